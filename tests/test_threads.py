"""torch's threads fitted to the CPUs a process may use: a container's CPU quota (cgroup v1 or v2,
its own cgroup or one above it), the affinity, and the user's OMP_NUM_THREADS over both; the
memory limit found the same way."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import medseg.cgroups as cgroups
import medseg.runtime as runtime
from tests.helpers import REPO

AFFINITY = float(len(os.sched_getaffinity(0)))


def _fake_proc(tmp_path: Path, own: dict[str, str]) -> tuple[Path, Path, Path]:
    """A /proc/self with a v1 ``cpu`` mount and a v2 mount under ``tmp_path``; ``own`` maps "cpu"
    and "v2" to this process's cgroup paths. Returns the proc folder and the two mounts."""
    proc, v1, v2 = tmp_path / "proc", tmp_path / "cgroup" / "cpu", tmp_path / "cgroup" / "unified"
    for folder in (proc, v1, v2):
        folder.mkdir(parents=True)
    (proc / "cgroup").write_text(
        f"9:memory:/elsewhere\n3:cpu,cpuacct:{own.get('cpu', '/')}\n0::{own.get('v2', '/')}\n"
    )
    (proc / "mountinfo").write_text(
        f"30 25 0:26 / {v1} rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
        f"31 25 0:27 / {tmp_path / 'cgroup' / 'memory'} rw,nosuid - cgroup cgroup rw,memory\n"
        f"32 25 0:28 / {v2} rw,nosuid - cgroup2 cgroup2 rw\n"
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
    )
    return proc, v1, v2


def _v1_quota(folder: Path, quota: int, period: int = 100000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period}\n")


def test_usable_cpus_reads_the_quota_of_the_process_cgroup_and_those_above(tmp_path):
    proc, v1, v2 = _fake_proc(tmp_path, {"cpu": "/kubepods/pod7/box", "v2": "/user.slice/job"})
    assert cgroups.usable_cpus(proc) == AFFINITY  # no quota anywhere: the affinity

    _v1_quota(v1 / "kubepods" / "pod7" / "box", -1)  # its own cgroup sets none ...
    _v1_quota(v1 / "kubepods" / "pod7", 150000)  # ... the pod above it 1.5 CPUs
    assert cgroups.usable_cpus(proc) == min(AFFINITY, 1.5)

    (v2 / "user.slice" / "job").mkdir(parents=True)
    (v2 / "user.slice" / "job" / "cpu.max").write_text("50000 100000\n")  # v2: 0.5, the lowest wins
    assert cgroups.usable_cpus(proc) == 0.5
    (v2 / "user.slice" / "job" / "cpu.max").write_text("max 100000\n")
    assert cgroups.usable_cpus(proc) == min(AFFINITY, 1.5)

    _v1_quota(v1 / "kubepods" / "pod7", int(1e5 * (AFFINITY + 8)))  # above the cores: the cores
    assert cgroups.usable_cpus(proc) == AFFINITY


def test_usable_cpus_in_a_container_that_sees_its_cgroup_at_the_mount(tmp_path):
    """Without a cgroup namespace, /proc/self/cgroup names the host's path (/docker/<id>), which
    is not under the container's mount; the container's own quota sits at the mount's root."""
    proc, v1, v2 = _fake_proc(tmp_path, {"cpu": "/docker/0f3a", "v2": "/docker/0f3a"})
    (v2 / "cpu.max").write_text("25000 100000\n")
    assert cgroups.usable_cpus(proc) == 0.25
    (v2 / "cpu.max").write_text("max 100000\n")
    _v1_quota(v1, 200000, 200000)  # v1 at the root, a period of its own
    assert cgroups.usable_cpus(proc) == 1.0

    proc2, _, v2b = _fake_proc(tmp_path / "ns", {"v2": "/../../outside"})  # outside the namespace
    (v2b / "cpu.max").write_text("75000 100000\n")
    assert cgroups.usable_cpus(proc2) == 0.75


