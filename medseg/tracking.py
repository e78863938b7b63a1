"""MLflow tracking: one run per training, params, batched metrics, artifacts, the model.

The store is ``cfg.tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` in the working folder. Every call goes through an
``MlflowClient`` bound to that URI: nothing here sets MLflow's process-wide tracking
URI, its active run or an environment variable that outlives the call.

HTTP calls to a tracking server are bounded (timeout and retries,
``tracking.http_timeout_s``/``http_retries``, unless the user set MLflow's own
variables): MLflow reads those bounds only from environment variables, so they are
set around each call and restored after it. An unreachable server is reported before
any training work starts (``Tracker.start`` raises ``TrackingError``); a local sqlite
store that cannot be written is reported the same way, in one line. When the server
drops mid-run the tracker goes offline: training goes on, nothing more is sent, and
``Tracker.end`` says what was not logged. ``Tracker`` with ``enabled=False`` imports
and calls nothing from MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from medseg.config import TrackingConfig
from medseg.errors import TrackingError, one_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# MLflow's defaults (120 s timeout, 7 retries, backoff factor 2) blocked 246 s against a dead
# server; bound them unless the user chose. MLflow reads these variables at each call.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
_ENV_LOCK = threading.RLock()
# the loggers that print tracebacks when a store cannot be used (filters do not apply to children)
_STORE_LOGGERS = (
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "alembic.runtime.migration",
    "sqlalchemy.engine.Engine",
)
_HINT = "fix tracking.uri / MLFLOW_TRACKING_URI, or pass --set tracking.enabled=false"


def no_usage_telemetry() -> None:
    """MLflow 3 reports usage to its makers: at import a thread fetches a config from the internet,
    then sends records of the API calls made. A tool on a hospital network does not call out on its
    own, so the command line and the served model turn it off (``MLFLOW_DISABLE_TELEMETRY=true``)
    unless the environment already says either way; ``MLFLOW_DISABLE_TELEMETRY=false`` keeps it on.
    Set before MLflow is imported; where it already is, its telemetry client is dropped."""
    import sys

    if "MLFLOW_DISABLE_TELEMETRY" in os.environ:  # the user's (or an earlier call's) word stands
        return
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    if "mlflow" not in sys.modules:
        return
    try:
        from mlflow.telemetry import set_telemetry_client
    except ImportError:  # an MLflow without telemetry
        return
    set_telemetry_client()  # reads the environment again: None when disabled


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI: the config's, else ``$MLFLOW_TRACKING_URI``, else ./mlflow.db (sqlite)."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextlib.contextmanager
def bounded_http(cfg: TrackingConfig | None = None) -> Iterator[None]:
    """MLflow's HTTP bounds for the calls inside the block; the environment is restored after it.

    A value the user set (in the environment) is kept as it is.
    """
    defaults = dict(_HTTP_DEFAULTS)
    if cfg is not None:
        defaults["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.http_timeout_s)
        defaults["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.http_retries)
    with _ENV_LOCK:
        added = [key for key in defaults if key not in os.environ]
        for key in added:
            os.environ[key] = defaults[key]
        try:
            yield
        finally:
            for key in added:
                os.environ.pop(key, None)


def client_for(uri: str) -> MlflowClient:
    """An ``MlflowClient`` bound to ``uri`` (tracking and model registry), no global state touched."""
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        raise TrackingError(
            f"MLflow is not installed ({exc}): pip install mlflow-skinny, or pass --set tracking.enabled=false"
        ) from exc
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:"):
        return None
    parsed = urlparse(uri)
    path = unquote(parsed.path)
    if parsed.query or path.startswith("/file:") or path in ("", "/:memory:", ":memory:"):
        return None  # SQLite URI filenames and in-memory stores: MLflow decides
    return Path(path)


def check_writable_store(uri: str) -> None:
    """For a local sqlite store: the database (or the folder that will hold it) must be writable.

    Checked before MLflow opens it, so that a read-only store is one line, not SQLAlchemy's
    migration tracebacks.
    """
    db = sqlite_path(uri)
    if db is None:
        return
    target = db if db.exists() else db.parent
    if not target.exists():
        raise TrackingError(f"MLflow store {uri}: the folder {db.parent} does not exist; {_HINT}")
    if not os.access(target, os.W_OK) or (db.exists() and not os.access(db.parent, os.W_OK)):
        raise TrackingError(f"MLflow store {uri}: {target} is read-only; {_HINT}")


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
            f"MLflow tracking server {uri} cannot be reached ({one_line(exc, with_type=True, limit=120)}); "
            f"start the server, {_HINT}"
        ) from exc


@contextlib.contextmanager
def quiet_store_logs() -> Iterator[None]:
    """Hold back the log records of SQLAlchemy and Alembic while a store is opened.

    A store that cannot be used makes them log tracebacks (about 90 lines) before MLflow raises;
    the one-line ``TrackingError`` says what matters. The loggers' own levels are left as they are:
    a filter on their handlers' path is added and removed.
    """
    blocker = _DropFilter()
    loggers = [logging.getLogger(name) for name in _STORE_LOGGERS]
    for logger in loggers:
        logger.addFilter(blocker)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(blocker)


class _DropFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


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
    """Versions of Python, medseg and the packages a run depends on (installed ones only): the
    run's ``version.*`` MLflow parameters and a bundle's ``metadata.json`` ``versions``."""
    import platform
    from importlib import metadata

    from medseg import __version__

    out = {"python": platform.python_version(), "medseg": __version__}
    for name in (
        "torch",
        "monai",
        "numpy",
        "mlflow",
        "mlflow-skinny",
        "SimpleITK",
        "nibabel",
        "pydicom",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class Tracker:
    """A thin, explicit wrapper over one MLflow run, through an ``MlflowClient`` bound to its URI."""

    def __init__(self, cfg: TrackingConfig, *, enabled: bool | None = None) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled if enabled is None else enabled
        self.run_id: str | None = None
        self.uri = resolve_uri(cfg) if self.enabled else ""
        self.failures: list[str] = []
        self.offline = False  # set when a call fails mid-run: nothing more is sent
        self.not_logged: list[str] = []
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    @property
    def _run(self) -> str:
        """The run id, for calls made only once a run is open."""
        if self.run_id is None:
            raise TrackingError("no MLflow run is open")
        return self.run_id

    def start(
        self, *, run_name: str | None = None, tags: dict[str, str] | None = None, run_id: str | None = None
    ) -> None:
        """Create the run (or reopen ``run_id``); an unusable store raises a one-line ``TrackingError``."""
        if not self.enabled:
            return
        check_reachable(self.uri, timeout_s=min(10.0, float(self.cfg.http_timeout_s)))
        check_writable_store(self.uri)
        try:
            with bounded_http(self.cfg), quiet_store_logs():
                self.run_id = self._open_run(run_name=run_name, tags=tags, run_id=run_id)
        except Exception as exc:
            raise TrackingError(
                f"MLflow tracking store {self.uri} cannot be used ({one_line(exc, with_type=True, limit=200)}); start the server, {_HINT}"
            ) from exc
        log.info("MLflow run %s in %s", self.run_id, self.uri)

    def _open_run(self, *, run_name: str | None, tags: dict[str, str] | None, run_id: str | None) -> str:
        client = self.client
        if run_id:
            client.update_run(run_id, status="RUNNING")
            return run_id
        experiment = client.get_experiment_by_name(self.cfg.experiment)
        # a local store keeps its artifacts beside its database (MLflow's default is ./mlruns of
        # whatever folder the first run started in: a store given by path scattered its artifacts)
        db = sqlite_path(self.uri)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(
                self.cfg.experiment, artifact_location=(db.parent / "mlruns").resolve().as_uri() if db else None
            )
        )
        run = client.create_run(
            experiment_id,
            run_name=self.cfg.run_name or run_name,
            tags={"mlflow.source.name": "medseg", "mlflow.source.type": "LOCAL", **(tags or {})},
        )
        return run.info.run_id

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or self.run_id is None:
            return None
        if self.offline:
            self.not_logged.append(what)
            return None
        try:
            with bounded_http(self.cfg), quiet_store_logs():
                return fn(*args, **kwargs)
        except Exception as exc:
            message = f"{what} not logged to MLflow ({one_line(exc, with_type=True, limit=200)})"
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
        if not self.enabled or self.run_id is None:
            return set()
        history = self._guard(
            f"history of {metric}", lambda: self.client.get_metric_history(self._run, metric)
        )
        return {int(m.step) for m in history or []}

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k[:250], _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            self._guard("params", lambda chunk=chunk: self.client.log_batch(self._run, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._guard(f"metrics of step {step}", lambda: self.client.log_batch(self._run, metrics=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or self.run_id is None:
            return
        path = Path(path)
        if path.is_dir():
            self._guard(
                f"artifact {path.name}",
                lambda: self.client.log_artifacts(self._run, str(path), artifact_path),
            )
        else:
            self._guard(
                f"artifact {path.name}",
                lambda: self.client.log_artifact(self._run, str(path), artifact_path),
            )

    def log_bundle_model(
        self,
        bundle_dir: str | Path,
        *,
        register: str | None = None,
        alias: str | None = None,
    ) -> str | None:
        """Log the whole bundle as an MLflow pyfunc model at ``model`` (see ``medseg.mlflow_model``).

        ``register``: a registered model name (default ``tracking.registered_model_name``) that gets
        a new version of it; ``alias`` (e.g. ``champion``) then points at that version. Returns the
        model URI (``models:/NAME/VERSION`` when registered, else ``runs:/ID/model``), or None when
        nothing was logged.
        """
        if not self.enabled or self.run_id is None or not self.cfg.log_model:
            return None
        from medseg.mlflow_model import log_bundle_model

        name = register or self.cfg.registered_model_name
        alias = alias or self.cfg.alias
        return self._guard(
            "model",
            log_bundle_model,
            self.client,
            self.run_id,
            Path(bundle_dir),
            registered_name=name,
            alias=alias,
        )

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status``; say what was not logged, if anything."""
        if not self.enabled or self.run_id is None:
            return
        if self.offline:
            self.not_logged.append(f"run status {status}")  # the run stays open in the store
        else:
            self._guard("run end", lambda: self.client.set_terminated(self._run, status=status))
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


