"""Class-balanced patch sampling: each foreground class a patch centre equally often by default."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medseg.config import Config
from medseg.transforms import build_augment, class_ratios, crop_kind


def _cfg(labels: dict[int, str], **augment) -> Config:
    off = {k: 0.0 for k in Config().augment.model_dump() if k.endswith("_prob")}
    return Config.model_validate(
        {
            "labels": labels,
            "model": {"depth": 3},
            "train": {"patch_size": [8, 8, 8]},
            "augment": {**off, "samples_per_volume": 1, **augment},
        }
    )


def test_auto_is_class_balanced_for_several_foreground_classes():
    assert crop_kind(_cfg({0: "bg", 1: "liver", 2: "spleen"})) == "label_classes"
    assert crop_kind(_cfg({0: "bg", 1: "spleen"})) == "pos_neg"
    assert crop_kind(_cfg({0: "bg", 1: "a", 2: "b"}, crop="pos_neg")) == "pos_neg"
    # two thirds foreground centres (pos_neg_ratio 2), shared equally; unnamed label values weigh 0
    assert class_ratios(_cfg({0: "bg", 1: "spleen", 5: "liver"})) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_a_small_organ_beside_a_large_one_is_a_patch_centre_a_third_of_the_time():
    label = np.zeros((40, 40, 40), np.float32)
    label[2:30, 2:30, 2:30] = 1  # large "liver": 21952 voxels
    label[34:37, 34:37, 34:37] = 2  # small "spleen": 27 voxels
    item = {
        "image": MetaTensor(torch.randn(1, 40, 40, 40)),
        "label": MetaTensor(torch.as_tensor(label)[None]),
    }
    chain = build_augment(_cfg({0: "bg", 1: "liver", 2: "spleen"}))
    chain.set_random_state(seed=0)
    hits = 0
    for _ in range(150):
        patch = chain(dict(item))[0]
        hits += bool((patch["label"] == 2).any())
    assert 0.25 < hits / 150 < 0.5  # by voxel count it would be about 0.1 % of foreground centres


def test_training_caches_the_preprocessing(tmp_path):
    """The training chain is flat: CacheDataset keeps every deterministic step (load, resample,
    class indices) and runs only the random crop and augmentation per step."""
    import nibabel as nib
    from monai.data import CacheDataset
    from monai.transforms import RandomizableTrait, Transform

    from medseg.transforms import build_train_chain

    cfg = _cfg({0: "bg", 1: "liver", 2: "spleen"}, flip_prob=0.5)
    cfg = Config.model_validate(
        {**cfg.model_dump(), "preprocess": {"spacing": [1.0, 1.0, 1.0], "intensity": {"kind": "zscore"}}}
    )
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:8, 2:8, 2:8], label[12:16, 12:16, 12:16] = 1, 2
    for name, array in (("image", np.random.default_rng(0).normal(size=label.shape)), ("label", label)):
        nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    chain = build_train_chain(cfg)
    first_random = chain.get_index_of_first(
        lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform)
    )
    assert first_random is not None
    augment = chain.transforms[first_random]  # the augmentation, run without MONAI's metadata
    assert first_random == len(chain.transforms) - 1
    assert type(augment).__name__ == "WithoutMetadata"
    assert type(augment.chain.transforms[0]).__name__ == "RandCropByLabelClassesd"
    item = {"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")}
    ds = CacheDataset([item], transform=chain, cache_rate=1.0, progress=False, copy_cache=False)
    cached = ds._cache[0]
    assert not isinstance(cached["image"], str)  # loaded and preprocessed once
    assert "label_cls_indices" in cached  # the class indices too
    patches = ds[0]
    assert patches[0]["image"].shape[1:] == (8, 8, 8)
    # no copy of the cached case per step (copy_cache=False): every patch is copied out of it first,
    # so augmenting patches in place cannot reach the cache
    image, label = cached["image"].clone(), cached["label"].clone()
    for _ in range(10):
        for patch in ds[0]:
            patch["image"].add_(100.0)
            patch["label"].zero_()
    assert torch.equal(cached["image"], image)
    assert torch.equal(cached["label"], label)


def test_augmentation_runs_without_metadata_and_restores_the_switch():
    """MONAI's metadata tracking is off inside the augmentation (patches need no affine) and back
    on after it, also when a transform of the chain fails."""
    from monai.data import get_track_meta
    from monai.transforms import Compose, Lambda

    from medseg.transforms import WithoutMetadata

    seen = []
    ok = WithoutMetadata(Compose([Lambda(lambda d: seen.append(get_track_meta()) or d)]))
    assert ok({"image": 1}) == {"image": 1}
    assert seen == [False]
    assert get_track_meta()

    def boom(d):
        raise RuntimeError("a transform failed")

    with pytest.raises(RuntimeError):
        WithoutMetadata(Compose([Lambda(boom)]))({"image": 1})
    assert get_track_meta()
