"""Faults at the file boundary: failed writes, long names, leftovers of killed writers, hostile inputs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import InputError, OutputError
from medseg.io import Volume, atomic_path, write_nifti, write_text_atomic
from medseg.io.volume import _host_tag, partial_name, sweep_partials

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


# ----------------------------------------------------------------------------- temp names


def test_long_input_name_fits_the_temp_name(tmp_path):
    """A legal 243-character input name gave Errno 36 (File name too long) on the mask's temp file."""
    stem = "c" * (243 - len(".nii.gz"))
    vol = Volume(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    out = write_nifti(vol, tmp_path / f"{stem}_seg.nii.gz")
    assert out.exists()
    assert len(out.name.encode()) <= 255
    assert _leftovers(tmp_path) == []
    name = partial_name("é" * 120 + ".nii.gz", folder=tmp_path)  # multi-byte: cut by bytes, not characters
    assert len(name.encode()) <= 255
    assert name.endswith(".partial.nii.gz")


def test_temp_name_keeps_format_suffix_not_uid_parts(tmp_path):
    name = partial_name("1.2.840.113619.2.55.3.nii.gz", folder=tmp_path)
    assert name.endswith(".partial.nii.gz")
    assert f".{os.getpid()}@{_host_tag()}-" in name


def test_atomic_write_does_not_touch_the_umask(tmp_path, monkeypatch):
    """Library code changes no process-wide state: the kernel applies the umask to os.open(..., 0o666)."""
    mask = os.umask(0o027)
    os.umask(mask)

    def forbidden(_mask):
        raise AssertionError("os.umask called by library code")

    monkeypatch.setattr(os, "umask", forbidden)
    out = write_text_atomic(tmp_path / "a.txt", "x")
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    # a writer that replaces the temp file with a private one (safetensors does) still gives the usual mode
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        tmp.unlink()
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


# ----------------------------------------------------------------------------- leftovers of killed writers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_partials_of_dead_writers_only(tmp_path):
    dead = _dead_pid()
    host = _host_tag()
    (tmp_path / "checkpoints").mkdir()
    dead_files = [
        tmp_path / "checkpoints" / f".last.pt.{dead}@{host}-0a1b2c3d.partial.pt",
        tmp_path / f".case_seg.nii.gz.{dead}@{host}-deadbeef.partial.nii.gz",
    ]
    live = tmp_path / f".best.pt.{os.getpid()}@{host}-0a1b2c3d.partial.pt"
    other_host = tmp_path / f".best.pt.{dead}@{'0' if host[0] != '0' else '1'}{host[1:]}-0a1b2c3d.partial.pt"
    old_legacy = [tmp_path / "checkpoints" / ".best.pt.partial", tmp_path / ".last.pt.k3j_x9ab.partial.pt"]
    new_legacy = tmp_path / ".weights.pt.zz11yy22.partial.pt"
    user_file = tmp_path / ".notes.partial.txt.bak"
    for p in [*dead_files, live, other_host, *old_legacy, new_legacy, user_file]:
        p.write_bytes(b"x")
    for p in old_legacy:
        os.utime(p, (time.time() - 7200, time.time() - 7200))

    removed = sweep_partials(tmp_path)

    assert sorted(removed) == sorted(dead_files + old_legacy)
    assert live.exists()
    assert other_host.exists()  # that PID is not this machine's to judge: removed only by age
    assert new_legacy.exists()
    assert user_file.exists()


def test_killed_writer_leaves_a_partial_that_the_next_start_sweeps(tmp_path):
    code = textwrap.dedent(
        """
        import sys, time
        from medseg.io import atomic_path
        with atomic_path(sys.argv[1] + "/best.pt") as tmp:
            tmp.write_bytes(b"half a checkpoint")
            print("writing", flush=True)
            time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    assert len(_leftovers(tmp_path)) == 1
    assert sweep_partials(tmp_path) == []  # the writer is alive: its file stays
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(sweep_partials(tmp_path)) == 1
    assert _leftovers(tmp_path) == []
    assert not (tmp_path / "best.pt").exists()


# ----------------------------------------------------------------------------- disk full

_FULL_DISK_WRITES = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np, torch
    from medseg.errors import OutputError
    from medseg.io import Volume, atomic_path, write_nifti, write_text_atomic
    folder = Path(sys.argv[1])
    writes = {
        "text": lambda: write_text_atomic(folder / "sidecar.json", "x" * 2_000_000),
        "nifti": lambda: write_nifti(Volume(np.random.rand(90, 90, 90).astype(np.float32), np.eye(4)),
                                     folder / "img.nii"),
    }
    def _tmp(final):
        with atomic_path(final) as tmp:
            torch.save({"w": torch.randn(400_000)}, tmp)
    writes["torch"] = lambda: _tmp(folder / "last.pt")
    for name, write in writes.items():
        try:
            write()
        except OutputError as exc:
            print(name, "OutputError", str(exc).replace(chr(10), " | "))
        else:
            print(name, "written")
    print("left:", sorted(p.name for p in folder.iterdir()))
    """
)


def _run_on_small_disk(tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the writes on a 300 KB tmpfs (user namespace), else under a 300 KB file-size limit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode == 0:
        script = f'mount -t tmpfs -o size=300k tmpfs "$1" && exec "{sys.executable}" -c "$2" "$1"'
        cmd = [unshare, "-rm", "sh", "-c", script, "sh", str(disk), _FULL_DISK_WRITES]
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    cmd = [sys.executable, "-c", _FULL_DISK_WRITES, str(disk)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_disk_full_is_one_line_and_leaves_no_temp_file(tmp_path):
    """Disk full during a checkpoint gave a torch RuntimeError traceback and left the .partial file."""
    proc = _run_on_small_disk(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    for name, target in (("text", "sidecar.json"), ("torch", "last.pt"), ("nifti", "img.nii")):
        assert lines[name].startswith("OutputError"), proc.stdout
        assert target in lines[name]
        assert "could not be written" in lines[name]
        assert "|" not in lines[name]
    assert lines["left:"] == "[]", proc.stdout


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_exit_2(tiny_dataset, tmp_path):
    """Disk full during a checkpoint gave a torch RuntimeError traceback, exit 1, and a .partial left."""
    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user namespaces here to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    tiny = "preprocess.spacing=[2,2,3] train.patch_size=[16,16,16] model.features=4 model.depth=2"
    script = (
        f'mount -t tmpfs -o size=120k tmpfs "$1" || exit 99; "{sys.executable}" -m medseg train --data "$2" '
        f'--out "$1/run" --set train.epochs=1 tracking.enabled=false {tiny}; echo "rc=$?"; '
        'find "$1" -name "*partial*" | sed "s/^/LEFT /"'
    )
    proc = subprocess.run(
        [unshare, "-rm", "sh", "-c", script, "sh", str(disk), str(tiny_dataset)],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    assert len(errors) == 1, proc.stderr
    assert "no space left on the device" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "LEFT" not in proc.stdout  # no temp file left on the full disk


def test_unwritable_output_folder_is_an_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="could not be written"), atomic_path(blocker / "sub" / "m.nii.gz"):
        pass


# ----------------------------------------------------------------------------- absurd sizes

_BOMB_READ = textwrap.dedent(
    """
    import resource, sys
    from medseg.errors import InputError
    from medseg.io import read_nifti
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_nifti(sys.argv[1], max_bytes=int(sys.argv[2]))
    except InputError as exc:
        print("InputError", exc)
    else:
        print("read")
    print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """
)


def _nifti_header_bytes(shape: tuple[int, ...], dtype=np.int16) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((1, 1, 1), dtype), np.eye(4))
    img.header.set_data_shape(shape)
    img.header["vox_offset"] = 352
    return img.header.binaryblock + b"\0" * 4


def test_tiny_nifti_claiming_32767_cubed_is_one_line(tmp_path):
    """A 66-byte NIfTI claiming 32767^3 voxels made nibabel allocate it (MemoryError traceback, exit 1)."""
    import gzip

    from tests.conftest import run_cli

    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header_bytes((32767, 32767, 32767)), 9))
    assert path.stat().st_size < 100
    proc = run_cli("convert", str(path), "out.nii.gz", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "32767x32767x32767" in proc.stderr
    assert "memory limit" in proc.stderr
    # uncompressed, the same header is refused as truncated before anything is mapped
    raw = tmp_path / "bomb.nii"
    raw.write_bytes(_nifti_header_bytes((32767, 32767, 32767)))
    proc = run_cli("convert", str(raw), "out.nii.gz", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "holds less than its header says" in proc.stderr


def test_small_gzip_holding_gigabytes_is_not_decompressed(tmp_path):
    """A 1 MB gzip holding 1 GiB was decompressed in full (2.6 GB RSS): the cap refuses it from the header."""
    import zlib

    path = tmp_path / "zeros.nii.gz"
    shape = (1024, 1024, 1024)  # 1 GiB of uint8 zeros
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    chunk = bytes(2**24)
    with open(path, "wb") as fh:
        fh.write(comp.compress(_nifti_header_bytes(shape, np.uint8)))
        for _ in range(2**30 // len(chunk)):
            fh.write(comp.compress(chunk))
        fh.write(comp.flush())
    assert path.stat().st_size < 2 * 2**20
    proc = subprocess.run(
        [sys.executable, "-c", _BOMB_READ, str(path), str(256 * 2**20)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "InputError" in proc.stdout
    assert "1024x1024x1024 voxels of uint8" in proc.stdout
    assert "memory limit of 256.0 MiB" in proc.stdout
    assert int(proc.stdout.split("grew_mb")[1]) < 64, proc.stdout  # nothing was decompressed


def test_preflight_estimates_from_the_header_and_refuses_over_budget(tmp_path):
    from medseg.io import write_dicom_series
    from medseg.io.preflight import parse_size, preflight

    vol = Volume(np.zeros((32, 32, 16), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    nii = write_nifti(vol, tmp_path / "ct.nii.gz", dtype="int16")
    est = preflight(nii, max_memory=2**30, n_classes=3, overhead_bytes=0)
    native = 32 * 32 * 16
    assert est.parts["read"] == native * (2 + 4)
    assert est.header.shape == (32, 32, 16)
    # a finer model grid (0.5 mm from 1x1x2 mm) holds 2*2*4 = 16 times the voxels
    fine = preflight(nii, max_memory=2**30, n_classes=3, spacing=(0.5, 0.5, 0.5), overhead_bytes=0)
    assert fine.parts["model grid"] == 16 * est.parts["model grid"]
    assert fine.parts["network output"] > est.parts["network output"]
    with pytest.raises(InputError, match=r"needs about .* for 32x32x16 voxels, more than the memory limit"):
        preflight(nii, max_memory=native * 8, overhead_bytes=0)
    # a DICOM series is sized from its headers, without reading pixels
    write_dicom_series(vol, tmp_path / "dicom")
    assert preflight(tmp_path / "dicom", max_memory=2**30).header.shape == (32, 32, 16)
    # NRRD/MetaImage from SimpleITK's header; a zipped study by what it expands to
    from medseg.io import write_sitk

    nrrd = write_sitk(vol, tmp_path / "ct.nrrd")
    assert preflight(nrrd, max_memory=2**30).header.shape[:3] == (32, 32, 16)
    shutil.make_archive(str(tmp_path / "study"), "zip", tmp_path / "dicom")
    zipped = preflight(tmp_path / "study.zip", max_memory=2**30).header
    assert zipped.shape[0] * 2 >= 32 * 32 * 16 * 2  # at least the pixel bytes
    assert parse_size("8G") == 8 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("lots")


def test_resident_bytes_is_this_process_memory():
    """In a fresh process (a long-lived one may hand a new array pages it already holds): 64 MiB
    touched raise it by about 64 MiB, and it agrees with the kernel's VmRSS."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from medseg.io.preflight import resident_bytes\n"
        "before = resident_bytes()\n"
        "block = np.ones(64 * 2**20, dtype=np.uint8)\n"
        "after = resident_bytes()\n"
        "vm = [int(x.split()[1]) * 1024 for x in Path('/proc/self/status').read_text().splitlines() if x.startswith('VmRSS')][0]\n"
        "print(before, after, vm)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    before, after, vm = (int(x) for x in out.stdout.split())
    assert 56 * 2**20 <= after - before <= 72 * 2**20
    assert abs(after - vm) <= 4 * 2**20


def test_preflight_for_an_ensemble_uses_the_bundles_settings(tmp_path):
    from types import SimpleNamespace

    from medseg.config import load_config
    from medseg.io.preflight import preflight, preflight_inference

    nii = write_nifti(Volume(np.zeros((64, 64, 32), np.float32), np.eye(4)), tmp_path / "ct.nii.gz")
    tiny = ["train.patch_size=[16,16,16]", "model.features=4", "model.depth=2", "labels={0: bg, 1: a, 2: b}"]
    coarse = SimpleNamespace(
        config=load_config(None, [*tiny, "preprocess.spacing=[2,2,2]"]), labels={0: "bg", 1: "a"}
    )
    fine = SimpleNamespace(
        config=load_config(None, [*tiny, "preprocess.spacing=[1,1,1]"]), labels={0: "", 1: "", 2: ""}
    )
    both = preflight_inference(nii, [coarse, fine], max_memory=2**34, tta=True)
    alone = preflight(
        nii,
        max_memory=2**34,
        spacing=(1, 1, 1),
        n_classes=3,
        n_models=2,
        tta=True,
        patch_size=(16, 16, 16),
        features=4,
    )
    assert both.parts == alone.parts  # the finest grid, most classes, both members, TTA
    assert both.parts["network"] == 16**3 * 4 * 4 * 8 * 2  # two windows in flight


# ----------------------------------------------------------------------------- folders written as one unit


def _bundle(folder: Path, version: str) -> None:
    for name in ("model.safetensors", "config.yaml", "metadata.json"):
        (folder / name).write_text(f"{name} {version}")


def _versions(folder: Path) -> set[str]:
    return {p.read_text().split()[-1] for p in folder.iterdir()}


@pytest.mark.parametrize("exchange", [True, False], ids=["rename_exchange", "rename_aside"])
def test_atomic_dir_replaces_a_folder_as_one_unit(tmp_path, monkeypatch, exchange):
    from medseg.io import volume

    if not exchange:

        def unsupported(_a, _b):
            raise OSError(38, "renameat2 is not available")

        monkeypatch.setattr(volume, "_rename_exchange", unsupported)
    with volume.atomic_dir(tmp_path / "bundle") as staging:
        _bundle(staging, "1")
    assert _versions(tmp_path / "bundle") == {"1"}
    with volume.atomic_dir(tmp_path / "bundle") as staging:
        _bundle(staging, "2")
    assert _versions(tmp_path / "bundle") == {"2"}

    def half_written() -> None:
        with volume.atomic_dir(tmp_path / "bundle") as staging:
            _bundle(staging, "3")
            raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        half_written()
    assert _versions(tmp_path / "bundle") == {"2"}  # never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with (
        pytest.raises(OutputError, match="already exists"),
        volume.atomic_dir(tmp_path / "bundle", overwrite=False),
    ):
        pass


def test_sweep_removes_dead_staging_folders_and_restores_a_folder_set_aside(tmp_path):
    from medseg.io.volume import _host_tag

    dead, host = _dead_pid(), _host_tag()
    staging = tmp_path / f".bundle.{dead}@{host}-0a1b2c3d.partial.tmp"
    aside = tmp_path / f".best.{dead}@{host}-0a1b2c3d.replaced.tmp"
    for folder in (staging, aside):
        folder.mkdir()
        _bundle(folder, "old")
    removed = sweep_partials(tmp_path)
    assert sorted(removed) == sorted([staging, aside])
    assert not staging.exists()
    assert _versions(tmp_path / "best") == {"old"}  # its writer died between the two renames: put back


def test_infer_refuses_a_case_over_max_memory_and_the_batch_goes_on(tmp_path):
    """The memory preflight in a batch: the absurd case fails with its estimate, the others are written."""
    import gzip

    import torch

    from medseg.bundle import save_bundle
    from medseg.config import load_config
    from medseg.models import build_model
    from medseg.synthetic import make_case
    from tests.conftest import run_cli

    cfg = load_config(
        None,
        [
            "labels={0: background, 1: liver}",
            "preprocess.spacing=[2,2,3]",
            "preprocess.intensity.window=[-200,300]",
            "preprocess.intensity.mean=50",
            "preprocess.intensity.std=100",
            "model.features=4",
            "model.depth=2",
            "train.patch_size=[16,16,16]",
        ],
    )
    torch.manual_seed(0)
    save_bundle(tmp_path / "bundle", build_model(cfg.model, out_channels=2), cfg, {})
    inputs = tmp_path / "inputs"
    write_nifti(make_case(0, size=16)[0], inputs / "small.nii.gz")
    (inputs / "huge.nii.gz").write_bytes(gzip.compress(_nifti_header_bytes((32767, 32767, 32767)), 9))
    proc = run_cli(
        "infer",
        "-m",
        "bundle",
        "-i",
        "inputs",
        "-o",
        "out",
        "--max-memory",
        "4G",
        "--no-report",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr  # some cases failed
    assert (tmp_path / "out" / "small_seg.nii.gz").exists()
    assert not (tmp_path / "out" / "huge_seg.nii.gz").exists()
    failed = [line for line in proc.stderr.splitlines() if "huge.nii.gz" in line and "FAILED" in line]
    assert failed, proc.stderr
    assert "needs about" in failed[0]
    assert "memory limit of 4.0 GiB" in failed[0]
    assert "MemoryError" not in proc.stderr
    bad = run_cli("infer", "-m", "bundle", "-i", "inputs", "-o", "out", "--max-memory", "lots", cwd=tmp_path)
    assert bad.returncode == 2
    assert "expected a size such as 8G" in bad.stderr


def test_multichannel_nifti_claiming_absurd_size_is_refused_from_the_header(tmp_path):
    import gzip

    from medseg.io.nifti import read_nifti_channels

    path = tmp_path / "channels.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header_bytes((4096, 4096, 4096, 4)), 9))
    with pytest.raises(InputError, match=r"4096x4096x4096x4 voxels .* more than the memory limit"):
        read_nifti_channels(path)


def test_nrrd_header_claiming_absurd_size_is_refused_before_simpleitk_allocates(tmp_path):
    """SimpleITK allocates what a NRRD header declares (a 116-byte file claiming 2048^3 shorts: 16 GiB)."""
    import gzip

    from medseg.io.preflight import check_read_size
    from medseg.io.sitk import read_sitk

    def nrrd(name: str, size: int) -> Path:
        path = tmp_path / name
        head = f"NRRD0004\ntype: short\ndimension: 3\nsizes: {size} {size} {size}\nendian: little\nencoding: gzip\n\n"
        path.write_bytes(head.encode() + gzip.compress(bytes(1000)))
        return path

    with pytest.raises(InputError, match=r"4096x4096x4096 voxels: reading them needs about 384\.0 GiB"):
        read_sitk(nrrd("huge.nrrd", 4096))
    with pytest.raises(InputError, match=r"more than the memory limit of 1\.0 GiB"):
        check_read_size(nrrd("big.nrrd", 1024), max_bytes=2**30)  # 6 GiB to read
    check_read_size(nrrd("small.nrrd", 16), max_bytes=2**30)
