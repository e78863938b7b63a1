"""MLflow tracking: one run per training, params, batched metrics, artifacts, the model.

The store is ``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` in the working folder. HTTP calls to a tracking server
are bounded (timeout and retries, ``tracking.http_timeout_s``/``http_retries``, unless
the user set MLflow's own variables), and an unreachable server is reported before
any training work starts (``Tracker.start`` raises ``TrackingError``). When the server
drops mid-run the tracker goes offline: training goes on, nothing more is sent, and
``Tracker.end`` says what was not logged. ``Tracker`` with ``enabled=False`` records nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from medseg.config import TrackingConfig
from medseg.errors import TrackingError

log = logging.getLogger(__name__)

# MLflow's defaults (120 s timeout, 7 retries, backoff factor 2) blocked 246 s against a dead
# server; bound them unless the user chose. MLflow reads these variables at each call.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


def resolve_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _bound_http(cfg: TrackingConfig | None = None) -> None:
    defaults = dict(_HTTP_DEFAULTS)
    if cfg is not None:
        defaults["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.http_timeout_s)
        defaults["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.http_retries)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """For an ``http(s)://`` tracking server: one bounded request to ``/health``, else ``TrackingError``."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # it answered: a proxy or an older server without /health
    except (OSError, ValueError) as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} cannot be reached ({type(exc).__name__}: {str(exc)[:120]}); "
            "start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or pass --set tracking.enabled=false"
        ) from exc


def git_commit() -> str | None:
    """The commit of the medseg source tree, when it is a git checkout."""
    import subprocess

    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and len(commit) == 40 else None


