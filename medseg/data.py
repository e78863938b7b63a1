"""Datasets: Decathlon and nnU-Net v2 folders, splits, fingerprint and integrity check.

``load_dataset(root)`` reads either layout and returns a :class:`Dataset` (cases with
absolute paths, one per channel file, and label and channel names):

- Medical Segmentation Decathlon: ``dataset.json`` with ``labels`` (int -> name),
  ``modality`` (channel -> name) and a ``training`` list; a multi-channel image is one
  4D NIfTI (channels on the last axis, as Task01 BrainTumour stores them).
- nnU-Net v2 raw (``DatasetXXX_Name``): ``dataset.json`` with ``channel_names``,
  ``labels`` (name -> int), ``numTraining`` and ``file_ending``; images
  ``imagesTr/CASE_0000<ending>`` .. ``CASE_000N`` (one file per channel) and labels
  ``labelsTr/CASE<ending>``. Region-based labels are refused.

Every entry is resolved (symbolic links followed, nothing opened) and refused when it
leads outside the dataset folder, unless ``allow_outside_root``; the same file may not
appear twice; dot-files (macOS ``._*`` AppleDouble files among them) are never inputs.
``split_cases`` gives a deterministic train/validation split (or a k-fold split);
``fingerprint`` summarises spacings, sizes and per-channel foreground intensities, from
which ``plan`` derives what the config leaves out; ``check_dataset`` is the integrity report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from medseg.errors import InputError, one_line
from medseg.io import Volume, check_same_grid, is_nifti, load_label, load_volume
from medseg.io.nifti import read_nifti_channels

log = logging.getLogger(__name__)

FloatTriple = tuple[float, float, float]
OUTSIDE_HINT = "pass --allow-outside-root to accept entries outside the dataset folder"


@dataclass(frozen=True)
class Case:
    """One case: its image file(s) (one per channel, or one file holding every channel) and label."""

    name: str
    images: tuple[Path, ...]
    label: Path | None = None

    @property
    def image(self) -> Path:
        """The first (or only) image file."""
        return self.images[0]

    def item(self) -> dict[str, Any]:
        """The dict the transform chains load: ``image`` (a path, or one path per channel) and ``label``."""
        image: Any = str(self.images[0]) if len(self.images) == 1 else [str(p) for p in self.images]
        return {"image": image, "label": str(self.label)} if self.label else {"image": image}


@dataclass
class Dataset:
    root: Path
    labels: dict[int, str]
    modality: str  # the first channel's name
    training: list[Case]
    test: list[Case] = field(default_factory=list)
    channels: dict[int, str] = field(default_factory=lambda: {0: "CT"})
    layout: str = "msd"  # "msd" or "nnunet"

    @property
    def n_channels(self) -> int:
        return len(self.channels)


def _case_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class _Entries:
    """Resolves ``dataset.json`` entries: inside the root (unless allowed), existing, each file once."""

    def __init__(self, root: Path, spec_path: Path, *, allow_outside_root: bool) -> None:
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.spec_path = spec_path
        self.allow = allow_outside_root
        self.seen: dict[Path, str] = {}

    def folder(self, rel: str) -> Path:
        """A folder of the layout (``imagesTr``...), refused when it is a link out of the root."""
        path = self.root / rel
        if (
            not self.allow
            and path.exists()
            and not Path(os.path.realpath(path)).is_relative_to(self.real_root)
        ):
            raise InputError(
                path, f"is a symbolic link that leads outside the dataset folder ({OUTSIDE_HINT})"
            )
        return path

    def resolve(self, rel: Any) -> Path:
        spec = self.spec_path
        if not isinstance(rel, str) or not rel.strip():
            raise InputError(spec, f"entry {rel!r} is not a file path")
        if Path(rel).name.startswith("."):
            raise InputError(spec, f"lists {rel!r}, a hidden file (macOS '._*' files are not images)")
        if not self.allow:
            if Path(rel).is_absolute():
                raise InputError(
                    spec,
                    f"lists {rel!r}, an absolute path; entries are relative to the "
                    f"dataset folder ({OUTSIDE_HINT})",
                )
            if ".." in Path(os.path.normpath(rel)).parts:
                raise InputError(
                    spec, f"lists {rel!r}, which leads outside the dataset folder ({OUTSIDE_HINT})"
                )
        # realpath follows symbolic links with lstat/readlink only: nothing outside is opened
        path = Path(os.path.realpath(self.root / rel))
        if not self.allow and not path.is_relative_to(self.real_root):
            raise InputError(
                spec, f"lists {rel!r}, a symbolic link that leads outside the dataset folder ({OUTSIDE_HINT})"
            )
        if not path.exists():  # a file, or a DICOM series folder
            raise InputError(spec, f"lists {rel}, which does not exist")
        if path in self.seen:
            raise InputError(
                spec,
                f"lists the same file twice: {self.seen[path]!r} and {rel!r} "
                "(a case would be in training and validation at once)",
            )
        self.seen[path] = rel
        return path


def _read_spec(root: Path) -> tuple[Path, dict[str, Any]]:
    spec_path = root / "dataset.json"
    if not spec_path.is_file():
        raise InputError(
            root, "no dataset.json (expected a Medical Segmentation Decathlon or nnU-Net v2 folder)"
        )
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(spec_path, f"not valid JSON ({exc})") from exc
    if not isinstance(spec, dict):
        raise InputError(spec_path, "expected a JSON object at the top level")
    return spec_path, spec


def _parse_labels(spec_path: Path, spec: dict[str, Any]) -> dict[int, str]:
    """Decathlon ``{"0": "background"}`` or nnU-Net ``{"background": 0}``; region-based labels refused."""
    raw = spec.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError(spec_path, "missing or malformed 'labels' entry")
    if "regions_class_order" in spec or any(isinstance(v, list | tuple) for v in raw.values()):
        raise InputError(
            spec_path,
            "region-based labels (nnU-Net regions_class_order, a label listing several "
            "values) are not supported; give each label one integer value",
        )
    try:
        if all(re.fullmatch(r"\s*\d+\s*", str(k)) for k in raw):
            labels = {int(k): str(v) for k, v in raw.items()}
        else:
            labels = {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise InputError(spec_path, f"malformed 'labels' entry ({exc}); expected name -> integer") from exc
    if len(labels) != len(raw):
        raise InputError(spec_path, "'labels' gives two labels the same value")
    if 0 not in labels:
        raise InputError(spec_path, "labels must include 0 (background)")
    return labels


def _parse_channels(spec_path: Path, raw: Any) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise InputError(
            spec_path, "'channel_names'/'modality' must map channel numbers to names, e.g. {\"0\": \"CT\"}"
        )
    try:
        channels = {int(k): str(v) for k, v in raw.items()}
    except ValueError as exc:
        raise InputError(spec_path, f"channel numbers must be integers ({exc})") from exc
    if sorted(channels) != list(range(len(channels))):
        raise InputError(
            spec_path, f"channels must be numbered 0..{len(channels) - 1}, got {sorted(channels)}"
        )
    return dict(sorted(channels.items()))


def load_dataset(root: str | Path, *, allow_outside_root: bool = False) -> Dataset:
    """Read a Decathlon or nnU-Net v2 raw dataset folder (see the module docstring)."""
    root = Path(root)
    if root.is_file() and root.name.endswith(".json"):
        root = root.parent
    spec_path, spec = _read_spec(root)
    labels = _parse_labels(spec_path, spec)
    entries = _Entries(root, spec_path, allow_outside_root=allow_outside_root)
    if "channel_names" in spec or ("training" not in spec and "file_ending" in spec):
        channels = _parse_channels(spec_path, spec.get("channel_names"))
        training, test = _nnunet_cases(root, spec_path, spec, len(channels), entries)
        layout = "nnunet"
    else:
        modality = spec.get("modality", {"0": "CT"})
        channels = _parse_channels(spec_path, modality) if isinstance(modality, dict) else {0: "CT"}
        training, test = _msd_cases(spec_path, spec, entries)
        layout = "msd"
    if not training:
        raise InputError(spec_path, "lists no training cases")
    return Dataset(root, labels, channels[0], training, test, channels=channels, layout=layout)


def _msd_cases(spec_path: Path, spec: dict[str, Any], entries: _Entries) -> tuple[list[Case], list[Case]]:
    training_raw = spec.get("training")
    if not isinstance(training_raw, list):
        raise InputError(spec_path, "missing or malformed 'training' list")
    label: Path | None
    training = []
    for entry in training_raw:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(spec_path, f"training entry {entry!r} lacks 'image'/'label'")
        image, label = entries.resolve(entry["image"]), entries.resolve(entry["label"])
        training.append(Case(_case_name(entry["image"]), (image,), label))
    test_labels = {_case_name(p): p for p in spec.get("test_labels", []) if isinstance(p, str)}
    test = []
    for rel in spec.get("test", []):
        rel = rel.get("image") if isinstance(rel, dict) else rel
        name = _case_name(str(rel))
        label = entries.resolve(test_labels[name]) if name in test_labels else None
        test.append(Case(name, (entries.resolve(rel),), label))
    return training, test


def _nnunet_cases(
    root: Path, spec_path: Path, spec: dict[str, Any], n_channels: int, entries: _Entries
) -> tuple[list[Case], list[Case]]:
    ending = spec.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise InputError(spec_path, f"'file_ending' {ending!r} must be a suffix such as \".nii.gz\"")
    # nnU-Net v2 also has an explicit form: "dataset": {case: {"images": [...], "label": ...}}
    if isinstance(spec.get("dataset"), dict):
        training = []
        for name, entry in spec["dataset"].items():
            images = entry.get("images") if isinstance(entry, dict) else None
            if not isinstance(images, list) or "label" not in entry:
                raise InputError(spec_path, f"'dataset' entry {name!r} lacks 'images'/'label'")
            training.append(
                Case(str(name), tuple(entries.resolve(p) for p in images), entries.resolve(entry["label"]))
            )
    else:
        training = _nnunet_folder(root, spec_path, "imagesTr", "labelsTr", ending, n_channels, entries, True)
    for case in training:
        if len(case.images) != n_channels:
            raise InputError(
                spec_path,
                f"case {case.name} has {len(case.images)} image files; channel_names declares {n_channels}",
            )
    declared = spec.get("numTraining")
    if declared is not None and declared != len(training):
        raise InputError(
            spec_path, f"numTraining is {declared} but {len(training)} training cases were found"
        )
    test = _nnunet_folder(root, spec_path, "imagesTs", "labelsTs", ending, n_channels, entries, False)
    return training, test


def _listing(folder: Path, ending: str) -> list[str]:
    """File names in ``folder`` with the given ending; dot-files (AppleDouble ``._*``) are not inputs."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))


