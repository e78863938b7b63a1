"""Cross-validation folds as nnU-Net trains them: ``medseg train -f 0 1 2`` or ``-f all``.

The k-fold split (``train.num_folds``, default 5) is made once per run folder and saved as
``<out>/splits.json`` in nnU-Net's ``splits_final.json`` format (a list with one
``{"train": [...], "val": [...]}`` per fold); later folds, re-runs and other machines reuse
that file, so every fold of a run sees the same cases whatever the dataset order or seed is
then. The split is the one ``medseg.data.split_cases`` gives for ``train.fold``. Each fold
trains into ``<out>/fold_<k>``; fold ``all`` trains on every case and, as in nnU-Net,
validates on the training cases. ``medseg infer -m <out>`` ensembles the ``fold_*`` bundles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medseg.config import Config
from medseg.data import Case, load_dataset, split_cases
from medseg.errors import ConfigError, InputError
from medseg.io import write_text_atomic

log = logging.getLogger(__name__)

SPLITS = "splits.json"
ALL = "all"

Fold = int | str  # a fold index, or "all"


def make_splits(cases: list[Case], *, num_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """The deterministic k-fold split of ``cases``: one ``{"train", "val"}`` of case names per fold."""
    if len(cases) < num_folds:
        raise ConfigError(
            f"train.num_folds is {num_folds} but the dataset has {len(cases)} training cases: "
            "choose fewer folds"
        )
    splits = []
    for fold in range(num_folds):
        train, val = split_cases(cases, seed=seed, fold=fold, num_folds=num_folds)
        splits.append({"train": [c.name for c in train], "val": [c.name for c in val]})
    return splits


def load_or_make_splits(path: Path, cases: list[Case], *, num_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """The run's split: ``path`` when it exists (checked against the dataset), else made and written."""
    if not path.is_file():
        splits = make_splits(cases, num_folds=num_folds, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(splits, indent=2) + "\n")
        log.info("%d-fold split of %d cases written to %s", num_folds, len(cases), path)
        return splits
    try:
        splits = json.loads(path.read_text())
        ok = isinstance(splits, list) and all(
            isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in splits
        )
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable split file ({exc})") from exc
    if not ok or not splits:
        raise InputError(path, 'expected a list of {"train": [...], "val": [...]}, one per fold')
    if len(splits) != num_folds:
        raise ConfigError(
            f"{path}: the run's split has {len(splits)} folds, train.num_folds is {num_folds}; "
            "use the run's number of folds or a new --out"
        )
    known = {c.name for c in cases}
    missing = sorted({n for s in splits for n in (*s["train"], *s["val"])} - known)
    if missing:
        raise InputError(path, f"names {len(missing)} case(s) the dataset does not have, e.g. {missing[0]!r}")
    log.info("reusing the %d-fold split in %s", len(splits), path)
    return splits


def fold_split(splits: list[dict[str, list[str]]], cases: list[Case], fold: Fold) -> tuple[list[str], list[str]]:
    """Training and validation case names of ``fold`` (``all``: every case for both)."""
    if fold == ALL:
        names = [c.name for c in cases]
        return names, list(names)
    return list(splits[int(fold)]["train"]), list(splits[int(fold)]["val"])


def parse_folds(folds: list[Fold], num_folds: int) -> list[Fold]:
    """``-f`` values checked against ``train.num_folds``: indices and ``all``, in order, each once."""
    out: list[Fold] = []
    for fold in folds:
        value: Fold = ALL if str(fold) == ALL else int(fold)
        if value != ALL and not 0 <= int(value) < num_folds:
            raise ConfigError(f"--fold {fold}: expected 0..{num_folds - 1} or all (train.num_folds is {num_folds})")
        if value not in out:
            out.append(value)
    return out


def train_folds(
    cfg: Config,
    data_root: str | Path,
    folds: list[Fold],
    *,
    out_dir: str | Path | None = None,
    resume: bool | str = False,
) -> list[Any]:
    """Train each of ``folds`` into ``<out>/fold_<k>`` with the run's saved split; the results in order.

    ``out_dir`` defaults to ``runs/<dataset>/<model>``. ``resume`` applies to every fold
    (a fold without a checkpoint starts fresh under ``--resume``).
    """
    from medseg.runtime import rank_and_world
    from medseg.train import train

    if cfg.train.fold is not None:
        raise ConfigError("train.fold is set and --fold given: choose one (--fold trains into <out>/fold_<k>)")
    data_root = Path(data_root)
    out = Path(out_dir) if out_dir else Path("runs") / data_root.resolve().name / cfg.model.name
    chosen = parse_folds(folds, cfg.train.num_folds)
    dataset = load_dataset(data_root, allow_outside_root=cfg.data.allow_outside_root)
    if rank_and_world()[0] == 0:
        splits = load_or_make_splits(out / SPLITS, dataset.training, num_folds=cfg.train.num_folds, seed=cfg.seed)
    else:  # the same split, computed; rank 0 writes the file
        splits = make_splits(dataset.training, num_folds=cfg.train.num_folds, seed=cfg.seed)
    results = []
    for fold in chosen:
        names = fold_split(splits, dataset.training, fold)
        if fold == ALL:
            fold_cfg = cfg
            log.info("fold all: training on every case (%d); validation runs on the training cases, as "
                     "nnU-Net does, so its Dice is not a held-out estimate", len(names[0]))
        else:
            fold_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fold": fold})})
            log.info("fold %s of %d: %d training, %d validation cases", fold, cfg.train.num_folds,
                     len(names[0]), len(names[1]))
        results.append(train(fold_cfg, data_root, out_dir=out / f"fold_{fold}", resume=resume, split=names))
    return results
