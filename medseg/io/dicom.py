"""DICOM series: find them in a folder, read one with exact geometry, write one.

Reading is done with pydicom (decoders: pylibjpeg for JPEG/JPEG-LS/JPEG 2000/RLE,
python-gdcm as a fallback) and geometry is computed here from the headers, never
trusted to a library default: slices are sorted by their position along the slice
normal, gaps and duplicates are refused, and the affine is built from
ImageOrientationPatient / ImagePositionPatient / PixelSpacing, in RAS millimetres.

Patient-identifying fields are never copied out of a header: a ``Volume`` only
gets the keys in ``SAFE_META_KEYS`` and a hash of the series UID.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.errors import InputError
from medseg.io.volume import Volume

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# SOP classes that hold no pixel volume: structured reports, RT structures,
# segmentations, presentation states, key objects, raw data.
_NON_IMAGE_MODALITIES = {"SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "SEG", "PR", "KO", "REG", "RAW", "DOC"}
_GAP_FACTOR = 1.5
_ORIENTATION_TOL = 1e-3


def uid_hash(uid: str) -> str:
    """Short stable hash of a UID: traceable in logs without revealing the UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


@dataclass
class _SliceHeader:
    path: Path
    series_key: str
    series_uid: str
    modality: str
    description: str
    iop: np.ndarray
    ipp: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    instance: int | None
    frames: int
    image_type: tuple[str, ...]
    transfer_syntax: str
    manufacturer: str


@dataclass
class SeriesInfo:
    """One image series (or one geometric stack within a series) found on disk."""

    series_id: str  # SeriesInstanceUID, or "hash:<12 hex>" when the UID is blank
    modality: str
    description: str
    files: list[Path]
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str  # axial / coronal / sagittal / oblique
    transfer_syntax: str
    problems: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return len(self.files)

    @property
    def uid_hash(self) -> str:
        return uid_hash(self.series_id)


@dataclass
class ScanResult:
    series: list[SeriesInfo]
    skipped: list[tuple[Path, str]]


def _orientation_name(iop: np.ndarray) -> str:
    normal = np.cross(iop[:3], iop[3:])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.99:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _candidate_files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            yield path


def _read_header(path: Path) -> _SliceHeader | str:
    """A slice's geometry header, or the reason the file is not a usable image slice."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return "not a DICOM file"
    except Exception as exc:
        return f"unreadable DICOM header ({type(exc).__name__}: {exc})"
    modality = str(ds.get("Modality", "") or "")
    if modality.upper() in _NON_IMAGE_MODALITIES:
        return f"non-image object (modality {modality})"
    # stop_before_pixels hides PixelData: an image object is recognised by its dimensions
    if "Rows" not in ds or "Columns" not in ds:
        return "no pixel data (not an image object)"
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    if "LOCALIZER" in image_type:
        return "localizer/scout image"
    if "SCREEN SHOT" in image_type or ("SECONDARY" in image_type and modality.upper() == "OT"):
        return "derived screenshot"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    iop_raw = ds.get("ImageOrientationPatient")
    ipp_raw = ds.get("ImagePositionPatient")
    ps_raw = ds.get("PixelSpacing")
    if frames > 1 and (iop_raw is None or ipp_raw is None):
        return "multi-frame (enhanced) object: not supported as a series slice yet"
    if iop_raw is None or ipp_raw is None:
        return "no ImageOrientationPatient/ImagePositionPatient (not a cross-sectional slice)"
    if ps_raw is None:
        return "no PixelSpacing"
    try:
        iop = np.asarray([float(v) for v in iop_raw], dtype=np.float64)
        ipp = np.asarray([float(v) for v in ipp_raw], dtype=np.float64)
        pixel_spacing = (float(ps_raw[0]), float(ps_raw[1]))
    except (TypeError, ValueError):
        return "malformed geometry tags (ImageOrientationPatient/ImagePositionPatient/PixelSpacing)"
    if iop.shape != (6,) or ipp.shape != (3,) or min(pixel_spacing) <= 0:
        return "malformed geometry tags (wrong number of values or non-positive spacing)"
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    # Blank series UIDs (anonymised by blanking) fall back to what still tells series apart.
    fallback = "|".join(
        str(ds.get(tag, "") or "")
        for tag in (
            "StudyInstanceUID",
            "FrameOfReferenceUID",
            "SeriesNumber",
            "SeriesDescription",
            "Modality",
        )
    )
    series_key = uid or f"hash:{uid_hash(fallback)}"
    instance = ds.get("InstanceNumber")
    return _SliceHeader(
        path=path,
        series_key=series_key,
        series_uid=uid,
        modality=modality,
        description=str(ds.get("SeriesDescription", "") or ""),
        iop=iop,
        ipp=ipp,
        pixel_spacing=pixel_spacing,
        rows=int(ds.get("Rows", 0)),
        cols=int(ds.get("Columns", 0)),
        instance=int(instance) if instance not in (None, "") else None,
        frames=frames,
        image_type=image_type,
        transfer_syntax=str(
            getattr(ds.file_meta, "TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
        ),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
    )


def _stacks(headers: list[_SliceHeader]) -> list[list[_SliceHeader]]:
    """Split one series' slices into geometric stacks (same orientation and matrix size)."""
    stacks: list[list[_SliceHeader]] = []
    for hdr in headers:
        for stack in stacks:
            ref = stack[0]
            if np.allclose(ref.iop, hdr.iop, atol=_ORIENTATION_TOL) and (ref.rows, ref.cols) == (
                hdr.rows,
                hdr.cols,
            ):
                stack.append(hdr)
                break
        else:
            stacks.append([hdr])
    return stacks