def _nnunet_folder(
    root: Path,
    spec_path: Path,
    images_dir: str,
    labels_dir: str,
    ending: str,
    n_channels: int,
    entries: _Entries,
    need_labels: bool,
) -> list[Case]:
    pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(ending)}$")
    found: dict[str, dict[int, str]] = {}
    for name in _listing(entries.folder(images_dir), ending):
        match = pattern.match(name)
        if not match:
            raise InputError(
                root / images_dir / name, f"is not named CASE_XXXX{ending} (one file per channel)"
            )
        found.setdefault(match.group(1), {})[int(match.group(2))] = name
    label_names = set(_listing(entries.folder(labels_dir), ending))
    cases = []
    for case_id, files in sorted(found.items()):
        if sorted(files) != list(range(n_channels)):
            raise InputError(
                root / images_dir,
                f"case {case_id} has channels {sorted(files)}; channel_names "
                f"declares {n_channels} ({', '.join(f'_{c:04d}' for c in range(n_channels))})",
            )
        images = tuple(entries.resolve(f"{images_dir}/{files[c]}") for c in range(n_channels))
        label = None
        if case_id + ending in label_names:
            label = entries.resolve(f"{labels_dir}/{case_id}{ending}")
        elif need_labels:
            raise InputError(root / labels_dir, f"has no label {case_id}{ending} for case {case_id}")
        cases.append(Case(case_id, images, label))
    orphans = sorted(label_names - {c + ending for c in found})
    if orphans and need_labels:
        raise InputError(root / labels_dir / orphans[0], f"is a label without images in {images_dir}")
    return cases


