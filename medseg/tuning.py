"""Post-processing chosen on validation: each step kept only when it helps (nnU-Net's
``determine_postprocessing``, extended to k components, small-object removal, hole filling and
the dense CRF with its weights and sigmas).

``tune_postprocessing(probabilities, references, spacing=..., label_ids=...)`` starts from the
plain argmax of the validation probabilities and tries, in order:

0. with ``tta_probabilities`` (per number of passes, 2 and/or 8, the same cases averaged over
   the flips inference's ``--tta`` runs): flip TTA, kept when it raises the mean foreground Dice
   by ``TTA_MIN_GAIN`` and ``TTA_GAIN_PER_PASS`` per pass added, lowers no label's by more than
   the CRF's rule allows (below) and does not worsen the mean HD95; 8 passes only when they beat the 2 (if
   kept) by 6 passes' worth again. The steps
   below are then tuned on the averaged probabilities, as inference will produce them. On unseen
   phantoms (11-minute model, 4 test cases) the low-contrast fatty organ's Dice went 0.924 ->
   0.932 with 2 passes and 0.935 with 8 (worst case 0.854 -> 0.869 / 0.882);
1. the dense CRF (``medseg.crf``, needs the normalised ``images``) with a few weight/sigma
   settings: the best is kept only when it raises the mean foreground Dice, lowers no label's
   Dice by more than ``CRF_LABEL_TOLERANCE`` (0.01) or than the mean rose, and does not worsen the HD95 averaged over the
   labels (``crf_verdict``). A setting that raised the mean but lowered some labels is tried again
   on the others only (``CRFConfig.skip_labels``: those labels keep the network's masks): on seed 3's
   phantoms the fatty organ vetoed every setting on two validation cases, and the test Dice was 0.900
   as shipped, 0.9145 with the CRF on the liver and kidneys;
2. per label, a bias on its log-probability before the argmax (+0.5 to +3): kept when it raises
   the label's mean Dice by ``BIAS_MIN_GAIN`` (0.01), lowers it on no validation case and no
   other label's mean by more than ``BIAS_TOLERANCE``, and does not worsen the label's HD95. A
   low-contrast organ the network under-segments on data unlike its training set gets its rim back
   (an unseen phantom's fatty organ at 16 HU below its neighbours: Dice 0.30 -> 0.54 with +2; on
   in-distribution validation cases 0.844 -> 0.857);
3. per label, on top of that: keep the largest component, keep the 2 largest, remove
   components smaller than a share of the smallest reference component, fill holes. A step
   is kept only when it raises the label's mean Dice by ``min_gain``, lowers it on no case by
   more than ``BIAS_TOLERANCE`` and does not worsen its mean HD95 (mm, ``medseg.metrics``);
   keeping the k largest where no training reference of the label has more than k components
   needs no gain, only no loss (``components_max``, ``TOPOLOGY_NOTE``).

"Does not worsen the HD95" means a rise of less than one voxel (``hd95_tolerance``: the finest
spacing of the validation grid), the metric's resolution: with a tolerance of 0.05 mm, seed 3's
phantoms rejected 2-pass TTA and every CRF on two validation cases and scored 0.895 on 20 test
cases (HD95 12.7 mm); with one voxel both were kept and the test cases scored 0.921 (6.8 mm).

Returns a ``PostprocessConfig`` (per-label steps, CRF on or off) to store in the bundle, and a
``TuningReport`` that says what was tried, measured and kept. A step that lowers Dice is never
kept, so inference with the bundle's defaults never applies a CRF that hurt on validation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

import numpy as np

from medseg.config import CRFConfig, LabelPostprocess, PostprocessConfig
from medseg.labels import value_channels
from medseg.metrics import dice, hd95
from medseg.postprocess import postprocess_labels

log = logging.getLogger(__name__)

Spacing = tuple[float, float, float]

# CRF settings tried: medseg's defaults, a gentler appearance kernel, three stronger and sharper
# ones, and a wide one; each kept only when it helps on validation (``crf_helps``). A low-contrast organ
# (15-60 HU from its neighbours) needs an intensity sigma of a quarter of the normalised unit or
# less: on unseen phantoms (benchmarks/phantoms.py, 11-minute model, model grid) its test Dice went
# 0.870 (no CRF) -> 0.898 (bilateral 2, intensity sigma 0.5, the setting kept before) -> 0.917-0.927
# with sharp settings, mean of three organs 0.922 -> 0.938 -> 0.950-0.952. The sharp ones run 3
# mean-field iterations with a 4-5 mm spatial sigma: at 3 mm and 5 iterations the best of them cost
# 4-5x the CRF time (8.3-10.1 s against 2.0-2.4 s on two validation cases; 405 s on a 16-body
# mosaic) for a validation Dice 0.002-0.003 higher, and a test Dice no higher (0.957 vs 0.959).
CRF_CANDIDATES: tuple[dict[str, float], ...] = (
    {},
    {"bilateral_weight": 2.0, "smooth_weight": 0.5},
    {"bilateral_weight": 5.0, "bilateral_sigma_mm": 4.0, "bilateral_intensity_sigma": 0.25, "iterations": 3},
    {"bilateral_weight": 8.0, "bilateral_sigma_mm": 5.0, "bilateral_intensity_sigma": 0.15, "iterations": 3},
    {"bilateral_weight": 12.0, "bilateral_sigma_mm": 4.0, "bilateral_intensity_sigma": 0.25, "iterations": 3},
    {"bilateral_sigma_mm": 10.0, "bilateral_intensity_sigma": 0.3},
)
BIAS_CANDIDATES = (0.5, 1.0, 2.0, 3.0)  # log-probability biases tried per label
# A bias moves every boundary voxel of its label, so it needs a clear validation gain: on two
# 11-minute phantom models +3 was kept for the kidney at +0.005-0.007 validation Dice and changed its
# test Dice by -0.001 to +0.001 (HD95 3.9 -> 4.3 mm); the fatty organ's +0.017-0.023 gave +0.001-0.003.
BIAS_MIN_GAIN = 0.01
# ... and it must lower the label's Dice on no validation case: on an unseen draw (seed 1, 11-minute
# model) +3 was kept for the kidney on a mean gain of +0.028 that one case carried (0.881 -> 0.953;
# the other 0.962 -> 0.950), and the four test cases' kidney fell on each (mean 0.971 -> 0.939).
BIAS_TOLERANCE = 1e-3  # how far another label's Dice may fall when a bias moves their shared border
# Flip TTA runs the network 2 or 8 times: kept only for a clear validation gain of the mean
# foreground Dice, at least TTA_MIN_GAIN and TTA_GAIN_PER_PASS for each pass it adds (8 passes:
# +0.007 over none, +0.006 over the 2). On an 11-minute phantoms model 8 passes gained +0.0097 on
# validation (every label up; the 2 passes +0.0039 but the fatty organ -0.002) and +0.007 on the
# test cases (worst fatty organ 0.877 -> 0.893), for 8.2x the network time (a one-body 512x512x200
# CT 5.0 -> 11.0 s end to end, the MONAI pipeline 21.7 s; a 16-body mosaic 59 -> 265 s).
# The CRF moves every label's border at once: one label may lose a little where another gains much.
# On an unseen draw (seed 1, 11-minute model, 2026-12-04) every setting raised the mean validation
# Dice (0.817 -> 0.824-0.845: the fatty organ +0.06-0.17) and lowered the kidney's by 0.005-0.085;
# rejecting them all left the 20 test cases at 0.855. A label may fall by this much, and by no more
# than the mean rises.
CRF_LABEL_TOLERANCE = 0.01
# 2 passes need +0.001 (was 0.003): on five 11-minute phantom models re-tuned on their own 2 validation
# cases (2026-12-06), seed 12's 2 passes gained +0.0023 and were rejected at 0.003; kept, its 20 test
# cases went 0.898 -> 0.9025 (fatty organ 0.758 -> 0.767); the four other draws' choices did not change
TTA_MIN_GAIN = 0.001
TTA_GAIN_PER_PASS = 0.001
MIN_VOLUME_SHARES = (0.05, 0.2, 0.5)  # of the smallest reference component, per label
# HD95 is a distance between voxel surfaces: a mean rise smaller than one voxel (the finest spacing
# of the grid it is measured on) is below what the metric resolves, not a worse border. On seed 3's
# phantoms (2 validation cases, 1.28 x 1.28 x 2.9 mm) a tolerance of 0.05 mm rejected every CRF
# setting: the mean HD95 rose 7.42 -> 7.57 mm (one case's fatty organ 8.0 -> 12.2 mm, the liver's and
# kidneys' 2.6 -> 1.3 mm) while the mean Dice rose 0.854 -> 0.871.
HD95_MIN_TOLERANCE_MM = 0.05  # an HD95 rise below this is measurement noise whatever the grid
# TOPOLOGY_NOTE: two validation cases seldom hold the stray blob a component step removes, so
# "keep the k largest" rarely gains ``min_gain`` there; where no training reference of the label has
# more than k components it is kept at no validation loss. Applied to the shipped masks of three
# unseen phantom draws (11-minute models, 20 test cases each; liver and fatty organ 1 component,
# kidneys 2), it changed their mean Dice 0.917 -> 0.924, 0.925 -> 0.927, 0.929 -> 0.933 and the
# kidneys' HD95 11.8 -> 3.9 mm on the first (a false kidney blob 25 mm away on 8 of 20 cases).
# Fragments (under 5 % of the label's largest component in that reference) are not counted: with
# them, seed 0's livers counted 2 (a 24-voxel sliver) and a test case kept a false liver blob;
# simulated on four shipped models' masks, the mean Dice 0.9395 -> 0.9478 on seed 0 and within
# 0.0001 on the others (benchmarks/README.md, fifteenth session).


@dataclass
class Trial:
    """One step tried: where, what, the validation figures before and after, and the verdict."""

    label: int | None  # None: all labels (the CRF)
    step: str
    dice_before: float
    dice_after: float
    hd95_before: float
    hd95_after: float
    kept: bool
    note: str = ""  # why a step whose mean rose was not kept (a validation case fell)


@dataclass
class TuningReport:
    """What the tuner tried and kept, with the validation Dice per label before and after."""

    cases: int
    baseline_dice: dict[int, float]
    final_dice: dict[int, float]
    trials: list[Trial] = field(default_factory=list)
    tta: bool | None = None  # flip TTA kept (True), rejected (False) or not tried (None)
    tta_flips: int | None = None  # the passes kept (2 or 8)
    components_max: dict[int, int] = field(default_factory=dict)  # the topology rule's counts, per label
    # channel -> the value the label files hold, where they differ (``Config.label_values``): the
    # report is keyed by channel, what a person reads (``table``, ``to_dict``) names the values
    label_values: dict[int, int] = field(default_factory=dict)

    def kept(self) -> list[Trial]:
        return [t for t in self.trials if t.kept]

    def value(self, label: int) -> int:
        """The value the label files hold for the network's channel ``label``."""
        return self.label_values.get(label, label)

    def kept_summary(self) -> str:
        """The steps kept, ``label: step`` (the label's value, or ``all``) comma-separated, for one line."""
        return ", ".join(f"{'all' if t.label is None else self.value(t.label)}: {t.step}" for t in self.kept())

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (``postprocess_tuning.json``), labels named by their values."""
        return {
            "cases": self.cases,
            "baseline_dice": {str(self.value(k)): v for k, v in self.baseline_dice.items()},
            "final_dice": {str(self.value(k)): v for k, v in self.final_dice.items()},
            "trials": [
                {**asdict(t), "label": None if t.label is None else self.value(t.label)} for t in self.trials
            ],
            "tta": self.tta,
            "tta_flips": self.tta_flips,
            "components_max": {str(self.value(k)): v for k, v in sorted(self.components_max.items())},
        }

    def table(self) -> str:
        """A Markdown table a person reads: every step tried, its effect, kept or not."""
        lines = [
            f"post-processing tuned on {self.cases} validation case(s)",
            "",
            "| label | step | Dice before | Dice after | HD95 before | HD95 after | kept |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in self.trials:
            where = "all" if t.label is None else str(self.value(t.label))
            lines.append(
                f"| {where} | {t.step} | {t.dice_before:.4f} | {t.dice_after:.4f} | {t.hd95_before:.2f} | "
                f"{t.hd95_after:.2f} | {'yes' if t.kept else 'no'}{f' ({t.note})' if t.note else ''} |"
            )
        return "\n".join(lines)


def _scores(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], spacings, label: int
) -> tuple[float, float]:
    """Mean Dice and mean HD95 (mm; cases where it is undefined left out, inf when all are) of one label."""
    dices, dists = [], []
    for p, r, s in zip(preds, refs, spacings, strict=True):
        dices.append(dice(p == label, r == label))
        h = hd95(p == label, r == label, s)
        if math.isfinite(h):
            dists.append(h)
    return float(np.mean(dices)), float(np.mean(dists)) if dists else math.inf


def _case_dices(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], label: int) -> np.ndarray:
    """One label's Dice per case."""
    return np.array([dice(p == label, r == label) for p, r in zip(preds, refs, strict=True)])