def _stack_geometry(stack: list[_SliceHeader]) -> tuple[list[_SliceHeader], np.ndarray, list[str]]:
    """Sort slices along the normal; return them, the LPS affine, and problems found."""
    ref = stack[0]
    row_dir, col_dir = ref.iop[:3], ref.iop[3:]
    normal = np.cross(row_dir, col_dir)
    problems: list[str] = []
    ordered = sorted(stack, key=lambda h: float(np.dot(h.ipp, normal)))
    spacing_set = {tuple(np.round(h.pixel_spacing, 4)) for h in ordered}
    if len(spacing_set) > 1:
        problems.append(f"inconsistent PixelSpacing within the series: {sorted(spacing_set)}")
    row_spacing, col_spacing = ref.pixel_spacing  # PixelSpacing = [between rows, between columns]
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 3] = ordered[0].ipp
    if len(ordered) == 1:
        affine[:3, 2] = normal * 1.0
        return ordered, affine, problems
    offsets = np.asarray([np.dot(h.ipp, normal) for h in ordered])
    steps = np.diff(offsets)
    if np.any(steps < 1e-3):
        dup = [str(ordered[i + 1].path.name) for i in np.flatnonzero(steps < 1e-3)[:3]]
        problems.append(f"duplicated slice positions (e.g. {', '.join(dup)})")
        affine[:3, 2] = normal
        return ordered, affine, problems
    step = float(np.median(steps))
    if np.any(steps > _GAP_FACTOR * step):
        where = [
            f"{offsets[i]:.2f}->{offsets[i + 1]:.2f} mm"
            for i in np.flatnonzero(steps > _GAP_FACTOR * step)[:3]
        ]
        problems.append(
            f"missing slice(s): gap larger than {_GAP_FACTOR}x the median step {step:.3f} mm at {', '.join(where)}"
        )
    elif not np.allclose(steps, step, rtol=0.05, atol=0.01):
        problems.append(f"uneven slice spacing (steps from {steps.min():.3f} to {steps.max():.3f} mm)")
    slice_vec = (ordered[-1].ipp - ordered[0].ipp) / (len(ordered) - 1)
    cos_tilt = float(np.dot(slice_vec, normal) / np.linalg.norm(slice_vec))
    if cos_tilt < 0.9999:
        tilt = float(np.degrees(np.arccos(min(1.0, cos_tilt))))
        problems.append(
            f"gantry tilt of {tilt:.2f} degrees (slices are sheared): not supported; resample the series first"
        )
    affine[:3, 2] = slice_vec
    return ordered, affine, problems


def scan_dicom(root: str | Path) -> ScanResult:
    """Find every image series under ``root`` (recursively) without reading pixels."""
    root = Path(root)
    if not root.exists():
        raise InputError(root, "not found")
    skipped: list[tuple[Path, str]] = []
    by_series: dict[str, list[_SliceHeader]] = defaultdict(list)
    for path in _candidate_files(root):
        hdr = _read_header(path)
        if isinstance(hdr, str):
            skipped.append((path, hdr))
        else:
            by_series[hdr.series_key].append(hdr)
    series: list[SeriesInfo] = []
    for key, headers in by_series.items():
        stacks = sorted(_stacks(headers), key=len, reverse=True)
        for n, stack in enumerate(stacks):
            if n > 0 and len(stack) <= 3:
                for hdr in stack:
                    skipped.append(
                        (
                            hdr.path,
                            "slice whose orientation/size differs from the rest of its series (scout?)",
                        )
                    )
                continue
            ordered, affine, problems = _stack_geometry(stack)
            spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
            series_id = key if n == 0 else f"{key}#{n}"
            series.append(
                SeriesInfo(
                    series_id=series_id,
                    modality=ordered[0].modality,
                    description=ordered[0].description,
                    files=[h.path for h in ordered],
                    size=(ordered[0].cols, ordered[0].rows, len(ordered)),
                    spacing=spacing,  # type: ignore[arg-type]
                    orientation=_orientation_name(ordered[0].iop),
                    transfer_syntax=ordered[0].transfer_syntax,
                    problems=problems,
                )
            )
    series.sort(key=lambda s: s.n_slices, reverse=True)
    return ScanResult(series=series, skipped=skipped)