def load_channels(paths: str | Path | Sequence[str | Path], *, resample: bool = False) -> list[Volume]:
    """Read one case's image channels: one file per channel, or one multi-channel (4D) NIfTI.

    Every channel must lie on the first channel's grid (an ``InputError`` naming both
    files otherwise); with ``resample`` the others are resampled onto it (linear).
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    volumes: list[Volume] = []
    for path in paths:
        path = Path(path)
        volumes += read_nifti_channels(path) if path.is_file() and is_nifti(path) else [load_volume(path)]
    return on_one_grid(volumes, resample=resample)


def on_one_grid(volumes: list[Volume], *, resample: bool = False) -> list[Volume]:
    """The channels, checked to share the first one's grid (or resampled onto it with ``resample``)."""
    first = volumes[0]
    out = [first]
    for index, volume in enumerate(volumes[1:], start=1):
        same = volume.shape == first.shape and np.allclose(volume.affine, first.affine, atol=1e-3)
        if resample and not same:
            log.info("channel %d resampled onto channel 0's grid", index)
            volume = resample_onto(volume, first)
        check_same_grid(
            first,
            volume,
            other_kind=f"channel {index}",
            reference_kind="channel 0",
            fix="pass --resample-channels to resample it onto the first channel's grid",
        )
        out.append(volume)
    return out


_CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$", re.IGNORECASE)


def group_channel_inputs(paths: Sequence[str | Path], n_channels: int) -> list[tuple[str, list[Path]]]:
    """Inference inputs as cases for a model taking ``n_channels`` channels: ``(stem, files)`` each.

    With one channel every input is a case. With several, a NIfTI holding them all (4D) is a
    case, and nnU-Net-named files ``CASE_0000`` .. ``CASE_000N`` are grouped into case ``CASE``;
    a case missing a channel file is refused, naming it. A DICOM folder stays one input (its
    channels are series: ``load_input_channels(..., series=[...])``).
    """
    from medseg.io import case_stem

    input_paths = [Path(p) for p in paths]
    if n_channels == 1:
        return [(case_stem(p), [p]) for p in input_paths]
    cases: list[tuple[str, list[Path]]] = []
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    for path in input_paths:
        match = _CHANNEL_FILE.match(path.name)
        if match and path.is_file() and not _is_multichannel_nifti(path):
            groups.setdefault((path.parent, match.group(1)), {})[int(match.group(2))] = path
        else:
            cases.append((case_stem(path), [path]))
    for (folder, stem), files in groups.items():
        if sorted(files) != list(range(n_channels)):
            missing = sorted(set(range(n_channels)) - set(files))
            raise InputError(
                folder / f"{stem}_{(missing or [max(files)])[0]:04d}",
                f"case {stem} has channel files {sorted(files)}; the model takes {n_channels} "
                f"({stem}_0000 .. {stem}_{n_channels - 1:04d})",
            )
        cases.append((stem, [files[c] for c in range(n_channels)]))
    return cases


def _is_multichannel_nifti(path: Path) -> bool:
    if not is_nifti(path):
        return False
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    try:
        shape = cast(SpatialImage, nib.load(str(path))).shape  # the header only
    except Exception:
        return False
    return len(shape) >= 4 and int(np.prod(shape[3:])) > 1


