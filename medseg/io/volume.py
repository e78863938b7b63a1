"""The in-memory image every stage shares: voxels + affine (RAS, mm) + safe metadata."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import OutputError, one_line

logger = logging.getLogger(__name__)

# Header fields a Volume may carry. Anything else read from a file header
# (patient name, ID, birth date, accession number, institution, study dates) is
# dropped at the reader, so it can never reach a log, MLflow or a file name.
SAFE_META_KEYS = frozenset(
    {
        "modality",
        "manufacturer",
        "manufacturer_model",
        "series_description",
        "series_uid_hash",
        "body_part",
        "transfer_syntax",
        "photometric",
        "pixel_values",  # what the reader did to the stored values (MONOCHROME1, modality LUT, BitsStored)
        "n_slices",
        "source_format",
        "orientation",
        "dtype",
        "kind",
    }
)


@dataclass(frozen=True)
class Volume:
    """A 3D image in world space.

    Attributes:
        array: voxels indexed (i, j, k); float32 for images, integers for masks.
        affine: 4x4 voxel-index -> RAS world (mm) matrix.
        meta: safe, non-identifying metadata only (see ``SAFE_META_KEYS``).
        source: the path it came from (for messages), or "" for computed volumes.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got {self.affine.shape}")
        unsafe = set(self.meta) - SAFE_META_KEYS
        if unsafe:
            raise ValueError(f"Volume.meta holds keys that are not known to be safe: {sorted(unsafe)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the voxel axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    def axcodes(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """Same grid, new voxels (e.g. a mask for this image)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array=array, affine=self.affine.copy(), meta={**self.meta, **meta}, source=self.source)


def case_stem(path: str | Path) -> str:
    """File name without .nii/.nii.gz/.nrrd/.nhdr/.mha/.mhd/.dcm/.zip; a DICOM folder's name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# Temp names: ".{final name, cut to fit}.{writer PID}@{host tag}-{token}.partial{format suffix}". The
# PID lets a later run tell a dead writer's leftovers (removed by sweep_partials) from a live writer's
# file; the host tag keeps a PID of another machine or container (shared folder) from being judged here.
_PARTIAL_RE = re.compile(r"^\..*\.(?P<pid>\d+)@(?P<host>[0-9a-f]{6})-[0-9a-f]{8}\.partial(?:\.[^.]+){0,2}$")
# A folder atomic_dir set aside while replacing it (where RENAME_EXCHANGE is missing).
_REPLACED_RE = re.compile(r"^\.(?P<final>.+)\.\d+@[0-9a-f]{6}-[0-9a-f]{8}\.replaced(?:\.[^.]+){0,2}$")
# Names of partials written before the PID was part of the name (mkstemp's 8 random characters,
# train's ".best.pt.partial"): removed only when older than ``legacy_age_s``.
_LEGACY_PARTIAL_RE = re.compile(r"^\..+\.(?:[0-9a-z_]{8}\.partial(?:\.[^.]+){0,2}|partial)$")
_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def _format_suffix(name: str) -> str:
    """The suffix a writer picks the format from (".nii.gz", ".pt", ...), never a dotted UID's parts."""
    lower = name.lower()
    for compound in _COMPOUND_SUFFIXES:
        if lower.endswith(compound) and len(name) > len(compound):
            return name[-len(compound) :]
    suffix = Path(name).suffix
    return suffix if 1 < len(suffix) <= 16 else ".tmp"


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()[:6]


def partial_name(final_name: str, *, folder: str | Path = ".", token: str | None = None) -> str:
    """The temporary name for writing ``final_name``: within the file system's name limit, PID inside."""
    token = token or secrets.token_hex(4)
    tail = f".{os.getpid()}@{_host_tag()}-{token}.partial{_format_suffix(final_name)}"
    room = _name_max(Path(folder)) - len(tail.encode()) - 1  # the leading dot
    head = final_name.encode()[: max(room, 1)].decode(errors="ignore")
    return f".{head}{tail}"


def _create_partial(final: Path, *, folder: bool = False) -> Path:
    """Create an empty temp file (or folder) beside ``final``; the kernel applies the umask."""
    for _ in range(100):
        tmp = final.parent / partial_name(final.name, folder=final.parent)
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final.parent))