def select_series(scan: ScanResult, root: Path, series_id: str | None = None) -> SeriesInfo:
    """The series a user means: the one named, or the main one (most slices)."""
    if not scan.series:
        reasons = sorted({reason for _, reason in scan.skipped})
        detail = f" (skipped {len(scan.skipped)} files: {'; '.join(reasons[:4])})" if scan.skipped else ""
        raise InputError(root, f"no DICOM image series found{detail}")
    if series_id is not None:
        matches = [
            s
            for s in scan.series
            if s.series_id == series_id or s.uid_hash == series_id or s.series_id.startswith(series_id)
        ]
        if not matches:
            listing = ", ".join(s.series_id for s in scan.series)
            raise InputError(root, f"no series {series_id!r}; found: {listing}")
        return matches[0]
    chosen = scan.series[0]
    if len(scan.series) > 1:
        if scan.series[1].n_slices == chosen.n_slices:
            listing = "; ".join(
                f"{s.series_id} ({s.n_slices} slices, {s.description or 'no description'})"
                for s in scan.series
            )
            raise InputError(root, f"holds several series of equal size; choose one with --series: {listing}")
        log.info(
            "%s: %d series found; using series %s (%d slices, the largest)",
            root,
            len(scan.series),
            uid_hash(chosen.series_id),
            chosen.n_slices,
        )
    return chosen


def _decode_slice(path: Path) -> tuple[np.ndarray, pydicom.Dataset]:
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:
        raise InputError(path, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if pixels.ndim != 2:
        raise InputError(path, f"expected a single 2D frame, got pixel array of shape {pixels.shape}")
    return pixels, ds


def read_dicom_series(root: str | Path, *, series_id: str | None = None) -> Volume:
    """Read one series from a folder (or a single file) into a RAS ``Volume`` of float32 values.

    Values are rescaled per slice (RescaleSlope/RescaleIntercept, e.g. Hounsfield units for CT).

    Raises:
        InputError: no usable series, ambiguous choice, missing/duplicated slices,
            inconsistent geometry, or undecodable pixels; the message names the file.
    """
    root = Path(root)
    scan = scan_dicom(root)
    info = select_series(scan, root, series_id)
    if info.problems:
        raise InputError(root, f"series {uid_hash(info.series_id)}: " + "; ".join(info.problems))
    headers = [h for h in (_read_header(p) for p in info.files) if not isinstance(h, str)]
    ordered, affine_lps, problems = _stack_geometry(headers)
    if problems:
        raise InputError(root, "; ".join(problems))
    slices = []
    photometric = ""
    for hdr in ordered:
        pixels, ds = _decode_slice(hdr.path)
        if pixels.shape != (hdr.rows, hdr.cols):
            raise InputError(
                hdr.path, f"pixel array {pixels.shape} does not match Rows x Columns {(hdr.rows, hdr.cols)}"
            )
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if photometric == "MONOCHROME1":
            # MONOCHROME1: low values display bright. Flip so that higher means brighter.
            bits = int(ds.get("BitsStored", 16))
            values = (np.float32((2**bits - 1) * slope + 2 * intercept)) - values
        slices.append(values.T)  # (rows, cols) -> (i along row direction, j along column direction)
    array = np.stack(slices, axis=-1)
    meta = {
        "modality": info.modality,
        "series_description": info.description,
        "series_uid_hash": info.uid_hash,
        "manufacturer": ordered[0].manufacturer,
        "transfer_syntax": info.transfer_syntax,
        "photometric": photometric,
        "n_slices": len(ordered),
        "orientation": info.orientation,
        "source_format": "dicom",
        "kind": "image",
    }
    return Volume(array=array, affine=LPS_TO_RAS @ affine_lps, meta=meta, source=str(root))


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    modality: str = "CT",
    series_description: str = "medseg synthetic",
    patient_name: str = "SYNTHETIC^PHANTOM",
    patient_id: str = "SYNTH0000",
    study_uid: str | None = None,
    series_uid: str | None = None,
    intercept: float = -1024.0,
    instance_order: str = "position",
) -> list[Path]:
    """Write a volume as a single-frame DICOM series (uncompressed, little endian).

    Slice k holds ``volume.array[:, :, k]``; ImagePositionPatient and
    ImageOrientationPatient encode ``volume.affine`` exactly (up to DS precision).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.linalg.inv(LPS_TO_RAS) @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir = lps[:3, 0] / spacing[0]
    col_dir = lps[:3, 1] / spacing[1]
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    stored = np.rint(volume.array - intercept)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("values out of the uint16 range after the intercept")
    stored = stored.astype(np.uint16)
    n = volume.shape[2]
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.SeriesDescription = series_description
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1 if instance_order == "position" else n - k
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.StudyDate = "20260101"
        ds.Manufacturer = "medseg"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        position = lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = "1"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
