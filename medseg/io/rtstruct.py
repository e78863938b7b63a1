"""RTSTRUCT out: a label map as contours a radiotherapy planning system reads.

One ROI per label, named after it and coloured as in the QC report, coded with the bundled SNOMED
CT map (``medseg.io.coding``). On every slice of the source series each connected region of a label
becomes a CLOSED_PLANAR contour (holes are contours of their own: planning systems fill contours
of one ROI on one slice with the even-odd rule) in patient coordinates (LPS, mm), traced at the
half-way level between the voxel centres inside and outside (marching squares, ``contourpy``), and
referencing the slice's image. The structure set references the source series and its frame of
reference and, like a DICOM SEG, copies the patient and study modules of its source so that the
planning system files it with the images; it is written only where the user asks for it.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import UID

from medseg.io.dicom_seg import complete_for_reference, named_label_values, read_source_headers
from medseg.io.volume import atomic_path

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
# the SOP class RTSTRUCTs conventionally reference a study by (Detached Study Management, retired)
_STUDY_REFERENCE_CLASS = "1.2.840.10008.3.1.2.3.1"
_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SpecificCharacterSet",
)


def slice_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed contours around the ``True`` voxels of one slice, as (n, 2) arrays of (i, j) indices.

    The first point is not repeated at the end (DICOM closes CLOSED_PLANAR contours itself).
    """
    import contourpy

    padded = np.pad(np.asarray(plane, dtype=np.float64), 1)  # regions at the border close too
    # contourpy indexes z[y, x]: rows are i, columns are j; its points are (x, y) = (j, i)
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    contours = []
    for line in generator.lines(0.5):
        points = np.asarray(line)[:, ::-1] - 1.0  # (x, y) -> (i, j), padding removed
        if len(points) > 1 and np.allclose(points[0], points[-1]):
            points = points[:-1]
        if len(points) >= 3:
            contours.append(points)
    return contours