def test_memory_limit_of_the_process_cgroup_and_those_above(tmp_path):
    """The memory preflight's default budget reads the limit where the CPU quota is read: v1's
    ``memory`` controller or v2, the process's own cgroup and every one above it."""
    proc, _, v2 = _fake_proc(tmp_path, {"v2": "/job"})  # v1 memory: /elsewhere, under .../memory
    memory = tmp_path / "cgroup" / "memory"
    assert cgroups.memory_limit(proc) is None
    memory.mkdir()
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (memory / "elsewhere").mkdir()
    (memory / "elsewhere" / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
    assert cgroups.memory_limit(proc) == 3 * 2**30
    (v2 / "job").mkdir()
    (v2 / "job" / "memory.max").write_text(f"{2**30}\n")
    assert cgroups.memory_limit(proc) == 2**30
    (v2 / "job" / "memory.max").write_text("max\n")
    assert cgroups.memory_limit(proc) == 3 * 2**30


def test_usable_cpus_without_a_proc_folder(tmp_path):
    assert cgroups.usable_cpus(tmp_path / "missing") == AFFINITY


def test_fit_threads_lowers_torch_threads_to_the_usable_cpus_unless_the_user_set_them(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(runtime, "usable_cpus", lambda proc=None: 1.5)
        with caplog.at_level("INFO", logger="medseg.runtime"):
            note = runtime.fit_threads_to_cpus()
        assert torch.get_num_threads() == 2  # 1.5 CPUs: rounded up (2 threads were faster there)
        assert note is not None
        assert "4 -> 2" in note
        assert "1.5 CPUs" in caplog.text

        monkeypatch.setattr(runtime, "usable_cpus", lambda proc=None: 8.0)
        assert runtime.fit_threads_to_cpus() is None  # never raised above what torch chose
        assert torch.get_num_threads() == 2

        torch.set_num_threads(4)
        monkeypatch.setattr(runtime, "usable_cpus", lambda proc=None: 1.0)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's (or torchrun's) setting wins
        assert runtime.fit_threads_to_cpus() is None
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def _writable_cpu_cgroup() -> tuple[Path, str] | None:
    """A cgroup folder this process may make children in, with a CPU quota file: v1's ``cpu``
    mount or a v2 folder with the ``cpu`` controller enabled for its children; None elsewhere."""
    for folder, version in cgroups.cgroup_dirs():
        if not os.access(folder, os.W_OK):
            continue
        if version == "v1":
            return folder, version
        try:
            if "cpu" in (folder / "cgroup.subtree_control").read_text().split():
                return folder, version
        except OSError:
            continue
    return None


@pytest.mark.skipif(_writable_cpu_cgroup() is None, reason="no cgroup this user may create (needs root)")
@pytest.mark.skipif(AFFINITY < 2, reason="one CPU: a quota cannot lower torch's threads")
def test_medseg_in_a_cgroup_with_half_a_cpu_runs_one_thread(tmp_path):
    """The real thing: a cgroup with a quota of half a CPU, as ``docker run --cpus 0.5`` makes, and
    ``medseg infer`` started in it. The bundle is missing, so it stops at once with its one-line
    error; before that it has fitted torch's threads and said so."""
    parent, version = _writable_cpu_cgroup()  # type: ignore[misc]
    group = parent / f"medseg-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    (tmp_path / "in").mkdir()
    try:
        if version == "v1":
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("50000")
        else:
            (group / "cpu.max").write_text("50000 100000")
        env = {k: v for k, v in os.environ.items() if k not in runtime.THREAD_ENV}
        env["PYTHONPATH"] = str(REPO)
        enter = f"echo $$ > {group / 'cgroup.procs'} && exec \"$@\""
        probe = subprocess.run(
            ["sh", "-c", enter, "sh", sys.executable, "-c",
             "import medseg.runtime as r; print(r.usable_cpus())"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert probe.returncode == 0, probe.stderr
        assert float(probe.stdout) == 0.5
        proc = subprocess.run(
            ["sh", "-c", enter, "sh", sys.executable, "-m", "medseg", "infer",
             "-m", str(tmp_path / "no-bundle"), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"torch threads {torch.get_num_threads()} -> 1: this process may use 0.5 CPUs" in proc.stderr
        last = proc.stderr.splitlines()[-1]
        assert last.startswith("medseg infer: error:"), last
        assert "no-bundle" in last, last
    finally:
        group.rmdir()