def _case_fell(before: np.ndarray, after: np.ndarray) -> str:
    """'' when no case's Dice fell by more than ``BIAS_TOLERANCE``; else which one, by how much
    (validation cases by their position: the table names no case)."""
    fell = np.flatnonzero(after < before - BIAS_TOLERANCE)
    if not len(fell):
        return ""
    i = int(fell[np.argmin((after - before)[fell])])
    return f"validation case {i + 1} of {len(before)} fell {before[i]:.3f} -> {after[i]:.3f}"


def hd95_tolerance(spacings: Sequence[Sequence[float]]) -> float:
    """How far a mean HD95 (mm) may rise and still count as not worse: one voxel of the finest
    spacing among the cases (``HD95_MIN_TOLERANCE_MM`` at least)."""
    return max(HD95_MIN_TOLERANCE_MM, min((min(float(v) for v in s) for s in spacings), default=0.0))


def _not_worse(after: float, before: float, tolerance: float) -> bool:
    return after <= before + tolerance or (math.isinf(before) and math.isinf(after))


def _component_volumes_mm3(refs, spacings, label: int) -> list[float]:
    import cc3d

    volumes = []
    for r, s in zip(refs, spacings, strict=True):
        mask = r == label
        if mask.any():
            stats = cc3d.statistics(cc3d.connected_components(mask, connectivity=26))
            volumes += [float(v) * float(np.prod(s)) for v in stats["voxel_counts"][1:] if v > 0]
    return volumes


