"""DICOM label objects in: an RTSTRUCT's contours or a DICOM SEG's segments as a label map on the grid
of the series they were drawn on, the grid ``read_dicom_series`` (and ``medseg convert``) gives that
series, so that the images and contours a planning system or PACS exports become a training case.

- RTSTRUCT: each CLOSED_PLANAR contour goes on the slice its plane lies on (found from its points'
  positions, not from its image reference, which planning systems may leave out) and is filled at
  the voxel centres it encloses; the contours of one ROI on one slice combine by the even-odd rule,
  as planning systems fill them (a hole is a contour of its own). ``medseg.io.rtstruct`` writes
  contours that this reads back voxel for voxel.
- DICOM SEG: highdicom reads each segment's frames by the source instances they belong to;
  fractional segments are cut at 0.5.

A label map holds one label per voxel, and ROIs often overlap (an organ inside the body outline, a
target volume across an organ): a voxel in several keeps the smallest of them, and the notes say how
many voxels that decided. Label values are 1..N in the order of ``rois`` (or of the file), named as
the ROIs or segments are (or as ``rois`` renames them). What is read is never modified.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medseg.errors import InputError, one_line
from medseg.io.dicom import LPS_TO_RAS, ScanResult, scan_dicom, series_grid, uid_hash
from medseg.io.volume import Volume

log = logging.getLogger(__name__)

LABEL_MODALITIES = ("RTSTRUCT", "SEG")
_OFF_SLICE = 0.25  # a contour further than this (in slices) from its slice's plane is reported


@dataclass
class ImportedLabels:
    """A label map read from an RTSTRUCT or DICOM SEG, on its series' grid."""

    volume: Volume  # integer labels, RAS affine: the grid read_dicom_series gives the series
    labels: dict[int, str]  # value -> name (0 is background)
    counts: dict[int, int]  # voxels per label value in the map
    series: str  # the series' hashed UID
    source: str  # the object: its modality and hashed SOP instance UID (never its path)
    notes: list[str] = field(default_factory=list)  # what the user should know (overlaps, skipped contours)


def parse_roi_specs(specs: Iterable[str] | None) -> list[tuple[str, str]]:
    """``--roi`` values: ``NAME`` (the ROI and its label) or ``LABEL=ROI`` (the ROI ``ROI`` as ``LABEL``;
    ``LABEL=A|B|C``: the first of those names a file holds)."""
    out: list[tuple[str, str]] = []
    for spec in specs or ():
        label, sep, roi = str(spec).partition("=")
        label, roi = label.strip(), (roi if sep else label).strip()
        if not label or not roi:
            raise ValueError(f"--roi {spec!r}: expected NAME or LABEL=ROI")
        out.append((label, roi))
    labels = [label for label, _ in out]
    doubled = sorted({label for label in labels if labels.count(label) > 1})
    if doubled:
        raise ValueError(f"--roi names label(s) {', '.join(map(repr, doubled))} twice")
    return out


