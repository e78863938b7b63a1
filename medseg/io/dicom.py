"""DICOM series: find them in a folder, read one with exact geometry, write one.

Reading is done with pydicom (decoders: pylibjpeg-libjpeg for JPEG baseline/lossless,
pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS, pylibjpeg-rle for RLE,
python-gdcm as a fallback) and geometry is computed here from the headers, never
trusted to a library default: slices are sorted by their position along the slice
normal (not by InstanceNumber), gaps, duplicates, mixed orientation or spacing and
gantry tilt are refused (tilt can be resampled on request), and the affine is built
from ImageOrientationPatient / ImagePositionPatient / PixelSpacing, in RAS millimetres.
Enhanced (multi-frame) objects are read frame by frame from their per-frame
functional groups. Pixel data are checked before decoding: a truncated slice is refused.

Patient-identifying fields are never copied out of a header: a ``Volume`` only
gets the keys in ``SAFE_META_KEYS`` and a hash of the series UID; messages and
logs name files and hashed UIDs, never header values.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.errors import InputError, one_line
from medseg.io.volume import Volume

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Objects that hold no pixel volume: structured reports, RT objects, segmentations,
# presentation states, key objects, registrations, raw data, encapsulated documents.
_NON_IMAGE_MODALITIES = {
    "SR",
    "RTSTRUCT",
    "RTPLAN",
    "RTDOSE",
    "RTRECORD",
    "SEG",
    "PR",
    "KO",
    "REG",
    "RAW",
    "DOC",
    "PLAN",
    "FID",
}
_NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.66": "segmentation/registration/raw data object",
    "1.2.840.10008.5.1.4.1.1.88": "structured report",
    "1.2.840.10008.5.1.4.1.1.11": "presentation state",
    "1.2.840.10008.5.1.4.1.1.481": "RT object",
    "1.2.840.10008.5.1.4.1.1.104": "encapsulated document",
}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_GAP_FACTOR = 1.5
_ORIENTATION_TOL = 1e-3
_SCOUT_MIN_ANGLE_DEG = 10.0  # a stray stack tilted less than this is a broken series, not a scout
_PRIMARY_MODALITIES = {"CT", "MR", "PT", "NM", "US"}


def uid_hash(uid: str) -> str:
    """Short stable hash of a UID: traceable in logs without revealing the UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


@contextlib.contextmanager
def _quiet(path: Path) -> Iterator[None]:
    """pydicom warns on stderr about odd values (quoting them); medseg decides itself what is fatal,
    and the messages are logged at DEBUG scrubbed of header values (``medseg.io.privacy``)."""
    from medseg.io.privacy import scrubbed_messages

    with scrubbed_messages(where=str(path)):
        yield


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
    frame: int | None = None  # index of the frame in an enhanced multi-frame object
    slope: float | None = None  # per-frame rescale of an enhanced object
    intercept: float | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name}[frame {self.frame + 1}]"


@dataclass
class SeriesInfo:
    """One image series (or one geometric stack within a series) found on disk."""

    series_id: str  # SeriesInstanceUID, or "hash:<12 hex>" when the UID is blank; "#n" for extra stacks
    modality: str
    description: str
    files: list[Path]
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str  # axial / coronal / sagittal / oblique
    transfer_syntax: str
    problems: list[str] = field(default_factory=list)
    original: bool = True  # ImageType ORIGINAL (not DERIVED/SECONDARY)
    n_frames: int = 0

    @property
    def n_slices(self) -> int:
        return self.n_frames or len(self.files)

    @property
    def uid_hash(self) -> str:
        return uid_hash(self.series_id)

    def label(self) -> str:
        """How messages and logs name the series: hashed UID, modality, description, size."""
        return (
            f"{self.uid_hash} ({self.modality or '?'}, {self.description or 'no description'!r}, "
            f"{self.n_slices} slices, {self.orientation})"
        )


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