def _label_step_candidates(refs, spacings, label: int) -> list[tuple[str, dict[str, Any]]]:
    """Per-label steps to try, in order (a later one builds on what was kept before it)."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("keep largest", {"keep_largest": True, "components": 1}),
        ("keep 2 largest", {"keep_largest": True, "components": 2}),
    ]
    volumes = _component_volumes_mm3(refs, spacings, label)
    if volumes:
        smallest = min(volumes)
        for share in MIN_VOLUME_SHARES:
            mm3 = round(share * smallest, 1)
            steps.append((f"remove < {mm3:g} mm3", {"min_volume_mm3": mm3}))
    steps.append(("fill holes", {"fill_holes": True}))
    return steps


def _apply(bases, spacings, cfg: PostprocessConfig, label_ids: list[int]) -> list[np.ndarray]:
    return [
        postprocess_labels(b, cfg, spacing=s, label_ids=label_ids)
        for b, s in zip(bases, spacings, strict=True)
    ]


def _with_label(cfg: PostprocessConfig, label: int, **update: Any) -> PostprocessConfig:
    out = cfg.model_copy(deep=True)
    current = out.per_label.get(label, LabelPostprocess())
    out.per_label = {**out.per_label, label: current.model_copy(update=update)}
    return out


def crf_helps(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], min_gain: float,
    hd95_tol: float = HD95_MIN_TOLERANCE_MM,
) -> bool:
    """The CRF's verdict from (Dice, HD95) per foreground label before and after it (``crf_verdict``)."""
    return crf_verdict(before, after, min_gain, hd95_tol)[0]