def label_object_modality(path: str | Path) -> str | None:
    """"RTSTRUCT" or "SEG" for a DICOM file of either; None for anything else (an image, not DICOM)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # not DICOM, or unreadable: not a label object
        return None
    modality = str(ds.get("Modality", "")).upper()
    return modality if modality in LABEL_MODALITIES else None


def read_label_object(
    path: str | Path,
    reference: str | Path | None = None,
    *,
    rois: Sequence[tuple[str, str]] | None = None,
    series_id: str | None = None,
    scan: ScanResult | None = None,
    require_referenced: bool = False,
) -> ImportedLabels:
    """Read an RTSTRUCT or DICOM SEG as a label map on the grid of the series it was drawn on.

    Args:
        path: the RTSTRUCT or SEG file.
        reference: the folder (or zipped study) holding that series; default: the file's own folder.
        rois: (label name, ROI or segment name) pairs to read, in label order (names matched without
            regard to case; ``A|B`` is the first of those the file holds); default: every ROI or
            segment, in the file's order.
        series_id: the series to use when the reference holds several and the one the object
            references is not among them (as for ``read_dicom_series``).
        scan: ``scan_dicom(reference)`` already done (many objects under one folder).
        require_referenced: refuse an object whose referenced series is not under ``reference``
            instead of reading it onto the main series there (a folder of many patients).

    Raises:
        InputError: not an RTSTRUCT/SEG, no usable series, another frame of reference, an ROI that is
            not there; the message names the file.
    """
    from medseg.io.privacy import scrubbed_messages

    path = Path(path)
    reference = Path(reference) if reference is not None else path.parent
    where = _Where(reference, series_id, scan, require_referenced)
    with scrubbed_messages(where=path.name):
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise InputError(path, f"cannot be read as DICOM ({_reason(exc)})") from exc
        modality = str(ds.get("Modality", "")).upper()
        if modality == "RTSTRUCT":
            return _read_rtstruct(path, ds, where, rois)
        if modality == "SEG":
            return _read_seg(path, ds, where, rois)
    what = f"a {modality} object" if modality else "a DICOM file without a Modality"
    raise InputError(path, f"is {what}, not an RTSTRUCT or DICOM SEG")


# ----------------------------------------------------------------------------- the series


@dataclass
class _Where:
    """Where to find the series an object was drawn on."""

    reference: Path
    series_id: str | None = None
    scan: ScanResult | None = None
    require_referenced: bool = False


@dataclass
class _Grid:
    shape: tuple[int, int, int]
    affine_lps: np.ndarray
    series: str  # hashed UID
    frame_of_reference: str
    instance_uids: list[str]
    notes: list[str]


def _reason(exc: BaseException, header: pydicom.Dataset | None = None) -> str:
    """A library's exception as one line, scrubbed of the header's identifying values, quoted strings
    and UIDs (pydicom and highdicom quote the values they reject)."""
    from medseg.io.privacy import identifying_values, scrub

    return scrub(one_line(exc), identifying_values([header] if header is not None else []))


def _instance_uid(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPInstanceUID", "") or (meta.get("MediaStorageSOPInstanceUID", "") if meta else ""))


def _grid(path: Path, where: _Where, referenced_series: str, *, instances: bool = False) -> _Grid:
    """The series the object was drawn on: the one it references if ``reference`` holds it, else
    ``series_id`` or the main series (its frame of reference is checked by the caller). The SOP
    instance UIDs of its slices only with ``instances`` (a SEG's frames are matched by them)."""
    from medseg.io.archive import dicom_source

    notes = []
    reference = where.reference
    with dicom_source(reference) as folder:
        scan = where.scan or scan_dicom(folder)
        if not scan.series:
            raise InputError(
                path, f"no image series under {reference} (pass --reference with the series it was drawn on)"
            )
        ids = {s.series_id for s in scan.series}
        if referenced_series and referenced_series not in ids:
            referenced_series = _blank_series(scan, referenced_series) or referenced_series
        chosen = where.series_id
        if chosen is None and referenced_series in ids:
            chosen = referenced_series
        elif chosen is None and where.require_referenced:
            raise InputError(path, f"the series it references ({uid_hash(referenced_series)}) is not under {reference}")
        elif chosen is None and referenced_series and len(scan.series) > 1:
            notes.append(
                f"the series it references ({uid_hash(referenced_series)}) is not under {reference.name}; "
                "read onto the main series there"
            )
        info, files, affine = series_grid(folder, series_id=chosen, scan=scan)
        try:
            headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in (files if instances else files[:1])]
        except Exception as exc:
            raise InputError(reference, f"cannot re-read series {info.uid_hash} ({_reason(exc)})") from exc
    return _Grid(
        shape=(*info.size[:2], len(files)),
        affine_lps=affine,
        series=info.uid_hash,
        frame_of_reference=str(headers[0].get("FrameOfReferenceUID", "")),
        instance_uids=[_instance_uid(h) for h in headers] if instances else [],
        notes=notes,
    )


