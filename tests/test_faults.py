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
from medseg.io.volume import partial_name, sweep_partials

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
    assert f".{os.getpid()}-" in name


def test_atomic_write_does_not_touch_the_umask(tmp_path, monkeypatch):
    """Library code changes no process-wide state: the kernel applies the umask to os.open(..., 0o666)."""
    mask = os.umask(0o027)
    os.umask(mask)

    def forbidden(_mask):
        raise AssertionError("os.umask called by library code")

    monkeypatch.setattr(os, "umask", forbidden)
    out = write_text_atomic(tmp_path / "a.txt", "x")
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


# ----------------------------------------------------------------------------- leftovers of killed writers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_partials_of_dead_writers_only(tmp_path):
    dead = _dead_pid()
    (tmp_path / "checkpoints").mkdir()
    dead_files = [
        tmp_path / "checkpoints" / f".last.pt.{dead}-0a1b2c3d.partial.pt",
        tmp_path / f".case_seg.nii.gz.{dead}-deadbeef.partial.nii.gz",
    ]
    live = tmp_path / f".best.pt.{os.getpid()}-0a1b2c3d.partial.pt"
    old_legacy = [tmp_path / "checkpoints" / ".best.pt.partial", tmp_path / ".last.pt.k3j_x9ab.partial.pt"]
    new_legacy = tmp_path / ".weights.pt.zz11yy22.partial.pt"
    user_file = tmp_path / ".notes.partial.txt.bak"
    for p in [*dead_files, live, *old_legacy, new_legacy, user_file]:
        p.write_bytes(b"x")
    for p in old_legacy:
        os.utime(p, (time.time() - 7200, time.time() - 7200))

    removed = sweep_partials(tmp_path)

    assert sorted(removed) == sorted(dead_files + old_legacy)
    assert live.exists()
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
    assert parse_size("8G") == 8 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("lots")