def crf_verdict(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], min_gain: float,
    hd95_tol: float = HD95_MIN_TOLERANCE_MM, label_values: Mapping[int, int] | None = None,
) -> tuple[bool, str]:
    """(kept, why not): the mean Dice rises by ``min_gain``, no label's Dice falls by more than
    ``CRF_LABEL_TOLERANCE`` or than the mean rose, and the HD95 averaged over the labels does not worsen
    by more than ``hd95_tol`` mm (``hd95_tolerance``: one voxel). HD95 is judged
    on the average, not label by label: on two validation cases one label's HD95 is one stray blob
    (which keep-largest, tuned next, removes), and a per-label rule rejected a CRF that raised every
    label's Dice (mean 0.862 -> 0.889) and cut the mean HD95 from 16.3 to 10.5 mm because one
    label's rose from 20.9 to 23.2 mm. ``label_values``: the label files' value of each channel, for
    the reason given (``TuningReport.label_values``)."""
    gain = _label_mean(after, 0) - _label_mean(before, 0)
    if gain < min_gain:
        return False, "" if gain < 0 else f"mean gain {gain:+.4f} below {min_gain:g}"
    fell = _labels_that_fell(before, after, min_gain)
    if fell:
        k = max(fell, key=lambda k: before[k][0] - after[k][0])
        value = (label_values or {}).get(k, k)
        return False, f"label {value} fell {before[k][0]:.3f} -> {after[k][0]:.3f}"
    if not _not_worse(_label_mean(after, 1), _label_mean(before, 1), hd95_tol):
        return False, "mean HD95 rose"
    return True, ""


def _label_mean(scores: dict[int, tuple[float, float]], i: int) -> float:
    """The mean over labels of their Dice (``i`` 0) or HD95 (``i`` 1)."""
    return float(np.mean([v[i] for v in scores.values()]))


def _tune_tta(
    probabilities, tta_probabilities: Mapping[int, Sequence[np.ndarray]], refs, spacings, label_ids,
    report: TuningReport, hd95_tol: float,
) -> list[np.ndarray]:
    """The flip-averaged probabilities when they beat the plain ones on validation, the fewest
    passes that do (module docstring); ``report.tta``/``report.tta_flips`` say what was kept."""
    fg = [k for k in label_ids if k]

    def scores(probs) -> dict[int, tuple[float, float]]:
        labels = [np.asarray(p).argmax(0) for p in probs]
        return {k: _scores(labels, refs, spacings, k) for k in fg}

    def beats(after, before, added_passes: int) -> bool:
        needed = max(TTA_MIN_GAIN, TTA_GAIN_PER_PASS * added_passes)
        return (
            _label_mean(after, 0) >= _label_mean(before, 0) + needed
            and not _labels_that_fell(before, after, needed)
            and _not_worse(_label_mean(after, 1), _label_mean(before, 1), hd95_tol)
        )

    plain = scores(probabilities)
    best: tuple[dict[int, tuple[float, float]], int, Trial] | None = None
    for passes in sorted(tta_probabilities):
        after = scores(tta_probabilities[passes])
        ok = beats(after, plain, passes - 1) and (best is None or beats(after, best[0], passes - best[1]))
        gain, needed = _label_mean(after, 0) - _label_mean(plain, 0), max(TTA_MIN_GAIN, TTA_GAIN_PER_PASS * (passes - 1))
        note = f"gain {gain:+.4f} below {needed:g} for {passes} passes" if 0 < gain < needed else ""
        trial = Trial(None, f"flip TTA ({passes} passes)", _label_mean(plain, 0), _label_mean(after, 0),
                      _label_mean(plain, 1), _label_mean(after, 1), False, note)
        report.trials.append(trial)
        if ok:
            best = (after, passes, trial)
    report.tta = best is not None
    if best is None:
        return list(probabilities)
    best[2].kept = True
    report.tta_flips = best[1]
    return list(tta_probabilities[best[1]])


def _tune_crf(
    probabilities, images, refs, spacings, label_ids, candidates, report: TuningReport, min_gain: float,
    hd95_tol: float, deadline: float | None = None,
) -> tuple[list[np.ndarray], CRFConfig]:
    """The probabilities as they are, or refined by the CRF setting that helps most (``crf_verdict``:
    the mean validation Dice up, no label's down by more than ``CRF_LABEL_TOLERANCE``). With
    ``deadline`` (``time.monotonic()``), a setting is tried only while the last one's time is left."""
    import time

    import torch

    from medseg.crf import dense_crf

    plain = [np.asarray(p).argmax(0) for p in probabilities]
    fg = [k for k in label_ids if k]
    before = {k: _scores(plain, refs, spacings, k) for k in fg}
    best: tuple[float, list[np.ndarray], CRFConfig, Trial] | None = None
    first = len(report.trials)
    last_s = 0.0
    for i, update in enumerate(candidates):
        if deadline is not None and time.monotonic() + last_s > deadline:
            log.info("time budget: %d of %d CRF settings not tried", len(candidates) - i, len(candidates))
            break
        started = time.monotonic()
        crf = CRFConfig(enabled=True, **update)
        refined = [
            dense_crf(
                torch.as_tensor(np.asarray(p, dtype=np.float32)),
                torch.as_tensor(np.asarray(im)),
                spacing=s,
                cfg=crf,
            ).numpy()
            for p, im, s in zip(probabilities, images, spacings, strict=True)
        ]
        name = "CRF " + (", ".join(f"{k}={v:g}" for k, v in update.items()) or "defaults")
        mean, after = _crf_trial(name, refined, before, refs, spacings, fg, min_gain, hd95_tol, report)
        fell = _labels_that_fell(before, after, min_gain)
        if mean is None and fell and len(fell) < len(fg):
            # the CRF on every label but those it lowered: they keep the network's masks
            crf = crf.model_copy(update={"skip_labels": fell})
            refined = [_keep_skipped(r, p, fell) for r, p in zip(refined, probabilities, strict=True)]
            spared = ", ".join(str(report.value(k)) for k in fell)
            mean, _ = _crf_trial(f"{name}, not on label {spared}", refined, before, refs,
                                 spacings, fg, min_gain, hd95_tol, report)
        if mean is not None and (best is None or mean > best[0]):
            best = (mean, refined, crf, report.trials[-1])
        last_s = time.monotonic() - started
    if best is None:
        return list(probabilities), CRFConfig(enabled=False)
    best[3].kept = True
    for trial in report.trials[first:]:
        if not trial.kept and not trial.note and trial.dice_after < best[0]:
            trial.note = "another setting scored higher" if trial.dice_after > trial.dice_before else ""
    return best[1], best[2]


