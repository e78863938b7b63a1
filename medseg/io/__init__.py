"""File formats live here and nowhere else: NIfTI, NRRD/MetaImage (SimpleITK), DICOM series
(folders or zipped studies), DICOM SEG, RTSTRUCT, label tables for viewers.

``load_volume(path)`` reads any of these inputs into a ``Volume``; ``write_mask`` writes a label
map in the exact grid of its source, as NIfTI or in the source's own format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.dicom import (
    ScanResult,
    SeriesInfo,
    read_dicom_series,
    scan_dicom,
    select_series,
    uid_hash,
    write_dicom_series,
)
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.labeltables import write_label_tables
from medseg.io.nifti import is_nifti, read_label_names, read_nifti, write_nifti
from medseg.io.rtstruct import write_rtstruct
from medseg.io.sitk import MASK_SUFFIX, is_sitk_image, read_sitk, sitk_format, write_sitk
from medseg.io.volume import Volume, atomic_path, case_stem, write_text_atomic

__all__ = [
    "OUTPUT_FORMATS",
    "ScanResult",
    "SeriesInfo",
    "Volume",
    "atomic_path",
    "case_stem",
    "checked_label",
    "find_inputs",
    "is_dicom_input",
    "is_image_file",
    "is_medseg_output",
    "is_nifti",
    "is_sitk_image",
    "load_label",
    "load_volume",
    "mask_path",
    "read_dicom_series",
    "read_label_names",
    "read_nifti",
    "read_sitk",
    "scan_dicom",
    "select_series",
    "sidecar_fields",
    "uid_hash",
    "write_dicom_seg",
    "write_dicom_series",
    "write_label_map",
    "write_label_tables",
    "write_mask",
    "write_nifti",
    "write_rtstruct",
    "write_sitk",
    "write_text_atomic",
]


def load_volume(
    path: str | Path,
    *,
    series_id: str | None = None,
    allow_tilt: bool = False,
    scan: ScanResult | None = None,
) -> Volume:
    """Read an image: NIfTI, NRRD or MetaImage file, a DICOM file, a folder holding DICOM series,
    or a zipped DICOM study (``.zip``, extracted safely into a temporary folder, removed after).

    For DICOM, ``series_id`` picks a series (UID, its hash or a unique prefix); without it
    the main series is chosen (see ``select_series``). ``allow_tilt`` resamples a
    gantry-tilted series onto an orthogonal grid instead of refusing it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file() and (is_nifti(path) or is_sitk_image(path)):
        if series_id is not None:
            raise InputError(path, "--series applies to DICOM folders, not to a NIfTI/NRRD/MetaImage file")
        return read_nifti(path, kind="image") if is_nifti(path) else read_sitk(path, kind="image")
    if path.is_file() and is_zip(path):
        from medseg.io.archive import read_zipped_series

        return read_zipped_series(path, series_id=series_id, allow_tilt=allow_tilt)
    if path.is_dir() or path.is_file():
        return read_dicom_series(path, series_id=series_id, allow_tilt=allow_tilt, scan=scan)
    raise InputError(path, "neither a NIfTI/NRRD/MetaImage file nor a DICOM series folder")


