from __future__ import annotations

import pytest

from medseg.config import Config, flatten, load_config
from medseg.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n")
    cfg = load_config(path, ["preprocess.spacing=[1.5, 1.5, 2.5]", "model.name=monai_unet"])
    assert cfg.train.epochs == 3
    assert cfg.preprocess.spacing == (1.5, 1.5, 2.5)
    assert cfg.model.name == "monai_unet"


def test_unknown_keys_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_config(path)
    with pytest.raises(ConfigError, match="nosuch"):
        load_config(None, ["nosuch.key=1"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])


def test_labels_need_background():
    with pytest.raises(ConfigError):
        load_config(None, ["labels={1: liver}"])


def test_flatten_roundtrip():
    flat = flatten(Config().model_dump(mode="json"))
    assert flat["train.epochs"] == 50
    assert "preprocess.intensity.kind" in flat