# --- models logged with a run: resolution and the local cache of downloaded bundles ---

CACHE_MAX_BYTES = 4 * 1024**3  # downloaded bundles kept; the least recently used go first
_COMPLETE = ".medseg-download.json"


@dataclass(frozen=True)
class ModelSource:
    """Where an MLflow model URI leads: the run that logged the bundle, and the registry entry."""

    uri: str
    tracking_uri: str
    run_id: str
    name: str | None = None
    version: str | None = None
    artifact_path: str = "bundle"

    @property
    def cache_key(self) -> str:
        return f"{self.run_id}-{self.artifact_path.replace('/', '_')}"


def resolve_model_uri(model_uri: str, *, tracking_uri: str | None = None) -> ModelSource:
    """``runs:/ID/...``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``
    resolved through MLflow's registry API to the run that logged the bundle."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    uri = tracking_uri or resolve_uri(TrackingConfig.model_validate({}))
    client = client_for(uri)
    try:
        with bounded_http(), quiet_store_logs():
            if model_uri.startswith("runs:/"):
                run_id, _ = RunsArtifactRepository.parse_runs_uri(model_uri)
                return ModelSource(model_uri, uri, run_id)
            if not model_uri.startswith("models:/"):
                raise TrackingError(
                    f"{model_uri}: expected runs:/<run id>/model, models:/<name>/<version> or models:/<name>@<alias>"
                )
            found = get_model_name_and_version(client, model_uri)
            if len(found) == 1:  # an MLflow 3 logged-model id (models:/m-...)
                logged_run = client.get_logged_model(found[0]).source_run_id
                if not logged_run:
                    raise TrackingError(
                        f"{model_uri}: the logged model has no run that logged a medseg bundle"
                    )
                return ModelSource(model_uri, uri, logged_run)
            name, version = found
            run_id = client.get_model_version(name, version).run_id or ""
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"{model_uri}: cannot be resolved in {uri} ({one_line(exc, with_type=True, limit=200)})") from exc
    if not run_id:
        raise TrackingError(
            f"{model_uri}: version {version} of {name} has no run that logged a medseg bundle"
        )
    return ModelSource(model_uri, uri, run_id, name=name, version=str(version))


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/medseg/models`` (``~/.cache/medseg/models`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medseg" / "models"


def download_bundle(
    model_uri: str,
    *,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
    max_cache_bytes: int = CACHE_MAX_BYTES,
) -> tuple[Path, ModelSource]:
    """The bundle folder logged with the run behind ``model_uri``, from the cache or downloaded into it.

    One folder per run (``<cache>/<run id>-bundle``), reused by later loads. A download goes to a
    staging folder in the cache that is renamed when complete and removed on failure, so nothing
    is left in the system's temp folder. Afterwards the least recently used bundles are removed
    until the cache holds at most ``max_cache_bytes`` (the one just fetched is always kept).
    """
    source = resolve_model_uri(model_uri, tracking_uri=tracking_uri)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / source.cache_key
    if (final / _COMPLETE).is_file():
        os.utime(final / _COMPLETE)  # recently used
        return final, source
    _sweep_partials(root)
    staging = Path(tempfile.mkdtemp(prefix=f".partial-{source.cache_key}-", dir=root))
    try:
        with bounded_http(), quiet_store_logs():
            local = client_for(source.tracking_uri).download_artifacts(
                source.run_id, source.artifact_path, str(staging)
            )
        marker = {**asdict(source), "downloaded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(local, _COMPLETE).write_text(json.dumps(marker, indent=2))
        with contextlib.suppress(OSError):  # a concurrent download of the same run won: use it
            os.replace(local, final)
    except Exception as exc:
        raise TrackingError(f"{model_uri}: cannot fetch the bundle from MLflow ({one_line(exc, with_type=True, limit=200)})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (final / _COMPLETE).is_file():
        raise TrackingError(f"{model_uri}: the run {source.run_id} holds no medseg bundle")
    prune_cache(root, max_cache_bytes, keep=final)
    return final, source


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prune_cache(root: Path, max_bytes: int, *, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used bundles until the cache holds at most ``max_bytes``."""
    entries = []
    for entry in root.iterdir():
        marker = entry / _COMPLETE
        if entry.is_dir() and marker.is_file():
            entries.append((marker.stat().st_mtime, entry, _folder_bytes(entry)))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, entry, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if keep is not None and entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed


def _sweep_partials(root: Path, older_than_s: float = 6 * 3600) -> None:
    """Staging folders of downloads that died (killed process) long enough ago."""
    now = time.time()
    for entry in root.glob(".partial-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