def _floats(values, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _check_geometry(iop: np.ndarray | None, ipp: np.ndarray | None, ps: np.ndarray | None) -> str | None:
    if iop is None or ipp is None or ps is None:
        return "malformed geometry tags (ImageOrientationPatient/ImagePositionPatient/PixelSpacing)"
    if ps.min() <= 0:
        return f"non-positive PixelSpacing {ps.tolist()}"
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        return f"ImageOrientationPatient {iop.round(4).tolist()} is not two orthogonal unit vectors"
    return None


def _read_headers(path: Path) -> list[_SliceHeader] | str:
    """A file's slice headers (one per frame), or the reason it is not a usable image."""
    try:
        with _quiet(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return "not a DICOM file"
    except Exception as exc:
        return f"unreadable DICOM header ({one_line(exc, with_type=True)})"
    try:
        with _quiet(path):
            return _headers_from_dataset(path, ds)
    except Exception as exc:  # a malformed element surfaces only when it is accessed
        return f"malformed DICOM header ({one_line(exc, with_type=True)})"


def _headers_from_dataset(path: Path, ds: pydicom.Dataset) -> list[_SliceHeader] | str:
    modality = str(ds.get("Modality", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if modality.upper() in _NON_IMAGE_MODALITIES:
        return f"non-image object (modality {modality})"
    for prefix, what in _NON_IMAGE_SOP_PREFIXES.items():
        if sop_class.startswith(prefix):
            return f"non-image object ({what})"
    # stop_before_pixels hides PixelData: an image object is recognised by its dimensions
    if "Rows" not in ds or "Columns" not in ds:
        declared = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if declared is not None and "Image Storage" in getattr(declared, "name", ""):
            # pydicom stops quietly at the end of a truncated file: the file meta still says "image"
            return (
                f"unreadable DICOM header: the file declares {declared.name} but ends before its image "
                "attributes (truncated file?)"
            )
        return "no pixel data (not an image object)"
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer/scout image"
    if "SCREEN SHOT" in image_type or sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "derived screenshot / secondary capture"
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        return f"colour image (SamplesPerPixel {samples}), not a greyscale cross-sectional slice"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
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
    instance = ds.get("InstanceNumber")
    common: dict[str, Any] = {
        "path": path,
        "series_key": uid or f"hash:{uid_hash(fallback)}",
        "series_uid": uid,
        "modality": modality,
        "description": str(ds.get("SeriesDescription", "") or ""),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "instance": int(instance) if instance not in (None, "") else None,
        "frames": frames,
        "image_type": image_type,
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
        "manufacturer": str(ds.get("Manufacturer", "") or ""),
    }
    if common["rows"] <= 0 or common["cols"] <= 0:
        return f"empty image matrix (Rows {common['rows']}, Columns {common['cols']})"
    if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds, common)
    iop_raw = ds.get("ImageOrientationPatient")
    ipp_raw = ds.get("ImagePositionPatient")
    ps_raw = ds.get("PixelSpacing")
    if iop_raw is None or ipp_raw is None:
        return "no ImageOrientationPatient/ImagePositionPatient (not a cross-sectional slice)"
    if ps_raw is None:
        return "no PixelSpacing"
    iop, ipp, ps = _floats(iop_raw, 6), _floats(ipp_raw, 3), _floats(ps_raw, 2)
    problem = _check_geometry(iop, ipp, ps)
    if problem:
        return problem
    # _check_geometry rejects a missing tag
    assert iop is not None
    assert ipp is not None
    assert ps is not None
    return [_SliceHeader(iop=iop, ipp=ipp, pixel_spacing=(float(ps[0]), float(ps[1])), **common)]


def _enhanced_frames(ds: pydicom.Dataset, common: dict[str, Any]) -> list[_SliceHeader] | str:
    """Per-frame geometry of an enhanced multi-frame object from its functional groups."""
    frames = common["frames"]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if not per_frame or len(per_frame) != frames:
        return (
            f"multi-frame object ({frames} frames) without per-frame geometry "
            "(PerFrameFunctionalGroupsSequence): cannot place its frames in space"
        )

    def group(fg, name: str):
        for source in (fg, shared):
            seq = source.get(name) if source is not None else None
            if seq:
                return seq[0]
        return None

    headers = []
    for f, fg in enumerate(per_frame):
        pos, ori, pix = (
            group(fg, "PlanePositionSequence"),
            group(fg, "PlaneOrientationSequence"),
            group(fg, "PixelMeasuresSequence"),
        )
        if pos is None or ori is None or pix is None:
            return (
                f"multi-frame object: frame {f + 1} has no plane position, orientation or pixel spacing "
                "in its functional groups"
            )
        iop = _floats(ori.get("ImageOrientationPatient") or [], 6)
        ipp = _floats(pos.get("ImagePositionPatient") or [], 3)
        ps = _floats(pix.get("PixelSpacing") or [], 2)
        problem = _check_geometry(iop, ipp, ps)
        if problem:
            return f"multi-frame object, frame {f + 1}: {problem}"
        # _check_geometry rejects a missing tag
        assert iop is not None
        assert ipp is not None
        assert ps is not None
        pvt = group(fg, "PixelValueTransformationSequence")
        slope = intercept = None
        if pvt is not None:
            slope = float(pvt.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(pvt.get("RescaleIntercept", 0.0) or 0.0)
        headers.append(
            _SliceHeader(
                iop=iop,
                ipp=ipp,
                pixel_spacing=(float(ps[0]), float(ps[1])),
                frame=f,
                slope=slope,
                intercept=intercept,
                **common,
            )
        )
    return headers


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


def _normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


@dataclass
class _Geometry:
    ordered: list[_SliceHeader]
    affine: np.ndarray  # LPS; for a tilted stack, the orthogonal grid it would be resampled to
    problems: list[str]
    shear_mm: np.ndarray | None = None  # in-plane shift per slice (gantry tilt), LPS mm


def _stack_geometry(stack: list[_SliceHeader]) -> _Geometry:
    """Sort slices along the normal; return them, the LPS affine, and the problems found."""
    ref = stack[0]
    row_dir, col_dir = ref.iop[:3], ref.iop[3:]
    normal = _normal(ref.iop)
    problems: list[str] = []
    ordered = sorted(stack, key=lambda h: float(np.dot(h.ipp, normal)))
    spacing_set = {_rounded(h.pixel_spacing) for h in ordered}
    if len(spacing_set) > 1:
        common = _common_spacing(ordered)
        odd = [h for h in ordered if _rounded(h.pixel_spacing) != common]
        problems.append(
            f"inconsistent PixelSpacing within the series: {odd[0].name} has {_mm(odd[0].pixel_spacing)}, "
            f"{len(ordered) - len(odd)} other slices {_mm(common)}"
        )
    row_spacing, col_spacing = ref.pixel_spacing  # PixelSpacing = [between rows, between columns]
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 3] = ordered[0].ipp
    if len(ordered) == 1:
        affine[:3, 2] = normal * 1.0
        return _Geometry(ordered, affine, problems)
    offsets = np.asarray([np.dot(h.ipp, normal) for h in ordered])
    steps = np.diff(offsets)
    if np.any(steps < 1e-3):
        dup = [f"{ordered[i].name} and {ordered[i + 1].name}" for i in np.flatnonzero(steps < 1e-3)[:2]]
        problems.append(f"duplicated slice positions ({'; '.join(dup)} lie at the same position)")
        affine[:3, 2] = normal
        return _Geometry(ordered, affine, problems)
    step = float(np.median(steps))
    if np.any(steps > _GAP_FACTOR * step):
        where = [
            f"between {ordered[i].name} and {ordered[i + 1].name} ({steps[i]:.2f} mm)"
            for i in np.flatnonzero(steps > _GAP_FACTOR * step)[:2]
        ]
        problems.append(
            f"missing slice(s): gap larger than {_GAP_FACTOR}x the median step {step:.3f} mm "
            f"{', '.join(where)}"
        )
    elif not np.allclose(steps, step, rtol=0.05, atol=0.01):
        problems.append(f"uneven slice spacing (steps from {steps.min():.3f} to {steps.max():.3f} mm)")
    slice_vec = (ordered[-1].ipp - ordered[0].ipp) / (len(ordered) - 1)
    # Every slice must lie on the line from the first to the last (a tilt may not change along the stack).
    residual = max(
        float(np.linalg.norm(h.ipp - ordered[0].ipp - slice_vec * (off - offsets[0]) / (slice_vec @ normal)))
        for h, off in zip(ordered, offsets, strict=True)
    )
    if residual > max(0.05 * step, 0.01) and not problems:
        problems.append(f"slice positions do not lie on one line (off by up to {residual:.2f} mm)")
    cos_tilt = float(np.dot(slice_vec, normal) / np.linalg.norm(slice_vec))
    shear = None
    if cos_tilt < 0.9999:
        tilt = float(np.degrees(np.arccos(min(1.0, cos_tilt))))
        problems.append(
            f"gantry tilt of {tilt:.2f} degrees (slices are sheared): refused; "
            "pass --resample-tilt (allow_tilt=True) to resample it onto an orthogonal grid"
        )
        shear = slice_vec - (slice_vec @ normal) * normal
        affine[:3, 2] = (slice_vec @ normal) * normal
    else:
        affine[:3, 2] = slice_vec
    return _Geometry(ordered, affine, problems, shear)


def _rounded(spacing: tuple[float, float]) -> tuple[float, float]:
    return (round(float(spacing[0]), 4), round(float(spacing[1]), 4))


def _mm(spacing: tuple[float, float]) -> str:
    return f"{spacing[0]:g} x {spacing[1]:g} mm"


def _common_spacing(ordered: list[_SliceHeader]) -> tuple[float, float]:
    """The PixelSpacing most slices share (what a stray slice is compared against)."""
    counts: dict[tuple[float, float], int] = defaultdict(int)
    for h in ordered:
        counts[_rounded(h.pixel_spacing)] += 1
    return max(counts, key=counts.__getitem__)


def _iop_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The larger of the angles between the row directions and between the column directions."""
    cos = [
        float(a[s] @ b[s]) / float(np.linalg.norm(a[s]) * np.linalg.norm(b[s]))
        for s in (slice(0, 3), slice(3, 6))
    ]
    return float(np.degrees(np.arccos(np.clip(min(cos), -1.0, 1.0))))


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(min(1.0, abs(float(_normal(a) @ _normal(b)))))))


def scan_dicom(root: str | Path) -> ScanResult:
    """Find every image series under ``root`` (recursively) without reading pixels."""
    root = Path(root)
    if not root.exists():
        raise InputError(root, "not found")
    skipped: list[tuple[Path, str]] = []
    by_series: dict[str, list[_SliceHeader]] = defaultdict(list)
    for path in _candidate_files(root):
        hdrs = _read_headers(path)
        if isinstance(hdrs, str):
            skipped.append((path, hdrs))
        else:
            for hdr in hdrs:
                by_series[hdr.series_key].append(hdr)
    series: list[SeriesInfo] = []
    for key, headers in by_series.items():
        stacks = sorted(_stacks(headers), key=len, reverse=True)
        main = stacks[0][0]
        stray_problems: list[str] = []
        for stack in stacks[1:]:
            if len(stack) > 3:
                continue  # a stack of its own: listed as a series "<uid>#n"
            angle = _angle_deg(main.iop, stack[0].iop)
            if angle >= _SCOUT_MIN_ANGLE_DEG:
                for hdr in stack:
                    skipped.append(
                        (hdr.path, f"slice at {angle:.0f} degrees to the rest of its series (scout?)")
                    )
            elif (stack[0].rows, stack[0].cols) != (main.rows, main.cols):
                stray_problems.append(
                    f"inconsistent image size within the series ({stack[0].name} is "
                    f"{stack[0].rows}x{stack[0].cols}, the rest {main.rows}x{main.cols})"
                )
            else:
                stray_problems.append(
                    f"inconsistent ImageOrientationPatient within the series ({stack[0].name} "
                    f"is turned by {_iop_angle_deg(main.iop, stack[0].iop):.2f} degrees)"
                )
        for n, stack in enumerate(stacks):
            if n > 0 and len(stack) <= 3:
                continue
            geo = _stack_geometry(stack)
            spacing = tuple(float(s) for s in np.linalg.norm(geo.affine[:3, :3], axis=0))
            series_id = key if n == 0 else f"{key}#{n}"
            frames = sum(1 for h in geo.ordered if h.frame is not None)
            series.append(
                SeriesInfo(
                    series_id=series_id,
                    modality=geo.ordered[0].modality,
                    description=geo.ordered[0].description,
                    files=list(dict.fromkeys(h.path for h in geo.ordered)),
                    size=(geo.ordered[0].cols, geo.ordered[0].rows, len(geo.ordered)),
                    spacing=spacing,  # type: ignore[arg-type]
                    orientation=_orientation_name(geo.ordered[0].iop),
                    transfer_syntax=geo.ordered[0].transfer_syntax,
                    # a stray slice also leaves a gap: name the cause, not the symptom
                    problems=(stray_problems if n == 0 and stray_problems else geo.problems),
                    original=not {"DERIVED", "SECONDARY"} & set(geo.ordered[0].image_type),
                    n_frames=frames,
                )
            )
    series.sort(key=_rank, reverse=True)
    return ScanResult(series=series, skipped=skipped)


def _rank(s: SeriesInfo) -> tuple:
    """What a user means by "the" series: an original image of a cross-sectional modality, the largest."""
    return (s.original, s.modality.upper() in _PRIMARY_MODALITIES, s.n_slices)


def select_series(scan: ScanResult, root: Path, series_id: str | None = None) -> SeriesInfo:
    """The series a user means: the one named, or the main one (original images, most slices)."""
    if not scan.series:
        reasons = sorted({reason for _, reason in scan.skipped})
        if not scan.skipped:
            raise InputError(root, "no DICOM image series found (no files in it)")
        raise InputError(
            root,
            f"no DICOM image series found (skipped {len(scan.skipped)} file(s): {'; '.join(reasons[:4])})",
        )
    if series_id is not None:
        matches = [
            s
            for s in scan.series
            if series_id in (s.series_id, s.uid_hash) or s.series_id.startswith(series_id)
        ]
        if not matches:
            listing = "; ".join(s.label() for s in scan.series)
            raise InputError(root, f"no series {series_id!r} here; found: {listing}")
        if len(matches) > 1 and not any(series_id in (s.series_id, s.uid_hash) for s in matches):
            listing = "; ".join(s.label() for s in matches)
            raise InputError(root, f"--series {series_id!r} matches several series: {listing}")
        return next((s for s in matches if series_id in (s.series_id, s.uid_hash)), matches[0])
    chosen = scan.series[0]
    if len(scan.series) > 1 and _rank(scan.series[1]) == _rank(chosen):
        listing = "; ".join(s.label() for s in scan.series)
        raise InputError(
            root, f"holds {len(scan.series)} series of equal rank; choose one with --series: {listing}"
        )
    return chosen


def _native_length_problem(ds: pydicom.Dataset) -> str | None:
    """For uncompressed transfer syntaxes: is there as much pixel data as the header promises?"""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and ts.is_compressed:
        return None
    if "PixelData" not in ds:
        return None
    bits = int(ds.get("BitsAllocated", 16) or 16)
    n = (
        int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("NumberOfFrames", 1) or 1)
        * int(ds.get("SamplesPerPixel", 1))
    )
    expected = (n * bits + 7) // 8
    found = len(ds.PixelData)
    if found < expected:
        return f"pixel data truncated (expected {expected} bytes, found {found})"
    return None


def _decoder_of_record(ts) -> str:
    """pylibjpeg (or pyjpegls / pydicom's RLE) decodes; GDCM only where none of them can.

    GDCM prints codec errors straight onto the process's stderr, where they would break
    medseg's one-line error contract, and its result would not be the one the tests check.
    """
    if ts is None or not ts.is_compressed:
        return ""
    try:
        from pydicom.pixels.decoders.base import get_decoder

        available = get_decoder(ts).available_plugins
    except (NotImplementedError, ValueError):
        return ""
    return next((name for name in ("pylibjpeg", "pyjpegls", "pydicom") if name in available), "")


def _decode(path: Path) -> tuple[np.ndarray, pydicom.Dataset]:
    """All frames of a file as (frames, rows, cols), checked against its header."""
    try:
        with _quiet(path):
            ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(path, f"unreadable DICOM file ({one_line(exc, with_type=True)})") from exc
    if "PixelData" not in ds:
        raise InputError(path, "no pixel data (the file ends before it, or it was stripped)")
    problem = _native_length_problem(ds)
    if problem:
        raise InputError(path, problem)
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        with _quiet(path):
            # unused high bits are kept, so that values outside BitsStored are seen (_within_bits_stored)
            ds.pixel_array_options(decoding_plugin=_decoder_of_record(ts), correct_unused_bits=False)
            pixels = ds.pixel_array
    except Exception as exc:
        name = getattr(ts, "name", str(ts))
        raise InputError(
            path,
            f"pixel data cannot be decoded as {name} ({one_line(exc, with_type=True)}); the file is "
            "corrupt or its declared transfer syntax is wrong",
        ) from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (frames, int(ds.Rows), int(ds.Columns)) if frames > 1 else (int(ds.Rows), int(ds.Columns))
    if pixels.shape != expected:
        raise InputError(path, f"decoded pixel array {pixels.shape} does not match the header's {expected}")
    return pixels.reshape((frames, int(ds.Rows), int(ds.Columns))), ds


def _within_bits_stored(pixels: np.ndarray, ds: pydicom.Dataset, path: Path) -> tuple[np.ndarray, int]:
    """Stored values cut to BitsStored, as dcm2niix (nii_mask12bit) and pydicom do; and how many were outside.

    Bits above BitsStored are not part of the value (PS3.5 8.1.1): overlay planes, or a writer that
    put signed 16-bit values under an unsigned 12-bit header. Unsigned values are masked, signed ones
    sign-extended from bit BitsStored-1. The caller warns when any value was outside.
    """
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    stored = int(ds.get("BitsStored", allocated) or allocated)
    if pixels.dtype.kind not in "iu" or not 0 < stored < pixels.dtype.itemsize * 8:
        return pixels, 0
    shift = pixels.dtype.itemsize * 8 - stored
    corrected = np.right_shift(np.left_shift(pixels, shift), shift)
    outside = int(np.count_nonzero(corrected != pixels))
    return corrected, outside


# Modalities whose pixel values are display values (projection radiography): there MONOCHROME1
# is mirrored so that higher means brighter. Elsewhere (CT in HU, PET, MR, ...) the values are
# physical and MONOCHROME1 only says how to display them.
DISPLAY_VALUE_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RF", "XA"})


def _values_are_physical(ds: pydicom.Dataset) -> bool:
    rescale_type = str(ds.get("RescaleType", "") or "").strip().upper()
    lut_types = {
        str(item.get("ModalityLUTType", "")).strip().upper() for item in ds.get("ModalityLUTSequence", [])
    }
    if rescale_type == "HU" or "HU" in lut_types:
        return True
    return str(ds.get("Modality", "")).upper() not in DISPLAY_VALUE_MODALITIES


def _rescaled(
    pixels: np.ndarray, ds: pydicom.Dataset, hdr: _SliceHeader, notes: set[str] | None = None
) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield units) through the modality LUT.

    The Modality LUT Sequence where a file has one (pydicom's ``apply_modality_lut``), else
    RescaleSlope/RescaleIntercept (per frame for enhanced objects). MONOCHROME1 mirrors the
    values only where they are display values (CR/DX/MG...); CT values stay in HU. What was
    done is added to ``notes``.
    """
    if hdr.slope is None and "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        try:
            values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        except Exception as exc:
            raise InputError(
                hdr.path, f"invalid Modality LUT Sequence ({one_line(exc, with_type=True)})"
            ) from exc
        ends = _stored_range(ds)
        ends_out = np.asarray(apply_modality_lut(np.asarray(ends, dtype=pixels.dtype), ds), dtype=np.float64)
        _note(notes, "modality LUT sequence applied")
    else:
        if hdr.slope is not None:
            slope, intercept = hdr.slope, float(hdr.intercept or 0.0)
        else:
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        if not (np.isfinite(slope) and np.isfinite(intercept)):
            raise InputError(hdr.path, f"invalid RescaleSlope/RescaleIntercept ({slope}, {intercept})")
        values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        lo, hi = _stored_range(ds)
        ends_out = np.array([lo * slope + intercept, hi * slope + intercept])
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        modality = str(ds.get("Modality", "") or "?")
        if _values_are_physical(ds):
            _note(
                notes,
                f"MONOCHROME1 {modality}: values are physical, kept as stored (display inversion not applied)",
            )
        else:
            # low stored values display bright: mirror the output range so that higher means brighter
            values = np.float32(ends_out.sum()) - values
            _note(notes, f"MONOCHROME1 {modality}: display values mirrored so that higher means brighter")
    return values


def _stored_range(ds: pydicom.Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _note(notes: set[str] | None, text: str) -> None:
    if notes is not None:
        notes.add(text)


def _warn_bits_stored(outside: list[tuple[Path, int]], ds: pydicom.Dataset) -> str:
    """Warn, naming the first file, that stored values were cut to BitsStored; return the note."""
    bits = int(ds.get("BitsStored", 0) or 0)
    kind = "signed" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "unsigned"
    total = sum(n for _, n in outside)
    more = f" and {len(outside) - 1} more file(s)" if len(outside) > 1 else ""
    log.warning(
        "%s%s: %d stored pixel values lie outside the declared %d-bit %s range; masked to BitsStored as "
        "dcm2niix does. Check the values: a header declaring %d-bit %s data over pixels written as 16-bit "
        "signed gives wrong intensities",
        outside[0][0],
        more,
        total,
        bits,
        kind,
        bits,
        kind,
    )
    return f"{total} stored values outside BitsStored {bits} ({kind}) masked to {bits} bits"


def _resample_tilt(array: np.ndarray, geo: _Geometry) -> np.ndarray:
    """Undo the gantry-tilt shear: shift every slice in-plane onto the orthogonal grid (linear)."""
    from scipy import ndimage

    assert geo.shear_mm is not None
    col_spacing = np.linalg.norm(geo.affine[:3, 0])  # along i (row direction)
    row_spacing = np.linalg.norm(geo.affine[:3, 1])  # along j (column direction)
    di = float(geo.shear_mm @ geo.affine[:3, 0]) / col_spacing**2
    dj = float(geo.shear_mm @ geo.affine[:3, 1]) / row_spacing**2
    fill = float(array.min())
    out = np.empty_like(array)
    for k in range(array.shape[2]):
        # target voxel (i, j) of slice k lies at (i - k*di, j - k*dj) of the sheared slice
        out[:, :, k] = ndimage.shift(array[:, :, k], (k * di, k * dj), order=1, mode="constant", cval=fill)
    return out


def _series_geometry(info: SeriesInfo) -> _Geometry:
    """The sorted slices (grid order k) and geometry of a series found by ``scan_dicom``."""
    headers = []
    for path in info.files:
        hdrs = _read_headers(path)
        if isinstance(hdrs, str):
            raise InputError(path, hdrs)
        headers.extend(hdrs)
    stacks = sorted(_stacks(headers), key=len, reverse=True)
    stack_no = int(info.series_id.rsplit("#", 1)[1]) if "#" in info.series_id else 0
    return _stack_geometry(stacks[stack_no] if stack_no < len(stacks) else stacks[0])


def series_files_in_grid_order(
    root: str | Path, *, series_id: str | None = None
) -> tuple[SeriesInfo, list[Path]]:
    """The files of the series ``read_dicom_series`` reads, in the order of its k axis.

    Only for single-frame series on an orthogonal grid (one file per slice).

    Raises:
        InputError: the series cannot be read, is multi-frame, or is gantry-tilted.
    """
    info, files, _ = series_grid(root, series_id=series_id)
    return info, files


def series_grid(
    root: str | Path, *, series_id: str | None = None, scan: ScanResult | None = None
) -> tuple[SeriesInfo, list[Path], np.ndarray]:
    """``series_files_in_grid_order`` and the grid's voxel -> patient (LPS, mm) affine, read from
    the headers alone: ``read_dicom_series`` gives the same grid with ``LPS_TO_RAS @ affine``."""
    root = Path(root)
    scan = scan or scan_dicom(root)
    info = select_series(scan, root, series_id)
    geo = _series_geometry(info)
    if any(h.frame is not None for h in geo.ordered):
        raise InputError(
            root, f"series {info.uid_hash} is an enhanced multi-frame object: not supported here"
        )
    if info.problems or geo.problems:
        raise InputError(root, f"series {info.uid_hash}: " + "; ".join(info.problems or geo.problems))
    return info, [h.path for h in geo.ordered], geo.affine


def read_dicom_series(
    root: str | Path,
    *,
    series_id: str | None = None,
    allow_tilt: bool = False,
    scan: ScanResult | None = None,
) -> Volume:
    """Read one series from a folder (or a single file) into a RAS ``Volume`` of float32 values.

    Values go through the modality LUT per slice (the Modality LUT Sequence, else
    RescaleSlope/RescaleIntercept: Hounsfield units for CT). MONOCHROME1 is mirrored only
    where values are display values (CR/DX/MG...); CT values stay physical. Stored values
    outside BitsStored are masked to it with a warning (as dcm2niix does). What was done is
    listed in ``meta["pixel_values"]``.

    Args:
        root: a folder (searched recursively) or one file.
        series_id: SeriesInstanceUID, its 12-character hash, or a unique prefix.
        allow_tilt: resample a gantry-tilted series onto an orthogonal grid instead of refusing it.
        scan: a previous ``scan_dicom(root)`` result, to avoid reading the headers twice.

    Raises:
        InputError: no usable series, ambiguous choice, missing/duplicated slices,
            inconsistent geometry, truncated or undecodable pixels; the message names the file.
    """
    root = Path(root)
    scan = scan or scan_dicom(root)
    info = select_series(scan, root, series_id)
    geo = _series_geometry(info)
    tilted = geo.shear_mm is not None
    _refuse_unusable(scan, info, root, allow_tilt=tilted and allow_tilt)
    array, photometric, notes = _read_pixels(geo)
    if tilted:
        array = _resample_tilt(array, geo)
        log.warning(
            "%s: series %s resampled onto an orthogonal grid to remove gantry tilt", root, info.uid_hash
        )
    if len(scan.series) > 1 and series_id is None:
        log.info("%s: %d series found; read %s, the main one", root, len(scan.series), info.label())
    meta = {
        "modality": info.modality,
        "series_description": info.description,
        "series_uid_hash": info.uid_hash,
        "manufacturer": geo.ordered[0].manufacturer,
        "transfer_syntax": info.transfer_syntax,
        "photometric": photometric,
        "pixel_values": sorted(notes),
        "n_slices": len(geo.ordered),
        "orientation": info.orientation,
        "source_format": "dicom",
        "kind": "image",
    }
    return Volume(array=array, affine=LPS_TO_RAS @ geo.affine, meta=meta, source=str(root))


def _refuse_unusable(scan: ScanResult, info: SeriesInfo, root: Path, *, allow_tilt: bool) -> None:
    """An InputError for an unparsable DICOM file in the folder or a problem of the series
    (a gantry tilt is none when ``allow_tilt``: the caller resamples it)."""
    problems = list(info.problems)
    if allow_tilt:
        problems = [p for p in problems if not p.startswith("gantry tilt")]
    broken = [(p, r) for p, r in scan.skipped if r.startswith(("unreadable", "malformed"))]
    if broken:
        # A DICOM file that cannot be parsed may be a slice of this series: never drop it silently.
        more = f" ({len(broken) - 1} more such files)" if len(broken) > 1 else ""
        raise InputError(
            broken[0][0], f"{broken[0][1]}{more}; it may belong to the series being read: repair or remove it"
        )
    if problems:
        raise InputError(root, f"series {info.uid_hash}: " + "; ".join(problems))


def _read_pixels(geo: _Geometry) -> tuple[np.ndarray, str, set[str]]:
    """The series' values (modality LUT applied) as an (i, j, k) array in ``geo.ordered`` order,
    its photometric interpretation and the notes on what was done to the values."""
    slices = []
    decoded: dict[Path, tuple[np.ndarray, pydicom.Dataset]] = {}
    photometric = ""
    notes: set[str] = set()
    outside: list[tuple[Path, int]] = []  # files with values outside BitsStored, and how many
    for hdr in geo.ordered:
        if hdr.path not in decoded:
            decoded.clear()  # keep at most one multi-frame file in memory
            raw, ds = _decode(hdr.path)
            pixels, n_outside = _within_bits_stored(raw, ds, hdr.path)
            if n_outside:
                outside.append((hdr.path, n_outside))
            decoded[hdr.path] = (pixels, ds)
        pixels, ds = decoded[hdr.path]
        frame = hdr.frame or 0
        if frame >= pixels.shape[0] or pixels.shape[1:] != (hdr.rows, hdr.cols):
            raise InputError(
                hdr.path, f"pixel array {pixels.shape} does not match the header ({hdr.rows}x{hdr.cols})"
            )
        photometric = str(ds.get("PhotometricInterpretation", ""))
        # (rows, cols) -> (i along the row direction, j along the column direction)
        slices.append(_rescaled(pixels[frame], ds, hdr, notes).T)
    if outside:
        notes.add(_warn_bits_stored(outside, ds))
    return np.stack(slices, axis=-1), photometric, notes


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