def _crf_trial(name, refined, before, refs, spacings, fg, min_gain, hd95_tol, report: TuningReport):
    """Score one CRF setting's refined validation probabilities and record the trial: (the mean Dice
    when ``crf_verdict`` keeps it, else None; the scores per label)."""
    labels = [r.argmax(0) for r in refined]
    after = {k: _scores(labels, refs, spacings, k) for k in fg}
    mean_after = _label_mean(after, 0)
    helps, why_not = crf_verdict(before, after, min_gain, hd95_tol, report.label_values)
    report.trials.append(Trial(None, name, _label_mean(before, 0), mean_after, _label_mean(before, 1),
                               _label_mean(after, 1), False, why_not))
    return (mean_after if helps else None), after


def _labels_that_fell(before, after, min_gain: float) -> list[int]:
    """The labels whose Dice fell by more than ``crf_verdict`` allows ([] unless the mean rose by
    ``min_gain``): ``CRF_LABEL_TOLERANCE``, and no more than the mean rose."""
    gain = _label_mean(after, 0) - _label_mean(before, 0)
    if gain < min_gain:
        return []
    allowed = min(CRF_LABEL_TOLERANCE, gain)  # a small mean gain buys no label's loss
    return sorted(k for k in before if after[k][0] < before[k][0] - allowed - 1e-9)


def _keep_skipped(refined: np.ndarray, probabilities: np.ndarray, skip: list[int]) -> np.ndarray:
    """``refined`` with the network's labels wherever it or the network calls a label in ``skip``
    (what ``dense_crf`` does at inference with ``skip_labels``)."""
    import torch

    from medseg.crf import keep_skipped_labels

    out = torch.as_tensor(np.array(refined, dtype=np.float32))
    network = torch.as_tensor(np.asarray(probabilities, dtype=np.float32))
    return keep_skipped_labels(out, network, skip).numpy()


def _tune_biases(
    probabilities, refs, spacings, label_ids, report: TuningReport, min_gain: float, hd95_tol: float
) -> tuple[list[np.ndarray], dict[int, float]]:
    """Per foreground label in turn, the log-probability bias (``BIAS_CANDIDATES``) that raises its
    Dice most, if any passes (see the module docstring); the argmax with the biases kept."""
    log_p = [np.log(np.clip(np.asarray(p, dtype=np.float32), 1e-6, None)) for p in probabilities]
    fg = [k for k in label_ids if k]
    biases: dict[int, float] = {}

    def argmax_with(extra: dict[int, float]) -> list[np.ndarray]:
        out = []
        for lp in log_p:
            shifted = lp.copy() if extra else lp
            for k, b in extra.items():
                shifted[k] += b
            out.append(shifted.argmax(0))
        return out

    def mean_dices(preds: list[np.ndarray]) -> dict[int, float]:
        return {j: float(_case_dices(preds, refs, j).mean()) for j in fg}

    labels = argmax_with(biases)
    dices = mean_dices(labels)
    for k in fg:
        before = _scores(labels, refs, spacings, k)
        before_cases = _case_dices(labels, refs, k)
        best: tuple[float, float, list[np.ndarray], Trial] | None = None
        for b in BIAS_CANDIDATES:
            trial = argmax_with({**biases, k: b})
            trial_dice = mean_dices(trial)
            gained = trial_dice[k] >= before[0] + max(min_gain, BIAS_MIN_GAIN)
            # without a gain its HD95 is not worth computing: the trial reports the one before
            after = _scores(trial, refs, spacings, k) if gained else (trial_dice[k], before[1])
            # the gain of one case does not pay for another's loss (see BIAS_MIN_GAIN)
            fell = _case_fell(before_cases, _case_dices(trial, refs, k)) if gained else ""
            kept = (
                gained
                and not fell
                and all(trial_dice[j] >= dices[j] - BIAS_TOLERANCE for j in fg if j != k)
                and _not_worse(after[1], before[1], hd95_tol)
            )
            step = Trial(k, f"log-probability bias +{b:g}", before[0], after[0], before[1], after[1], False, fell)
            report.trials.append(step)
            if kept and (best is None or after[0] > best[0]):
                best = (after[0], b, trial, step)
        if best is not None:
            biases[k], labels = best[1], best[2]
            best[3].kept = True
            dices = mean_dices(labels)
    return labels, biases


