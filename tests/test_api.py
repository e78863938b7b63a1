"""The Python API: ``medseg.load_bundle(path, device=...).predict(x)`` takes a path, a Volume, a nibabel
image, a SimpleITK image or a NumPy array with ``affine=``, runs on the bundle's device and gives the
mask on the input's own grid; a multi-channel bundle takes a 4D image or one image per channel."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medseg
from medseg.bundle import save_bundle
from medseg.config import config_from_dict
from medseg.errors import InputError
from medseg.io import Volume, load_volume, write_nifti
from medseg.models import build_model
from medseg.synthetic import make_case

LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "spleen"}
CT = {"kind": "ct", "window": [-200, 300], "mean": 50, "std": 100}


def _bundle(path: Path, **extra) -> Path:
    """Untrained tiny weights (seeded): the API is under test here, not accuracy."""
    cfg = config_from_dict(
        {
            "labels": LABELS,
            "preprocess": {"spacing": [2, 2, 3], "intensity": CT, **extra.pop("preprocess", {})},
            "model": {"features": 4, "depth": 2, **extra.pop("model", {})},
            "train": {"patch_size": [16, 16, 16]},
        }
    )
    torch.manual_seed(0)
    network = build_model(cfg.model, in_channels=cfg.model.in_channels or 1, out_channels=len(LABELS))
    return save_bundle(path, network, cfg, {"note": "untrained"})


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("api")
    image, _ = make_case(1, size=20, orientation="LPS")  # stored LPS: an axis mix-up would show
    return _bundle(root / "bundle"), write_nifti(image, root / "ct.nii.gz", dtype="int16")


def _same_mask(mask: Volume, reference: Volume) -> None:
    assert isinstance(mask, Volume)
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(mask.array, reference.array)


def test_predict_takes_every_common_image_kind(single, tmp_path):
    import SimpleITK as sitk

    path, image = single
    bundle = medseg.load_bundle(path, device="cpu")
    assert bundle.device.type == "cpu"
    reference = bundle.predict(image)
    source = nib.load(image)
    assert reference.shape == source.shape
    np.testing.assert_allclose(reference.affine, source.affine, atol=1e-5)
    assert len(np.unique(reference.array)) > 1  # a mask with structure, so agreement below means something
    sitk.WriteImage(sitk.ReadImage(str(image)), str(tmp_path / "ct.nrrd"))
    array = np.asarray(source.dataobj)
    for given in (
        str(image),
        Path(image),
        tmp_path / "ct.nrrd",
        load_volume(image),
        source,
        sitk.ReadImage(str(image)),
        (array, source.affine),
    ):
        _same_mask(bundle.predict(given), reference)
    _same_mask(bundle.predict(array, affine=source.affine), reference)
    # the mask is saved as the README shows: the input's grid, voxel for voxel
    written = nib.load(write_nifti(bundle.predict(array, affine=source.affine), tmp_path / "seg.nii.gz"))
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), reference.array)


def test_predict_says_what_it_needs(single):
    path, image = single
    bundle = medseg.load_bundle(path)
    source = nib.load(image)
    array = np.asarray(source.dataobj)
    with pytest.raises(TypeError, match=r"affine="):
        bundle.predict(array)
    with pytest.raises(TypeError, match=r"affine= goes with a NumPy array"):
        bundle.predict(load_volume(image), affine=source.affine)
    with pytest.raises(TypeError, match=r"invertible 4x4"):
        bundle.predict(array, affine=np.eye(3))
    with pytest.raises(TypeError, match=r"expected a 3D image"):
        bundle.predict(array[:, :, 0], affine=source.affine)
    with pytest.raises(TypeError, match=r"cannot segment a dict"):
        bundle.predict({"image": str(image)})
    with pytest.raises(InputError, match=r"does not exist|not found|no such"):
        bundle.predict(Path(image).with_name("missing.nii.gz"))


@pytest.mark.gpu
def test_predict_runs_on_the_bundles_device(single):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path, image = single
    bundle = medseg.load_bundle(path, device="cuda")
    assert bundle.device.type == "cuda"
    mask = bundle.predict(image)  # no device argument: the bundle's
    assert bundle.device.type == "cuda"
    reference = medseg.load_bundle(path, device="cpu").predict(image)
    assert (mask.array == reference.array).mean() >= 0.999
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-5)


def test_multichannel_bundle_takes_a_4d_image_or_one_image_per_channel(tmp_path):
    from medseg.io.nifti import write_nifti_channels

    path = _bundle(
        tmp_path / "bundle",
        preprocess={"channels": [{**CT, "name": "CT"}, {"kind": "mr", "name": "T2"}]},
        model={"in_channels": 2},
    )
    ct, _ = make_case(2, size=20, orientation="LPS")
    t2 = ct.with_array(np.sqrt(np.clip(ct.array + 1024.0, 0, None)).astype(np.float32))
    files = [write_nifti(ct, tmp_path / "case_0000.nii.gz"), write_nifti(t2, tmp_path / "case_0001.nii.gz")]
    four_d = write_nifti_channels([ct, t2], tmp_path / "case.nii.gz")
    bundle = medseg.load_bundle(path)
    assert bundle.in_channels == 2
    reference = bundle.predict(four_d)
    assert reference.shape == ct.shape
    np.testing.assert_allclose(reference.affine, ct.affine, atol=1e-5)
    assert len(np.unique(reference.array)) > 1
    stacked = np.stack([ct.array, t2.array], axis=-1)
    for given in (str(four_d), files, [ct, t2], nib.load(four_d), [nib.load(f) for f in files]):
        _same_mask(bundle.predict(given), reference)
    _same_mask(bundle.predict(stacked, affine=ct.affine), reference)
    with pytest.raises(TypeError, match=r"the model takes 2 channels \(CT, T2\)"):
        bundle.predict(ct)
    with pytest.raises(TypeError, match=r"got a sequence of 1"):
        bundle.predict([ct])
    with pytest.raises(InputError, match=r"gives 1 channel\(s\); the model takes 2 \(CT, T2\)"):
        bundle.predict(files[0])
