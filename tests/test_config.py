from __future__ import annotations

import json

import pytest

from medseg.config import Config, apply_overrides, config_from_dict, flatten, load_config
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
    """Flattened params (what MLflow holds) given back as --set overrides rebuild the same config."""
    cfg = Config.model_validate({"train": {"epochs": 7, "patch_size": [16, 32, 48]}, "labels": {0: "bg", 1: "a"}})
    flat = flatten(cfg.model_dump(mode="json"))
    assert flat["train.epochs"] == 7
    assert "preprocess.intensity.kind" in flat
    overrides = [f"{key}={json.dumps(value)}" for key, value in flat.items()]
    rebuilt = config_from_dict(apply_overrides({}, overrides))
    assert rebuilt == cfg
