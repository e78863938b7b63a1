"""The whole bundle as an MLflow pyfunc model: NIfTI in, mask on the input's grid out.

``mlflow.pyfunc.load_model(uri).predict(df)`` and ``mlflow models serve -m URI --env-manager local``
run medseg's own pipeline (preprocessing, sliding window, resampling to the source grid,
post-processing) from the bundle stored inside the model (``artifacts/bundle``).

Request: one row per image, with either ``nifti`` (the ``.nii``/``.nii.gz`` file's bytes, base64)
or ``path`` (a NIfTI file or DICOM folder the server can read)::

    curl -X POST http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"nifti": "<base64 of ct.nii.gz>"}]}'

Answer: per row ``mask`` (base64 of a ``.nii.gz`` uint8 label map with the input's shape and
affine) and ``labels`` (JSON: label id -> name). Importing this module imports MLflow: it is
loaded only to log or serve a model.
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from medseg.io import Volume

log = logging.getLogger(__name__)

ARTIFACT = "bundle"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "nifti", required=False), ColSpec("string", "path", required=False)]),
    outputs=Schema([ColSpec("string", "mask"), ColSpec("string", "labels")]),
)


def nifti_bytes(volume: Volume) -> bytes:
    """``volume`` as the bytes of a gzipped NIfTI file (sform = qform = its affine)."""
    from medseg.io import write_nifti

    with tempfile.TemporaryDirectory(prefix="medseg-pyfunc-") as tmp:
        path = write_nifti(volume, Path(tmp) / "volume.nii.gz")
        return path.read_bytes()


def volume_from_bytes(data: bytes) -> Volume:
    """A NIfTI file's bytes (gzipped or not) read by medseg's own NIfTI reader."""
    from medseg.io import read_nifti

    suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory(prefix="medseg-pyfunc-") as tmp:
        path = Path(tmp) / f"request{suffix}"
        path.write_bytes(data)
        return read_nifti(path, kind="image")


def _pass_on(caught: list[warnings.WarningMessage], *, but: str) -> None:
    """Emit recorded warnings again, as they were, except those whose message contains ``but``."""
    for w in caught:
        if but not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# MLflow advises type hints on ``predict`` when the class is defined (a warning in colour, at every training
# run that logs a model); medseg leaves them out on purpose (MLflow would infer its own schema from them).
# MLflow shows its warnings "once" inside its own filter, so a filter here cannot hide that one: the
# class is defined with warnings recorded, and every other warning is passed on as it was.
with warnings.catch_warnings(record=True) as _definition_warnings:
    warnings.simplefilter("always")

    class BundleModel(PythonModel):
        """medseg's inference pipeline behind MLflow's pyfunc interface (one row per image)."""

        def load_context(self, context: Any) -> None:
            import torch

            from medseg.bundle import load_bundle
            from medseg.runtime import fit_threads_to_cpus
            from medseg.tracking import no_usage_telemetry

            fit_threads_to_cpus()  # a serving container's CPU quota (torch would start a thread per host core)
            no_usage_telemetry()  # the server's process: no usage reports from here on (the images set it at start)
            config = getattr(context, "model_config", None) or {}
            device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
            self.bundle = load_bundle(context.artifacts[ARTIFACT], device=device)
            self.labels = json.dumps({str(k): v for k, v in sorted(self.bundle.labels.items())})

        def predict(self, context, model_input, params=None):  # untyped: MLflow would infer a schema from hints
            rows = _records(model_input)
            out = []
            for row in rows:
                volume = _volume_of(row)
                mask = self.bundle.predict(volume)
                out.append({"mask": base64.b64encode(nifti_bytes(mask)).decode("ascii"), "labels": self.labels})
            return pd.DataFrame(out, columns=["mask", "labels"])


_pass_on(_definition_warnings, but="Add type hints to the `predict` method")
del _definition_warnings


def _records(model_input: Any) -> list[dict[str, Any]]:
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input).to_dict(orient="records")
    if isinstance(model_input, list):
        return [dict(r) for r in model_input]
    raise TypeError(
        f"expected a DataFrame or records with 'nifti' or 'path', got {type(model_input).__name__}"
    )


def _volume_of(row: dict[str, Any]) -> Volume:
    data = row.get("nifti")
    if isinstance(data, str) and data:
        return volume_from_bytes(base64.b64decode(data))
    if isinstance(data, bytes) and data:
        return volume_from_bytes(data)
    path = row.get("path")
    if isinstance(path, str) and path:
        from medseg.io import load_volume

        return load_volume(path)
    raise ValueError("each row needs 'nifti' (base64 of a NIfTI file) or 'path'")


def decode_mask(value: str) -> Volume:
    """A ``mask`` answered by the model back to a :class:`~medseg.io.Volume` (label map)."""
    from medseg.io import Volume

    volume = volume_from_bytes(base64.b64decode(value))
    return Volume(volume.array.round().astype(np.uint8), volume.affine, meta={"kind": "label"})


def input_example(bundle_dir: Path) -> pd.DataFrame:
    """A synthetic request (no patient data): a small phantom on the bundle's planned spacing."""
    import yaml

    from medseg.io import Volume

    cfg = yaml.safe_load((bundle_dir / "config.yaml").read_text())
    spacing = [float(s) for s in (cfg.get("preprocess", {}).get("spacing") or [1.0, 1.0, 1.0])]
    patch = [int(p) for p in (cfg.get("train", {}).get("patch_size") or [16, 16, 16])]
    rng = np.random.default_rng(0)
    array = rng.normal(0.0, 10.0, size=patch).astype(np.float32)
    array[tuple(slice(p // 4, 3 * p // 4) for p in patch)] += 100.0
    volume = Volume(array, np.diag([*spacing, 1.0]))
    return pd.DataFrame([{"nifti": base64.b64encode(nifti_bytes(volume)).decode("ascii")}])


def requirements(bundle_dir: Path) -> list[str]:
    """pip requirements of the served model: medseg and the versions the bundle was trained with."""
    from importlib import metadata

    meta_path = bundle_dir / "metadata.json"
    trained = json.loads(meta_path.read_text()).get("versions", {}) if meta_path.is_file() else {}
    out = []
    for name in ("medseg", "torch", "monai", "numpy"):
        version = trained.get(name)
        out.append(f"{name}=={version.split('+')[0]}" if version else name)
    for name in ("mlflow-skinny", "nibabel", "pandas", "safetensors", "PyYAML", "pydantic", "scipy"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def save_bundle_model(bundle_dir: str | Path, path: str | Path) -> Path:
    """Write the pyfunc model folder (MLmodel, the bundle, signature, input example, requirements)."""
    bundle_dir = Path(bundle_dir)
    with tempfile.TemporaryDirectory(prefix="medseg-pyfunc-") as tmp:
        # "models from code": the model is this module's class, not a pickle of an object
        code = Path(tmp) / "medseg_pyfunc.py"
        code.write_text(_MODEL_CODE)
        _save(bundle_dir, path, code)
    return Path(path)


_MODEL_CODE = """\
import mlflow.models

from medseg.mlflow_model import BundleModel

mlflow.models.set_model(BundleModel())
"""


def _save(bundle_dir: Path, path: str | Path, code: Path) -> None:
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(code),
        artifacts={ARTIFACT: str(bundle_dir)},
        signature=SIGNATURE,
        input_example=input_example(bundle_dir),
        pip_requirements=requirements(bundle_dir),
        metadata={"medseg_bundle_hash": _hash(bundle_dir)},
        model_config={
            "device": ""
        },  # "" = CUDA when present; load_model(..., model_config={"device": "cpu"})
    )


def _hash(bundle_dir: Path) -> str:
    from medseg.bundle import bundle_hash

    return bundle_hash(bundle_dir)


def log_bundle_model(
    client: MlflowClient,
    run_id: str,
    bundle_dir: Path,
    *,
    registered_name: str | None = None,
    alias: str | None = None,
    artifact_path: str = "model",
) -> str:
    """Save the pyfunc model and log it to ``run_id`` at ``artifact_path`` through ``client`` (no
    fluent API, no process-wide MLflow state); register it and set ``alias`` when asked.

    Returns ``models:/NAME/VERSION`` when registered, else ``runs:/RUN_ID/model``.
    """
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="medseg-pyfunc-") as tmp:
        local = save_bundle_model(bundle_dir, Path(tmp) / artifact_path)
        client.log_artifacts(run_id, str(local), artifact_path)
    if not registered_name:
        return f"runs:/{run_id}/{artifact_path}"
    try:
        client.create_registered_model(registered_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(registered_name, source, run_id=run_id)
    if alias:
        client.set_registered_model_alias(registered_name, alias, version.version)
    log.info("registered %s version %s%s", registered_name, version.version, f" (@{alias})" if alias else "")
    return f"models:/{registered_name}/{version.version}"
