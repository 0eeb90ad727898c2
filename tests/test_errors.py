"""errors.format_validation_error: one format for every pydantic error, naming the offending key."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dialclip_ray.errors import ConfigError, format_validation_error


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(gt=0)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    optim: Inner
    items: list[int] = []

    @model_validator(mode="after")
    def _whole(self) -> "Outer":
        if len(self.items) > 2:
            raise ValueError("too many items")
        return self


def error_of(raw: dict) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(raw)
    return info.value


def test_format_names_dotted_keys_and_list_positions():
    msg = format_validation_error(error_of({"optim": {"lr": -1, "typo": 1}, "items": [1, "x"]}), "cfg.yaml")
    assert msg.startswith("cfg.yaml: ")
    parts = msg[len("cfg.yaml: "):].split("; ")
    assert "optim.lr: Input should be greater than 0" in parts
    assert "optim.typo: Extra inputs are not permitted" in parts
    assert any(p.startswith("items.1: Input should be a valid integer") for p in parts)
    assert "https://" not in msg  # no pydantic doc URLs


def test_format_root_errors_and_empty_where():
    err = error_of({"optim": {"lr": 1}, "items": [1, 2, 3]})
    assert format_validation_error(err, "x") == "x: <root>: Value error, too many items"
    assert format_validation_error(err, "invalid request", root="body") == \
        "invalid request: body: Value error, too many items"
    assert format_validation_error(err, "") == "<root>: Value error, too many items"


def test_training_config_error_names_the_key(tmp_path):
    from dialclip_ray.train.config import ConfigError as TrainConfigError
    from dialclip_ray.train.config import load_train_config

    assert TrainConfigError is ConfigError  # one shared class, still importable from train.config
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": ["x"]}, "optim": {"lr": -1}}))
    with pytest.raises(ConfigError, match=r"train\.yaml: invalid training config: optim\.lr: Input should be greater"):
        load_train_config(path)


def test_sweep_error_is_a_config_error():
    from dialclip_ray.tuning.space import SpaceError

    assert issubclass(SpaceError, ConfigError)


def test_index_params_and_manifest_errors_use_the_format(tmp_path):
    from dialclip_ray.index.factory import validate_params
    from dialclip_ray.index.manifest import IndexManifest, IndexManifestError

    with pytest.raises(ValueError) as info:
        validate_params("ivf", {"nlist": 0, "bogus": 1})
    msg = str(info.value)
    assert msg.startswith("invalid params for index kind 'ivf': ") and "\n" not in msg
    assert "nlist: Input should be greater than or equal to 1" in msg and "bogus: Extra inputs" in msg

    (tmp_path / "manifest.json").write_text(json.dumps({"dim": "wide"}))
    with pytest.raises(IndexManifestError, match=r"manifest\.json: invalid manifest: .*dim: Input should be"):
        IndexManifest.load(tmp_path)
