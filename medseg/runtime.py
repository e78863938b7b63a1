"""Where and how the network runs: device, distributed rank/world, and one precision policy.

Training, inference and the CLI all ask this module, so that "AMP on CUDA" means the
same dtype everywhere (bf16 where the GPU supports it, else fp16 with a grad scaler)
and CPU bf16 is used only where it was *measured* faster on the machine that runs:
CPUs differ (bf16 autocast was 1.85x faster than fp32 on an AMX Xeon and 8-35x slower
on an AVX2-only one), so nothing here assumes.

Hands on: ``resolve_device``, ``Dist``/``init_distributed``/``rank_and_world``/``coordination_group``/``leave_distributed``,
``resolve_precision`` and ``autocast`` (a context manager for the forward pass).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from medseg.cgroups import usable_cpus
from medseg.errors import InputError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str | None) -> torch.device:
    """``auto``/None: CUDA when present, else CPU; an explicit CUDA request without CUDA is a user error."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(None, f"device {requested!r} requested but CUDA is not available")
    try:
        return torch.device(requested)
    except RuntimeError as exc:
        raise InputError(None, f"unknown device {requested!r}; expected auto, cpu, cuda or cuda:N") from exc


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torchrun (``RANK``/``WORLD_SIZE``), else (0, 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    if world < 1 or not 0 <= rank < world:
        return 0, 1
    return rank, world


@dataclass
class Dist:
    """Where this process stands under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def shard(self, items: list, *, even: bool) -> list:
        """This rank's share of ``items``; ``even`` repeats a few so every rank has as many (DDP needs it)."""
        if not self.active:
            return items
        if even and len(items) % self.world:
            items = items + items[: self.world - len(items) % self.world]
        return items[self.rank :: self.world]


def init_distributed(requested_device: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (NCCL on GPUs, Gloo on CPU) when ``WORLD_SIZE`` > 1."""
    rank, world = rank_and_world()
    device = resolve_device(requested_device)
    if world <= 1:
        return Dist(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank), device


def leave_distributed() -> None:
    """Destroy this process's process group, after freeing what still holds it (a DDP model).

    A DistributedDataParallel wrapper left alive for the interpreter's exit now and then aborts the
    rank as Python shuts down ("terminate called without an active exception", SIGABRT: a torch
    thread touching Python after finalisation began), and torchrun then fails the whole run.
    Measured with two Gloo ranks that train a DDP model and leave, beside two busy processes: 7 of 40
    launches aborted that way, none of 40 with the model collected first (``benchmarks/ddp_exit.py``).
    """
    if not torch.distributed.is_initialized():
        return
    gc.collect()
    torch.distributed.destroy_process_group()


@contextlib.contextmanager
def coordination_group(*, timeout_s: float = 7 * 24 * 3600) -> Iterator[Dist | None]:
    """This torchrun job's ranks joined in a Gloo group for coordination (verdicts, barriers), not tensors.

    Yields None outside torchrun (``WORLD_SIZE`` 1) and where there is no rendezvous to join
    (``MASTER_ADDR``/``MASTER_PORT`` unset: ranks set by hand cannot coordinate). A process group
    already joined (``init_distributed``) is used as is; one created here is destroyed on leaving.
    ``timeout_s``: how long a rank waits for the others at a barrier (ranks of a batch may finish
    hours apart).
    """
    from datetime import timedelta

    rank, world = rank_and_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        yield None
        return
    if torch.distributed.is_initialized():
        yield Dist(rank=rank, world=world, local_rank=local_rank)
        return
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        yield None
        return
    torch.distributed.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield Dist(rank=rank, world=world, local_rank=local_rank)
    finally:
        leave_distributed()


# ----------------------------------------------------------------------------- CPU threads

# What the user sets for torch's (OpenMP's) threads; where set, medseg leaves the count alone.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def fit_threads_to_cpus() -> str | None:
    """Lower torch's intra-op threads to the CPUs this process may use (``usable_cpus``, rounded
    up), and say so; None where nothing changed.

    torch starts one thread per core of the host, whatever a container's CPU quota: under
    ``docker run --cpus 2`` on a 16-core host, 16 threads share 2 CPUs' worth of time and the
    kernel stops them all for most of each period. Measured on 2 cores with a quota of 1 CPU, a
    training step took 1.20-1.29 s on 2 threads and 1.07-1.15 s on 1; with 0.5 CPU 2.55-2.90 s
    against 2.19-2.26 s; with 1.25 and 1.5 CPUs 2 threads were faster, hence rounding up
    (``benchmarks/cpu_quota.py``). ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, where set, win
    (torchrun sets the first for each of several processes on one machine)."""
    if any(os.environ.get(name) for name in THREAD_ENV):
        return None
    cpus = usable_cpus()
    threads = max(1, math.ceil(cpus - 1e-6))
    before = torch.get_num_threads()
    if threads >= before:
        return None
    torch.set_num_threads(threads)
    note = (f"torch threads {before} -> {threads}: this process may use {cpus:g} CPU{'' if cpus == 1 else 's'} "
            "(a container's CPU quota or the affinity; OMP_NUM_THREADS overrides)")
    log.info(note)
    return note


# ----------------------------------------------------------------------------- precision


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX present (bf16 is emulated, and much slower, on other CPUs)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers, present in torch 2.x
        return False


def cache_dir() -> Path:
    """medseg's per-user cache (``$XDG_CACHE_HOME/medseg``, else ``~/.cache/medseg``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medseg"


def machine_key() -> str:
    """This CPU (model and flags), core count and torch build: what a speed measurement depends on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        cpu = "\n".join(lines) or cpu
    raw = f"{cpu}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """``measure_cpu_bf16_speedup()``, measured once per machine and kept in the user cache."""
    path = cache_dir() / f"cpu-bf16-{machine_key()}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        return float(json.loads(path.read_text())["speedup"])
    speedup = measure_cpu_bf16_speedup()
    _save_to_cache(path, {"speedup": speedup, "measured_at": time.time()})
    return speedup


def _save_to_cache(path: Path, payload: dict[str, Any]) -> None:
    """A measurement into the user cache, atomically; a read-only home only costs the measurement next time."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)


def measure_cpu_bf16_speedup(size: int = 32, channels: int = 16, repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small 3D conv block, forward + backward, on this CPU.

    About a second; cached for the process. > 1 means bf16 is faster here.
    """
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(channels, channels, 3, padding=1),
        torch.nn.InstanceNorm3d(channels),
        torch.nn.LeakyReLU(),
        torch.nn.Conv3d(channels, channels, 3, padding=1),
    )
    x = torch.randn(2, channels, size, size, size)

    def run(bf16: bool) -> float:
        model = set_memory_format(net, torch.channels_last_3d) if bf16 else net
        inp = x.contiguous(memory_format=torch.channels_last_3d) if bf16 else x
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(inp)
            out.float().sum().backward()
            best = min(best, time.perf_counter() - t0)
        return best

    run(False), run(True)  # warm-up (first calls pick kernels)
    fp32, bf16 = run(False), run(True)
    set_memory_format(net, torch.contiguous_format)
    return fp32 / max(bf16, 1e-9)


def resolve_precision(
    device: torch.device, requested: str = "auto", *, amp: bool = True, quiet: bool = False
) -> Precision:
    """The dtype the forward pass runs in, for training and inference alike.

    CUDA: ``auto`` is bf16 where supported, else fp16 (``amp=False`` means fp32).
    CPU: ``auto`` is bf16 only where a micro-benchmark on this machine measured it at least
    1.2x faster than fp32 (and the CPU has native bf16); fp16 is never used on CPU. ``quiet``: the
    choice is not logged (the time-budget planner asks once per candidate it measures).
    """
    if requested not in PRECISION_CHOICES:
        raise InputError(None, f"precision {requested!r}; expected one of {', '.join(PRECISION_CHOICES)}")
    if device.type == "cuda":
        if requested == "auto":
            if not amp:
                return "fp32"
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested  # type: ignore[return-value]
    if requested == "fp16":
        raise InputError(None, "precision fp16 is for CUDA; on CPU use fp32 or bf16")
    if requested == "bf16":
        if not cpu_has_native_bf16():
            log.warning("bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated and far slower")
        return "bf16"
    if requested == "fp32" or not amp or not cpu_has_native_bf16():
        return "fp32"
    speedup = cpu_bf16_speedup()
    choice: Precision = "bf16" if speedup >= 1.2 else "fp32"
    if not quiet:
        log.info("CPU precision: %s (bf16 measured %.2fx the speed of fp32 on this machine)", choice, speedup)
    return choice


def continued_precision(device: torch.device, began: str, *, amp: bool = True) -> Precision:
    """The precision a resumed run goes on in: the one it began in (its checkpoint says which), so
    that a busier machine measuring bf16 differently today cannot change the numerics mid-run; only
    a device that cannot run it natively (the run moved) falls back to what ``auto`` picks here."""
    if began == "bf16":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    else:
        native = began == "fp32" or (began == "fp16" and device.type == "cuda")
    if native:
        log.info("precision: %s, as the run began", began)
        return began  # type: ignore[return-value]
    chosen = resolve_precision(device, "auto", amp=amp)
    log.warning("the run began in %s, which this %s does not run natively: it goes on in %s",
                began or "an unrecorded precision", device.type.upper(), chosen)
    return chosen


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """The forward pass in ``precision`` (autocast; fp32 = no autocast)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=_DTYPES[precision]):
        yield


def channels_last(device: torch.device, precision: Precision) -> bool:
    """Channels-last 3D memory format for inference: what makes CPU bf16 convolutions fast (oneDNN).
    (In fp32 the forward alone was 0.87-0.91x as fast channels-last on a 2-core AVX-512 Xeon;
    training measures its own, ``training_channels_last``.)"""
    return device.type == "cpu" and precision == "bf16"


LAYOUT_MIN_SPEEDUP = 1.08  # channels-last must beat contiguous by this much to be used for training
LAYOUT_SLOW_PAIR_S = 2.0  # a first contiguous + channels-last pair this slow is warm-up enough
# ... and one this slow leaves one timed pair: a step of seconds is a steady reading of itself, and the
# fingerprint plan's 192x160x48 x 3 bf16 patches (``--epochs`` on a CPU) spent 181 s measuring three
LAYOUT_LONG_PAIR_S = 20.0
# 2: entries written by the budget planner's own layout A/B (77e46fc-df4b340, one model switched
# between layouts, AdamW's state left in the first) read channels-last 1.00x where it was 1.24x
# 3: entries per precision (bf16 measured too; it had been channels-last always)
# 4: instance norms keep a channels-last map channels-last (medseg.kernels.keep_channels_last)
# 5: one-weight PReLUs without torch's CPU backward kernel (medseg.kernels.quick_prelu_backward)
# 6: the loss's gradient in the logits' layout (medseg.losses.DiceCE)
_LAYOUT_CACHE_VERSION = 6


def training_channels_last(
    network: torch.nn.Module,
    input_shape: tuple[int, ...],
    out_channels: int,
    device: torch.device,
    precision: Precision,
    *,
    requested: str = "auto",
) -> tuple[bool, str]:
    """Whether to train ``network`` in channels-last 3D, and why (one line for the log).

    On a CPU, fp32 and bf16 alike, by measurement, because it depends on the machine, the network,
    the patch and the precision: on a 2-core AVX-512 Xeon a fp32 training step of MONAI's UNet(16)
    was 1.27x faster channels-last at 64x64x32 and 1.45x at 96x96x48, 0.93x at 32^3, and BasicUNet
    1.01x; in bf16 on an AMD EPYC with avx512_bf16 MONAI's UNet(16) 1.1-1.2x at 80x80x32, the
    classic U-Net 0.87-0.92x at 48x64x16 to 80x80x32 while its instance norms handed the next
    convolution a contiguous tensor (22 % of the step went in copies), 1.10x since they keep the
    layout (``medseg.kernels.keep_channels_last``, which the trainer applies). A copy
    of the network takes forward + Dice/CE + backward steps in both layouts, interleaved (about 10
    steps); the answer is cached per machine, network, input shape and precision in the user cache.
    CUDA and 2D networks: contiguous. ``requested`` (``train.memory_format``) other than auto is
    followed on CPU."""
    if device.type != "cpu" or len(input_shape) != 5:
        return False, "contiguous (not a 3D network on CPU)"
    if requested != "auto":
        return requested == "channels_last", f"{requested.replace('_', '-')} (train.memory_format)"
    if precision not in ("fp32", "bf16"):
        return False, "contiguous"
    key = _layout_key(network, input_shape, out_channels, precision)
    speedup = _layout_entries().get(key)
    source = "cached"
    if speedup is None:
        try:
            speedup = measure_channels_last_speedup(network, input_shape, out_channels, precision=precision)
        except (RuntimeError, MemoryError) as exc:  # out of memory, an op without a channels-last kernel
            return False, f"contiguous (channels-last could not be measured: {type(exc).__name__})"
        source = "measured"
        _remember_channels_last_speedup(key, speedup)
    use = float(speedup) >= LAYOUT_MIN_SPEEDUP
    layout = "channels-last 3D" if use else "contiguous"
    return use, f"{layout} (channels-last {source} at {float(speedup):.2f}x the contiguous step here, {precision})"


def _layout_key(network: torch.nn.Module, input_shape: tuple[int, ...], out_channels: int, precision: str) -> str:
    n_params = sum(p.numel() for p in network.parameters())
    return f"{type(network).__name__}|{n_params}|{'x'.join(map(str, input_shape))}|{out_channels}|{precision}"


def _layout_file() -> Path:
    return cache_dir() / f"train-layout-{machine_key()}.json"


def _layout_entries() -> dict[str, float]:
    cached: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(_layout_file().read_text())
    return dict(cached.get("entries", {})) if cached.get("version") == _LAYOUT_CACHE_VERSION else {}


def _remember_channels_last_speedup(key: str, speedup: float) -> None:
    """Cache a measured contiguous / channels-last training-step ratio (per machine, network, shape, precision)."""
    entries = {**_layout_entries(), key: float(speedup)}
    _save_to_cache(_layout_file(), {"version": _LAYOUT_CACHE_VERSION, "entries": entries})


def measure_channels_last_speedup(
    network: torch.nn.Module, input_shape: tuple[int, ...], out_channels: int, rounds: int = 3,
    *, precision: Precision = "fp32",
) -> float:
    """Contiguous / channels-last seconds of a training step (forward in ``precision``, Dice + CE,
    backward) of a copy of ``network`` on random data of ``input_shape``: two untimed steps each
    (with one, a fresh ``medseg train`` read 1.07x once where five others read 1.15-1.20x; one
    where the first pair took ``LAYOUT_SLOW_PAIR_S`` or more: the classic U-Net's 176x128x48 x 4
    patches took 100 s to measure), then ``rounds`` alternating (one where the first pair took
    ``LAYOUT_LONG_PAIR_S``); the medians compared. The network
    itself is not touched."""
    import copy

    from medseg.losses import DiceCE

    model = copy.deepcopy(network).train()
    loss_fn = DiceCE()  # the trainer's loss: its gradient keeps the logits' layout
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(input_shape, generator=gen)
    label = torch.randint(0, out_channels, (input_shape[0], 1, *input_shape[2:]), generator=gen).float()

    def step(last: bool) -> float:
        fmt = torch.channels_last_3d if last else torch.contiguous_format
        set_memory_format(model, fmt)
        x = image.contiguous(memory_format=fmt)
        start = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        loss_fn(out, label).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step(False) + step(True)
    if first < LAYOUT_SLOW_PAIR_S:
        step(False), step(True)
    elif first >= LAYOUT_LONG_PAIR_S:
        rounds = 1
    plain, last = [], []
    for _ in range(rounds):
        plain.append(step(False))
        last.append(step(True))
    plain.sort(), last.sort()
    return plain[len(plain) // 2] / max(last[len(last) // 2], 1e-9)


def set_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """``module.to(memory_format=...)`` in place (torch's stubs omit the keyword)."""
    return module.to(memory_format=memory_format)  # type: ignore[call-overload]


_SS_DISABLE = 2  # <bits/sigstack.h> (Linux)


class _SignalStack(ctypes.Structure):
    """``stack_t`` of sigaltstack(2)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    if not sys.platform.startswith("linux"):  # the flags below are Linux's
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "sigaltstack") else None
    except OSError:  # no C library to call (Windows): nothing to keep
        return None


def signal_stack() -> tuple[int, int, int] | None:
    """This thread's alternate signal stack (address, flags, size), or None where it cannot be read."""
    libc = _libc()
    if libc is None:
        return None
    current = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(current)) != 0:
        return None
    return (current.ss_sp or 0, current.ss_flags, current.ss_size)


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """The calling thread's alternate signal stack as it was, whatever the block's native code does.

    OpenVINO's CPU plugin, on its first ``compile_model`` in a thread, replaces that thread's
    alternate signal stack (sigaltstack) with one of its own and does not put the old one back.
    Python installs its signal handlers with SA_ONSTACK, so every later signal to that thread is
    delivered on OpenVINO's stack; once that memory is released, the kernel cannot write the signal
    frame and the process dies of SIGSEGV at the next SIGTERM/SIGINT (seen as a crash of the batch
    SIGTERM test after the backend tests, about one run in two). Restoring the stack after each call
    into OpenVINO keeps signal delivery on memory the process owns.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    saved = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        if saved.ss_flags & _SS_DISABLE:
            saved.ss_sp, saved.ss_size = None, 0
        libc.sigaltstack(ctypes.byref(saved), None)