def _blank_series(scan: ScanResult, referenced: str) -> str | None:
    """The series without a SeriesInstanceUID (anonymised) whose stand-in medseg's SEG and RTSTRUCT
    writers gave it (``medseg.io.dicom_seg.stand_in_uid``) is ``referenced``, if one is."""
    from medseg.io.dicom_seg import stand_in_uid

    for info in scan.series:
        if info.series_id.startswith("hash:") and info.files:
            first = pydicom.dcmread(info.files[0], stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"])
            if stand_in_uid(first, "SeriesInstanceUID", info.uid_hash) == referenced:
                return info.series_id
    return None


def _check_frame(path: Path, theirs: Iterable[str], grid: _Grid) -> None:
    """Contours in another patient coordinate system than the series' cannot be placed on it."""
    other = sorted({str(uid) for uid in theirs if uid} - {grid.frame_of_reference})
    if other and grid.frame_of_reference:
        raise InputError(
            path,
            f"drawn in frame of reference {uid_hash(other[0])}, but series {grid.series} is in "
            f"{uid_hash(grid.frame_of_reference)} (pass --reference with the series it was drawn on)",
        )


def _select(path: Path, available: list[str], rois: Sequence[tuple[str, str]] | None, what: str) -> list[tuple[str, int]]:
    """(label name, index into ``available``) for each label to read, in label order. An ROI given as
    ``A|B|C`` is the first of those names the file holds (naming drifts between patients and years)."""
    if not available:
        raise InputError(path, f"holds no {what}")
    if not rois:
        return [(name, i) for i, name in enumerate(available)]
    index: dict[str, int] = {}
    for i, name in enumerate(available):
        index.setdefault(name.strip().casefold(), i)
    chosen, missing = [], []
    for label, roi in rois:
        found = [index[key] for key in (n.strip().casefold() for n in roi.split("|")) if key in index]
        if found:
            chosen.append((label, found[0]))
        else:
            missing.append(" or ".join(repr(n.strip()) for n in roi.split("|")))
    if missing:
        raise InputError(path, f"no {what} named {', '.join(missing)}; it has {', '.join(map(repr, available))}")
    taken = [i for _, i in chosen]
    twice = sorted({available[i] for i in taken if taken.count(i) > 1})
    if twice:
        raise InputError(path, f"{what} {', '.join(map(repr, twice))} would be read as two labels")
    return chosen


# ----------------------------------------------------------------------------- RTSTRUCT


def _referenced_series(ds: pydicom.Dataset) -> str:
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if series.get("SeriesInstanceUID"):
                    return str(series.SeriesInstanceUID)
    return ""


def _contour_points(contour: Any) -> np.ndarray:
    """ContourData as floats, parsed from its bytes: pydicom's DS values, one object per number,
    took half the reading time of a structure set with 10,000 contours."""
    from pydicom.dataelem import RawDataElement

    element = contour.get_item(0x30060050) if 0x30060050 in contour else None
    if element is None:
        return np.zeros(0)
    try:
        if isinstance(element, RawDataElement):
            text = bytes(element.value or b"").decode("ascii", "replace").strip(" \0")
            return np.asarray([v for v in text.split("\\") if v.strip()], dtype=np.float64) if text else np.zeros(0)
        return np.asarray(element.value, dtype=np.float64).ravel()
    except (TypeError, ValueError):  # not numbers: a broken contour, counted as such by the caller
        return np.full(1, np.nan)


def _even_odd(ij: np.ndarray, size: tuple[int, int]) -> tuple[int, np.ndarray] | None:
    """The voxel centres a closed polygon encloses (even-odd rule) as (first row, rows x columns bool),
    by scanlines: one crossing per edge and row, the parity of the crossings left of each centre.
    Exact and proportional to the area (matplotlib's point-in-path test over the bounding box took
    seconds for a body outline on every slice; scikit-image's ``draw.polygon`` is not a dependency)."""
    i0, j0 = ij[:, 0], ij[:, 1]
    i1, j1 = np.roll(i0, -1), np.roll(j0, -1)
    first, last = max(int(np.ceil(i0.min())), 0), min(int(np.floor(i0.max())), size[0] - 1)
    if last < first:
        return None
    rows = np.arange(first, last + 1)
    low, high = np.minimum(i0, i1), np.maximum(i0, i1)
    edge, row = np.nonzero((rows[None, :] >= low[:, None]) & (rows[None, :] < high[:, None]))
    along = (rows[row] - i0[edge]) / (i1[edge] - i0[edge])
    at = j0[edge] + along * (j1[edge] - j0[edge])
    toggles = np.zeros((rows.size, size[1] + 1), dtype=np.int32)
    np.add.at(toggles, (row, np.clip(np.floor(at).astype(int) + 1, 0, size[1])), 1)
    return first, (np.cumsum(toggles, axis=1)[:, : size[1]] & 1).astype(bool)


def _fill_contours(contours: Sequence[Any], to_voxel: np.ndarray, shape: tuple[int, int, int], skipped: Counter):
    """One ROI's CLOSED_PLANAR contours filled slice by slice: {k: (i, j) bool plane}, and the largest
    distance (in slices) of a contour from the slice it was put on."""
    planes: dict[int, np.ndarray] = {}
    farthest = 0.0
    for contour in contours:
        kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
        points = _contour_points(contour)
        if kind != "CLOSED_PLANAR":
            skipped[f"{kind.lower()} contour(s) (only closed planar ones are areas)"] += 1
            continue
        if points.size < 9 or points.size % 3 or not np.isfinite(points).all():
            skipped["broken contour(s) (fewer than 3 points, or points that are not numbers)"] += 1
            continue
        ijk = points.reshape(-1, 3) @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        if np.ptp(ijk[:, 2]) > 0.5:
            skipped["contour(s) not parallel to the series' slices"] += 1
            continue
        position = float(ijk[:, 2].mean())
        k = round(position)
        if not 0 <= k < shape[2]:
            skipped["contour(s) outside the series' slices"] += 1
            continue
        farthest = max(farthest, abs(position - k))
        filled = _even_odd(ijk[:, :2], shape[:2])
        if filled is not None:
            first, inside = filled
            plane = planes.setdefault(k, np.zeros(shape[:2], dtype=bool))
            plane[first : first + len(inside)] ^= inside
    return planes, farthest


def _number(item: pydicom.Dataset, keyword: str) -> int:
    """An ROI number, or -1 where it is missing or not an integer (that ROI then has no contours)."""
    try:
        return int(item.get(keyword, -1))
    except (TypeError, ValueError):
        return -1


def _read_rtstruct(
    path: Path, ds: pydicom.Dataset, where: _Where, rois: Sequence[tuple[str, str]] | None
) -> ImportedLabels:
    structures = list(ds.get("StructureSetROISequence", []))
    names = [str(s.get("ROIName", "") or f"ROI {s.get('ROINumber', i + 1)}") for i, s in enumerate(structures)]
    chosen = _select(path, names, rois, "ROI")
    grid = _grid(path, where, _referenced_series(ds))
    _check_frame(path, [structures[i].get("ReferencedFrameOfReferenceUID", "") for _, i in chosen], grid)
    contours_of = {
        _number(c, "ReferencedROINumber"): list(c.get("ContourSequence", [])) for c in ds.get("ROIContourSequence", [])
    }
    to_voxel = np.linalg.inv(grid.affine_lps)
    skipped: Counter = Counter()
    planes, farthest = [], 0.0
    for _, i in chosen:
        filled, far = _fill_contours(contours_of.get(_number(structures[i], "ROINumber"), []), to_voxel, grid.shape, skipped)
        planes.append(filled)
        farthest = max(farthest, far)
    notes = list(grid.notes)
    notes += [f"{n} {what} skipped" for what, n in skipped.items()]
    if farthest > _OFF_SLICE:
        notes.append(
            f"contours lie up to {farthest:.2f} slices from the slices they were put on "
            "(drawn on another series of the same frame of reference?)"
        )
    return _labelled(path, ds, grid, [label for label, _ in chosen], planes, notes)


# ----------------------------------------------------------------------------- DICOM SEG


def _read_seg(path: Path, header: pydicom.Dataset, where: _Where, rois: Sequence[tuple[str, str]] | None) -> ImportedLabels:
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except KeyError as exc:
        raise InputError(path, f"cannot be read as a DICOM SEG: attribute {one_line(exc)} is missing (a truncated file?)") from exc
    except Exception as exc:
        raise InputError(path, f"cannot be read as a DICOM SEG ({_reason(exc, header)})") from exc
    segments = list(seg.SegmentSequence)
    names = [str(s.get("SegmentLabel", "") or f"segment {s.SegmentNumber}") for s in segments]
    chosen = _select(path, names, rois, "segment")
    referenced = [str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])]
    grid = _grid(path, where, referenced[0] if referenced else "", instances=True)
    _check_frame(path, [seg.get("FrameOfReferenceUID", "")], grid)
    planes = []
    for _, i in chosen:
        try:
            frames = seg.get_pixels_by_source_instance(
                grid.instance_uids, segment_numbers=[int(segments[i].SegmentNumber)], rescale_fractional=True
            )
        except Exception as exc:
            raise InputError(
                path, f"its frames do not belong to the instances of series {grid.series} ({_reason(exc, header)})"
            ) from exc
        voxels = np.asarray(frames)[..., 0] >= 0.5  # (k, rows, columns)
        planes.append({int(k): voxels[k].T.copy() for k in np.flatnonzero(voxels.any(axis=(1, 2)))})
    return _labelled(path, header, grid, [label for label, _ in chosen], planes, list(grid.notes))


