"""Plans from the dataset fingerprint: spacing, normalisation by modality, patch, batch, overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from medseg.config import Config
from medseg.data import Fingerprint, fingerprint, label_components, load_dataset
from medseg.errors import InputError
from medseg.plan import make_plan, target_spacing

# a fingerprint as medseg 0.1.0 first wrote it (no spacing_p10, no label_volumes_ml): old runs still load
OLD_FORMAT_FP = {
    "n_cases": 10,
    "modality": "CT",
    "labels": {"0": "background", "1": "liver"},
    "spacing_median": [0.8, 0.8, 1.0],
    "spacing_min": [0.6, 0.6, 0.8],
    "spacing_max": [1.0, 1.0, 5.0],
    "extent_mm_median": [400.0, 400.0, 300.0],
    "foreground_intensity": {"mean": 80.0, "std": 40.0, "p00_5": -50.0, "p99_5": 250.0},
    "label_voxels": {"0": 900000, "1": 100000},
    "hash": "0" * 16,
}


def make_fp(**changes) -> Fingerprint:
    return Fingerprint.model_validate({**OLD_FORMAT_FP, "spacing_p10": [0.7, 0.7, 0.8], **changes})


BASE_FP = make_fp()


def test_spacing_is_the_median_for_isotropic_data():
    assert target_spacing(BASE_FP) == (0.8, 0.8, 1.0)


def test_anisotropic_coarse_axis_takes_10th_percentile():
    fp = make_fp(
        spacing_median=[0.7, 0.7, 5.0], spacing_p10=[0.6, 0.6, 3.0], extent_mm_median=[350, 350, 100]
    )
    # 5 mm is >3x 0.7 mm and 20 slices are >3x fewer than 500 voxels: nnU-Net's rule applies
    assert target_spacing(fp) == (0.7, 0.7, 3.0)
    # anisotropic spacing but many slices: the median stays
    fp_many = fp.model_copy(update={"extent_mm_median": (350.0, 350.0, 5000.0)})
    assert target_spacing(fp_many) == (0.7, 0.7, 5.0)


def test_ct_and_mr_normalisation():
    ct = make_plan(Config(), BASE_FP)
    it = ct.preprocess.intensity
    assert it.kind == "ct"
    assert it.window == (-50.0, 250.0)
    assert (it.mean, it.std) == (80.0, 40.0)
    mr = make_plan(Config(), make_fp(modality="MR"))
    assert mr.preprocess.intensity.kind == "mr"
    assert mr.preprocess.intensity.window is None


def test_patch_fits_memory_and_batch_grows_only_when_patch_covers_image():
    small = make_plan(Config.model_validate({"train": {"memory_budget_gb": 1.0}}), BASE_FP)
    big = make_plan(Config.model_validate({"train": {"memory_budget_gb": 16.0}}), BASE_FP)
    vox = lambda c: c.train.patch_size[0] * c.train.patch_size[1] * c.train.patch_size[2]
    assert vox(small) < vox(big)
    for plan in (small, big):
        assert all(p % 16 == 0 for p in plan.train.patch_size)  # classic_unet depth 4
        assert plan.train.batch_size == 2  # the patch does not cover the image
    tiny_images = make_fp(extent_mm_median=[24.0, 24.0, 30.0])
    tiny = make_plan(Config.model_validate({"train": {"memory_budget_gb": 4.0}}), tiny_images)
    assert tiny.train.patch_size == (32.0, 32.0, 32.0)
    assert tiny.train.batch_size > 2


def test_patches_keep_a_near_cubic_field_of_view_in_mm_on_anisotropic_scans():
    """A patch shrinks along its longest axis in mm, not in voxels: on a 1 x 1 x 2.3 mm CT the
    voxel rule gave 48 x 48 x 48 (50 x 50 x 112 mm, a third of a liver across and the abdomen's whole
    height); on 5 mm slices a field of view five times taller than wide."""
    import numpy as np

    from medseg.plan import candidate_patches

    for spacing, extent_mm in (((1.05, 1.05, 2.34), (168, 143, 110)), ((0.8, 0.8, 5.0), (350, 300, 250))):
        fp = make_fp(spacing_median=list(spacing), extent_mm_median=list(extent_mm))
        cfg = Config.model_validate({"preprocess": {"spacing": list(spacing)}, "train": {"memory_budget_gb": 4.0}})
        plan = make_plan(cfg, fp)
        for patch in [plan.train.patch_size, *candidate_patches(plan.train.patch_size, 16, spacing=spacing)]:
            mm = np.asarray(patch) * np.asarray(spacing)
            assert all(p % 16 == 0 for p in patch)
            # no axis longer in mm than another by more than one shrink step can explain
            assert mm.max() <= 2.2 * mm.min(), (patch, mm)
        mids = [p for p in candidate_patches(plan.train.patch_size, 16, spacing=spacing) if 60_000 < np.prod(p) < 200_000]
        assert mids  # a candidate near 48^3's voxels, not only the top and a quarter of it
    # isotropic voxels: the rule in mm is the rule in voxels, as before
    assert candidate_patches((160.0, 128.0, 48.0), 16, spacing=(2.0, 2.0, 2.0)) == candidate_patches(
        (160.0, 128.0, 48.0), 16
    )


def test_scheduler_by_optimiser_and_overrides_win():
    assert make_plan(Config(), BASE_FP).train.scheduler == "cosine"
    sgd = make_plan(Config.model_validate({"train": {"optimizer": "sgd"}}), BASE_FP)
    assert sgd.train.scheduler == "poly"
    fixed = Config.model_validate(
        {"preprocess": {"spacing": [2, 2, 2]}, "train": {"patch_size": [64, 64, 32], "batch_size": 3}}
    )
    plan = make_plan(fixed, BASE_FP)
    assert plan.preprocess.spacing == (2.0, 2.0, 2.0)
    assert plan.train.patch_size == (64.0, 64.0, 32.0)
    assert plan.train.batch_size == 3


def test_old_format_fingerprint_loads_round_trips_and_plans(tmp_path):
    path = tmp_path / "fingerprint.json"
    path.write_text(json.dumps(OLD_FORMAT_FP))
    fp = Fingerprint.load(path)
    assert fp.spacing_p10 is None
    assert fp.label_volumes_ml is None
    assert fp.to_dict() == OLD_FORMAT_FP  # the same keys and values written back: no key added
    # anisotropic, but no 10th percentile recorded: the median stays
    aniso = Fingerprint.model_validate(
        {**OLD_FORMAT_FP, "spacing_median": [0.7, 0.7, 5.0], "extent_mm_median": [350, 350, 100]}
    )
    assert target_spacing(aniso) == (0.7, 0.7, 5.0)
    assert make_plan(Config(), fp).preprocess.spacing == (0.8, 0.8, 1.0)


def test_fingerprint_is_frozen_and_its_hash_is_the_sorted_json_of_its_keys(tiny_dataset, tmp_path):
    import hashlib

    from pydantic import ValidationError

    fp = fingerprint(load_dataset(tiny_dataset))
    fields = {k: v for k, v in fp.to_dict().items() if k != "hash"}
    # the formula every earlier fingerprint.json and bundle's fingerprint_hash was made with
    assert fp.hash == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert set(fp.to_dict()) == {*OLD_FORMAT_FP, "spacing_p10", "label_volumes_ml", "label_components_max"}
    # the most 26-connected pieces of each label in any case (fragments under 5 % of the label's
    # largest piece not counted), counted here with scipy instead of cc3d
    from scipy import ndimage

    from medseg.io import load_label, load_volume

    most: dict[str, int] = {}
    for case in load_dataset(tiny_dataset).training:
        label = load_label(case.label, image=load_volume(case.images[0])).array
        for k in np.unique(label[label > 0]):
            pieces = ndimage.label(label == k, structure=np.ones((3, 3, 3)))[0]
            sizes = np.bincount(pieces.ravel())[1:]
            most[str(k)] = max(most.get(str(k), 0), int((sizes >= 0.05 * sizes.max()).sum()))
    assert fp.label_components_max == most
    assert fp.n_cases == 4
    assert fp.labels["0"] == "background"
    (tmp_path / "fingerprint.json").write_text(fp.to_json())
    assert Fingerprint.load(tmp_path / "fingerprint.json") == fp
    with pytest.raises(ValidationError):
        fp.n_cases = 3  # type: ignore[misc]


def _two_organ_ct(root, *, fat_organ_voxels: int):
    """CT cases with a large enhancing organ (label 1, ~150 HU) and a small fat-density one
    (label 2, ~-90 HU) inside body fat (-100 HU): the small organ is far under 0.5 % of the foreground."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(2):
        label = np.zeros((40, 40, 40), np.uint8)
        label[4:36, 4:36, 4:36] = 1
        side = round(fat_organ_voxels ** (1 / 3))
        label[36 : 36 + side, 0:side, 0:side] = 2
        image = np.where(label == 1, 150.0, -100.0)
        image[label == 2] = -90.0
        image = (image + rng.normal(0, 10, image.shape)).astype(np.int16)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"c{i}.nii.gz")
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    spec = {
        "name": "t",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "fatty"},
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_label_components_read_either_memory_order():
    """nibabel's arrays are Fortran-ordered: the components are counted without a C copy, and the
    same in either order or in a strided view."""
    lab = np.zeros((20, 30, 10), np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    lab[10:15, 2:5, 2:5] = 1
    lab[2:8, 20:25, 5:9] = 2
    for arr in (lab, np.asfortranarray(lab), lab[:, ::-1, :]):
        assert label_components(arr) == {1: 2, 2: 1}


def test_label_components_do_not_count_fragments():
    """A sliver of an organ (under 5 % of its largest piece) is not a piece: counted, it let the
    tuner keep "the 2 largest" livers and a false liver blob survived on a test case."""
    lab = np.zeros((40, 40, 20), np.uint8)
    lab[2:22, 2:22, 2:12] = 1  # 4000 voxels
    lab[30:33, 30:33, 15:17] = 1  # 18 voxels: a fragment
    lab[2:12, 28:38, 2:12] = 2  # a pair of equal kidneys ...
    lab[28:38, 2:12, 2:12] = 2
    lab[30:34, 30:34, 2:6] = 2  # ... and a third piece of 64 voxels, 6.4 % of the largest: counted
    assert label_components(lab) == {1: 1, 2: 3}
    assert label_components(lab, min_share=0) == {1: 2, 2: 3}
    assert label_components(lab, min_share=0.1) == {1: 1, 2: 2}


def test_the_fingerprint_pairs_voxels_and_labels_whatever_the_images_memory_order(tmp_path, monkeypatch):
    """An image in C order beside a Fortran-ordered label (a DICOM series read by SimpleITK beside a
    NIfTI mask): each label's sampled intensities are its own voxels', the same as in one order."""
    import dataclasses

    from medseg import data as data_module

    dataset = load_dataset(_two_organ_ct(tmp_path / "d", fat_organ_voxels=512))
    expected = fingerprint(dataset).foreground_intensity
    real = data_module.load_channels

    def c_ordered(*args, **kwargs):
        channels = real(*args, **kwargs)
        assert channels[0].array.flags.f_contiguous  # nibabel's order: the test would prove nothing
        return [dataclasses.replace(c, array=np.ascontiguousarray(c.array)) for c in channels]

    monkeypatch.setattr(data_module, "load_channels", c_ordered)
    assert fingerprint(dataset).foreground_intensity == expected


def test_ct_window_holds_every_labels_intensities_however_small_the_label(tmp_path):
    """The window's percentiles weigh labels equally: a small fat-density organ is not clipped to the
    value of the fat around it (a union percentile would put the window's floor near 150 HU here)."""
    fp = fingerprint(load_dataset(_two_organ_ct(tmp_path / "d", fat_organ_voxels=64)))
    stats = fp.foreground_intensity
    assert stats.p00_5 < -100.0  # the fatty organ (-90 +- 10 HU) lies inside the window, tails included
    assert 165.0 < stats.p99_5 < 200.0  # the large organ's upper tail, not beyond it
    window = make_plan(Config(), fp).preprocess.intensity.window
    assert window is not None
    assert window[0] < -100.0
    assert 140.0 < stats.mean < 160.0  # mean and std stay those of the foreground voxels themselves


@pytest.mark.parametrize(
    "text", ["{not json", json.dumps({**OLD_FORMAT_FP, "n_cases": "many"}), json.dumps({"hash": "0" * 16})]
)
def test_a_malformed_fingerprint_is_an_input_error_naming_the_file(tmp_path, text):
    path = tmp_path / "fingerprint.json"
    path.write_text(text)
    with pytest.raises(InputError, match=r"fingerprint\.json: not a readable dataset fingerprint"):
        Fingerprint.load(path)


@pytest.mark.slow
def test_train_with_no_config_uses_the_plan(tiny_dataset, tmp_path, capsys):
    from medseg.cli import main

    out = tmp_path / "run"
    # no --config: everything but the epoch count (and, to keep this test short, its length) comes from the plan
    assert main(["train", "--data", str(tiny_dataset), "--epochs", "1", "--set", "train.iterations_per_epoch=2",
                 "--out", str(out)]) == 0
    assert "bundle:" in capsys.readouterr().out
    fp = json.loads((out / "fingerprint.json").read_text())
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    bundle_cfg = yaml.safe_load((out / "bundle" / "config.yaml").read_text())
    assert plan["preprocess"]["spacing"] == pytest.approx(fp["spacing_median"], abs=1e-3)
    assert plan["train"]["patch_size"] is not None
    assert plan["preprocess"]["intensity"]["window"] is not None
    for section in ("preprocess", "train"):
        assert bundle_cfg[section] == plan[section]
    assert "spacing" in (out / "plan.txt").read_text()
    # --epochs on a CPU: the patch measured for this CPU's speed, and the plan says so
    assert "measured on this CPU as for a 15-min budget, for the epochs given" in (out / "plan.txt").read_text()

    import mlflow

    client = mlflow.MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])[0]
    assert run.data.params["train.patch_size"] == str(plan["train"]["patch_size"])
    assert run.data.params["fingerprint_hash"] == fp["hash"]
    assert "plan.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_sparse_label_values_become_channels_dense_ones_stay():
    """Label values that are not 0..K-1 train on channels 0..K-1 (no warning, no advice to relabel:
    the values are mapped, and mapped back when masks are written); dense labels are left alone."""
    from medseg.config import Config
    from medseg.labels import channel_labels, mapping_note

    dense = channel_labels(Config(), {0: "background", 1: "liver", 2: "spleen"})
    assert dense.labels == {0: "background", 1: "liver", 2: "spleen"}
    assert dense.label_values is None
    assert mapping_note(dense) is None
    assert channel_labels(Config(), None).labels is None
    sparse = channel_labels(Config(), {0: "background", 255: "lesion"})
    assert sparse.labels == {0: "background", 1: "lesion"}
    assert sparse.label_values == {0: 0, 1: 255}
    assert max(sparse.labels) + 1 == 2  # two output channels, not 256
    note = mapping_note(sparse)
    assert note is not None
    assert "values 0, 255 are network channels 0..1 (2 labels)" in note
    assert "relabel" not in note
    assert channel_labels(sparse).label_values == {0: 0, 1: 255}  # a mapped config is kept as it is
    many = channel_labels(Config(), {0: "background", **{v: f"o{v}" for v in (5, 10, 20, 40, 60, 117)}})
    assert "0, 5, 10, 20, 40, ..." in (mapping_note(many) or "")
