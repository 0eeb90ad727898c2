"""A tiny Ray Tune sweep: ASHA stops a trial early, the best config trains, a rerun retrains nothing."""

from __future__ import annotations

import pytest
import yaml

from dialclip_ray.train.config import load_train_config
from dialclip_ray.tuning.space import SpaceError, load_space
from dialclip_ray.tuning.sweep import run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def space_file(tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    base = {"model": {"preset": "default", "backbone": {"model_name": "dialclip-micro"}, "context_prompt_length": 4,
                      "cpg_dim": 32, "cpg_heads": 2},
            "data": {"train": [str(tiny_corpus.photochat)], "max_train_examples": 24, "max_val_examples": 12},
            "optim": {"batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "eval_batch_size": 32},
            "run": {"workers": 1, "threads_per_worker": 1}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    space = {"base_config": "base.yaml", "search": "random", "samples": 4, "max_concurrent": 2, "epochs": 3,
             "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
             "params": {"context_prompt_length": {"choice": [2, 4]}, "num_experts": {"choice": [1, 2, 3]},
                        "insertion_layer": {"choice": [0, 1, 2]}, "lr": {"loguniform": [1e-4, 3e-2]}}}
    (tmp / "space.yaml").write_text(yaml.safe_dump(space))
    return tmp


def test_invalid_space_names_the_key(space_file):
    raw = yaml.safe_load((space_file / "space.yaml").read_text())
    raw["params"]["insertion_layer"] = {"choice": [1, 9]}
    (space_file / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaceError, match=r"params\.insertion_layer: value 9"):
        load_space(space_file / "bad.yaml")
    raw["params"] = {"context_promt_length": {"choice": [1]}}
    (space_file / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpaceError, match="context_promt_length"):
        load_space(space_file / "bad.yaml")


def test_sweep_asha_best_config_and_resume(ray_cluster, space_file):
    first = run_sweep(space_file / "space.yaml", "tiny", space_file / "runs")
    assert len(first.table) == 4 and not first.restored
    assert any(r["stopped_early"] for r in first.table), first.table
    assert first.default_val_sum is not None  # the base config's values were a trial
    best = load_train_config(first.best_config_path)
    assert {k: getattr(best.model, k, None) if k != "lr" else best.optim.lr for k in first.best_params} \
        == first.best_params
    for name in ("trials.csv", "trials.md", "sensitivity.png", "summary.json"):
        assert (first.sweep_dir / name).stat().st_size > 0
    checkpoints = sorted(p.name for p in (first.sweep_dir / "trials").glob("*/checkpoint_*"))
    again = run_sweep(space_file / "space.yaml", "tiny", space_file / "runs")
    assert again.restored
    assert [r["epochs_run"] for r in again.table] == [r["epochs_run"] for r in first.table]
    assert sorted(p.name for p in (first.sweep_dir / "trials").glob("*/checkpoint_*")) == checkpoints


@pytest.mark.parametrize("space", ["tune/synthetic.yaml", "tune/paper.yaml"])
def test_shipped_search_spaces_validate(space):
    from pathlib import Path

    spec, base = load_space(Path(__file__).parent.parent / space)
    assert spec.params and base.model.variant == "dialclip"
