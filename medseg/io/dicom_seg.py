"""DICOM SEG out: a label map on a DICOM series' grid as a Segmentation object (highdicom).

The SEG references every source instance of the series (the same files, in the same
order along the slice normal, that ``read_dicom_series`` stacked into the volume), holds
one segment per label with its name, and is written atomically. A SEG is attached to
its study in a PACS through the patient and study modules it copies from the source
images, so unlike every other medseg output it carries the source's patient identity, as
the DICOM standard requires; it is written only where the user asks for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom

from medseg.errors import InputError
from medseg.io.dicom import one_line, series_files_in_grid_order
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
) -> Path:
    """Write ``mask`` (in the grid ``read_dicom_series(source_dir)`` gives) as a DICOM SEG.

    Args:
        mask: label map (i, j, k) on the source series' grid; 0 is background.
        source_dir: the DICOM folder (or file) the mask was computed from.
        path: the ``.dcm`` file to write.
        labels: label value -> name; each non-zero label becomes a segment, numbered 1..N in
            label order and labelled with its name.
        series_id: the series within ``source_dir`` (as for ``read_dicom_series``).
        overwrite: replace an existing file.

    Returns:
        ``path``.

    Raises:
        InputError: the source series cannot be referenced (unreadable, multi-frame, tilted).
        ValueError: the mask does not fit the series, or holds labels not in ``labels``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medseg import __version__

    path = Path(path)
    info, files = series_files_in_grid_order(source_dir, series_id=series_id)
    expected = (*info.size[:2], len(files))
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} does not fit series {info.uid_hash} of shape {expected}")
    segment_labels = sorted(v for v in labels if v != 0)
    unknown = sorted(set(np.unique(mask).tolist()) - set(segment_labels) - {0})
    if unknown:
        raise ValueError(f"mask holds labels {unknown} that have no name in labels {sorted(labels)}")
    if not segment_labels:
        raise ValueError("no non-zero labels to write as segments")
    lut = np.zeros(max(segment_labels) + 1, dtype=np.uint8)
    for number, value in enumerate(segment_labels, start=1):
        lut[value] = number
    # (i, j, k) = (column, row, slice) -> frames of (rows, columns), one per source instance
    frames = lut[np.asarray(mask, dtype=np.int64)].transpose(2, 1, 0)
    try:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except Exception as exc:
        raise InputError(source_dir, f"cannot re-read the source series ({one_line(exc)})") from exc
    _complete_for_reference(sources, source_dir, info.uid_hash)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medseg", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(labels[value])[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, value in enumerate(segment_labels, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name="medseg",
        software_versions=__version__,
        device_serial_number="none",
        series_description="medseg segmentation",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
    )
    with atomic_path(path, overwrite=overwrite) as tmp:
        seg.save_as(tmp)
    log.info("%s: DICOM SEG with %d segment(s) for series %s", path.name, len(descriptions), info.uid_hash)
    return path


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


def _complete_for_reference(sources: list[pydicom.Dataset], source_dir: str | Path, series_hash: str) -> None:
    """Make in-memory copies of the source headers referenceable (the files are never touched).

    Anonymisers that blank identifiers leave SOPClassUID/SOPInstanceUID empty in the dataset while
    the file meta still holds them; blank Study/Series UIDs get deterministic stand-ins, and a
    warning says that a PACS will not link such a SEG to its images.
    """
    from pydicom.uid import generate_uid

    stand_ins = []
    for ds in sources:
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not ds.get("SOPInstanceUID") or not ds.get("SOPClassUID"):
            raise InputError(
                source_dir, f"series {series_hash}: an instance has no SOP UIDs, a SEG cannot reference it"
            )
        for attr in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if not ds.get(attr):
                seed = [str(sources[0].get("FrameOfReferenceUID", "")), attr, series_hash]
                setattr(ds, attr, generate_uid(entropy_srcs=seed))
                stand_ins.append(attr)
        for attr in _TYPE2:
            if attr not in ds:
                setattr(ds, attr, "")
    if stand_ins:
        log.warning(
            "%s: series %s has blank %s; the DICOM SEG references stand-in UIDs, so a PACS will not "
            "link it to the images",
            source_dir,
            series_hash,
            "/".join(sorted(set(stand_ins))),
        )
