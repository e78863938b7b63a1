"""DICOM pixel values: MONOCHROME1 CT stays in HU, the Modality LUT Sequence applies, BitsStored is enforced."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medseg.io import read_dicom_series
from tests import dicom_cases as dc


def _edit_all(paths, change) -> None:
    for p in paths:
        dc.edit(p, change)


def test_monochrome1_ct_keeps_hounsfield_units(tmp_path):
    """A MONOCHROME1 CT came out about 1860 HU off: its values were mirrored around the stored range."""
    vol = dc.ramp_volume()
    paths = dc.series(tmp_path / "s", vol)  # CT, HU = stored - 1024

    def monochrome1(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"

    _edit_all(paths, monochrome1)
    back = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.meta["photometric"] == "MONOCHROME1"
    assert any("MONOCHROME1 CT: values are physical" in n for n in back.meta["pixel_values"])


def test_monochrome1_with_rescale_type_hu_is_physical_whatever_the_modality(tmp_path):
    vol = dc.ramp_volume()
    paths = dc.series(tmp_path / "s", vol)

    def hu_cr(ds):
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.Modality = "CR"
        ds.RescaleType = "HU"

    _edit_all(paths, hu_cr)
    np.testing.assert_array_equal(read_dicom_series(tmp_path / "s").array, vol.array)


def test_monochrome1_display_values_are_mirrored(tmp_path):
    """Radiography (CR/DX) values are display values: MONOCHROME1 is mirrored so that higher is brighter."""
    vol = dc.ramp_volume()
    paths = dc.series(tmp_path / "s", vol)

    def inverted_dx(ds):
        ds.PixelData = (65535 - ds.pixel_array.astype(np.int64)).astype(np.uint16).tobytes()
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.Modality = "DX"

    _edit_all(paths, inverted_dx)
    back = read_dicom_series(tmp_path / "s")
    np.testing.assert_array_equal(back.array, vol.array)
    assert any("mirrored" in n for n in back.meta["pixel_values"])


def test_modality_lut_sequence_is_applied(tmp_path):
    """A Modality LUT Sequence was ignored (its RescaleSlope/Intercept defaults were used instead)."""
    vol = dc.ramp_volume()
    paths = dc.series(tmp_path / "s", vol)
    first = 0
    lut = np.arange(4096) * 3 + 100  # output = 3 * stored + 100

    def with_lut(ds):
        del ds.RescaleSlope
        del ds.RescaleIntercept
        item = Dataset()
        item.LUTDescriptor = [len(lut), first, 16]
        item.ModalityLUTType = "US"  # unspecified units
        item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUTData
        ds.ModalityLUTSequence = Sequence([item])

    stored = [pydicom.dcmread(p).pixel_array.copy() for p in paths]
    _edit_all(paths, with_lut)
    back = read_dicom_series(tmp_path / "s")
    expected = np.stack([s.T for s in stored], axis=-1).astype(np.int64)
    got = back.array.astype(np.int64)
    np.testing.assert_array_equal(got, expected * 3 + 100)
    assert "modality LUT sequence applied" in back.meta["pixel_values"]


def test_values_outside_bits_stored_are_masked_with_a_warning(tmp_path, caplog):
    """Unsigned 12-bit declared, signed 16-bit held (-1000 stored as 64536): accepted silently before."""
    vol = dc.ramp_volume()
    paths = dc.series(tmp_path / "s", vol)

    def twelve_bit(ds):
        ds.BitsStored, ds.HighBit = 12, 11

    _edit_all(paths, twelve_bit)
    clean = read_dicom_series(tmp_path / "s")
    assert not any("BitsStored" in n for n in clean.meta["pixel_values"])

    def overflow(ds):
        arr = ds.pixel_array.astype(np.int64)
        arr[0, :5] = 64536  # -1000 as a 16-bit two's complement
        ds.PixelData = arr.astype(np.uint16).tobytes()

    dc.edit(paths[2], overflow)
    with caplog.at_level(logging.WARNING, logger="medseg"):
        back = read_dicom_series(tmp_path / "s")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(paths[2].name in w and "outside the declared 12-bit unsigned range" in w for w in warnings)
    assert "5 stored values outside BitsStored 12 (unsigned) masked to 12 bits" in back.meta["pixel_values"]
    # masked as dcm2niix does: 64536 & 0xFFF = 3096 -> 3096 - 1024 HU
    assert np.count_nonzero(back.array == 3096 - 1024) >= 5
    np.testing.assert_array_equal(np.delete(back.array, 2, axis=2), np.delete(clean.array, 2, axis=2))
