"""SNOMED CT codes for segment labels: what a PACS or a viewer reads a DICOM SEG segment as.

A DICOM segment says what it holds with two codes (DICOM PS3.16 CID 7150 for the category, CID 7151
and its relatives for the type) and, for paired organs, a laterality modifier (CID 244), as dcmqi and
TotalSegmentator code them: "kidney left" is Kidney (64033007) modified by Left (7771000). The map
below covers the structures of the Medical Segmentation Decathlon and the common abdominal, thoracic
and brain-tumour label sets; codes are SNOMED CT as DICOM lists them (pydicom's ``codes.SCT``).
A label not in the map is coded as the generic Tissue / Organ, and any label can be given its own
codes (``segment_code(name, overrides=...)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Coded:
    """One coded concept: scheme designator, code value, meaning."""

    scheme: str
    value: str
    meaning: str

    def concept(self):
        """As a highdicom ``CodedConcept``."""
        import highdicom as hd

        return hd.sr.CodedConcept(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


@dataclass(frozen=True)
class SegmentCode:
    """Category, type and optional type modifier (laterality) of a segment."""

    category: Coded
    type: Coded
    modifier: Coded | None = None


def _sct(value: str, meaning: str) -> Coded:
    return Coded("SCT", value, meaning)


ANATOMY = _sct("91723000", "Anatomical Structure")
ABNORMAL = _sct("49755003", "Morphologically Abnormal Structure")
TISSUE = _sct("85756007", "Tissue")
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")
FALLBACK = SegmentCode(TISSUE, _sct("91772007", "Organ"))

# normalised structure name -> (category, type); left/right forms are derived from these
_ORGANS: dict[str, Coded] = {
    "liver": _sct("10200004", "Liver"),
    "spleen": _sct("78961009", "Spleen"),
    "kidney": _sct("64033007", "Kidney"),
    "pancreas": _sct("15776009", "Pancreas"),
    "aorta": _sct("15825003", "Aorta"),
    "lung": _sct("39607008", "Lung"),
    "stomach": _sct("69695003", "Stomach"),
    "gallbladder": _sct("28231008", "Gallbladder"),
    "urinary bladder": _sct("89837001", "Bladder"),
    "prostate": _sct("41216001", "Prostate"),
    "peripheral zone of prostate": _sct("279706003", "Peripheral zone of the prostate"),
    "transition zone of prostate": _sct("399384005", "Transition zone of the prostate"),
    "esophagus": _sct("32849002", "Esophagus"),
    "duodenum": _sct("38848004", "Duodenum"),
    "small intestine": _sct("30315005", "Small intestine"),
    "colon": _sct("71854001", "Colon"),
    "rectum": _sct("34402009", "Rectum"),
    "heart": _sct("80891009", "Heart"),
    "brain": _sct("12738006", "Brain"),
    "hippocampus": _sct("5366008", "Hippocampus"),
    "trachea": _sct("44567001", "Trachea"),
    "inferior vena cava": _sct("64131007", "Inferior vena cava"),
    "portal vein": _sct("32764006", "Portal vein"),
    "adrenal gland": _sct("23451007", "Adrenal gland"),
    "blood vessel": _sct("59820001", "Blood vessel"),
    "vertebra": _sct("51282000", "Vertebra"),
    "bone": _sct("272673000", "Bone"),
    "muscle": _sct("71616004", "Muscle"),
    "thyroid": _sct("69748006", "Thyroid"),
}
_FINDINGS: dict[str, Coded] = {
    "necrosis": _sct("6574001", "Necrosis"),
    "edema": _sct("79654002", "Edema"),
    "neoplasm": _sct("108369006", "Neoplasm"),
    "lesion": _sct("52988006", "Lesion"),
    "mass": _sct("4147007", "Mass"),
    "cyst": _sct("367643001", "Cyst"),
}
# other names for the same structures (after normalisation: lower case, British -> US spelling)
_ALIASES = {
    "kidneys": "kidney",
    "lungs": "lung",
    "gall bladder": "gallbladder",
    "bladder": "urinary bladder",
    "oesophagus": "esophagus",
    "small bowel": "small intestine",
    "ivc": "inferior vena cava",
    "portal vein and splenic vein": "portal vein",
    "adrenal": "adrenal gland",
    "vessel": "blood vessel",
    "hepatic vessel": "blood vessel",
    "pz": "peripheral zone of prostate",
    "peripheral zone": "peripheral zone of prostate",
    "tz": "transition zone of prostate",
    "transition zone": "transition zone of prostate",
    "central gland": "transition zone of prostate",
    # brain tumour sub-regions (BraTS, MSD Task01) and other findings
    "necrotic core": "necrosis",
    "necrotic tumor core": "necrosis",
    "necrotic and non enhancing tumor core": "necrosis",
    "ncr": "necrosis",
    "peritumoral edema": "edema",
    "ed": "edema",
    "enhancing tumor": "neoplasm",
    "gd enhancing tumor": "neoplasm",
    "et": "neoplasm",
    "non enhancing tumor": "neoplasm",
    "tumor": "neoplasm",
    "tumor core": "neoplasm",
    "whole tumor": "neoplasm",
    "cancer": "neoplasm",
    "liver tumor": "neoplasm",
    "kidney tumor": "neoplasm",
    "pancreas tumor": "neoplasm",
    "colon cancer primaries": "neoplasm",
    "lung nodule": "neoplasm",
    "nodule": "mass",
}
_SPELLING = {"tumour": "tumor", "oedema": "edema", "haemorrhage": "hemorrhage", "oesophagus": "esophagus"}


def normalise(name: str) -> str:
    """Lower case, separators as spaces, US spelling: ``"Kidney_Left"`` -> ``"kidney left"``."""
    words = re.sub(r"[_\-/,().]+", " ", name.lower()).split()
    return " ".join(_SPELLING.get(w, w) for w in words)


def _lateral(words: str) -> tuple[str, Coded | None]:
    """Split a leading or trailing "left"/"right" off a normalised name."""
    parts = words.split()
    for index in (0, -1):
        if len(parts) > 1 and parts[index] in ("left", "right"):
            side = LEFT if parts.pop(index) == "left" else RIGHT
            return " ".join(parts), side
    return words, None


def bundled_code(name: str) -> SegmentCode | None:
    """The bundled code of a structure name, or None when it is not in the map."""
    words, side = _lateral(normalise(name))
    key = _ALIASES.get(words, words)
    if key in _ORGANS:
        return SegmentCode(ANATOMY, _ORGANS[key], side)
    if key in _FINDINGS and side is None:
        return SegmentCode(ABNORMAL, _FINDINGS[key])
    return None


def parse_coded(value: Any) -> Coded:
    """``"SCT:10200004:Liver"``, ``["SCT", "10200004", "Liver"]`` or ``{scheme, value, meaning}``."""
    if isinstance(value, str):
        parts = value.split(":", 2)
    elif isinstance(value, Mapping):
        parts = [value.get("scheme", ""), value.get("value", ""), value.get("meaning", "")]
    else:
        parts = list(value)
    if len(parts) != 3 or not all(str(p).strip() for p in parts):
        raise ValueError(f"a code is SCHEME:VALUE:MEANING (e.g. SCT:10200004:Liver), got {value!r}")
    return Coded(*(str(p).strip() for p in parts))


def parse_override(value: Any) -> SegmentCode:
    """One label's codes from config: ``{category: ..., type: ..., modifier: ...}`` (modifier optional)."""
    if isinstance(value, SegmentCode):
        return value
    if not isinstance(value, Mapping) or not {"category", "type"} <= set(value):
        raise ValueError(
            f"a segment code needs 'category' and 'type' (and optionally 'modifier'), got {value!r}"
        )
    unknown = set(value) - {"category", "type", "modifier"}
    if unknown:
        raise ValueError(
            f"unknown keys {sorted(unknown)} in a segment code; expected category, type, modifier"
        )
    modifier = value.get("modifier")
    return SegmentCode(
        parse_coded(value["category"]),
        parse_coded(value["type"]),
        None if modifier is None else parse_coded(modifier),
    )


def segment_code(
    name: str, value: int | None = None, *, overrides: Mapping[Any, Any] | None = None
) -> SegmentCode:
    """The codes of one label: an override (by label name or value) first, then the bundled map, then
    the generic Tissue / Organ."""
    for key in (name, None if value is None else str(value), value):
        if overrides and key is not None and key in overrides:
            return parse_override(overrides[key])
    return bundled_code(name) or FALLBACK
