"""Network backends for inference: torch, ONNX Runtime and OpenVINO, in fp32 or bf16, chosen by measurement.

A :class:`Predictor` is a callable on a float tensor batch ``(B, C, *roi)`` that returns float32 logits
``(B, K, *roi)`` on the input's device, so MONAI's ``sliding_window_inference`` (and with it TTA,
ensembles, CRF and post-processing) runs the same with every backend.

``make_predictor(bundle, backend, precision, device, window_shape=...)`` builds one. ``auto`` (backend
or precision) runs a short micro-benchmark on this machine: every available backend and precision on a
few windows of a synthetic CT phantom preprocessed like a real scan, timed, and compared with torch fp32
(argmax agreement >= 99.9 %, per-label Dice change <= 0.002). The fastest candidate that passes wins
(a bf16 one only when ``LOW_PRECISION_MARGIN`` faster than the fastest fp32 one that passed);
torch fp32 is the fallback when nothing else is installed or passes, and the reason says so. The
result is cached per machine (CPU model, flags, thread count, library versions) and bundle (content
hash) under the user cache folder (``$XDG_CACHE_HOME/medseg`` or ``~/.cache/medseg``), so the
measurement runs once. ONNX Runtime and OpenVINO run the bundle's exported network (``medseg
export``), or one exported on the fly into the cache folder when the bundle has none.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import platform
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medseg.errors import ConfigError, MedsegError, one_line
from medseg.runtime import signal_stack_kept

if TYPE_CHECKING:
    from medseg.bundle import Bundle

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
MIN_AGREEMENT = 0.999  # argmax agreement with torch fp32
MAX_DICE_CHANGE = 0.002  # per label, against torch fp32's mask
# A label with fewer voxels than this in both masks is not scored: one voxel moved would be a Dice
# change of several percent (measured: 12 voxels of a barely predicted label), noise not a difference.
MIN_LABEL_VOXELS = 200
INSTALL_HINT = {
    "onnxruntime": "pip install 'medseg[onnxruntime]'",
    "openvino": "pip install openvino",
}
_CACHE_VERSION = 4  # 3: fp32 wins a near tie (LOW_PRECISION_MARGIN); 4: candidates timed in turns
# bf16 moves a few voxels of the mask (agreement 99.98 % here); it is chosen over the fastest fp32
# candidate that passed only when it is at least this much faster. Within it the timings are this
# machine's noise: e.g. torch bf16 0.0307 s against openvino fp32 0.0325 s per batch in one run,
# 0.028 against 0.025 s in the next, so fp32 gives torch fp32's own mask at the same speed.
LOW_PRECISION_MARGIN = 1.1
# ``auto`` measures the backends only for a network that takes at least this long per batch of windows
# in torch fp32: measuring costs seconds once (export, compilation, timing), which a network of a few
# milliseconds per batch cannot repay on a typical scan (tiny test networks: 3-5 ms; a 16-feature
# U-Net on 48^3 windows: about 100 ms).
MEASURE_ABOVE_S = 0.02
# Interleaved timing rounds per candidate (see _interleaved_best): a few seconds once per machine and bundle.
MEASURE_ROUNDS = 5
# Measuring keeps every candidate alive for the interleaved timing (torch fp32 and bf16, ONNX Runtime's
# session, OpenVINO's compiled model): peak RSS rose by 2.4-3.0x one batch's activations
# (``medseg.io.preflight.network_bytes``) over a cached run (benchmarks/preflight_memory.py: +0.38 GiB
# for DynUNet 8 at 80x96x32, +1.47 GiB for the classic U-Net 16 at 96x96x64, 2 windows a batch).
MEASURE_MEMORY_FACTOR = 3.0


class BackendError(MedsegError):
    """A backend failed while running the network (one line: which backend, which batch, why)."""


class BackendUnavailableError(MedsegError):
    """A backend or precision cannot run here (not installed, no native bf16, CUDA device)."""


# ----------------------------------------------------------------------------- predictors


@dataclass
class Predictor:
    """A network forward on one backend: ``predictor(batch) -> float32 logits`` on the batch's device."""

    backend: str
    precision: str
    run: Callable[[torch.Tensor], torch.Tensor]
    reason: str = ""
    selection: dict[str, Any] | None = None  # the micro-benchmark behind an ``auto`` choice

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        try:
            return self.run(batch)
        except MedsegError:
            raise
        except Exception as exc:  # a backend's own error becomes one line; --debug shows the chain
            raise BackendError(
                f"backend {self.name} failed on a batch of shape {tuple(batch.shape)}: {one_line(exc)}"
            ) from exc