def package_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("medseg", "torch", "monai", "numpy", "mlflow", "SimpleITK", "nibabel", "pydicom"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class Tracker:
    """A thin, explicit wrapper over one MLflow run."""

    def __init__(self, cfg: TrackingConfig, *, enabled: bool | None = None) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled if enabled is None else enabled
        self.run_id: str | None = None
        self.uri = resolve_uri(cfg) if self.enabled else ""
        if self.enabled:
            _bound_http(cfg)  # MLflow reads these at every call, so every call below is bounded
        self.failures: list[str] = []
        self.offline = False  # set when a call fails mid-run: nothing more is sent
        self.not_logged: list[str] = []

    def start(
        self, *, run_name: str | None = None, tags: dict[str, str] | None = None, run_id: str | None = None
    ) -> None:
        if not self.enabled:
            return
        _bound_http(self.cfg)
        check_reachable(self.uri, timeout_s=min(10.0, float(self.cfg.http_timeout_s)))
        import mlflow

        self._previous_uri = (_global_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
        mlflow.set_tracking_uri(self.uri)
        try:
            experiment = mlflow.set_experiment(self.cfg.experiment)
            run = mlflow.start_run(
                run_id=run_id,
                experiment_id=None if run_id else experiment.experiment_id,
                run_name=None if run_id else (self.cfg.run_name or run_name),
                tags=tags,
            )
        except Exception as exc:
            raise TrackingError(
                f"MLflow tracking store {self.uri} cannot be used ({type(exc).__name__}: {str(exc)[:200]}); "
                "start the server, fix tracking.uri / MLFLOW_TRACKING_URI, or pass --set tracking.enabled=false"
            ) from exc
        self.run_id = run.info.run_id
        log.info("MLflow run %s in %s", self.run_id, self.uri)

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        if not self.enabled or self.run_id is None:
            return None
        if self.offline:
            self.not_logged.append(what)
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            message = f"{what} not logged to MLflow ({type(exc).__name__}: {str(exc)[:200]})"
            self.failures.append(message)
            self.not_logged.append(what)
            if self.uri.startswith(("http://", "https://")):
                # a dead server costs timeout x retries per call: stop sending, keep training
                self.offline = True
                log.warning("%s; MLflow server unreachable, training goes on without tracking", message)
            else:
                log.warning(message)
            return None

    def logged_steps(self, metric: str) -> set[int]:
        """Steps already recorded for ``metric`` in this run (to re-log a resumed run without duplicates)."""
        import mlflow

        client = mlflow.MlflowClient(self.uri)
        history = self._guard(f"history of {metric}", client.get_metric_history, self.run_id, metric)
        return {int(m.step) for m in history or []}

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow
        from mlflow.entities import Param

        items = [Param(k[:250], _param_value(v)) for k, v in params.items()]
        client = mlflow.MlflowClient(self.uri)
        for start in range(0, len(items), 100):
            self._guard("params", client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        client = mlflow.MlflowClient(self.uri)
        self._guard(f"metrics of step {step}", client.log_batch, self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        fn = mlflow.log_artifacts if path.is_dir() else mlflow.log_artifact
        self._guard(f"artifact {path.name}", fn, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        self._guard("tags", mlflow.set_tags, tags)

    def log_model(self, network, input_example) -> None:
        """``mlflow.pytorch.log_model`` with an input example (the signature is inferred from it)."""
        if not self.cfg.log_model or not self.enabled:
            return
        import mlflow.pytorch

        self._guard(
            "model",
            mlflow.pytorch.log_model,
            network,
            name="model",
            input_example=input_example,
            registered_model_name=self.cfg.registered_model_name,
            pip_requirements=["torch", "monai", "numpy"],
        )

    def end(self, status: str = "FINISHED") -> None:
        if not self.enabled or self.run_id is None:
            return
        import mlflow

        if self.offline:
            self.not_logged.append(f"run status {status}")
            # the run stays open in the store; mlflow's local state must not keep pointing at it
            _forget_active_run()
        else:
            self._guard("run end", mlflow.end_run, status=status)
        # leave MLflow's process-wide tracking URI (and the variable it sets) as we found them
        previous_uri, previous_env = getattr(self, "_previous_uri", (None, None))
        with contextlib.suppress(Exception):
            mlflow.set_tracking_uri(previous_uri)
        if previous_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
        if self.not_logged:
            shown = ", ".join(self.not_logged[:12]) + (" ..." if len(self.not_logged) > 12 else "")
            log.warning(
                "MLflow: %d item(s) were NOT logged to run %s (%s): %s. Checkpoints and the bundle are "
                "in the run folder; resume with --resume once the server is back to log the history.",
                len(self.not_logged),
                self.run_id,
                self.failures[0] if self.failures else "",
                shown,
            )


def _global_tracking_uri() -> str | None:
    """The URI set with ``mlflow.set_tracking_uri`` in this process, if any (not the env default)."""
    try:
        from mlflow.tracking._tracking_service import utils

        return utils._tracking_uri
    except (ImportError, AttributeError):
        return None


def _forget_active_run() -> None:
    """Drop MLflow's in-process active run without calling the (dead) server."""
    try:
        from mlflow.tracking.fluent import _active_run_stack

        stack = _active_run_stack.get() if hasattr(_active_run_stack, "get") else _active_run_stack
        stack.clear()
    except Exception:  # internal API: best effort only
        pass


def download_bundle(model_uri: str, dest: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Fetch the bundle folder logged with a run, for ``runs:/ID/model`` or ``models:/NAME/VERSION``."""
    _bound_http()
    import mlflow

    uri = tracking_uri or resolve_uri(TrackingConfig())
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        if model_uri.startswith("models:/"):
            name, _, version = model_uri[len("models:/") :].partition("/")
            if version in ("", "latest"):
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise TrackingError(f"{model_uri}: no registered versions")
                version = str(max(int(v.version) for v in versions))
            run_id = client.get_model_version(name, version).run_id
        elif model_uri.startswith("runs:/"):
            run_id = model_uri[len("runs:/") :].split("/")[0]
        else:
            raise TrackingError(f"{model_uri}: expected runs:/<run id>/model or models:/<name>/<version>")
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="bundle", dst_path=str(dest))
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(
            f"{model_uri}: cannot fetch the bundle from MLflow ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    return Path(local)