def _slice_geometry(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(origin, 3x2 matrix) taking (i, j) on this slice to LPS mm: i along rows, j down columns."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return ipp, np.stack([iop[:3] * column_spacing, iop[3:] * row_spacing], axis=1)


def _contour_data(points: np.ndarray):
    """ContourData (3006,0050) as an already-encoded element: pydicom would otherwise parse and
    validate every one of the (often hundreds of thousands of) decimal strings twice."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    # DS holds at most 16 characters; micrometres are far below any planning system's resolution
    text = "\\".join(f"{v:.4f}".rstrip("0").rstrip(".") or "0" for v in points.ravel())
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b" "
    return RawDataElement(Tag(0x3006, 0x0050), "DS", len(raw), raw, 0, False, True)


def _image_reference(ds: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _roi_contours(mask: np.ndarray, value: int, sources: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    items: list[pydicom.Dataset] = []
    for k, ds in enumerate(sources):
        plane = mask[:, :, k] == value
        if not plane.any():
            continue
        origin, to_world = _slice_geometry(ds)
        for points in slice_contours(plane):
            world = points @ to_world.T + origin
            item = pydicom.Dataset()
            item.ContourImageSequence = [_image_reference(ds)]
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(world)
            item.ContourNumber = len(items) + 1
            item[0x30060050] = _contour_data(world)
            items.append(item)
    return items


def _references(sources: list[pydicom.Dataset]) -> pydicom.Dataset:
    first = sources[0]
    series = pydicom.Dataset()
    series.SeriesInstanceUID = first.SeriesInstanceUID
    series.ContourImageSequence = [_image_reference(ds) for ds in sources]
    study = pydicom.Dataset()
    study.ReferencedSOPClassUID = _STUDY_REFERENCE_CLASS
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [study]
    return frame


def _structure_set(sources: list[pydicom.Dataset], algorithm: tuple[str, str]) -> pydicom.dataset.FileDataset:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medseg import __version__

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    first = sources[0]
    for keyword in _PATIENT_STUDY:
        if keyword in first or keyword != "SpecificCharacterSet":
            setattr(ds, keyword, first.get(keyword, ""))
    now = datetime.datetime.now()
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(first.get("SeriesNumber", 0) or 0) + 2000
    ds.SeriesDescription = "medseg contours"
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = algorithm[0][:64]
    ds.SoftwareVersions = __version__
    ds.StructureSetLabel = algorithm[0][:16]
    ds.StructureSetName = f"{algorithm[0]} {algorithm[1]}"[:64]
    ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.OperatorsName = ""
    ds.ReferencedFrameOfReferenceSequence = [_references(sources)]
    ds.StructureSetROISequence = []
    ds.ROIContourSequence = []
    ds.RTROIObservationsSequence = []
    return ds


def _add_roi(ds, number: int, value: int, name: str, contours, code, algorithm: tuple[str, str]) -> None:
    from medseg.io.labeltables import label_rgb

    roi = pydicom.Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
    roi.ROIName = name[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = f"{algorithm[0]} {algorithm[1]}, label {value}"[:64]
    ds.StructureSetROISequence.append(roi)
    contour = pydicom.Dataset()
    contour.ReferencedROINumber = number
    contour.ROIDisplayColor = list(label_rgb(value))
    if contours:
        contour.ContourSequence = contours
    ds.ROIContourSequence.append(contour)
    observation = pydicom.Dataset()
    observation.ObservationNumber = number
    observation.ReferencedROINumber = number
    observation.ROIObservationLabel = name[:16]
    observation.RTROIInterpretedType = "ORGAN" if code.category.value == "91723000" else ""
    observation.ROIInterpreter = ""
    identification = pydicom.Dataset()
    identification.CodeValue = code.type.value
    identification.CodingSchemeDesignator = code.type.scheme
    identification.CodeMeaning = code.type.meaning
    observation.RTROIIdentificationCodeSequence = [identification]
    ds.RTROIObservationsSequence.append(observation)


def write_rtstruct(
    mask: np.ndarray,
    source_dir: str | Path,
    path: str | Path,
    *,
    labels: Mapping[int, str],
    series_id: str | None = None,
    overwrite: bool = True,
    codes: Mapping[Any, Any] | None = None,
    algorithm_name: str = "medseg",
    algorithm_version: str | None = None,
) -> Path:
    """Write ``mask`` (in the grid ``read_dicom_series(source_dir)`` gives) as an RT Structure Set.

    Args:
        mask: label map (i, j, k) on the source series' grid; 0 is background.
        source_dir: the DICOM folder (or file, or zipped study) the mask was computed from.
        path: the ``.dcm`` file to write.
        labels: label value -> name; each non-zero label becomes an ROI (numbered 1..N in label
            order), also when it holds no voxel (an ROI without contours).
        series_id: the series within ``source_dir`` (as for ``read_dicom_series``).
        overwrite: replace an existing file.
        codes: per-label codes overriding the bundled map (as for ``write_dicom_seg``).
        algorithm_name, algorithm_version: the model, recorded in the ROI generation description.

    Raises:
        InputError: the source series cannot be referenced (unreadable, multi-frame, tilted, no SOP UIDs).
        ValueError: the mask does not fit the series or holds labels not in ``labels``.
    """
    from medseg import __version__
    from medseg.io.coding import segment_code
    from medseg.io.privacy import scrubbed_messages

    path = Path(path)
    info, sources = read_source_headers(source_dir, mask.shape, series_id=series_id)
    values = named_label_values(mask, labels)
    algorithm = (str(algorithm_name), str(algorithm_version or __version__))
    with scrubbed_messages(sources, where=path.name):
        # blank UIDs (anonymisers) get the same stand-ins, and the same warning, as for a DICOM SEG
        complete_for_reference(sources, source_dir, info.uid_hash, what="RTSTRUCT")
        ds = _structure_set(sources, algorithm)
        mask = np.asarray(mask)
        for number, value in enumerate(values, start=1):
            contours = _roi_contours(mask, value, sources)
            code = segment_code(str(labels[value]), value, overrides=codes)
            _add_roi(ds, number, value, str(labels[value]), contours, code, algorithm)
        with atomic_path(path, overwrite=overwrite) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    n_contours = sum(len(c.get("ContourSequence", [])) for c in ds.ROIContourSequence)
    log.info(
        "%s: RTSTRUCT with %d ROI(s), %d contours for series %s",
        path.name,
        len(values),
        n_contours,
        info.uid_hash,
    )
    return path