def cpu_has_native_bf16() -> bool:
    from medseg.runtime import cpu_has_native_bf16 as native

    return native()


def torch_predictor(network: torch.nn.Module, precision: str, device: str | torch.device) -> Predictor:
    """The network itself (medseg.predict.torch_predictor: no_grad, autocast, channels-last for CPU bf16)."""
    from medseg.predict import torch_predictor as wrap
    from medseg.runtime import set_memory_format

    device = torch.device(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {precision!r} for torch; expected fp32, bf16 (or fp16 on CUDA)")
    if precision == "fp16" and device.type != "cuda":
        raise BackendUnavailableError("precision fp16 is for CUDA; on CPU use fp32 or bf16")
    set_memory_format(network, torch.contiguous_format)  # wrap() goes channels-last where that is faster
    return Predictor("torch", precision, wrap(network, device=device, precision=precision))  # type: ignore[arg-type]


def onnxruntime_predictor(onnx_path: str | Path, precision: str, *, threads: int | None = None) -> Predictor:
    """The exported ONNX network on ONNX Runtime's CPU provider (fp32 only)."""
    if precision != "fp32":
        raise BackendUnavailableError("onnxruntime runs fp32 only on the CPU provider")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError(
            f"onnxruntime is not installed ({INSTALL_HINT['onnxruntime']})"
        ) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # ONNX Runtime's threads spin on after a run by default: the torch work between two batches of
    # windows (blending) and, in the measurement, the next candidate ran up to 1.5x slower beside them
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        arr = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        out = session.run(None, {input_name: arr})[0]
        return torch.from_numpy(out).to(batch.device)

    return Predictor("onnxruntime", "fp32", run)


def openvino_predictor(
    model_path: str | Path,
    precision: str,
    *,
    window_shape: tuple[int, ...] | None = None,
    threads: int | None = None,
    compile_cache: Path | None = None,
) -> Predictor:
    """The exported network (OpenVINO IR or ONNX) compiled for the CPU in f32 or bf16.

    A model compiled for one static input shape ran 1.6x faster than the dynamic one here, so each
    input shape met gets its own compiled model; a smaller last batch of windows is padded up to
    ``window_shape``'s batch. ``compile_cache``: OpenVINO's own cache of compiled models (its
    ``CACHE_DIR``), which it keys by model, shape and settings: a 64x64x32 window's compile took
    0.35 s from the ONNX file and 0.13 s from the cache here. Skipped when the folder cannot be made.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} for openvino; expected fp32 or bf16")
    try:
        import openvino as ov
    except ImportError as exc:
        raise BackendUnavailableError(f"openvino is not installed ({INSTALL_HINT['openvino']})") from exc
    if precision == "bf16" and not cpu_has_native_bf16():
        raise BackendUnavailableError("openvino bf16: this CPU has no native bf16 (it would run f32)")
    core = ov.Core()
    if compile_cache is not None:
        try:
            Path(compile_cache).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(compile_cache)})
        except (OSError, RuntimeError) as exc:
            log.debug("openvino compile cache %s not used: %s", compile_cache, exc)
    source = core.read_model(str(model_path))
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
        "PERFORMANCE_HINT": "LATENCY",
    }
    requests: dict[tuple[int, ...], Any] = {}

    def request_for(shape: tuple[int, ...]) -> Any:
        if shape not in requests:
            model = source.clone()
            model.reshape({model.inputs[0].get_any_name(): list(shape)})
            with signal_stack_kept():  # OpenVINO's first compile replaces it (see medseg.runtime)
                requests[shape] = core.compile_model(model, "CPU", config).create_infer_request()
        return requests[shape]

    if window_shape is not None:
        request_for(tuple(int(s) for s in window_shape))

    def run(batch: torch.Tensor) -> torch.Tensor:
        arr = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        n = arr.shape[0]
        shape = tuple(arr.shape)
        if window_shape is not None and tuple(window_shape[1:]) == shape[1:] and n < window_shape[0]:
            arr = np.concatenate([arr, np.zeros((window_shape[0] - n, *shape[1:]), arr.dtype)])
            shape = tuple(arr.shape)
        request = request_for(shape)
        with signal_stack_kept():
            out = request.infer({0: arr})[0]
        return torch.from_numpy(np.array(out[:n], dtype=np.float32)).to(batch.device)

    return Predictor("openvino", precision, run)


# ----------------------------------------------------------------------------- exported files


def file_sha256(path: str | Path) -> str:
    path = Path(path)
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_hash(bundle: Bundle) -> str:
    """Content hash of the network: weights and config (the file bytes when the bundle has them)."""
    from medseg.bundle import CONFIG, WEIGHTS

    digest = hashlib.sha256()
    weights = Path(bundle.path) / WEIGHTS
    if weights.is_file():
        digest.update(file_sha256(weights).encode())
    else:
        for key, value in sorted(bundle.network.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    config = Path(bundle.path) / CONFIG
    digest.update(config.read_bytes() if config.is_file() else bundle.config.model_dump_json().encode())
    return digest.hexdigest()[:20]


def exported_file(bundle: Bundle, fmt: str) -> Path | None:
    """The bundle's exported network in ``fmt`` when its record matches the bundle's weights, else None."""
    from medseg.bundle import WEIGHTS

    record = (bundle.metadata.get("exports") or {}).get(fmt)
    if not record:
        return None
    path = Path(bundle.path) / record["file"]
    weights = Path(bundle.path) / WEIGHTS
    if not path.is_file() or not weights.is_file():
        return None
    if record.get("weights_sha256") != file_sha256(weights):
        log.warning("%s: exported %s does not match the weights (re-run medseg export); ignored", path, fmt)
        return None
    return path


def user_cache_dir() -> Path:
    """The per-user cache folder (XDG convention): measurements and on-the-fly exports."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medseg"


def onnx_for(bundle: Bundle, cache_dir: Path | None = None) -> Path:
    """The bundle's exported ONNX file, or one exported into the cache folder (once per bundle content)."""
    found = exported_file(bundle, "onnx")
    if found is not None:
        return found
    from medseg.export import export_onnx

    target = (cache_dir or user_cache_dir()) / "exports" / bundle_hash(bundle) / "model.onnx"
    if not target.is_file():
        log.info("exporting the network to ONNX for this machine's backends: %s", target)
        export_onnx(bundle.network, target, window_shape=default_window_shape(bundle))
    return target


def openvino_model_for(bundle: Bundle, cache_dir: Path | None = None) -> Path:
    """The bundle's OpenVINO IR when exported, else its ONNX file (OpenVINO reads ONNX directly)."""
    return exported_file(bundle, "openvino") or onnx_for(bundle, cache_dir)


def default_window_shape(bundle: Bundle, sw_batch_size: int | None = None) -> tuple[int, ...]:
    cfg = bundle.config
    roi = tuple(int(p) for p in (cfg.train.patch_size or (64, 64, 64)))
    in_channels = _in_channels(bundle.network)
    return (int(sw_batch_size or cfg.infer.sw_batch_size), in_channels, *roi)


def _in_channels(network: torch.nn.Module) -> int:
    for module in network.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return 1


def build_predictor(
    bundle: Bundle,
    backend: str,
    precision: str,
    device: str | torch.device = "cpu",
    *,
    window_shape: tuple[int, ...] | None = None,
    cache_dir: Path | None = None,
) -> Predictor:
    """One explicit backend and precision (no measurement); BackendUnavailableError when it cannot run here."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}; expected one of auto, {', '.join(BACKENDS)}")
    if backend == "torch":
        return torch_predictor(bundle.network, precision, device)
    if device.type != "cpu":
        raise BackendUnavailableError(
            f"backend {backend} runs on the CPU; use --device cpu or --backend torch"
        )
    window_shape = window_shape or default_window_shape(bundle)
    if backend == "onnxruntime":
        if precision != "fp32":
            raise BackendUnavailableError("onnxruntime runs fp32 only on the CPU provider")
        return onnxruntime_predictor(onnx_for(bundle, cache_dir), precision)
    if precision == "bf16" and not cpu_has_native_bf16():
        raise BackendUnavailableError("openvino bf16: this CPU has no native bf16 (it would run f32)")
    return openvino_predictor(
        openvino_model_for(bundle, cache_dir), precision, window_shape=window_shape,
        compile_cache=(cache_dir or user_cache_dir()) / "openvino",
    )


# ----------------------------------------------------------------------------- parity


def parity_batch(bundle: Bundle, window_shape: tuple[int, ...], *, seed: int = 0) -> torch.Tensor:
    """``window_shape`` windows of a synthetic CT phantom, preprocessed with the bundle's own chain.

    The phantom is sized so that, at the bundle's spacing, it roughly fills a window; windows are
    taken around the centre at quarter-window offsets (zero-padded where the image is smaller).
    """
    from medseg.synthetic import make_case
    from medseg.transforms import build_preprocess, to_metatensor

    cfg = bundle.config
    batch, channels, *roi = window_shape
    spacing = np.asarray(cfg.preprocess.spacing or (1.5, 1.5, 2.0), dtype=float)
    extent_needed = np.asarray(roi, dtype=float) * spacing / np.array([64.0, 52.0, 44.0])
    size = int(np.clip(64 * extent_needed.max(), 64, 160))
    image, _ = make_case((seed, 7), size=size, orientation="RAS")
    pre = build_preprocess(cfg, keys=("image",), load=False)
    grid = pre({"image": to_metatensor(image)})["image"].as_tensor()[0].float()
    pad = [max(0, r - s) for r, s in zip(roi, grid.shape, strict=True)]
    if any(pad):
        grid = torch.nn.functional.pad(grid, [p for d in reversed(pad) for p in (d // 2, d - d // 2)])
    centre = [(s - r) // 2 for s, r in zip(grid.shape, roi, strict=True)]
    windows = []
    for k in range(batch):
        shift = [((k + 1) // 2) * (1 if k % 2 else -1) * (r // 4) for r in roi] if k else [0, 0, 0]
        start = [min(max(0, c + d), s - r) for c, d, s, r in zip(centre, shift, grid.shape, roi, strict=True)]
        sl = tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
        windows.append(grid[sl][None].expand(channels, *roi))
    return torch.stack(windows).contiguous()


def parity(reference: torch.Tensor, logits: torch.Tensor, labels: dict[int, str]) -> dict[str, Any]:
    """Argmax agreement and per-label Dice of ``logits``' mask against ``reference``'s.

    Labels with fewer than ``MIN_LABEL_VOXELS`` voxels in both masks are not scored.
    """
    ref = reference.argmax(dim=1)
    got = logits.argmax(dim=1)
    agreement = float((ref == got).float().mean())
    dice: dict[str, float] = {}
    for k, name in sorted(labels.items()):
        if k == 0:
            continue
        a, b = ref == k, got == k
        total = int(a.sum()) + int(b.sum())
        if max(int(a.sum()), int(b.sum())) >= MIN_LABEL_VOXELS:
            dice[name] = round(2.0 * int((a & b).sum()) / total, 6)
    max_change = max((1.0 - d for d in dice.values()), default=0.0)
    passed = agreement >= MIN_AGREEMENT and max_change <= MAX_DICE_CHANGE
    return {
        "agreement": round(agreement, 6),
        "dice": dice,
        "max_dice_change": round(max_change, 6),
        "passed": passed,
    }


def parity_settings(window_shape: tuple[int, ...]) -> dict[str, Any]:
    return {
        "reference": "torch fp32",
        "case": "synthetic CT phantom (medseg.synthetic.make_case, seed (0, 7), RAS), bundle preprocessing",
        "window_shape": list(window_shape),
        "min_agreement": MIN_AGREEMENT,
        "max_dice_change": MAX_DICE_CHANGE,
        "min_label_voxels": MIN_LABEL_VOXELS,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- selection


@dataclass
class Candidate:
    backend: str
    precision: str
    seconds: float | None = None  # best of the timed runs on the parity batch
    agreement: float | None = None
    dice: dict[str, float] = field(default_factory=dict)
    max_dice_change: float | None = None
    passed: bool = False
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"


def machine_fingerprint() -> dict[str, Any]:
    """What the measurement depends on: CPU model and flags, threads, library versions."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.processor(), platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.strip()
    except OSError:
        pass
    out: dict[str, Any] = {
        "cpu": model,
        "flags_sha": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for module in ("onnxruntime", "openvino"):
        out[module] = _installed_version(module)
    return out


def _installed_version(distribution: str) -> str | None:
    """The installed version from the package metadata: importing onnxruntime to read its
    ``__version__`` cost 0.15 s of every ``medseg infer`` that then ran OpenVINO."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _candidates(backend: str, precision: str) -> list[tuple[str, str]]:
    backends = BACKENDS if backend == "auto" else (backend,)
    precisions = PRECISIONS if precision == "auto" else (precision,)
    return [(b, p) for b in backends for p in precisions if not (b == "onnxruntime" and p == "bf16")]


def _time(predictor: Predictor, batch: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    out = predictor(batch)  # warm-up: kernels chosen, caches filled
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = predictor(batch)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _interleaved_best(
    predictors: dict[str, Predictor], batch: torch.Tensor, rounds: int
) -> dict[str, float]:
    """Best seconds per predictor over ``rounds`` rounds that run each once, in turn.

    Timing one backend after the other (best of two each) let a burst of other work on the machine
    land on one candidate only: openvino fp32 measured 0.134 s in one run and 0.050 s in another on the
    same machine, against torch fp32's 0.087 and 0.068 s, so ``auto`` kept the slower torch. In turns,
    a burst slows every candidate of its round and the best of the rounds compares like with like.
    """
    best = {name: float("inf") for name in predictors}
    for _ in range(rounds):
        for name, predictor in predictors.items():
            t0 = time.perf_counter()
            predictor(batch)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _torch_seconds(network: torch.nn.Module, window_shape: tuple[int, ...]) -> float:
    """torch fp32 seconds for one batch of windows (best of two, after a warm-up)."""
    predictor = torch_predictor(network, "fp32", "cpu")
    seconds, _ = _time(predictor, torch.zeros(window_shape), repeats=2)
    return seconds


def measure(
    bundle: Bundle,
    *,
    backend: str = "auto",
    precision: str = "auto",
    window_shape: tuple[int, ...],
    cache_dir: Path | None = None,
    rounds: int = MEASURE_ROUNDS,
) -> list[Candidate]:
    """Time every candidate backend/precision on the parity batch and check it against torch fp32.

    Each candidate is built (exported, compiled) and run once, its logits compared with torch fp32's;
    those that pass parity are then timed in ``rounds`` interleaved rounds with torch fp32
    (:func:`_interleaved_best`).
    """
    batch = parity_batch(bundle, window_shape)
    labels = bundle.config.labels or {k: str(k) for k in range(1, 2)}  # by network channel, as the logits
    reference_predictor = torch_predictor(bundle.network, "fp32", "cpu")
    reference = reference_predictor(batch)  # warm-up and the logits every candidate is held to
    out = [Candidate("torch", "fp32", None, 1.0, {}, 0.0, True)]
    timed: dict[str, Predictor] = {"torch fp32": reference_predictor}
    for b, p in _candidates(backend, precision):
        if (b, p) == ("torch", "fp32"):
            continue
        cand = Candidate(b, p)
        out.append(cand)
        if b == "torch" and p == "bf16" and not cpu_has_native_bf16():
            cand.note = "no native bf16 on this CPU (emulated: 8-35x slower than fp32 on an AVX2-only CPU)"
            continue
        try:
            if b == "torch":  # its own copy: bf16 turns the weights channels-last in place
                predictor = torch_predictor(copy.deepcopy(bundle.network), p, "cpu")
            else:
                predictor = build_predictor(bundle, b, p, "cpu", window_shape=window_shape, cache_dir=cache_dir)
            logits = predictor(batch)
        except MedsegError as exc:
            cand.note = one_line(exc)
            continue
        except Exception as exc:  # a backend that cannot run this network is skipped, with why
            cand.note = f"failed: {one_line(exc)[:300]}"
            continue
        result = parity(reference, logits, labels)
        cand.agreement, cand.dice = result["agreement"], result["dice"]
        cand.max_dice_change, cand.passed = result["max_dice_change"], result["passed"]
        if not cand.passed:
            cand.note = (
                f"failed parity (agreement {100 * cand.agreement:.3f} % vs >= {100 * MIN_AGREEMENT:.1f} %, "
                f"max Dice change {cand.max_dice_change:.5f} vs <= {MAX_DICE_CHANGE})"
            )
            continue
        timed[cand.name] = predictor
    seconds = _interleaved_best(timed, batch, rounds)
    for cand in out:
        if cand.name in seconds:
            cand.seconds = round(seconds[cand.name], 4)
    return out


def choose(candidates: list[Candidate], backend: str, precision: str) -> tuple[Candidate, str]:
    """The fastest candidate that passed parity and matches the request; torch fp32 otherwise."""
    wanted = set(_candidates(backend, precision))
    ok = [c for c in candidates if c.passed and c.seconds is not None and (c.backend, c.precision) in wanted]
    reference = candidates[0]
    why = "; ".join(
        f"{c.name}: {c.note}" for c in candidates if (c.backend, c.precision) in wanted and c.note
    )
    if ok:
        best = min(ok, key=lambda c: c.seconds or 0.0)
        exact = min((c for c in ok if c.precision == "fp32"), key=lambda c: c.seconds or 0.0, default=None)
        tie = ""
        if exact is not None and best is not exact and (exact.seconds or 0.0) <= LOW_PRECISION_MARGIN * (best.seconds or 0.0):
            tie = f"; {best.name} ({best.seconds:.3f} s) is less than {LOW_PRECISION_MARGIN:g}x faster: fp32 kept"
            best = exact
        if best is reference and why:
            return best, f"torch fp32 (fallback): {why}"
        speedup = (reference.seconds or 0.0) / max(best.seconds or 1e-9, 1e-9)
        reason = (
            f"{best.name}: fastest that passed parity ({best.seconds:.3f} s per batch, {speedup:.2f}x torch "
            f"fp32; agreement {100 * (best.agreement or 0):.3f} %, max Dice change {best.max_dice_change}){tie}"
        )
        return best, reason
    return reference, f"torch fp32 (fallback): {why or 'no other candidate'}"


def _selection_file(
    bundle: Bundle,
    machine: dict[str, Any],
    backend: str,
    precision: str,
    window_shape: tuple[int, ...],
    cache_dir: Path | None,
) -> Path:
    """Where the measured choice for this machine, bundle and request is cached."""
    key_src = json.dumps(
        [machine, bundle_hash(bundle), list(window_shape), backend, precision, _CACHE_VERSION]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    return (cache_dir or user_cache_dir()) / "backends" / f"{key}.json"


def select(
    bundle: Bundle,
    *,
    backend: str = "auto",
    precision: str = "auto",
    window_shape: tuple[int, ...],
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The measured choice for this machine and bundle, from the cache or measured now (then cached)."""
    from medseg.io import write_text_atomic

    machine = machine_fingerprint()
    path = _selection_file(bundle, machine, backend, precision, window_shape, cache_dir)
    if path.is_file():
        try:
            record = json.loads(path.read_text())
            log.info("backend: %s (measured before on this machine; %s)", record["reason"], path)
            return {**record, "cached": True, "cache_file": str(path)}
        except (OSError, ValueError, KeyError):
            log.warning("%s: unreadable backend cache, measuring again", path)
    log.info(
        "measuring backends for this machine and bundle (once; cached in %s): %s",
        path.parent,
        ", ".join(f"{b} {p}" for b, p in _candidates(backend, precision)),
    )
    t0 = time.perf_counter()
    candidates = measure(
        bundle, backend=backend, precision=precision, window_shape=window_shape, cache_dir=cache_dir
    )
    best, reason = choose(candidates, backend, precision)
    record = {
        "backend": best.backend,
        "precision": best.precision,
        "reason": reason,
        "candidates": [asdict(c) for c in candidates],
        "machine": machine,
        "settings": parity_settings(window_shape),
        "measured_s": round(time.perf_counter() - t0, 2),
    }
    try:
        write_text_atomic(path, json.dumps(record, indent=2))
    except MedsegError as exc:  # an unwritable cache costs a re-measurement next time, nothing more
        log.warning("backend cache not written: %s", exc)
    for c in candidates:
        log.info(
            "  %-18s %s",
            c.name,
            f"{c.seconds:.3f} s, agreement {c.agreement}" if c.seconds is not None else c.note,
        )
    log.info("backend: %s", reason)
    return {**record, "cached": False, "cache_file": str(path)}


def make_predictor(
    bundle: Bundle,
    backend: str = "auto",
    precision: str = "auto",
    device: str | torch.device = "cpu",
    *,
    window_shape: tuple[int, ...] | None = None,
    cache_dir: Path | None = None,
    max_memory: int | None = None,
) -> Predictor:
    """The predictor for ``bundle`` on ``device``: explicit backend and precision, or measured (``auto``).

    On CUDA the backend is torch with the runtime's precision policy. An explicit backend that cannot run
    here is a one-line error; ``auto`` falls back to torch fp32 and says why (``predictor.reason``), also
    where measuring would take more memory than ``max_memory`` (bytes; None = half this machine's) leaves.
    """
    device = torch.device(device)
    _check_request(backend, precision, device)
    window_shape = tuple(window_shape or default_window_shape(bundle))
    if device.type != "cpu":
        return _accelerator_predictor(bundle, precision, device)
    if backend != "auto" and precision != "auto":
        try:
            predictor = build_predictor(
                bundle, backend, precision, device, window_shape=window_shape, cache_dir=cache_dir
            )
        except BackendUnavailableError as exc:
            raise ConfigError(f"--backend {backend} --precision {precision}: {exc}") from exc
        predictor.reason = f"{predictor.name}: requested"
        return predictor
    unmeasured = _torch_without_measuring(
        bundle, backend, precision, device, window_shape, cache_dir, max_memory
    )
    if unmeasured is not None:
        return unmeasured
    record = select(
        bundle, backend=backend, precision=precision, window_shape=window_shape, cache_dir=cache_dir
    )
    try:
        predictor = build_predictor(
            bundle,
            record["backend"],
            record["precision"],
            device,
            window_shape=window_shape,
            cache_dir=cache_dir,
        )
    except MedsegError as exc:
        log.warning(
            "backend %s %s unavailable now (%s); torch fp32", record["backend"], record["precision"], exc
        )
        predictor = torch_predictor(bundle.network, "fp32", device)
        record = {**record, "reason": f"torch fp32 (fallback): {one_line(exc)}"}
    predictor.reason = record["reason"]
    predictor.selection = record
    return predictor


def _check_request(backend: str, precision: str, device: torch.device) -> None:
    """A backend and precision medseg knows, and one that can run on ``device`` (else ConfigError)."""
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"backend {backend!r}; expected one of auto, {', '.join(BACKENDS)}")
    if precision not in ("auto", *PRECISIONS, "fp16"):
        raise ConfigError(f"precision {precision!r}; expected one of auto, {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 is for CUDA; on the CPU use fp32 or bf16")
    if device.type != "cpu" and backend not in ("auto", "torch"):
        raise ConfigError(f"backend {backend} runs on the CPU; use --device cpu or --backend torch")


def _accelerator_predictor(bundle: Bundle, precision: str, device: torch.device) -> Predictor:
    """On CUDA: torch with the runtime's precision policy (the other backends run on the CPU)."""
    from medseg.runtime import resolve_precision

    chosen = resolve_precision(device, precision)
    predictor = torch_predictor(bundle.network, chosen, device)
    predictor.reason = f"torch {chosen} on {device.type} ({'requested' if precision != 'auto' else 'auto'})"
    return predictor


def measurement_bytes(bundle: Bundle, window_shape: tuple[int, ...]) -> int:
    """About the memory that measuring the backends adds to this process (``MEASURE_MEMORY_FACTOR``)."""
    from medseg.io.preflight import network_bytes

    windows = network_bytes(window_shape[2:], bundle.config.model.features, window_shape[0])
    return int(MEASURE_MEMORY_FACTOR * windows)


def _torch_without_measuring(
    bundle: Bundle,
    backend: str,
    precision: str,
    device: torch.device,
    window_shape: tuple[int, ...],
    cache_dir: Path | None,
    max_memory: int | None = None,
) -> Predictor | None:
    """Torch, when measuring the other backends is not worth it or not possible (a multi-channel model,
    a network too fast for them to repay the measurement, or too little memory left under
    ``max_memory``, bytes, None = ``default_max_memory()``); None when the choice is to be measured."""
    fixed = "fp32" if precision == "auto" else precision
    if (bundle.config.model.in_channels or 1) > 1 and backend in ("auto", "torch"):
        # the parity check runs a synthetic single-channel CT: not measured for multi-channel models
        predictor = torch_predictor(bundle.network, fixed, device)
        predictor.reason = f"torch {fixed}: multi-channel model, backends not measured"
        return predictor
    if backend != "auto":
        return None
    cached = _selection_file(bundle, machine_fingerprint(), backend, precision, window_shape, cache_dir).is_file()
    if cached:  # a cached choice was measured: no need to time torch again
        return None
    from medseg.io.preflight import default_max_memory, format_bytes, resident_bytes

    need = measurement_bytes(bundle, window_shape)
    left = (default_max_memory() if max_memory is None else int(max_memory)) - resident_bytes()
    if need > left:  # the cases still get their own preflight; the measurement must not take their memory
        predictor = torch_predictor(bundle.network, fixed, device)
        predictor.reason = (
            f"torch {fixed}: measuring the other backends needs about {format_bytes(need)}, more than the "
            f"{format_bytes(max(left, 0))} the memory limit leaves; not measured"
        )
        log.info("backend: %s", predictor.reason)
        return predictor
    torch_s = _torch_seconds(bundle.network, window_shape)
    if torch_s >= MEASURE_ABOVE_S:
        return None
    predictor = torch_predictor(bundle.network, fixed, device)
    predictor.reason = (
        f"torch {fixed}: the network runs a batch of windows in {1000 * torch_s:.1f} ms, too fast "
        f"for the other backends to repay measuring them"
    )
    return predictor


_PREDICTORS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Predictor]] = weakref.WeakKeyDictionary()


