"""This process's cgroup limits, the way a container sets them: the CPU quota (``usable_cpus``) and
the memory limit (``memory_limit``), from cgroup v2 or v1, its own cgroup or any above it.

Torch-free (the reading side, ``medseg.io``, uses it too). A container with its own cgroup namespace
sees its cgroup at the mount's root; a process in a systemd slice, a Kubernetes pod without a
namespace or a cgroup made by hand (``cgcreate``) sees it deeper, and a limit on a parent limits
it too, so every level from the process's cgroup up to the mount is read and the lowest limit wins.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC_SELF = Path("/proc/self")


def cgroup_dirs(proc: Path = PROC_SELF, controller: str = "cpu") -> list[tuple[Path, str]]:
    """The cgroup folders that may hold this process's ``controller`` limit, each with its version
    ("v2", "v1"): under every mount of the unified hierarchy or of v1's ``controller`` (from
    ``mountinfo``), the process's own cgroup (from ``cgroup``) and every cgroup above it."""
    try:
        own_lines = (proc / "cgroup").read_text().splitlines()
        mount_lines = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return []
    own: dict[str, str] = {}  # "v2" or a v1 controller -> the process's cgroup path
    for line in own_lines:
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hierarchy == "0" and not controllers:
            own["v2"] = path
        for name in controllers.split(","):
            own.setdefault(name, path)
    found: list[tuple[Path, str]] = []
    for line in mount_lines:
        head, _, tail = line.partition(" - ")
        fields, kinds = head.split(), tail.split()
        if len(fields) < 5 or len(kinds) < 3:
            continue
        mount, fstype, options = Path(fields[4]), kinds[0], kinds[2].split(",")
        if fstype == "cgroup2":
            version = "v2"
        elif fstype == "cgroup" and controller in options:
            version = "v1"
        else:
            continue
        cgroup = Path(own.get("v2" if version == "v2" else controller, "/"))
        if ".." in cgroup.parts:  # a cgroup outside this namespace's view
            cgroup = Path("/")
        for level in (cgroup, *cgroup.parents):
            folder = mount / level.relative_to("/") if level.is_absolute() else mount
            if (folder, version) not in found:
                found.append((folder, version))
    return found


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_quota_in(folder: Path, version: str) -> float | None:
    """The CPUs a cgroup folder's quota allows, or None where it sets none (or cannot be read)."""
    try:
        if version == "v2":
            quota, period = (_read(folder / "cpu.max") or "").split()[:2]
        else:
            quota, period = _read(folder / "cpu.cfs_quota_us") or "", _read(folder / "cpu.cfs_period_us") or ""
        if quota in ("max", "-1") or float(period) <= 0:
            return None
        return float(quota) / float(period)
    except ValueError:
        return None


def usable_cpus(proc: Path | None = None) -> float:
    """The CPUs this process may use: its affinity, or the lowest CPU quota of its cgroups (v2
    ``cpu.max``, v1 ``cpu.cfs_quota_us``) where lower, e.g. 2.0 under ``docker run --cpus 2``."""
    n = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    dirs = cgroup_dirs(proc or PROC_SELF, "cpu")
    quotas = [q for folder, version in dirs if (q := _cpu_quota_in(folder, version))]
    return max(0.01, min([n, *quotas]))


def memory_limit(proc: Path | None = None) -> int | None:
    """The lowest memory limit (bytes) of this process's cgroups (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), or None where none is set (v1 writes "no limit" as a huge number,
    which the caller's comparison with the machine's memory discards)."""
    limits = []
    for folder, version in cgroup_dirs(proc or PROC_SELF, "memory"):
        text = _read(folder / ("memory.max" if version == "v2" else "memory.limit_in_bytes"))
        if text and text.isdigit() and int(text) > 0:
            limits.append(int(text))
    return min(limits) if limits else None