def tune_postprocessing(
    probabilities: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    *,
    spacing: Spacing | Sequence[Spacing],
    label_ids: Sequence[int],
    images: Sequence[np.ndarray] | None = None,
    base: PostprocessConfig | None = None,
    crf_candidates: Sequence[dict[str, float]] = CRF_CANDIDATES,
    min_gain: float = 1e-3,
    tta_probabilities: Mapping[int, Sequence[np.ndarray]] | None = None,
    components_max: Mapping[int, int] | None = None,
    label_values: Mapping[int, int] | None = None,
    crf_deadline: float | None = None,
) -> tuple[PostprocessConfig, TuningReport]:
    """Choose the post-processing on validation cases; see the module docstring.

    Args:
        probabilities: per case, softmax probabilities (C, X, Y, Z) in the grid of its reference.
        references: per case, the reference label map (X, Y, Z).
        spacing: the voxel size in mm, one for all cases or one per case.
        label_ids: the model's labels, background (0) included.
        images: per case, the normalised image (X, Y, Z) the CRF's appearance kernel reads;
            without them the CRF is not tried (and stays off).
        base: the configuration to start from (connectivity, ``largest_of``); its steps are reset.
        tta_probabilities: per number of TTA passes (2, 8), per case, the probabilities averaged
            over those flips; flip TTA is then tried first (``report.tta``/``tta_flips`` say what
            was kept).
        components_max: per label, the most connected components any training reference has,
            fragments not counted (the fingerprint's ``label_components_max``; ``medseg.data.
            FRAGMENT_SHARE``): keeping that many largest components
            (or more) is kept when it lowers the validation Dice nowhere, without a gain.
        label_values: channel -> the value the label files hold (``Config.label_values``); the
            report names the labels by these values.
        crf_deadline: ``time.monotonic()`` after which no further CRF setting is tried (a time
            budget's); the settings tried by then compete as usual.

    Example:
        >>> cfg, report = tune_postprocessing(probs, refs, spacing=(1, 1, 2.5), label_ids=[0, 1, 2])
        >>> print(report.table())
    """
    refs, spacings = _case_inputs(probabilities, references, spacing, tta_probabilities)
    ids = sorted(int(k) for k in label_ids)
    fg = [k for k in ids if k]
    cfg = (base or PostprocessConfig()).model_copy(
        update={
            "keep_largest": False,
            "min_volume_mm3": 0.0,
            "fill_holes": False,
            "per_label": {},
            "largest_of": "label",
        },
        deep=True,
    )
    plain = [np.asarray(p).argmax(0) for p in probabilities]
    report = TuningReport(len(refs), {k: _scores(plain, refs, spacings, k)[0] for k in fg}, {},
                          components_max=dict(components_max or {}), label_values=dict(label_values or {}))
    tol = hd95_tolerance(spacings)  # what "does not worsen HD95" allows, for every step
    if tta_probabilities:
        probabilities = _tune_tta(probabilities, tta_probabilities, refs, spacings, ids, report, tol)
    if images is not None and crf_candidates:
        refined, cfg.crf = _tune_crf(
            probabilities, images, refs, spacings, ids, crf_candidates, report, min_gain, tol, crf_deadline
        )
    else:
        refined, cfg.crf = list(probabilities), cfg.crf.model_copy(update={"enabled": False})
    bases, biases = _tune_biases(refined, refs, spacings, ids, report, min_gain, tol)
    for label, bias in biases.items():
        cfg = _with_label(cfg, label, logit_bias=bias)
    for label in fg:
        most = None if components_max is None else components_max.get(label)
        cfg = _tune_label_steps(cfg, label, bases, refs, spacings, ids, report, min_gain, tol, most)
    final = _apply(bases, spacings, cfg, ids)
    report.final_dice = {k: _scores(final, refs, spacings, k)[0] for k in fg}
    log.debug("%s", report.table())  # the table goes to postprocess_tuning.md (and tune's stdout)
    return cfg, report


def _case_inputs(
    probabilities: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    spacing: Spacing | Sequence[Spacing],
    tta_probabilities: Mapping[int, Sequence[np.ndarray]] | None,
) -> tuple[list[np.ndarray], list[Spacing]]:
    """``tune_postprocessing``'s references (int64) and one spacing per case, after checking that
    every input has one entry per reference."""
    if len(probabilities) != len(references) or not references:
        raise ValueError(
            f"need as many probabilities as references (got {len(probabilities)}, {len(references)})"
        )
    for passes, averaged in (tta_probabilities or {}).items():
        if len(averaged) != len(references):
            raise ValueError(f"need as many {passes}-pass TTA probabilities as references (got {len(averaged)})")
    per_case = list(spacing) if spacing and isinstance(spacing[0], Sequence) else [spacing] * len(references)
    spacings = [cast(Spacing, tuple(float(v) for v in cast(Sequence[float], s))) for s in per_case]
    return [np.asarray(r).astype(np.int64) for r in references], spacings


def _tune_label_steps(
    cfg: PostprocessConfig, label: int, bases, refs, spacings, ids, report: TuningReport, min_gain: float,
    hd95_tol: float, most_components: int | None = None,
) -> PostprocessConfig:
    """Keep-largest / k largest / small-component removal / hole filling for one label, each kept
    when it raises the label's mean Dice by ``min_gain``, lowers it on no validation case by more
    than ``BIAS_TOLERANCE`` (a stray blob removed from one case does not pay for a real part of
    the organ removed from another) and does not worsen its mean HD95.

    With ``most_components`` (the most components any training reference of the label has), keeping
    the k largest for k at least that many needs no gain, only no loss: validation cases rarely
    hold the stray blob the step removes (see ``TOPOLOGY_NOTE``)."""
    current = _apply(bases, spacings, cfg, ids)
    score, cases = _scores(current, refs, spacings, label), _case_dices(current, refs, label)
    for name, update in _label_step_candidates(refs, spacings, label):
        steps = cfg.per_label.get(label)
        kept_k = steps.components if steps is not None and steps.keep_largest else None
        if kept_k is not None and (name.startswith("remove") or update.get("components", 0) > kept_k):
            continue  # keeping the largest already removed the small components (and more)
        topology = (bool(update.get("keep_largest")) and most_components is not None
                    and update["components"] >= most_components)
        trial_cfg = _with_label(cfg, label, **update)
        trial = _apply(bases, spacings, trial_cfg, ids)
        after, after_cases = _scores(trial, refs, spacings, label), _case_dices(trial, refs, label)
        gained = after[0] >= score[0] + (0.0 if topology else min_gain)
        fell = _case_fell(cases, after_cases) if gained else ""
        kept = gained and not fell and _not_worse(after[1], score[1], hd95_tol)
        by_topology = topology and kept and after[0] < score[0] + min_gain  # kept by that rule alone
        note = fell or (f"no loss; training references have at most {most_components}" if by_topology else "")
        report.trials.append(Trial(label, name, score[0], after[0], score[1], after[1], kept, note))
        if kept:
            cfg, score, cases = trial_cfg, after, after_cases
    return cfg