def predictor_for(
    bundle: Bundle,
    device: str | torch.device = "cpu",
    *,
    cache_dir: Path | None = None,
    max_memory: int | None = None,
) -> Predictor:
    """The predictor the bundle's ``infer`` config asks for (``backend``, ``precision``), built once per
    network, device and window shape and reused across the cases of a batch. ``max_memory``: bytes
    (``--max-memory``) that measuring the backends must fit in; None = half this machine's memory.

    The older opt-in ``infer.cpu_bf16`` counts as ``precision: bf16`` when precision is ``auto``.
    """
    infer = bundle.config.infer
    precision = "bf16" if infer.precision == "auto" and infer.cpu_bf16 else infer.precision
    window_shape = default_window_shape(bundle, infer.sw_batch_size)
    key = (infer.backend, precision, str(torch.device(device)), window_shape, bundle_hash(bundle))
    memo = _PREDICTORS.setdefault(bundle.network, {})
    if key not in memo:
        memo[key] = make_predictor(
            bundle,
            infer.backend,
            precision,
            device,
            window_shape=window_shape,
            cache_dir=cache_dir,
            max_memory=max_memory,
        )
    return memo[key]


def backend_predictors(
    bundles: list[Bundle], device: str | torch.device, *, max_memory: int | None = None
) -> list[Predictor]:
    """One predictor per bundle (an ensemble may differ), from each bundle's ``infer`` config."""
    return [predictor_for(bundle, device, max_memory=max_memory) for bundle in bundles]


def describe(predictor: Predictor) -> dict[str, Any]:
    """What the sidecar records about the network runtime."""
    out: dict[str, Any] = {
        "backend": predictor.backend,
        "precision": predictor.precision,
        "reason": predictor.reason,
    }
    if predictor.selection:
        out["measured"] = {
            f"{c['backend']} {c['precision']}": c["seconds"] if c["passed"] else f"not used: {c['note']}"
            for c in predictor.selection["candidates"]
        }
    return out