def _write_failure(final: Path, exc: BaseException) -> OutputError | None:
    """The one-line OutputError for a failed write, or None when ``exc`` is not a write failure."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "no space left on the device"
        return OutputError(f"{final}: could not be written ({reason})")
    # torch.save reports a failed write (disk full) as a RuntimeError from its C++ stream writer,
    # worded differently by where it failed; a nearly full device says what happened.
    if isinstance(exc, RuntimeError):
        free = _free_bytes(final.parent)
        if free is not None and free < 1 << 20:
            return OutputError(f"{final}: could not be written (no space left on the device)")
        text = str(exc).lower()
        if any(word in text for word in ("write", "iostream", "inline_container")):
            return OutputError(f"{final}: could not be written ({one_line(exc, limit=200)})")
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def atomic_path(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success.

    The temporary name keeps the final format suffix (writers pick the format from
    it), carries the writer's PID (see ``sweep_partials``) and stays within the
    file system's name limit. On any error the temporary file is removed and
    ``final`` is untouched; a failed write (disk full, read-only folder, ...)
    becomes an ``OutputError`` naming ``final``.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputError(f"{final}: already exists (pass --overwrite to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_partial(final)
        mode = stat.S_IMODE(tmp.stat().st_mode)  # 0666 less the umask, as the kernel applied it
    except OSError as exc:
        raise _write_failure(final, exc) from exc  # type: ignore[misc]
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
            if stat.S_IMODE(os.fstat(fh.fileno()).st_mode) != mode:
                os.chmod(tmp, mode)  # a writer that replaced the file (safetensors: 0600) gets the usual mode
        os.replace(tmp, final)
    except BaseException as exc:
        failure = _write_failure(final, exc)  # before the unlink, which frees the space it measures
        tmp.unlink(missing_ok=True)
        if failure is not None:
            raise failure from exc
        raise
    _fsync_folder(final.parent)


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; on success it becomes ``final`` as one unit.

    For outputs that are several files meant to agree (a bundle: weights, config, metadata).
    An existing ``final`` is swapped with the staging folder in one step (renameat2
    RENAME_EXCHANGE) and then removed; where the file system cannot exchange, it is renamed
    aside first (``sweep_partials`` puts it back if the writer dies in between). On any
    error the staging folder is removed and ``final`` is untouched; a failed write is an
    ``OutputError`` naming ``final``.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputError(f"{final}: already exists (pass --overwrite to replace it)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = _create_partial(final, folder=True)
    except OSError as exc:
        raise _write_failure(final, exc) from exc  # type: ignore[misc]
    try:
        yield staging
        _fsync_tree(staging)
        _move_into_place(staging, final)
    except BaseException as exc:
        failure = _write_failure(final, exc)
        shutil.rmtree(staging, ignore_errors=True)
        if failure is not None:
            raise failure from exc
        raise
    _fsync_folder(final.parent)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_folder(Path(root))


def _move_into_place(staging: Path, final: Path) -> None:
    if not final.exists():
        os.rename(staging, final)
        return
    try:
        _rename_exchange(staging, final)
    except OSError:
        # no RENAME_EXCHANGE here: set the old one aside under a name sweep_partials restores from
        aside = final.parent / _marker(partial_name(final.name, folder=final.parent), ".partial", ".replaced")
        os.rename(final, aside)
        os.rename(staging, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        shutil.rmtree(staging, ignore_errors=True)  # it holds the old folder now


def _marker(name: str, old: str, new: str) -> str:
    """``name`` with its last ``old`` marker (".partial", ".replaced") changed to ``new``."""
    i = name.rfind(old)
    return name[:i] + new + name[i + len(old) :]


def _rename_exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError) as exc:
        raise OSError(errno.ENOSYS, "renameat2 is not available") from exc
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: some file systems cannot fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_partials(folder: str | Path, *, recursive: bool = True, legacy_age_s: float = 3600.0) -> list[Path]:
    """Remove temp files left by writers that died (SIGKILL, power loss) in ``folder``.

    A temp file whose name carries a PID of this host is removed when that process
    no longer exists; one written on another host (a shared folder) or in the older
    PID-less form when it is older than ``legacy_age_s``.
    Files of live writers are kept. Call it at the start of a run, on the run or
    output folder (best while holding ``medseg.locks.exclusive`` on it).

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    now = time.time()
    for root, dirs, files in os.walk(folder):
        for name in list(dirs):  # staging folders of atomic_dir, and folders it set aside
            path = Path(root) / name
            if name.startswith(".") and _sweep_folder(path, name, now, legacy_age_s):
                removed.append(path)
                dirs.remove(name)
        for name in files:
            path = Path(root) / name
            if not _is_stale_partial(path, name, now, legacy_age_s):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        if not recursive:
            break
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted writes in %s", len(removed), folder)
    return removed


def _sweep_folder(path: Path, name: str, now: float, legacy_age_s: float) -> bool:
    """Remove a dead writer's staging folder; put back a folder it had set aside. True when handled."""
    aside = _REPLACED_RE.match(name)
    if aside and _is_stale_partial(path, _marker(name, ".replaced", ".partial"), now, legacy_age_s):
        final = path.parent / aside.group("final")
        if not final.exists():
            os.rename(path, final)  # the writer died between its two renames: the old folder comes back
            logger.warning("%s: restored from %s, left by an interrupted replacement", final, path.name)
        else:
            shutil.rmtree(path, ignore_errors=True)
        return True
    if _PARTIAL_RE.match(name) and _is_stale_partial(path, name, now, legacy_age_s):
        shutil.rmtree(path, ignore_errors=True)
        return True
    return False


def _is_stale_partial(path: Path, name: str, now: float, legacy_age_s: float) -> bool:
    if not name.startswith("."):
        return False
    match = _PARTIAL_RE.match(name)
    if match and match.group("host") == _host_tag():
        return not _pid_alive(int(match.group("pid")))
    if match or _LEGACY_PARTIAL_RE.match(name):  # another host's writer, or a name without a PID: by age
        try:
            return now - path.lstat().st_mtime > legacy_age_s
        except OSError:
            return False
    return False


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