def is_zip(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".zip"


def is_image_file(path: str | Path) -> bool:
    """A file name medseg reads as one input on its own: NIfTI, NRRD, MetaImage or a zipped study."""
    return is_nifti(path) or is_sitk_image(path) or is_zip(path)


def load_label(
    path: str | Path,
    *,
    image: Volume | None = None,
    expected_labels: Iterable[int] | None = None,
    label_values: Mapping[int, int] | None = None,
) -> Volume:
    """Read a label map (NIfTI, NRRD or MetaImage); when ``image`` is given, its grid must match
    exactly; when ``expected_labels`` is given, no other value may occur. With ``label_values``
    (network channel -> stored value, ``medseg.config.Config.label_values``) only those values may
    occur, and the map comes back as channels (``medseg.labels``)."""
    label = read_sitk(path, kind="label") if is_sitk_image(path) else read_nifti(path, kind="label")
    if image is not None:
        check_same_grid(image, label)
    return checked_label(label, expected_labels=expected_labels, label_values=label_values)


def checked_label(
    label: Volume,
    *,
    expected_labels: Iterable[int] | None = None,
    label_values: Mapping[int, int] | None = None,
) -> Volume:
    """``label`` refused (an ``InputError`` naming its file) when it holds a value outside
    ``expected_labels`` or ``label_values``; with ``label_values``, its values as network channels."""
    from medseg.labels import values_outside, values_to_channels

    if label_values is not None:
        expected_labels = label_values.values()
    if expected_labels is not None:
        allowed = {int(v) for v in expected_labels} | {0}
        unexpected = values_outside(label.array, allowed)
        if unexpected:
            raise InputError(
                label.source or None,
                f"label map holds values {unexpected} that are not among the declared labels "
                f"{sorted(allowed)}; fix the labels or the label list",
            )
    if label_values is not None:
        label = label.with_array(values_to_channels(label.array, label_values))
    return label


def check_same_grid(
    reference: Volume,
    other: Volume,
    *,
    atol: float = 1e-3,
    other_kind: str = "label",
    reference_kind: str = "image",
    fix: str = "resample the label onto the image grid (nearest neighbour)",
) -> None:
    """Refuse ``other`` unless it has ``reference``'s shape and affine; the message names both files."""
    if reference.shape != other.shape:
        raise InputError(
            other.source,
            f"{other_kind} shape {other.shape} differs from {reference_kind} {reference.source} "
            f"shape {reference.shape}",
        )
    if not np.allclose(reference.affine, other.affine, atol=atol):
        raise InputError(
            other.source,
            f"{other_kind} grid differs from {reference_kind} {reference.source}: affines differ by up to "
            f"{np.abs(reference.affine - other.affine).max():.4g} mm; {fix}",
        )


# medseg's own outputs beside a mask (see medseg.batch): never inputs
_OUTPUT_SUFFIXES = (
    "_seg.nii.gz",
    "_seg.nii",
    "_seg.nrrd",
    "_seg.mha",
    "_seg.json",
    "_seg.dcm",
    "_seg_rtstruct.dcm",
    "_seg.itksnap.txt",
    "_seg.ctbl",
    "_seg_entropy.nii.gz",
    "_seg_qc.png",
)


def is_medseg_output(path: str | Path) -> bool:
    """Whether ``path`` is named as medseg writes its outputs (mask, sidecar, SEG, maps, report)."""
    name = Path(path).name
    if name.endswith(_OUTPUT_SUFFIXES) or (name.startswith("report") and name.endswith(".html")):
        return True
    stem, _, rest = name.rpartition("_prob_")
    return stem.endswith("_seg") and rest.removesuffix(".nii.gz").isdigit()


def _candidates(folder: Path) -> list[Path]:
    """A folder's entries that may be inputs: no dot-files (macOS ``._*`` included), no medseg outputs."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p for p in entries if not (p.is_file() and is_medseg_output(p))]


def find_inputs(paths: list[str | Path]) -> list[Path]:
    """Expand ``infer --input`` arguments: image files (NIfTI, NRRD, MetaImage, zipped DICOM), DICOM
    series folders, or folders of these.

    Inside folders, dot-files (macOS ``._*`` AppleDouble files included) and medseg's own outputs
    (``*_seg.nii.gz``, sidecars, probability maps, label tables, reports) are never taken as inputs.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(path, "not found")
        if path.is_file():
            found.append(path)
            continue
        entries = _candidates(path)
        niftis = [p for p in entries if p.is_file() and is_image_file(p)]
        subdirs = [p for p in entries if p.is_dir()]
        if niftis:
            found.extend(niftis)
            found.extend(subdirs)
        elif subdirs and not any(p.is_file() for p in entries):
            found.extend(subdirs)  # a folder of DICOM series folders
        elif entries or not any(is_medseg_output(p) for p in path.iterdir()):
            found.append(path)  # a DICOM series folder (an empty one fails as such)
    return found


OUTPUT_FORMATS = ("nifti", "nrrd", "metaimage", "input")


def mask_path(
    out_dir: str | Path, source: str | Path, *, output_format: str = "nifti", stem: str | None = None
) -> Path:
    """Where the mask for input ``source`` goes: ``out_dir/<stem>_seg`` + the format's suffix.

    ``output_format`` is ``nifti`` (``.nii.gz``), ``nrrd`` (``.nrrd``), ``metaimage`` (``.mha``), or
    ``input``: the input's own format for a NRRD/MetaImage input (a detached ``.nhdr``/``.mhd``
    header gives a single ``.nrrd``/``.mha`` file), NIfTI for every other input. ``stem`` names a case
    given as several channel files (``CASE_0000`` .. -> ``CASE``).
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format {output_format!r} is not one of {list(OUTPUT_FORMATS)}")
    fmt = output_format
    if fmt == "input":
        fmt = sitk_format(source) if is_sitk_image(source) else "nifti"
    suffix = ".nii.gz" if fmt == "nifti" else MASK_SUFFIX[fmt]
    return Path(out_dir) / f"{stem or case_stem(source)}_seg{suffix}"


def write_label_map(
    mask: np.ndarray, source: Volume, path: str | Path, *, labels: dict[int, str], overwrite: bool = True
) -> Path:
    """Write only the label map ``mask`` (in ``source``'s grid), in the format of ``path``'s suffix.

    NIfTI (``.nii.gz``/``.nii``): the label names embedded as a header extension. NRRD (``.nrrd``) or
    MetaImage (``.mha``): the grid copied from ``source``'s own header when it is such a file (so the
    mask has the input's grid exactly), else computed from its affine.
    """
    path = Path(path)
    if mask.shape != source.shape:
        raise ValueError(f"mask shape {mask.shape} differs from source grid {source.shape}")
    if mask.max(initial=0) > 255:
        raise ValueError("mask holds labels above 255")
    array = np.asarray(mask, dtype=np.uint8)  # no copy when it is one already
    if is_nifti(path):
        out = Volume(array=array, affine=source.affine, meta={"kind": "label"}, source=str(path))
        return write_nifti(out, path, overwrite=overwrite, labels=labels)
    # the source path rides along so that write_sitk copies its header's grid
    out = Volume(array=array, affine=source.affine, meta={"kind": "label"}, source=source.source)
    return write_sitk(out, path, overwrite=overwrite)


def is_dicom_input(path: str | Path) -> bool:
    """A DICOM series folder, DICOM file or zipped study (what a DICOM SEG or RTSTRUCT can reference)."""
    path = Path(path)
    return path.is_dir() or (path.is_file() and not is_nifti(path) and not is_sitk_image(path))


def sidecar_fields(source: Volume, labels: dict[int, str]) -> dict[str, Any]:
    """The label names and the source grid, as a mask's ``<stem>.json`` sidecar records them."""
    return {
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "source": {
            "name": Path(source.source).name,
            "format": source.meta.get("source_format", ""),
            "shape": list(source.shape),
            "spacing_mm": [round(s, 6) for s in source.spacing],
            "affine": np.asarray(source.affine).round(6).tolist(),
            "axcodes": source.axcodes(),
            # what the reader did to the stored values (MONOCHROME1, modality LUT, BitsStored), if anything
            **(
                {"pixel_values": list(source.meta["pixel_values"])} if source.meta.get("pixel_values") else {}
            ),
        },
    }


def write_mask(
    mask: np.ndarray,
    source: Volume,
    path: str | Path,
    *,
    labels: dict[int, str],
    extra: dict[str, Any] | None = None,
    overwrite: bool = True,
    label_tables: bool = False,
) -> Path:
    """Write ``mask`` (in ``source``'s grid) plus ``<stem>.json`` with label names and geometry.

    The format follows the suffix of ``path`` (see ``mask_path``): NIfTI (label names embedded as a
    header extension), NRRD or MetaImage (the source file's grid copied exactly). With
    ``label_tables`` the ITK-SNAP and 3D Slicer label tables are written beside it.
    """
    path = Path(path)
    if mask.shape != source.shape:
        raise ValueError(f"mask shape {mask.shape} differs from source grid {source.shape}")
    if mask.max(initial=0) > 255:
        raise ValueError("mask holds labels above 255")
    sidecar = {**sidecar_fields(source, labels), **(extra or {})}
    json_path = path.with_name(case_stem(path) + ".json")
    write_label_map(mask, source, path, labels=labels, overwrite=overwrite)
    if label_tables:
        from medseg.io.labeltables import write_label_tables

        write_label_tables(path, labels)
    write_text_atomic(json_path, json.dumps(sidecar, indent=2), overwrite=True)
    return path
