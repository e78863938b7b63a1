"""Label values as the files hold them, and the network's output channels.

The network has one output channel per label, channels 0..K-1. Label files may hold other
values: a binary mask exported as 0/255 (ITK-SNAP, 3D Slicer and other tools do), a label set
such as 0, 1, 2, 5. Used as channels directly, a 0/255 mask trained 256 output channels for 2
labels, a step 30x as long as at 0/1 (benchmarks/README.md). So when training starts,
``channel_labels`` keys the config's labels by channel (0..K-1, in value order) and records
``Config.label_values`` (channel -> value; ``mapping_note`` is the training log's line about it).
Every reference label map is read onto the channels (``medseg.io.load_label(..., label_values=...)``;
a value that is no label's is refused, naming the file) and every predicted mask is written with
the values (``channels_to_values``, in ``medseg.predict``), so the user's values are kept at every
boundary the user sees.

Labels that are 0..K-1 already need no mapping: their configs, bundles and masks are as before
``label_values`` existed, and so are bundles trained on other values before it (their network
has a channel for every value up to the largest).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from medseg.config import Config
from medseg.errors import ConfigError


def _shown(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 6 else ", ".join(map(str, values[:5])) + ", ..."


def channel_labels(cfg: Config, labels: Mapping[int, str] | None = None) -> Config:
    """``cfg`` with its labels (``cfg.labels``, else ``labels`` as dataset.json gives them) on the
    network's channels: keyed by the values the label files hold, they become channels 0..K-1 in
    value order, with ``label_values`` to map them back; the per-label post-processing
    (``postprocess.per_label``, ``postprocess.crf.skip_labels``), given by value, is mapped the same
    way. Labels that are 0..K-1, and a config that has its ``label_values`` already (a bundle's, a
    resumed run's), are kept as they are.

    Example:
        >>> cfg = channel_labels(Config(), {0: "background", 255: "lesion"})
        >>> cfg.labels, cfg.label_values
        ({0: 'background', 1: 'lesion'}, {0: 0, 1: 255})
    """
    given = cfg.labels or labels
    values = sorted(int(v) for v in given or {})
    if cfg.label_values is not None or values == list(range(len(values))):
        return cfg.model_copy(update={"labels": given}, deep=True)
    assert given is not None  # values is not empty
    channel = {v: c for c, v in enumerate(values)}
    post = cfg.postprocess
    for what, keys in (
        ("postprocess.per_label", post.per_label),
        ("postprocess.crf.skip_labels", post.crf.skip_labels),
    ):
        unknown = sorted(set(keys) - set(channel))
        if unknown:
            raise ConfigError(
                f"{what}: {unknown} are not label values; the labels' values are {_shown(values)} "
                "(per-label settings name a label by the value its files hold)"
            )
    crf = post.crf.model_copy(update={"skip_labels": [channel[v] for v in post.crf.skip_labels]})
    by_channel = {channel[v]: steps for v, steps in post.per_label.items()}
    postprocess = post.model_copy(update={"per_label": by_channel, "crf": crf})
    return cfg.model_copy(
        update={
            "labels": {channel[v]: given[v] for v in values},
            "label_values": {c: v for v, c in channel.items()},
            "postprocess": postprocess,
        },
        deep=True,
    )


def mapping_note(cfg: Config) -> str | None:
    """One line saying which label values became which channels (values and counts only), or None
    where there is no mapping."""
    if cfg.label_values is None:
        return None
    values = [cfg.label_values[c] for c in sorted(cfg.label_values)]
    return (
        f"labels: the label files' values {_shown(values)} are network channels 0..{len(values) - 1} "
        f"({len(values)} labels); masks are written with the values"
    )


def values_outside(array: np.ndarray, allowed: Iterable[int]) -> list[int]:
    """The values of a label map (non-negative integers, uint8 as medseg's readers give them) that
    are not in ``allowed``, sorted: counted in one pass (a sort of the voxels, ``np.unique``, took
    seconds on a whole-body CT)."""
    present = np.flatnonzero(np.bincount(np.asarray(array).ravel(order="K"), minlength=1))  # any order: a view
    return sorted(set(present.tolist()) - {int(v) for v in allowed})


def value_channels(label_values: Mapping[int, int] | None) -> dict[int, int]:
    """The inverse of ``label_values``: stored value -> network channel (empty when they are the
    same, so that ``.get(v, v)`` reads a value as its channel either way)."""
    return {v: c for c, v in (label_values or {}).items()}


def values_to_channels(array: np.ndarray, label_values: Mapping[int, int]) -> np.ndarray:
    """A label map's values as network channels (uint8); every value must be one of ``label_values``
    (``medseg.io.load_label`` refuses the others, naming the file)."""
    lut = np.zeros(256, dtype=np.uint8)
    for c, v in label_values.items():
        lut[v] = c
    return lut[np.asarray(array)]


def channels_to_values(array: np.ndarray, label_values: Mapping[int, int] | None) -> np.ndarray:
    """A predicted label map (network channels) with the values the label files hold; as it is
    when ``label_values`` is None (channel k is value k)."""
    if label_values is None:
        return array
    lut = np.zeros(max(label_values) + 1, dtype=np.uint8)
    for c, v in label_values.items():
        lut[c] = v
    return lut[np.asarray(array)]
