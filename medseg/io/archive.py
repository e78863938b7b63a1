"""Zipped DICOM studies (how PACS exports often arrive): checked, extracted, read, cleaned up.

Every entry is checked before anything is written: no absolute paths, no ``..``, no links, no
encrypted entries, and caps on the entry count, the total uncompressed size and the compression
ratio (zip bombs). Extraction goes into a private temporary folder that is removed afterwards, and
the bytes actually written are counted, so a header that lies about sizes cannot exceed the caps.
The usual series selection then runs on the extracted folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medseg.errors import InputError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipLimits:
    """Caps on what a zipped study may expand to.

    Attributes:
        max_entries: files and folders in the archive.
        max_total_bytes: uncompressed size of all files together.
        max_ratio: uncompressed / compressed size, for the archive as a whole and for any entry over
            ``ratio_floor_bytes`` (DICOM compresses about 2-10x; a bomb 1000x and more).
        ratio_floor_bytes: entries smaller than this are not ratio-checked (tiny headers compress well).
    """

    max_entries: int = 50_000
    max_total_bytes: int = 16 << 30
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 << 20


def _is_link(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return info.create_system == 3 and stat.S_ISLNK(mode)


def _unsafe_name(name: str) -> str | None:
    if not name or "\0" in name:
        return "an empty or NUL-containing name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "a '..' component leading out of the folder"
    return None


def _skipped(name: str) -> bool:
    """macOS resource forks and dot-files are not part of a study."""
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


def check_zip(path: Path, archive: zipfile.ZipFile, limits: ZipLimits) -> list[zipfile.ZipInfo]:
    """The entries to extract, or an ``InputError`` naming the first hostile one."""
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise InputError(path, f"holds {len(infos)} entries, more than the {limits.max_entries} allowed")
    total = packed = 0
    keep = []
    for info in infos:
        problem = _unsafe_name(info.filename)
        if problem:
            raise InputError(path, f"entry {info.filename[:80]!r} has {problem}; refusing the archive")
        if _is_link(info):
            raise InputError(path, f"entry {info.filename[:80]!r} is a symbolic link; refusing the archive")
        if info.flag_bits & 0x1:
            raise InputError(path, f"entry {info.filename[:80]!r} is encrypted; unzip it yourself first")
        if info.is_dir() or _skipped(info.filename):
            continue
        total += info.file_size
        packed += info.compress_size
        if info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_ratio * max(
            info.compress_size, 1
        ):
            raise InputError(
                path,
                f"entry {info.filename[:80]!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                f"(more than {limits.max_ratio:g}x): refusing a possible zip bomb",
            )
        keep.append(info)
    if total > limits.max_total_bytes:
        raise InputError(
            path,
            f"expands to {total / 2**30:.1f} GiB, more than the {limits.max_total_bytes / 2**30:.1f} GiB allowed",
        )
    if total > limits.ratio_floor_bytes and total > limits.max_ratio * max(packed, 1):
        raise InputError(
            path,
            f"expands {total / max(packed, 1):.0f}x (more than {limits.max_ratio:g}x): refusing a possible zip bomb",
        )
    if not keep:
        raise InputError(path, "the archive holds no files")
    return keep


def _extract(
    path: Path, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, limits: ZipLimits
) -> None:
    written = 0
    for index, info in enumerate(infos):
        # numbered files: names inside the archive (patient names, at times) never reach the disk,
        # and no name can lead outside ``dest``
        target = dest / f"{index:06d}.dcm"
        declared = info.file_size
        with archive.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                declared -= len(chunk)
                if declared < 0 or written > limits.max_total_bytes:
                    raise InputError(
                        path, f"entry {info.filename[:80]!r} holds more than its header declares"
                    )
                out.write(chunk)


@contextlib.contextmanager
def extracted_zip(path: str | Path, *, limits: ZipLimits | None = None) -> Iterator[Path]:
    """Yield a temporary folder holding the checked contents of the zip ``path``; removed on exit.

    Raises:
        InputError: not a zip file, a hostile entry (see ``check_zip``), or a corrupt member.
    """
    path = Path(path)
    limits = limits or ZipLimits()
    tmp = Path(tempfile.mkdtemp(prefix="medseg-zip-"))
    try:
        try:
            with zipfile.ZipFile(path) as archive:
                infos = check_zip(path, archive, limits)
                _extract(path, archive, infos, tmp, limits)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
            raise InputError(path, f"not a readable zip archive ({' '.join(str(exc).split())})") from exc
        except OSError as exc:
            raise InputError(path, f"could not be extracted ({exc.strerror or exc})") from exc
        log.debug("%s: %d files extracted to a temporary folder", path.name, len(infos))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def dicom_source(path: str | Path) -> Iterator[Path]:
    """The DICOM folder (or file) behind an input: ``path`` itself, or a zip's extracted contents."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        with extracted_zip(path) as folder:
            yield folder
    else:
        yield path


def _renamed(exc: InputError, folder: Path, path: Path) -> InputError:
    """The same error, naming the zip instead of the temporary folder."""
    problem = exc.problem.replace(str(folder), path.name)
    return InputError(path, problem)


def read_zipped_series(path: str | Path, *, series_id: str | None = None, allow_tilt: bool = False):
    """Read one DICOM series from a zipped study, as ``read_dicom_series`` reads a folder."""
    from medseg.io.dicom import read_dicom_series
    from medseg.io.volume import Volume

    path = Path(path)
    with dicom_source(path) as folder:
        try:
            volume = read_dicom_series(folder, series_id=series_id, allow_tilt=allow_tilt)
        except InputError as exc:
            raise _renamed(exc, folder, path) from None
    return Volume(array=volume.array, affine=volume.affine, meta=dict(volume.meta), source=str(path))
