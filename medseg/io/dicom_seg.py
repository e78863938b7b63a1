"""DICOM SEG out: a label map on a DICOM series' grid as a Segmentation object (highdicom).

The SEG references every source instance of the series (the same files, in the same
order along the slice normal, that ``read_dicom_series`` stacked into the volume), holds
one segment per label with its name, its SNOMED CT codes (``medseg.io.coding``), its display
colour (the QC overlay's, as CIELab) and the model as algorithm identification, and is written
atomically. The source may be a zipped study (extracted again, into a temporary folder). A SEG is attached to
its study in a PACS through the patient and study modules it copies from the source
images, so unlike every other medseg output it carries the source's patient identity, as
the DICOM standard requires; it is written only where the user asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medseg.errors import InputError, one_line
from medseg.io.dicom import SeriesInfo, series_files_in_grid_order
from medseg.io.volume import atomic_path

log = logging.getLogger(__name__)


def write_dicom_seg(
    mask: np.ndarray,
    source_dir: str | Path,
    path: str | Path,
    *,
    labels: dict[int, str],
    series_id: str | None = None,
    overwrite: bool = True,
    codes: Mapping[Any, Any] | None = None,
    algorithm_name: str = "medseg",
    algorithm_version: str | None = None,
) -> Path:
    """Write ``mask`` (in the grid ``read_dicom_series(source_dir)`` gives) as a DICOM SEG.

    Args:
        mask: label map (i, j, k) on the source series' grid; 0 is background.
        source_dir: the DICOM folder (or file, or zipped study) the mask was computed from.
        path: the ``.dcm`` file to write.
        labels: label value -> name; each non-zero label becomes a segment, numbered 1..N in
            label order and labelled with its name.
        series_id: the series within ``source_dir`` (as for ``read_dicom_series``).
        overwrite: replace an existing file.
        codes: per-label codes overriding the bundled map, keyed by label name or value:
            ``{"tumour": {"category": "SCT:49755003:Morphologically Abnormal Structure",
            "type": "SCT:108369006:Neoplasm"}}`` (see ``medseg.io.coding.parse_override``).
        algorithm_name: the model's name, recorded as the segments' algorithm identification.
        algorithm_version: the model's version (default: medseg's version).

    Returns:
        ``path``.

    Raises:
        InputError: the source series cannot be referenced (unreadable, multi-frame, tilted).
        ValueError: the mask does not fit the series, holds labels not in ``labels``, or an
            override is not a valid code.
    """
    from medseg.io.privacy import scrubbed_messages

    path = Path(path)
    info, sources = read_source_headers(source_dir, mask.shape, series_id=series_id)
    with scrubbed_messages(sources, where=path.name):
        complete_for_reference(sources, source_dir, info.uid_hash)
        seg = _segmentation(mask, sources, labels, codes=codes, algorithm=(algorithm_name, algorithm_version))
        with atomic_path(path, overwrite=overwrite) as tmp:
            seg.save_as(tmp)
    log.info(
        "%s: DICOM SEG with %d segment(s) for series %s", path.name, len(seg.SegmentSequence), info.uid_hash
    )
    return path


def read_source_headers(
    source_dir: str | Path, mask_shape: tuple[int, ...], *, series_id: str | None = None
) -> tuple[SeriesInfo, list[pydicom.Dataset]]:
    """The headers (no pixels) of the source series a DICOM SEG or RTSTRUCT references, in the
    order of the mask's k axis; ``source_dir`` is a folder or a zipped study (never modified).

    Raises:
        InputError: the series cannot be read, is multi-frame or tilted, or a file cannot be re-read.
        ValueError: ``mask_shape`` is not the series' (columns, rows, slices).
    """
    from medseg.io.archive import dicom_source

    with dicom_source(source_dir) as folder:
        info, files = series_files_in_grid_order(folder, series_id=series_id)
        expected = (*info.size[:2], len(files))
        if tuple(mask_shape) != expected:
            raise ValueError(
                f"mask shape {tuple(mask_shape)} does not fit series {info.uid_hash} of shape {expected}"
            )
        try:
            sources: list[pydicom.Dataset] = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        except Exception as exc:
            raise InputError(source_dir, f"cannot re-read the source series ({one_line(exc)})") from exc
    return info, sources


def named_label_values(mask: np.ndarray, labels: Mapping[int, str]) -> list[int]:
    """The non-zero label values of ``labels``, sorted; a value in ``mask`` without a name is a ValueError."""
    values = sorted(int(v) for v in labels if v != 0)
    unknown = sorted(set(np.unique(mask).tolist()) - set(values) - {0})
    if unknown:
        raise ValueError(f"mask holds labels {unknown} that have no name in labels {sorted(labels)}")
    return values


def _segment_values(mask: np.ndarray, labels: dict[int, str]) -> list[int]:
    segment_labels = named_label_values(mask, labels)
    if not segment_labels:
        raise ValueError("no non-zero labels to write as segments")
    return segment_labels


def segment_descriptions(
    labels: dict[int, str],
    *,
    codes: Mapping[Any, Any] | None = None,
    algorithm: tuple[str, str | None] = ("medseg", None),
) -> list:
    """One highdicom ``SegmentDescription`` per non-zero label: name, SNOMED codes, colour, algorithm."""
    import highdicom as hd
    from pydicom.sr.codedict import codes as dicom_codes

    from medseg import __version__
    from medseg.io.coding import segment_code
    from medseg.io.labeltables import label_rgb

    name, version = algorithm
    identification = hd.AlgorithmIdentificationSequence(
        name=str(name)[:64],
        family=dicom_codes.cid7162.ArtificialIntelligence,
        version=str(version or __version__)[:64],
    )
    descriptions = []
    for number, value in enumerate(sorted(v for v in labels if v != 0), start=1):
        code = segment_code(str(labels[value]), value, overrides=codes)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(labels[value])[:64],
            segmented_property_category=code.category.concept(),
            segmented_property_type=code.type.concept(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*label_rgb(value)),
        )
        if code.modifier is not None:  # laterality of a paired organ (DICOM CID 244)
            item = description.SegmentedPropertyTypeCodeSequence[0]
            item.SegmentedPropertyTypeModifierCodeSequence = [code.modifier.concept()]
        descriptions.append(description)
    return descriptions


def _segmentation(
    mask: np.ndarray,
    sources: list[pydicom.Dataset],
    labels: dict[int, str],
    *,
    codes: Mapping[Any, Any] | None,
    algorithm: tuple[str, str | None],
):
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medseg import __version__

    segment_labels = _segment_values(mask, labels)
    lut = np.zeros(max(segment_labels) + 1, dtype=np.uint8)
    for number, value in enumerate(segment_labels, start=1):
        lut[value] = number
    # (i, j, k) = (column, row, slice) -> frames of (rows, columns), one per source instance
    frames = lut[np.asarray(mask, dtype=np.int64)].transpose(2, 1, 0)
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(labels, codes=codes, algorithm=algorithm),
        series_instance_uid=generate_uid(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name=str(algorithm[0])[:64],
        software_versions=__version__,
        device_serial_number="none",
        series_description="medseg segmentation",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
    )


# Type 2 attributes of the patient and study modules a SEG must carry (empty when the source lacks them).
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def stand_in_uid(first: pydicom.Dataset, attr: str, series_hash: str) -> str:
    """The UID a SEG or RTSTRUCT references where the series' ``attr`` is blank: the same for the
    same series every time, so that ``medseg.io.dicom_labels`` finds the series again."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(first.get("FrameOfReferenceUID", "")), attr, series_hash]))


def complete_for_reference(
    sources: list[pydicom.Dataset], source_dir: str | Path, series_hash: str, *, what: str = "DICOM SEG"
) -> None:
    """Make in-memory copies of the source headers referenceable (the files are never touched).

    Anonymisers that blank identifiers leave SOPClassUID/SOPInstanceUID empty in the dataset while
    the file meta still holds them; blank Study/Series UIDs get deterministic stand-ins, and a
    warning says that a PACS will not link such a SEG to its images.
    """

    stand_ins = []
    for ds in sources:
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not ds.get("SOPInstanceUID") or not ds.get("SOPClassUID"):
            raise InputError(
                source_dir, f"series {series_hash}: an instance has no SOP UIDs, a {what} cannot reference it"
            )
        for attr in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if not ds.get(attr):
                setattr(ds, attr, stand_in_uid(sources[0], attr, series_hash))
                stand_ins.append(attr)
        for attr in _TYPE2:
            if attr not in ds:
                setattr(ds, attr, "")
    if stand_ins:
        log.warning(
            "%s: series %s has blank %s; the %s references stand-in UIDs, so a PACS will not "
            "link it to the images",
            source_dir,
            series_hash,
            "/".join(sorted(set(stand_ins))),
            what,
        )
