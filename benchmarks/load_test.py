"""Load test: one ``medseg infer`` over a folder of many mixed studies, a few of them broken.

Builds ``--studies`` synthetic CT studies (medseg.synthetic phantoms, 24..96 voxels a side,
anisotropic spacing, RAS / LPS / permuted axes (sagittal, coronal) / oblique, int16 NIfTI) of which
``--broken`` are broken in varied ways (truncated gzip, a header that claims more voxels than the
file holds, zero bytes, a file whose content is not what its extension says, NaN-filled). Trains
a tiny bundle (the smoke settings, 2 epochs, MLflow off) unless ``--bundle`` gives one to reuse, then
runs ONE ``python -m medseg infer`` over the folder in a subprocess while sampling its resident
memory (``VmRSS`` in /proc/PID/status, every 0.1 s) and noting it when each case's log line
appears (cases 10 and N are the figures the issue asks for).

Checks: exit code 1 (some cases failed); every valid study has its mask (the input's shape and
affine) and sidecar; every broken one is listed in report.html and on stderr with the reason
expected for its kind, and has no output. Prints a table; writes JSON (default
benchmarks/results/load_test.json). Exit status 0 only when every check passes.

Run (on a quiet machine; several minutes):
    python benchmarks/load_test.py                      # 200 studies, 10 broken
    python benchmarks/load_test.py --studies 20 --broken 2 --bundle runs/x/bundle
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "load_test.json"
ORIENTATIONS = ("RAS", "LPS", "sagittal", "coronal", "oblique")
# what each broken kind is, and a piece of the reason medseg must give for it
BROKEN_KINDS = {
    "truncated_gzip": "truncated or corrupt voxel data",
    "header_lies_about_size": "holds less than its header says",
    "zero_byte": "not a readable NIfTI file",
    "wrong_extension": "not a readable NIfTI file",
    "nan_filled": "voxels are NaN or infinite",
}
SMOKE = ["--config", str(REPO / "medseg" / "configs" / "smoke.yaml")]


@dataclass
class Study:
    name: str  # file name in the studies folder
    kind: str  # "valid" or one of BROKEN_KINDS
    shape: tuple[int, ...] = ()
    orientation: str = ""


@dataclass
class Run:
    returncode: int
    seconds: float
    stderr: str
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (s since start, bytes)
    rss_at_case: dict[int, int] = field(default_factory=dict)  # case number (1-based) -> bytes
    peak_rss: int = 0


def _broken_kinds(n_broken: int) -> list[str]:
    """``n_broken`` kinds spread over BROKEN_KINDS (2 -> two different ones; 10 -> each twice)."""
    kinds = list(BROKEN_KINDS)
    return [kinds[i * len(kinds) // n_broken] for i in range(n_broken)]


def _write_broken(kind: str, folder: Path, index: int, rng: np.random.Generator) -> Path:
    """One broken study of ``kind`` (written from a valid small one where that makes it realistic)."""
    from medseg.io import Volume, write_nifti
    from medseg.synthetic import make_case

    image = make_case(10_000 + index, size=24)[0]
    if kind == "truncated_gzip":
        path = write_nifti(image, folder / f"case_{index:03d}.nii.gz", dtype="int16")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header_lies_about_size":
        import nibabel as nib

        path = folder / f"case_{index:03d}.nii.gz"
        img = nib.Nifti1Image(image.array.astype(np.int16), image.affine)
        header = img.header.copy()
        header.set_data_shape((96, 96, 96))  # 1.7 MB claimed; the file holds 28 KB of voxels
        path.write_bytes(
            gzip.compress(header.binaryblock + b"\0" * 4 + image.array.astype(np.int16).tobytes())
        )
    elif kind == "zero_byte":
        path = folder / f"case_{index:03d}.nii.gz"
        path.write_bytes(b"")
    elif kind == "wrong_extension":
        # a PNG picture named like a NIfTI study (an export saved under the wrong name)
        path = folder / f"case_{index:03d}.nii.gz"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "nan_filled":
        nan = Volume(np.full(image.shape, np.nan, np.float32), image.affine)
        path = write_nifti(nan, folder / f"case_{index:03d}.nii.gz")
    else:
        raise ValueError(f"unknown broken kind {kind!r}; expected one of {sorted(BROKEN_KINDS)}")
    return path


def make_studies(folder: Path, *, n_studies: int, n_broken: int, seed: int = 0) -> list[Study]:
    """``n_studies`` NIfTI studies in ``folder``: mixed sizes and orientations, ``n_broken`` of them
    broken (spread evenly through the batch)."""
    from medseg.io import write_nifti
    from medseg.synthetic import make_case

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    broken_at = {int(i) for i in np.linspace(3, n_studies - 2, n_broken)} if n_broken else set()
    kinds = iter(_broken_kinds(n_broken))
    studies = []
    for index in range(1, n_studies + 1):
        if index in broken_at:
            kind = next(kinds)
            studies.append(Study(_write_broken(kind, folder, index, rng).name, kind))
            continue
        size = int(rng.integers(24, 97))
        orientation = ORIENTATIONS[index % len(ORIENTATIONS)]
        image = make_case((seed, index), size=size, orientation=orientation)[0]
        path = write_nifti(image, folder / f"case_{index:03d}.nii.gz", dtype="int16")
        studies.append(Study(path.name, "valid", tuple(image.shape), orientation))
    return studies


def untrained_bundle(folder: Path) -> Path:
    """A bundle with the smoke settings and untrained weights (CT labels and normalisation set)."""
    import torch

    from medseg.bundle import save_bundle
    from medseg.config import load_config
    from medseg.models import build_model

    cfg = load_config(
        REPO / "medseg" / "configs" / "smoke.yaml",
        [
            "labels={0: background, 1: liver, 2: kidney, 3: spleen}",
            "preprocess.intensity.window=[-200,300]",
            "preprocess.intensity.mean=50",
            "preprocess.intensity.std=100",
        ],
    )
    torch.manual_seed(0)
    return save_bundle(folder / "bundle", build_model(cfg.model, out_channels=4), cfg, {})


def trained_bundle(folder: Path, *, epochs: int = 2) -> Path:
    """A tiny bundle trained with the smoke settings on a small synthetic dataset (MLflow off)."""
    from medseg.synthetic import make_dataset

    make_dataset(folder / "data", cases=6, size=32, seed=3, test_fraction=0.34)
    cmd = [
        sys.executable,
        "-m",
        "medseg",
        "train",
        "--data",
        str(folder / "data"),
        "--out",
        str(folder / "run"),
        "--epochs",
        str(epochs),
        *SMOKE,
        "--set",
        "tracking.enabled=false",
        "--set",
        "train.device=cpu",
    ]
    subprocess.run(cmd, cwd=folder, env=_env(), check=True, capture_output=True, text=True)
    return folder / "run" / "bundle"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _rss(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


_CASE_LINE = re.compile(r"\[(\d+)/(\d+)\]")


def run_infer(
    bundle: Path, studies: Path, out: Path, *, extra: list[str] | None = None, timeout: float = 7200
) -> Run:
    """One ``medseg infer`` over ``studies``: its exit code, stderr, and its RSS over time and per case."""
    cmd = [
        sys.executable,
        "-m",
        "medseg",
        "infer",
        "-m",
        str(bundle),
        "-i",
        str(studies),
        "-o",
        str(out),
        "--device",
        "cpu",
        *(extra or []),
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = Run(returncode=-1, seconds=0.0, stderr="")
    lines: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = _rss(proc.pid)
            if rss is not None:
                run.rss_samples.append((round(time.monotonic() - t0, 2), rss))
                run.peak_rss = max(run.peak_rss, rss)
            done.wait(0.1)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            match = _CASE_LINE.search(line)
            if match and int(match.group(1)) not in run.rss_at_case:
                rss = _rss(proc.pid)  # the case has just finished (its result line is logged)
                if rss is not None:
                    run.rss_at_case[int(match.group(1))] = rss

    threads = [
        threading.Thread(target=sample, daemon=True),
        threading.Thread(target=read_stderr, daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        done.set()
        for thread in threads:
            thread.join(timeout=10)
    run.returncode = proc.returncode
    run.seconds = round(time.monotonic() - t0, 1)
    run.stderr = "".join(lines)
    return run


def check_outputs(studies: list[Study], folder: Path, out: Path, run: Run) -> dict[str, list[str]]:
    """Every check of the load test: a list of problems per check (empty = passed)."""
    import nibabel as nib

    problems: dict[str, list[str]] = {"exit code 1": [], "valid exported": [], "broken listed": []}
    if run.returncode != 1:
        problems["exit code 1"].append(f"exit code {run.returncode}")
    report_path = out / "report.html"
    report = html.unescape(report_path.read_text()) if report_path.is_file() else ""
    failed_lines = {
        Path(m.group(1)).name: m.group(2)
        for m in re.finditer(r"^FAILED (\S+?): (.*)$", run.stderr, re.MULTILINE)
    }
    for study in studies:
        stem = study.name.removesuffix(".nii.gz")
        mask, sidecar = out / f"{stem}_seg.nii.gz", out / f"{stem}_seg.json"
        if study.kind == "valid":
            if not (mask.is_file() and sidecar.is_file()):
                problems["valid exported"].append(f"{study.name}: mask or sidecar missing")
                continue
            source, written = nib.load(str(folder / study.name)), nib.load(str(mask))
            if written.shape != source.shape or not np.allclose(written.affine, source.affine, atol=1e-4):
                problems["valid exported"].append(f"{study.name}: mask grid differs from the input's")
            continue
        reason = failed_lines.get(study.name)
        expected = BROKEN_KINDS[study.kind]
        if reason is None:
            problems["broken listed"].append(f"{study.name} ({study.kind}): not listed as FAILED on stderr")
        elif expected and expected not in reason:
            problems["broken listed"].append(
                f"{study.name} ({study.kind}): reason {reason!r} lacks {expected!r}"
            )
        elif f"<td>{study.name}</td><td>{reason}</td>" not in report:
            problems["broken listed"].append(
                f"{study.name} ({study.kind}): not in report.html with its reason"
            )
        if mask.exists() or sidecar.exists():
            problems["broken listed"].append(f"{study.name} ({study.kind}): has an output")
    return problems


def summarise(studies: list[Study], run: Run, problems: dict[str, list[str]], *, bundle: str) -> dict:
    """The figures and verdicts as one JSON-able record."""
    n = len(studies)
    marks = sorted({1, 10, n // 2, n} & set(run.rss_at_case))
    rss_10, rss_n = run.rss_at_case.get(10), run.rss_at_case.get(n)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "bundle": bundle,
        "studies": n,
        "broken": {s.name: s.kind for s in studies if s.kind != "valid"},
        "sizes": {
            "min": min((min(s.shape) for s in studies if s.shape), default=0),
            "max": max((max(s.shape) for s in studies if s.shape), default=0),
        },
        "orientations": sorted({s.orientation for s in studies if s.orientation}),
        "exit_code": run.returncode,
        "seconds": run.seconds,
        "rss_at_case_mib": {str(k): round(run.rss_at_case[k] / 2**20, 1) for k in marks},
        "rss_case_10_mib": round(rss_10 / 2**20, 1) if rss_10 else None,
        "rss_case_last_mib": round(rss_n / 2**20, 1) if rss_n else None,
        "rss_growth_10_to_last": round(rss_n / rss_10, 3) if rss_10 and rss_n else None,
        "peak_rss_mib": round(run.peak_rss / 2**20, 1),
        "checks": {name: {"passed": not found, "problems": found} for name, found in problems.items()},
        "rss_curve_mib": [
            (t, round(b / 2**20, 1)) for t, b in run.rss_samples[:: max(1, len(run.rss_samples) // 400)]
        ],
    }


def print_table(record: dict) -> None:
    rows = [
        ("studies (broken)", f"{record['studies']} ({len(record['broken'])})"),
        ("sizes, voxels a side", f"{record['sizes']['min']}..{record['sizes']['max']}"),
        ("orientations", ", ".join(record["orientations"])),
        ("exit code", str(record["exit_code"])),
        ("wall time", f"{record['seconds']} s"),
        *[(f"RSS after case {k}", f"{v} MiB") for k, v in record["rss_at_case_mib"].items()],
        ("RSS growth, case 10 -> last", str(record["rss_growth_10_to_last"])),
        ("peak RSS", f"{record['peak_rss_mib']} MiB"),
        *[
            (f"check: {k}", "passed" if v["passed"] else f"FAILED ({len(v['problems'])})")
            for k, v in record["checks"].items()
        ],
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for name, check in record["checks"].items():
        for problem in check["problems"][:10]:
            print(f"  {name}: {problem}")


def load_test(
    work: Path,
    *,
    n_studies: int,
    n_broken: int,
    bundle: Path | None = None,
    untrained: bool = False,
    seed: int = 0,
    results: Path | None = RESULTS,
) -> dict:
    """Build the studies, get a bundle, run one ``medseg infer``, check; returns the record."""
    studies = make_studies(work / "studies", n_studies=n_studies, n_broken=n_broken, seed=seed)
    if bundle is None:
        bundle = untrained_bundle(work) if untrained else trained_bundle(work)
    run = run_infer(bundle, work / "studies", work / "out")
    problems = check_outputs(studies, work / "studies", work / "out", run)
    record = summarise(studies, run, problems, bundle=str(bundle))
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(record, indent=2))
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument(
        "--broken", type=int, default=None, help="broken studies (default: 5 %% of --studies)"
    )
    parser.add_argument("--bundle", type=Path, help="reuse this bundle (default: train a tiny one)")
    parser.add_argument(
        "--untrained", action="store_true", help="a bundle with untrained weights (no training)"
    )
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_broken = args.broken if args.broken is not None else max(1, round(args.studies * 0.05))
    with tempfile.TemporaryDirectory(prefix="medseg-load-") as tmp:
        work = args.work or Path(tmp)
        record = load_test(
            work,
            n_studies=args.studies,
            n_broken=n_broken,
            bundle=args.bundle,
            untrained=args.untrained,
            seed=args.seed,
            results=args.json,
        )
    print_table(record)
    print(f"written {args.json}")
    return 0 if all(c["passed"] for c in record["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
