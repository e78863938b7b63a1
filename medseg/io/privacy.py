"""Third-party messages on paths that touch DICOM headers, captured and scrubbed of patient data.

pydicom and highdicom quote header values in their warnings and log records: highdicom's
"The string "DOE JOHN" is unlikely to represent the intended person name", pydicom's
"Invalid value for VR DA: '19511231x'", UIDs of the instances they copy from. Inside
``scrubbed_messages`` none of these reaches a handler: warnings are recorded, the ``pydicom`` and
``highdicom`` loggers hand their records to a collector instead of the application's handlers, and
on exit each distinct message is logged once at DEBUG on medseg's logger after ``scrub``:
every identifying value of the given datasets (whole and in parts, in any case), every quoted
string and every UID (replaced by its hash) are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import warnings
from collections.abc import Iterable, Iterator

log = logging.getLogger(__name__)

# Header attributes whose values identify a patient, a visit or a person
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
)
_LOGGERS = ("pydicom", "highdicom")
_UID = re.compile(r"\b[0-2](?:\.(?:0|[1-9][0-9]*)){3,}\b")
_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'|\u201c[^\u201d]*\u201d")
_REDACTED = "<redacted>"
_MIN_PART = 3  # name parts shorter than this ("Li", "Jo") are too common to redact everywhere
_MAX_MESSAGES = 5


def identifying_values(datasets: Iterable) -> list[str]:
    """The identifying strings in ``datasets`` (pydicom Datasets): each value, its forms and parts.

    A person name ``DOE^JOHN`` gives ``DOE^JOHN``, ``DOE JOHN``, ``DOE, JOHN``, ``DOE`` and ``JOHN``;
    a name without carets gives itself and its words.
    """
    found: set[str] = set()
    for ds in datasets:
        for keyword in IDENTIFYING:
            element = ds.get(keyword) if hasattr(ds, "get") else None
            values = element if isinstance(element, list | tuple) or _is_multi(element) else [element]
            for value in values:
                found |= _forms(value)
    return sorted((v for v in found if v), key=len, reverse=True)


def _is_multi(value) -> bool:
    return type(value).__name__ == "MultiValue"


def _forms(value) -> set[str]:
    if value is None:
        return set()
    text = str(value).strip()
    if not text:
        return set()
    forms = {text, text.replace("^", " ").strip(), text.replace("^", ", ").strip()}
    forms |= {" ".join(f.split()) for f in forms}
    parts = re.split(r"[\^=\s,]+", text)
    forms |= {p for p in parts if len(p) >= _MIN_PART}
    # escaped forms a library might print: repr of the str, of its UTF-8 bytes
    for form in list(forms):
        forms.add(ascii(form)[1:-1])
        forms.add(repr(form.encode("utf-8", "replace"))[2:-1])
    return forms


def uid_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def scrub(text: str, needles: Iterable[str] = ()) -> str:
    """``text`` without the given values (case-insensitive), quoted strings, or raw UIDs."""
    for needle in sorted(set(needles), key=len, reverse=True):
        if needle:
            text = re.sub(re.escape(needle), _REDACTED, text, flags=re.IGNORECASE)
    text = _QUOTED.sub(_REDACTED, text)
    text = _UID.sub(lambda m: f"uid:{uid_hash(m.group(0))}", text)
    return " ".join(text.split())


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def scrubbed_messages(datasets: Iterable = (), *, where: str = "") -> Iterator[None]:
    """Capture warnings and pydicom/highdicom log records; log them scrubbed at DEBUG on exit.

    Args:
        datasets: headers whose identifying values must not appear (more can be added by the caller
            later: the values are read on exit, so datasets filled inside the block count too).
        where: a file name (never a patient's) to prefix the messages with.
    """
    datasets = list(datasets)
    collector = _Collector()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(collector)
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg, propagate in saved:
            lg.removeHandler(collector)
            lg.propagate = propagate
    needles = identifying_values(datasets)
    texts = [str(w.message) for w in caught] + [_message(r) for r in collector.records]
    seen: list[str] = []
    for text in texts:
        cleaned = scrub(text, needles)
        if cleaned not in seen:
            seen.append(cleaned)
    for text in seen[:_MAX_MESSAGES]:
        log.debug("%s: %s", where or "dicom", text)
    if len(seen) > _MAX_MESSAGES:
        log.debug("%s: %d more library messages withheld", where or "dicom", len(seen) - _MAX_MESSAGES)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a broken format string in a library's log call
        return str(record.msg)
