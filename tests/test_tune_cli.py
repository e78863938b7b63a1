"""`medseg tune`: a bundle's post-processing chosen again on labelled cases it has not seen (a site's
own annotated scans), written to a new bundle; the model it starts from is never modified."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli, train_untuned_bundle


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset):
    """A one-epoch bundle without tuning, and unseen labelled cases from another seed."""
    from medseg.synthetic import make_dataset

    root = tmp_path_factory.mktemp("tune_cli")
    bundle = train_untuned_bundle(tiny_dataset, root / "run")
    make_dataset(root / "site", cases=3, size=32, seed=11, test_fraction=0.0)
    return bundle, root / "site"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_tune_writes_a_tuned_copy_and_leaves_the_model_alone(trained, tmp_path):
    bundle, site = trained
    before = _digest(bundle)
    out = tmp_path / "tuned"
    proc = run_cli("tune", "-m", str(bundle), "--data", str(site), "-o", str(out), cwd=tmp_path, check=True)
    assert _digest(bundle) == before  # the model tuned from is not modified
    from medseg.data import load_dataset

    cases = len(load_dataset(site).training)
    assert cases >= 2
    assert f"post-processing tuned on {cases} validation case(s)" in proc.stdout
    assert f"tuned bundle: {out}" in proc.stdout
    report = json.loads((out / "postprocess_tuning.json").read_text())
    assert report["cases"] == cases
    assert report["trials"]  # every step was tried on the site's cases
    # the same weights, a config that holds what was kept
    assert _digest(out)["model.safetensors"] == before["model.safetensors"]
    from medseg.bundle import load_bundle

    tuned = load_bundle(out)
    assert tuned.config.infer.tta == bool(report["tta"])
    tuned_on = tuned.metadata["postprocess_tuned_on"]  # the bundle says where its choice was made
    assert tuned_on["dataset"] == "site"
    assert tuned_on["cases"] == cases
    assert set(tuned_on["label_components_max"]) == {str(k) for k in tuned.config.labels if k}
    kept_labels = {t["label"] for t in report["trials"] if t["kept"] and t["label"] is not None}
    assert kept_labels <= set(tuned.config.postprocess.per_label)
    # and the tuned bundle infers
    image = next((site / "imagesTr").glob("*.nii.gz"))
    run_cli("infer", "-m", str(out), "-i", str(image), "-o", str(tmp_path / "masks"), "--device", "cpu",
            cwd=tmp_path, check=True)
    assert list((tmp_path / "masks").glob("*_seg.nii.gz"))


def test_tune_refuses_labels_that_differ_and_writing_over_its_model(trained, tmp_path):
    bundle, site = trained
    other = tmp_path / "other"
    shutil.copytree(site, other)
    spec = json.loads((other / "dataset.json").read_text())
    spec["labels"] = {"0": "background", "1": "spleen"}
    (other / "dataset.json").write_text(json.dumps(spec))
    proc = run_cli("tune", "-m", str(bundle), "--data", str(other), "-o", str(tmp_path / "t"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "other" in proc.stderr
    assert "differ from the model's" in proc.stderr
    assert not (tmp_path / "t").exists()
    proc = run_cli("tune", "-m", str(bundle), "--data", str(site), "-o", str(bundle), cwd=tmp_path)
    assert proc.returncode == 2
    assert "not over the model" in proc.stderr