def load_input_channels(
    files: Sequence[str | Path],
    *,
    n_channels: int,
    series: Sequence[str] | None = None,
    resample: bool = False,
    channel_names: Sequence[str] | None = None,
) -> list[Volume]:
    """One inference case's channels, checked against what the model takes.

    ``files``: one 4D NIfTI, one file per channel, or one DICOM folder whose channels are
    the series named by ``series`` (one UID or hash per channel, in channel order).
    """
    if series and len(series) > 1:
        if len(files) != 1:
            raise InputError(files[0], "--series once per channel needs one DICOM folder or study per case")
        volumes = on_one_grid([load_volume(files[0], series_id=uid) for uid in series], resample=resample)
    elif series:
        volumes = [load_volume(files[0], series_id=series[0])]
    else:
        volumes = load_channels(files, resample=resample)
    if len(volumes) != n_channels:
        names = f" ({', '.join(channel_names)})" if channel_names else ""
        how = "--series once per channel" if Path(files[0]).is_dir() else "a 4D NIfTI or CASE_000k files"
        raise InputError(
            files[0], f"gives {len(volumes)} channel(s); the model takes {n_channels}{names}: pass {how}"
        )
    return volumes


def resample_onto(volume: Volume, reference: Volume) -> Volume:
    """``volume`` resampled (linear, edge values beyond its field of view) onto ``reference``'s grid."""
    from scipy import ndimage

    to_source = np.linalg.inv(volume.affine) @ reference.affine
    array = ndimage.affine_transform(
        volume.array.astype(np.float32),
        to_source[:3, :3],
        offset=to_source[:3, 3],
        output_shape=reference.shape,
        order=1,
        mode="nearest",
    )
    return Volume(array=array, affine=reference.affine.copy(), meta=dict(volume.meta), source=volume.source)


