"""benchmarks/case_contrast.py: a label's intensity, contrast and noise per case, beside its Dice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _case(root: Path, split: str, stem: str, organ_hu: float, rng: np.random.Generator) -> None:
    image = np.full((32, 32, 16), 50.0) + rng.normal(0.0, 10.0, (32, 32, 16))
    label = np.zeros((32, 32, 16), np.uint8)
    label[10:22, 10:22, 4:12] = 1
    image[label == 1] += organ_hu - 50.0
    for kind, data in (("images", image.astype(np.int16)), ("labels", label)):
        (root / f"{kind}{split}").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, np.eye(4)), root / f"{kind}{split}" / f"{stem}.nii.gz")


def test_cases_are_listed_by_the_labels_intensity_with_their_dice_and_the_training_range(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    _case(data, "Tr", "train_0", 10.0, rng)
    _case(data, "Tr", "train_1", 20.0, rng)
    _case(data, "Ts", "bright", 40.0, rng)
    _case(data, "Ts", "dark", 0.0, rng)
    (data / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"}}))
    results = tmp_path / "acc.json"
    results.write_text(json.dumps({"results": {"medseg": {"cases": {
        "bright": {"dice_organ": 0.4}, "dark": {"dice_organ": 0.95}}}}}))
    out = tmp_path / "table.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "case_contrast.py"), "--data", str(data), "--results",
         str(results), "--label", "1", "--out", str(out)],
        capture_output=True, text=True, check=True,
    )
    lines = proc.stdout.splitlines()
    assert "training cases inside 10 to 20" in lines[0]
    rows = [line for line in lines if line.startswith("| dark") or line.startswith("| bright")]
    assert [row.split(" |")[0] for row in rows] == ["| dark", "| bright"], "listed by intensity"
    assert "(above training)" in rows[1]
    assert rows[1].endswith("0.400 |")
    table = json.loads(out.read_text())
    dark = table["test"]["dark"]
    assert abs(dark["inside"] - 0.0) < 3
    assert abs(dark["contrast"] - 50.0) < 4
    assert 7.0 < dark["noise"] < 13.0  # the image's 10 HU, measured inside the label
