"""The MLflow pyfunc model wraps the whole bundle: `mlflow models serve` on 127.0.0.1 answers a NIfTI
(bytes or path) with the mask on the input's grid, registered through `medseg train --register --alias`
and served from models:/NAME@ALIAS. The Python API takes every common image type."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import run_cli

TINY = [
    *("--epochs", "1"),
    *("--set", "preprocess.spacing=[2.0, 2.0, 3.0]"),
    *("--set", "train.patch_size=[16, 16, 16]"),
    *("--set", "model.features=4"),
    *("--set", "model.depth=2"),
    *("--set", "augment.samples_per_volume=1"),
]


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_dataset):
    """`medseg train --register tiny --alias champion` into its own sqlite store."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_cli(
        "train",
        *("--data", str(tiny_dataset), "--out", "run"),
        *TINY,
        *("--set", f"tracking.uri={uri}"),
        *("--register", "tiny", "--alias", "champion"),
        cwd=root,
        check=True,
    )
    # an input that is not RAS-oriented and not the training grid: the mask must follow it
    source = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    img = nib.load(source)
    flipped = img.as_reoriented(np.array([[1, -1], [0, 1], [2, -1]]))
    image = root / "lpi_case.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(flipped.dataobj, dtype=np.float32), flipped.affine), image)
    return root, uri, image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as answer:
        return json.loads(answer.read())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_model_answers_a_nifti_with_the_mask_on_its_grid(registered, tmp_path):
    from medseg.bundle import load_bundle
    from medseg.mlflow_model import decode_mask

    root, uri, image = registered
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "models", "serve"),
            *("-m", "models:/tiny@champion", "--env-manager", "local"),
            *("-h", "127.0.0.1", "-p", str(port)),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, "mlflow models serve exited at start"
                assert time.monotonic() < deadline, "the model server did not answer within 240 s"
                time.sleep(1)
        payload = {
            "dataframe_records": [
                {"nifti": base64.b64encode(image.read_bytes()).decode("ascii")},
                {"path": str(image)},
            ]
        }
        answer = _post(f"http://127.0.0.1:{port}/invocations", payload)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    rows = answer["predictions"]
    assert len(rows) == 2
    expected = load_bundle(root / "run" / "bundle").predict(image)
    source = nib.load(image)
    for row in rows:
        mask = decode_mask(row["mask"])
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        np.testing.assert_array_equal(mask.array, expected.array)
        assert json.loads(row["labels"])["0"] == "background"
    assert expected.array.max() > 0  # a mask with something in it, not all background


@pytest.mark.slow
def test_logged_model_carries_signature_example_requirements_and_the_bundle(registered):
    import mlflow

    from medseg.bundle import bundle_hash

    root, uri, image = registered
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version_by_alias("tiny", "champion")
    assert str(version.version) == "1"
    local = Path(client.download_artifacts(version.run_id, "model", str(root / "dl")))
    info = mlflow.models.Model.load(local / "MLmodel")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["nifti", "path"]
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["mask", "labels"]
    assert (local / "input_example.json").is_file()
    requirements = (local / "requirements.txt").read_text()
    for package in ("medseg==", "torch==", "monai==", "nibabel"):
        assert package in requirements
    assert info.metadata["medseg_bundle_hash"] == bundle_hash(root / "run" / "bundle")
    assert bundle_hash(local / "artifacts" / "bundle") == bundle_hash(root / "run" / "bundle")
    assert not list(local.rglob("*.pkl"))  # models from code: nothing pickled

    # in-process pyfunc, through the registry alias
    model = mlflow.pyfunc.load_model(f"{local}", model_config={"device": "cpu"})
    import pandas as pd

    out = model.predict(pd.DataFrame([{"path": str(image)}]))
    assert list(out.columns) == ["mask", "labels"]


@pytest.mark.slow
def test_predict_accepts_every_common_image_type(registered):
    import SimpleITK as sitk

    import medseg
    from medseg.io import Volume, load_volume

    root, _, image = registered
    bundle = medseg.load_bundle(root / "run" / "bundle", device="cpu")
    reference = bundle.predict(image)
    volume = load_volume(image)
    img = nib.load(image)
    for given in (
        str(image),
        volume,
        img,
        sitk.ReadImage(str(image)),
        (np.asarray(img.dataobj), img.affine),
    ):
        mask = bundle.predict(given)
        assert isinstance(mask, Volume)
        np.testing.assert_allclose(mask.affine, img.affine, atol=1e-4)
        np.testing.assert_array_equal(mask.array, reference.array)
    with pytest.raises(TypeError, match=r"\(array, affine\)"):
        bundle.predict(np.asarray(img.dataobj))
    assert bundle.device.type == "cpu"


def test_defining_the_pyfunc_class_prints_no_type_hint_advice_but_passes_other_warnings_on():
    """MLflow warns (in colour, at every training run that logs a model) that ``predict`` has no type
    hints, which medseg leaves out on purpose; that advice is not printed, any other warning raised
    while the class is defined still is."""
    proc = subprocess.run(
        [sys.executable, "-c", "import medseg.mlflow_model"], capture_output=True, text=True, check=True
    )
    assert "type hints" not in proc.stderr, proc.stderr

    import warnings

    from medseg.mlflow_model import _pass_on

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("Add type hints to the `predict` method", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        _pass_on(caught, but="Add type hints to the `predict` method")
    assert [str(w.message) for w in again] == ["something else"]