def _flip_averages(network: Any, image: Any, cfg: Any, plain: np.ndarray, passes: int) -> dict[int, np.ndarray]:
    """Softmax probabilities of one preprocessed image (1, C, X, Y, Z) averaged over inference's TTA
    flips, from its ``plain`` (unflipped) probabilities and the other passes: ``passes`` 2 gives
    {2: ...}, 8 gives {2: ..., 8: ...} (the mirror pair is among the 8 flips: one run serves both)."""
    import torch

    from medseg.predict import flip_sets
    from medseg.validation import window_logits

    mirror_flips = flip_sets(True, 2)
    total = torch.from_numpy(plain)[None].clone()
    mirror = total.clone() if passes == 8 else None
    flips = flip_sets(True, passes)
    for dims in flips[1:]:  # flips[0] is the unflipped pass: ``plain``
        # on the CPU beside ``plain`` (tuning on a GPU runs the windows there)
        p = torch.flip(torch.softmax(window_logits(network, torch.flip(image, dims), cfg), dim=1), dims).cpu()
        if mirror is not None and dims in mirror_flips:
            mirror.add_(p)
        total.add_(p)
    out = {len(flips): total.div_(len(flips))[0].numpy()}
    if mirror is not None:
        out[2] = mirror.div_(2)[0].numpy()
    return out


def _raw_item(case: Any) -> dict[str, Any]:
    """A validation case as the preprocessing takes it (a ``Case``, or anything with image/label)."""
    return case.item() if hasattr(case, "item") else {"image": str(case.image), "label": str(case.label)}


def validation_probabilities(
    network: Any, cfg: Any, cases: Sequence[Any], *, device: Any = "cpu"
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[Spacing]]:
    """Softmax probabilities, references, normalised images and spacings of validation cases in
    the model grid (the preprocessing of ``cfg``, sliding windows as validation runs them)."""
    import torch

    from medseg.transforms import build_preprocess, preprocessed
    from medseg.validation import window_logits

    preprocess = build_preprocess(cfg)
    probs: list[np.ndarray] = []
    refs: list[np.ndarray] = []
    images: list[np.ndarray] = []
    spacings: list[Spacing] = []
    network.eval()
    with torch.no_grad():
        for case in cases:
            item = preprocessed(preprocess, _raw_item(case))  # image: one path, or one per channel
            image = item["image"][None].to(device)
            probs.append(torch.softmax(window_logits(network, image, cfg), dim=1)[0].cpu().numpy())
            refs.append(np.asarray(item["label"][0]).round().astype(np.int64))
            images.append(np.asarray(item["image"][0], dtype=np.float32))  # the CRF reads the first channel
            affine = np.asarray(item["image"].affine, dtype=float)
            spacings.append(cast(Spacing, tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))))
    return probs, refs, images, spacings


def tta_validation_probabilities(
    network: Any, cfg: Any, cases: Sequence[Any], plain: Sequence[np.ndarray], *, device: Any = "cpu",
    passes: int = 8,
) -> dict[int, list[np.ndarray]]:
    """Per number of TTA passes (2, and 8 when ``passes`` is 8), the validation cases' probabilities
    averaged over those flips, in the model grid as ``validation_probabilities`` gives them (``plain``,
    its probabilities, serve as the unflipped pass)."""
    import torch

    from medseg.transforms import build_preprocess, preprocessed

    preprocess = build_preprocess(cfg)
    out: dict[int, list[np.ndarray]] = {}
    network.eval()
    with torch.no_grad():
        for case, unflipped in zip(cases, plain, strict=True):
            image = preprocessed(preprocess, _raw_item(case))["image"][None].to(device)
            for n, probs in _flip_averages(network, image, cfg, unflipped, passes).items():
                out.setdefault(n, []).append(probs)
    return out