# ----------------------------------------------------------------------------- the label map


def _labelled(
    path: Path, header: pydicom.Dataset, grid: _Grid, names: list[str], planes: list[dict[int, np.ndarray]],
    notes: list[str],
) -> ImportedLabels:
    """One label map from the labels' filled planes: where they overlap, the smallest label is kept."""
    sizes = [int(sum(int(p.sum()) for p in filled.values())) for filled in planes]
    out = np.zeros(grid.shape, dtype=np.uint8 if len(names) < 256 else np.uint16)
    overlaps: Counter = Counter()
    for index in sorted(range(len(names)), key=lambda n: -sizes[n]):  # the largest first, smaller over it
        value = index + 1
        for k, plane in planes[index].items():
            target = out[:, :, k]
            under = target[plane]
            for other, n in zip(*np.unique(under[under > 0], return_counts=True), strict=True):
                overlaps[(int(other), value)] += int(n)
            target[plane] = value
    labels = {0: "background", **{n + 1: name for n, name in enumerate(names)}}
    counts = {value: int(c) for value, c in zip(*np.unique(out, return_counts=True), strict=True) if value}
    counts = {value: counts.get(value, 0) for value in range(1, len(names) + 1)}
    empty = [repr(labels[v]) for v, c in counts.items() if c == 0 and not sizes[v - 1]]
    if len(empty) == len(names):
        raise InputError(path, f"{', '.join(empty)} enclose(s) no voxel of series {grid.series}: nothing to read (an empty or truncated file?)")
    if empty:
        notes.append(f"{', '.join(empty)} enclose(s) no voxel of the series: label(s) left empty")
    if overlaps:
        pairs = ", ".join(
            f"{labels[inner]!r} inside {labels[outer]!r} ({n})" for (outer, inner), n in overlaps.most_common(3)
        )
        notes.append(
            f"{sum(overlaps.values())} voxels lie in more than one label; each kept the smallest: {pairs}"
            + (" ..." if len(overlaps) > 3 else "")
        )
    modality = str(header.get("Modality", "")).upper()
    fmt = "rtstruct" if modality == "RTSTRUCT" else "dicom-seg"
    meta = {"kind": "label", "source_format": fmt, "series_uid_hash": grid.series, "n_slices": grid.shape[2]}
    volume = Volume(array=out, affine=LPS_TO_RAS @ grid.affine_lps, meta=meta, source=str(path))
    log.debug("%s: %d label(s) on series %s, %s", path.name, len(names), grid.series, counts)
    uid = _instance_uid(header)
    source = f"{modality} {uid_hash(uid) if uid else 'without an instance UID'}"
    return ImportedLabels(volume=volume, labels=labels, counts=counts, series=grid.series, source=source, notes=notes)
