"""Builders for DICOM test inputs: tiny series, edited headers, other transfer syntaxes, non-image objects."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from medseg.io import Volume, write_dicom_series

# transfer syntax name -> UID, for the decoding tests
SYNTAXES = {
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "jpeg_lossless": JPEGLosslessSV1,
    "jpeg_baseline": JPEGBaseline8Bit,
    "deflate": DeflatedExplicitVRLittleEndian,
    "big_endian": ExplicitVRBigEndian,
}


def ramp_volume(shape=(12, 10, 6), affine: np.ndarray | None = None, seed: int = 0) -> Volume:
    """A volume whose every voxel differs (so a swapped or flipped slice is caught), in HU."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(np.prod(shape)).reshape(shape) % 2000 - 1000
    return Volume(values.astype(np.float32), np.eye(4) if affine is None else affine)


def series(folder: Path, volume: Volume | None = None, **kwargs) -> list[Path]:
    """Write ``volume`` (default: a ramp) as an uncompressed CT series; return the slice paths in order."""
    return write_dicom_series(volume if volume is not None else ramp_volume(), folder, **kwargs)


def edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def transcode(path: Path, syntax: str) -> None:
    """Re-encode one file in another transfer syntax, in place (lossless except JPEG baseline)."""
    uid = SYNTAXES[syntax]
    ds = pydicom.dcmread(path)
    if syntax in ("rle", "jpeg2000", "jpegls"):
        ds.compress(uid)
        ds.save_as(path)
    elif syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = uid
        ds.save_as(path)
    elif syntax == "big_endian":
        arr = ds.pixel_array
        ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = uid
        pydicom.dcmwrite(path, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    else:
        _gdcm_transcode(path, uid)


def _gdcm_transcode(path: Path, uid: str) -> None:
    """JPEG baseline / lossless: pydicom has no encoder for these, GDCM does."""
    import gdcm

    ts = {
        JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
        JPEGBaseline8Bit: gdcm.TransferSyntax.JPEGBaselineProcess1,
    }[uid]
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise RuntimeError(f"GDCM cannot read {path}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(ts))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"GDCM cannot transcode {path}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"GDCM cannot write {path}")


def to_8bit(path: Path) -> None:
    """Store a slice as 8-bit (JPEG baseline only takes 8 bits): values 0..255, slope 1, intercept 0."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.int64)
    ds.PixelData = (arr % 256).astype(np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    ds.save_as(path)


_NON_IMAGE = {
    "SR": ("1.2.840.10008.5.1.4.1.1.88.11", "SR"),
    "RTSTRUCT": ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT"),
    "PR": ("1.2.840.10008.5.1.4.1.1.11.1", "PR"),
    "SEG": ("1.2.840.10008.5.1.4.1.1.66.4", "SEG"),
}


def non_image(path: Path, kind: str, *, series_uid: str | None = None) -> Path:
    """A minimal non-image object (SR, RTSTRUCT, PR, SEG) as such files appear in an export."""
    sop_class, modality = _NON_IMAGE[kind]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def localizer(path: Path, *, series_uid: str | None = None, flagged: bool = True) -> Path:
    """A 1-slice sagittal scout; ``flagged`` sets ImageType LOCALIZER, else it is only orthogonal."""
    vol = ramp_volume((10, 12, 1), seed=9)
    vol = Volume(vol.array, np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]]))
    tmp = path.parent / f".{path.name}.d"
    (written,) = write_dicom_series(vol, tmp, series_uid=series_uid)
    if flagged:
        edit(written, lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    written.rename(path)
    tmp.rmdir()
    return path