def split_cases(
    cases: list[Case], *, seed: int, val_fraction: float = 0.2, fold: int | None = None, num_folds: int = 5
) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split; with ``fold`` a k-fold split (nnU-Net style)."""
    order = np.random.default_rng(seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    if fold is not None:
        if not 0 <= fold < num_folds:
            raise InputError(None, f"--fold {fold}: expected 0..{num_folds - 1}")
        folds = np.array_split(np.arange(len(shuffled)), num_folds)
        val_idx = set(folds[fold].tolist())
    else:
        n_val = max(1, round(len(shuffled) * val_fraction)) if len(shuffled) > 1 else 0
        val_idx = set(range(n_val))
    train = [c for i, c in enumerate(shuffled) if i not in val_idx]
    val = [c for i, c in enumerate(shuffled) if i in val_idx]
    return train, val


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing re-ordered to the RAS axis each voxel axis is closest to."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    axis_of = np.argmax(np.abs(affine[:3, :3] / spacing), axis=0)
    out = np.empty(3)
    out[axis_of] = spacing
    return out


def _weighted_percentiles(pools: list[np.ndarray], qs: tuple[float, ...]) -> list[float]:
    """Percentiles of the union of ``pools`` with every pool weighing the same, however many values
    it holds (each value weighs 1 / its pool's size)."""
    pools = [p for p in pools if p.size]
    values = np.concatenate(pools).astype(np.float64)
    weights = np.concatenate([np.full(p.size, 1.0 / p.size) for p in pools])
    order = np.argsort(values, kind="stable")
    values, cum = values[order], np.cumsum(weights[order])
    cum /= cum[-1]
    return [float(values[min(int(np.searchsorted(cum, q / 100.0)), values.size - 1)]) for q in qs]


def _intensity_stats(values: np.ndarray, per_label: list[np.ndarray]) -> dict[str, float]:
    """Mean and std of the foreground sample; its 0.5-99.5 percentiles with every label weighing the
    same (``per_label``: one sample per label), so that a small organ's intensities are inside the
    CT window however many voxels the large ones have. A window from the union alone (nnU-Net's)
    clips a small low-density organ (fat-containing, cystic) to the value of the fat and air around
    it: on medseg's phantoms 12-21 % of the fatty organ's voxels were clipped in the cases where it
    scored worst."""
    lo, hi = (
        _weighted_percentiles(per_label, (0.5, 99.5))
        if any(p.size for p in per_label)
        else [float(np.percentile(values, q)) for q in (0.5, 99.5)]
    )
    return {"mean": float(values.mean()), "std": float(values.std()), "p00_5": float(lo), "p99_5": float(hi)}


class IntensityStats(BaseModel):
    """Foreground intensity statistics of one channel (a sample of the labelled voxels); the
    percentiles weigh every label the same."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: float
    std: float
    p00_5: float  # 0.5th percentile
    p99_5: float  # 99.5th percentile


class Fingerprint(BaseModel):
    """What ``plan`` needs to know of a dataset: spacings and extents (RAS order, mm), foreground
    intensities, label counts and per-label training volumes.

    Saved as ``fingerprint.json`` in the run folder with the keys of its fields (``to_dict``); a
    fingerprint written by an older medseg (no ``spacing_p10``, ``label_volumes_ml`` or
    ``label_components_max``) still loads.
    ``hash`` is the first 16 hex digits of the SHA-256 of the other keys as sorted JSON.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_cases: int
    modality: str  # the first channel's name
    labels: dict[str, str]  # label value (as text) -> name
    spacing_median: FloatTriple
    spacing_min: FloatTriple
    spacing_max: FloatTriple
    spacing_p10: FloatTriple | None = None
    extent_mm_median: FloatTriple
    foreground_intensity: IntensityStats  # the first channel's
    label_voxels: dict[str, int]
    # per-label volume range (ml) over the training cases: inference flags volumes far outside it
    label_volumes_ml: dict[str, tuple[float, float]] | None = None
    # per label, the most connected components (26-connected, fragments under ``FRAGMENT_SHARE`` of
    # the largest not counted) any training reference has: the post-processing tuner keeps "keep the
    # k largest" for a label whose references never have more
    label_components_max: dict[str, int] | None = None
    # multi-channel datasets only (single-channel fingerprints, and their hashes, stay as they were)
    channels: dict[str, str] | None = None
    foreground_intensity_channels: tuple[IntensityStats, ...] | None = None
    hash: str

    @model_validator(mode="after")
    def _channels_match(self) -> Fingerprint:
        stats = self.foreground_intensity_channels
        if (self.channels is None) != (stats is None) or len(self.channels or ()) != len(stats or ()):
            raise ValueError("'channels' and 'foreground_intensity_channels' go together, one entry a channel")
        return self

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Fingerprint:
        """The fingerprint of ``fields`` (every key but ``hash``), its hash computed."""
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
        return cls.model_validate({**fields, "hash": digest})

    @classmethod
    def load(cls, path: str | Path) -> Fingerprint:
        """Read a ``fingerprint.json``; an unreadable or malformed one is an InputError naming it."""
        try:
            return cls.model_validate(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:  # JSONDecodeError and ValidationError are ValueErrors
            raise InputError(path, f"not a readable dataset fingerprint ({one_line(exc)})") from exc

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict, with the keys ``fingerprint.json`` has always had."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @property
    def channel_names(self) -> list[str]:
        """Channel names in channel order (empty for a single-channel dataset)."""
        return [v for _, v in sorted((self.channels or {}).items(), key=lambda kv: int(kv[0]))]


def fingerprint(
    dataset: Dataset, *, max_samples_per_case: int = 20000, seed: int = 0, resample_channels: bool = False
) -> Fingerprint:
    """Spacings, sizes (RAS order), foreground intensity statistics (per channel) and label counts;
    an ``InputError`` naming the file for a label map off its image's grid or holding a value that
    is no label's."""
    rng = np.random.default_rng(seed)
    spacings, extents = [], []
    samples: list[list[np.ndarray]] = [[] for _ in range(dataset.n_channels)]
    # per channel and label: a sample of that label's voxels (the window's percentiles weigh labels equally)
    by_label: list[dict[int, list[np.ndarray]]] = [{} for _ in range(dataset.n_channels)]
    per_label = max(500, max_samples_per_case // max(1, len(dataset.labels) - 1))
    label_voxels = {k: 0 for k in dataset.labels}
    label_ml: dict[int, list[float]] = {k: [] for k in dataset.labels if k}
    components = {k: 0 for k in dataset.labels if k}
    for case in dataset.training:
        assert case.label is not None  # every training case has a label (load_dataset refuses one without)
        channels = load_channels(case.images, resample=resample_channels)
        image = channels[0]
        # a value that is no label's stops here, naming the file (in training it would be a channel
        # the network does not have, or the wrong one)
        label = load_label(case.label, image=image, expected_labels=dataset.labels)
        spacing = _ras_spacing(image.affine)
        spacings.append(spacing)
        extents.append(_ras_shape(image) * spacing)
        # voxels in the label's memory order (nibabel's arrays are Fortran-ordered): a C-order ravel
        # copied every volume, 19 of 38 s on eight 512x512x200 CTs
        order = memory_order(label.array)
        label_flat = label.array.ravel(order=order)
        foreground = np.flatnonzero(label_flat)
        n_fg = int(foreground.size)
        if n_fg:
            pick = foreground[rng.choice(n_fg, size=min(n_fg, max_samples_per_case), replace=False)]
            picks = _label_samples(label_flat, foreground, rng, per_label)
            for c, channel in enumerate(channels[: dataset.n_channels]):
                flat = channel.array.ravel(order=order)
                samples[c].append(flat[pick])
                for k, where in picks.items():
                    by_label[c].setdefault(k, []).append(flat[where])
        counts = np.bincount(label_flat, minlength=max(dataset.labels) + 1)
        voxel_ml = float(abs(np.linalg.det(image.affine[:3, :3]))) / 1000.0
        for k in label_voxels:
            n = int(counts[k]) if k < len(counts) else 0
            label_voxels[k] += n
            if k:
                label_ml[k].append(n * voxel_ml)
        for k, n in label_components(label.array).items():
            if k in components:
                components[k] = max(components[k], n)
    stats = [
        _intensity_stats(
            np.concatenate(s) if s else np.zeros(1, np.float32), [np.concatenate(v) for v in labs.values()]
        )
        for s, labs in zip(samples, by_label, strict=True)
    ]
    fields: dict[str, Any] = {
        "n_cases": len(dataset.training),
        "modality": dataset.modality,
        "labels": {str(k): v for k, v in dataset.labels.items()},
        "spacing_median": np.median(spacings, axis=0).round(4).tolist(),
        "spacing_min": np.min(spacings, axis=0).round(4).tolist(),
        "spacing_max": np.max(spacings, axis=0).round(4).tolist(),
        "spacing_p10": np.percentile(spacings, 10, axis=0).round(4).tolist(),
        "extent_mm_median": np.median(extents, axis=0).round(2).tolist(),
        "foreground_intensity": stats[0],
        "label_voxels": {str(k): v for k, v in label_voxels.items()},
        "label_volumes_ml": {str(k): [round(min(v), 3), round(max(v), 3)] for k, v in label_ml.items() if v},
        "label_components_max": {str(k): n for k, n in components.items() if n},
    }
    if dataset.n_channels > 1:  # single-channel fingerprints (and their hashes) stay as they were
        fields["channels"] = {str(k): v for k, v in dataset.channels.items()}
        fields["foreground_intensity_channels"] = stats
    return Fingerprint.from_fields(fields)


def memory_order(array: np.ndarray) -> Literal["C", "F"]:
    """``"F"`` for a Fortran-ordered array (nibabel's), else ``"C"``: the order in which ``ravel``
    returns a view instead of a copy (the same order for two arrays keeps their voxels paired)."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


# A component under this share of its label's largest component in the same label map is a fragment
# (a sliver cut off where organs meet, an island of annotation), not a piece of the anatomy: the
# topology rule of the post-processing tuning (``medseg.tuning``) counts pieces, not fragments. On
# seed 0's phantoms one training liver had a 24-voxel sliver beside 59,394 voxels, so the rule
# allowed "keep the 2 largest" and a test case kept a false 15,000-voxel liver blob (Dice 0.888).
FRAGMENT_SHARE = 0.05


def label_components(label: np.ndarray, *, min_share: float = FRAGMENT_SHARE) -> dict[int, int]:
    """Per foreground label present, its number of 26-connected components of at least ``min_share``
    of the label's largest one (0: every component), in one cc3d pass over all labels (cc3d's
    multi-label mode keeps touching labels apart; it reads either memory order)."""
    import cc3d

    label = np.asarray(label)
    if not (label.flags.c_contiguous or label.flags.f_contiguous):
        label = np.ascontiguousarray(label)
    cc, n = cc3d.connected_components(label, connectivity=26, return_N=True)
    if not n:
        return {}
    order = memory_order(label)
    flat = cc.ravel(order=order)
    owner = np.zeros(n + 1, dtype=np.int64)
    owner[flat] = label.ravel(order=order)  # every voxel of a component has its label
    sizes = np.bincount(flat, minlength=n + 1)
    counts: dict[int, int] = {}
    for k in np.unique(owner[1:]):
        if k:
            own = sizes[1:][owner[1:] == k]
            counts[int(k)] = int((own >= min_share * own.max()).sum())
    return counts


def _label_samples(
    flat: np.ndarray, foreground: np.ndarray, rng: np.random.Generator, per_label: int
) -> dict[int, np.ndarray]:
    """Up to ``per_label`` random indices into ``flat`` (a label map's voxels, flattened) of each
    foreground label's voxels (``foreground``: ``flat``'s nonzero indices), in one sort of the
    foreground (not one pass over the volume per label: datasets with a hundred labels exist)."""
    fg = foreground[rng.permutation(foreground.size)]
    values = flat[fg]
    order = np.argsort(values, kind="stable")
    fg, values = fg[order], values[order]
    present, starts, counts = np.unique(values, return_index=True, return_counts=True)
    return {int(k): fg[a : a + min(n, per_label)] for k, a, n in zip(present, starts, counts, strict=True)}


def _ras_shape(volume) -> np.ndarray:
    spacing = np.asarray(volume.spacing)
    axis_of = np.argmax(np.abs(volume.affine[:3, :3] / spacing), axis=0)
    out = np.empty(3)
    out[axis_of] = volume.shape
    return out


def check_dataset(
    root: str | Path, *, allow_outside_root: bool = False, resample_channels: bool = False
) -> list[str]:
    """Integrity report: every image readable with the declared channels on one grid, every label
    on its image's grid with known values."""
    problems: list[str] = []
    try:
        dataset = load_dataset(root, allow_outside_root=allow_outside_root)
    except InputError as exc:
        return [str(exc)]
    known = set(dataset.labels)
    for case in dataset.training + [c for c in dataset.test if c.label is not None]:
        assert case.label is not None  # training cases all have labels; unlabelled test cases are skipped
        try:
            channels = load_channels(case.images, resample=resample_channels)
            if len(channels) != dataset.n_channels:
                problems.append(
                    f"{case.image}: holds {len(channels)} channel(s); dataset.json declares {dataset.n_channels}"
                )
            label = load_label(case.label)
            check_same_grid(channels[0], label)
            values = set(np.unique(label.array).tolist())
            if values - known:
                problems.append(
                    f"{case.label}: label values {sorted(values - known)} are not in dataset.json labels"
                )
        except InputError as exc:
            problems.append(str(exc))
    return problems