def tune_bundle(
    bundle_dir: Any,
    val_cases: Sequence[Any],
    *,
    device: Any = "cpu",
    try_crf: bool = True,
    time_left: float | None = None,
    count_references: bool = False,
) -> TuningReport | None:
    """Tune the post-processing of a trained bundle on its validation cases and store the choice
    in the bundle's config (applied by default at inference; flip TTA as ``infer.tta``) with the
    report beside it (``postprocess_tuning.json``). None when there are no validation cases.

    Flip TTA is tried unless the bundle already runs it, and, with ``time_left`` (seconds), only
    with the passes (8, else 2) that, estimated from the plain pass, take at most half of what is left;
    CRF settings are tried while more than a fifth of it is left (``tune_postprocessing``'s ``crf_deadline``).
    The topology rule's component counts are the bundle metadata's ``label_components_max``; with
    ``count_references`` the validation references' own counts join them (cases the model never saw,
    as ``tune_on_dataset`` gives it)."""
    import json
    import time
    from pathlib import Path

    from medseg.bundle import CONFIG, load_bundle
    from medseg.config import dump_config
    from medseg.io import write_text_atomic

    if not val_cases:
        return None
    bundle = load_bundle(bundle_dir, device=device)
    cfg = bundle.config
    label_ids = sorted(cfg.labels or {})
    started = time.monotonic()
    probs, refs, images, spacings = validation_probabilities(bundle.network, cfg, val_cases, device=device)
    plain_s = time.monotonic() - started
    tta_probs = None
    if not cfg.infer.tta:
        # the passes that fit in half the time left (each about one plain pass, preprocessing included)
        room = None if time_left is None else 0.5 * (time_left - plain_s)
        passes = next((n for n in (8, 2) if room is None or n * plain_s <= room), None)
        if passes is not None:
            tta_probs = tta_validation_probabilities(bundle.network, cfg, val_cases, probs, device=device,
                                                     passes=passes)
        else:
            log.info("time budget: flip TTA not tried on validation (2 passes would take about %.0f s)",
                     2 * plain_s)
        if passes == 2:
            log.info("time budget: flip TTA tried with 2 passes only (8 would take about %.0f s)", 8 * plain_s)
    most = components_max(bundle.metadata, refs if count_references else (), label_values=cfg.label_values)
    chosen, report = tune_postprocessing(
        probs,
        refs,
        spacing=spacings,
        label_ids=label_ids,
        images=images if try_crf else None,
        base=cfg.postprocess,
        tta_probabilities=tta_probs,
        components_max=most,
        label_values=cfg.label_values,
        # the rest of the tuning, the bundle and MLflow take a fifth of what is left (2 s at least)
        crf_deadline=None if time_left is None else started + time_left - max(2.0, 0.2 * time_left),
    )
    tuned = cfg.model_copy(update={"postprocess": chosen}, deep=True)
    if report.tta is not None:
        tuned.infer.tta = report.tta
    if report.tta_flips is not None:
        tuned.infer.tta_flips = cast(Literal[2, 8], report.tta_flips)
    write_text_atomic(Path(bundle_dir) / CONFIG, dump_config(tuned))
    write_text_atomic(Path(bundle_dir) / "postprocess_tuning.json", json.dumps(report.to_dict(), indent=2))
    return report


def components_max(
    metadata: Mapping[str, Any],
    references: Sequence[np.ndarray] = (),
    *,
    label_values: Mapping[int, int] | None = None,
) -> dict[int, int] | None:
    """Per channel, the most components a reference has: the bundle's training references (metadata
    ``label_components_max``, keyed by the label files' values, which ``label_values`` maps onto the
    channels) and ``references`` (on the channels); None when neither says (bundles before 2026-12-06)."""
    from medseg.data import label_components

    channel = value_channels(label_values)
    recorded = metadata.get("label_components_max") or {}
    most = {channel.get(int(k), int(k)): int(v) for k, v in recorded.items()}
    for ref in references:
        for k, n in label_components(ref).items():
            most[k] = max(most.get(k, 0), n)
    return most or None


def tune_on_dataset(model: Any, data: Any, out: Any, *, max_cases: int = 20) -> TuningReport:
    """Choose a bundle's post-processing (flip TTA, CRF, biases, component steps) again on the
    labelled cases of another dataset (a site's own annotated scans, never seen in training) and
    write the bundle so tuned to ``out``, as one unit; ``model`` (folder or MLflow URI) is not
    modified. The references' component counts join the bundle's own (``label_components_max``).
    The first ``max_cases`` labelled cases (by name) are used: every case's probabilities are held
    in memory at once (classes x voxels x 4 bytes, twice with TTA: about 0.6 GB for an abdominal CT)."""
    import json
    import shutil
    from pathlib import Path

    from medseg.bundle import CONFIG, METADATA, WEIGHTS, load_bundle, resolve_model
    from medseg.config import dump_config
    from medseg.data import load_dataset
    from medseg.errors import ConfigError, InputError
    from medseg.io.volume import atomic_dir

    source = resolve_model(model)
    bundle = load_bundle(source)
    if Path(out).resolve() == Path(source).resolve():
        raise ConfigError(f"{out}: the tuned bundle goes to a new folder, not over the model it starts from")
    dataset = load_dataset(data)
    cases = sorted((c for c in dataset.training if c.label is not None), key=lambda c: c.name)[:max_cases]
    if not cases:
        raise InputError(dataset.root, "no labelled cases to tune on (the dataset's 'training' list is empty)")
    theirs = bundle.labels  # by the values the label files hold, as dataset.json's
    if theirs != dataset.labels:
        raise InputError(dataset.root, f"labels {dataset.labels} differ from the model's {theirs}")
    if dataset.root.resolve().name == bundle.metadata.get("dataset"):
        log.warning("tuning on the dataset the model was trained on: its predictions there are better than "
                    "on new scans, so steps that help new scans may look useless; tune on cases it has not seen")
    log.info("tuning on %d labelled case(s) of %s", len(cases), dataset.root.name)
    cfg = bundle.config.model_copy(deep=True)
    cfg.infer.tta = False  # chosen again, on these cases
    with atomic_dir(out) as staging:
        for name in (WEIGHTS, METADATA):
            shutil.copy2(Path(source) / name, staging / name)
        (staging / CONFIG).write_text(dump_config(cfg))
        report = tune_bundle(staging, cases, count_references=True)
        assert report is not None  # there are cases
        meta = json.loads((staging / METADATA).read_text())  # where the post-processing was chosen
        meta["postprocess_tuned_on"] = {"dataset": dataset.root.resolve().name, "cases": len(cases),
                                        "label_components_max": report.to_dict()["components_max"]}
        (staging / METADATA).write_text(json.dumps(meta, indent=2, default=str))
    return report
