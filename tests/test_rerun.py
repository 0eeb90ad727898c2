"""Reruns are explicit: a changed config is refused naming the fields, allowed only on request (and
recorded); resume loads the trainable state strictly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dialclip_ray.train.config import dump_train_config, load_train_config
from dialclip_ray.train.run import CHANGES_FILE, CONFIG_FILE, RunConfigChangedError, check_rerun, run_training


def _config(tmp_path, corpus, **optim):
    cfg = {"model": {"preset": "default", "backbone": {"model_name": "dialclip-micro"}, "context_prompt_length": 4,
                     "cpg_dim": 32, "cpg_heads": 2},
           "data": {"train": [str(corpus.photochat)], "max_train_examples": 16},
           "optim": {"epochs": 1, "batch_size": 8, **optim},
           "run": {"name": "rerun", "storage_path": str(tmp_path / "runs"), "workers": 1}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _started(tmp_path, corpus):
    """A run directory as `dialclip train` leaves it once started: its recorded config."""
    config = _config(tmp_path, corpus)
    cfg = load_train_config(config)
    from dialclip_ray.train.config import resolve_paths

    dump_train_config(resolve_paths(cfg), tmp_path / "runs" / "rerun" / CONFIG_FILE)
    return config


def test_changed_config_is_refused_naming_the_fields(tmp_path, tiny_corpus):
    config = _started(tmp_path, tiny_corpus)
    changed = load_train_config(config, {"optim.lr": 0.5, "model.num_experts": 3})
    with pytest.raises(RunConfigChangedError) as err:
        run_training(changed)  # refused before Ray starts
    msg = str(err.value)
    assert "optim.lr" in msg and "model.num_experts" in msg and "--allow-config-change" in msg
    assert "optim.epochs" not in msg


def test_resume_safe_fields_may_change(tmp_path, tiny_corpus):
    config = _started(tmp_path, tiny_corpus)
    more = load_train_config(config, {"optim.epochs": 5, "run.max_failures": 3, "data.feature_actors": 4})
    from dialclip_ray.train.config import resolve_paths

    assert check_rerun(resolve_paths(more), tmp_path / "runs" / "rerun", []) == {}


def test_allowed_change_is_recorded_in_the_run(tmp_path, tiny_corpus):
    config = _started(tmp_path, tiny_corpus)
    from dialclip_ray.train.config import resolve_paths

    cfg = resolve_paths(load_train_config(config, {"optim.lr": 0.5}))
    changed = check_rerun(cfg, tmp_path / "runs" / "rerun", [], allow_config_change=True)
    assert changed == {"optim.lr": (0.001, 0.5)}
    log = json.loads((tmp_path / "runs" / "rerun" / CHANGES_FILE).read_text())
    assert log[-1]["changed"] == {"optim.lr": {"from": 0.001, "to": 0.5}}


def test_cli_refuses_with_exit_2_and_names_the_field(tmp_path, tiny_corpus, capsys):
    from dialclip_ray.cli import main

    config = _started(tmp_path, tiny_corpus)
    assert main(["train", "--config", str(config), "--workers", "2"]) == 2
    assert "run.workers: 1 -> 2" in capsys.readouterr().out


def test_resume_load_is_strict():
    from dialclip_ray.model.config import BackboneConfig, preset
    from dialclip_ray.model.dialclip import build_model
    from dialclip_ray.train.loop import ResumeMismatchError, load_trainable_strict

    cfg = preset("default", backbone=BackboneConfig(model_name="dialclip-micro"))
    model, _ = build_model(cfg)
    state = model.trainable_state_dict()
    load_trainable_strict(model, state, "r")  # the model's own state fits
    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(ResumeMismatchError, match="missing"):
        load_trainable_strict(model, missing, "r")
    with pytest.raises(ResumeMismatchError, match="unexpected"):
        load_trainable_strict(model, {**state, "experts.99.weight": torch.zeros(1)}, "r")
    key = next(iter(state))
    with pytest.raises(ResumeMismatchError, match="other shape"):
        load_trainable_strict(model, {**state, key: torch.zeros(3, 1, 7)}, "r")
