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
    epochs = lambda table: {r["trial_id"]: r["epochs_run"] for r in table}  # noqa: E731 (rows sort by score)
    assert epochs(again.table) == epochs(first.table)
    assert sorted(p.name for p in (first.sweep_dir / "trials").glob("*/checkpoint_*")) == checkpoints


@pytest.mark.parametrize("space", ["tune/synthetic.yaml", "tune/paper.yaml"])
def test_shipped_search_spaces_validate(space):
    from pathlib import Path

    spec, base = load_space(Path(__file__).parent.parent / space)
    assert spec.params and base.model.variant == "dialclip"


def _trial_table_row(tmp_path, scores: tuple[float, ...], checkpointed: tuple[int, ...], tune_metrics: dict,
                     tune_rows: list[dict]) -> dict:
    """The trials-table row of one trial "abc" whose checkpoints (epochs ``checkpointed``) hold the history
    ``scores``, and which reported ``tune_rows`` to Tune (its metrics dataframe)."""
    from types import SimpleNamespace

    import pandas as pd

    from dialclip_ray.model.checkpoint import save_checkpoint
    from dialclip_ray.model.config import DialCLIPConfig
    from dialclip_ray.model.dialclip import build_model
    from dialclip_ray.tuning.report import trial_table
    from dialclip_ray.tuning.space import SweepSpec

    model, _ = build_model(DialCLIPConfig(backbone={"model_name": "dialclip-micro"}, context_prompt_length=2,
                                          cpg_dim=16, cpg_heads=2))
    history = [{"epoch": e, "val_sum": v} for e, v in enumerate(scores, start=1)]
    for epoch in checkpointed:  # Ray's checkpoint dirs, named by time
        save_checkpoint(model, tmp_path / "trials" / "trial-abc" / f"checkpoint_2026-11-27_0{epoch}",
                        extra={"epoch": epoch, "history": history[:epoch], "metrics": history[epoch - 1]})
    spec = SweepSpec.model_validate({"base_config": "base.yaml", "epochs": 3,
                                     "params": {"lr": {"loguniform": [1e-4, 1e-2]}}})
    result = SimpleNamespace(metrics={"trial_id": "abc", **tune_metrics}, path="x", config={"lr": 1e-3}, error=None,
                             metrics_dataframe=pd.DataFrame(tune_rows))
    row, = trial_table([result], spec, tmp_path / "trials")
    return row


def test_resumed_trial_counts_its_epochs_from_its_checkpoints(tmp_path):
    """After the sweep's driver died, Tune sees a resumed trial's reports from 1 again (1 row here);
    the table reads the trial's own checkpoint history (3 epochs) and does not call it stopped early."""
    row = _trial_table_row(tmp_path, (10.0, 30.0, 20.0), (2, 3), {},
                           [{"epoch": 3, "val_sum": 20.0, "training_iteration": 1}])
    assert row["epochs_run"] == 3 and not row["stopped_early"] and row["best_val_sum"] == 30.0


def test_a_trial_stopped_by_asha_counts_only_the_epochs_tune_saw(tmp_path):
    """ASHA stops a trial after Tune saw epoch 2; its workers may still checkpoint epoch 3 before they
    are killed (a tiny epoch is faster than the stop): the table says 2 epochs, stopped early."""
    row = _trial_table_row(tmp_path, (10.0, 12.0, 40.0), (1, 2, 3), {"epoch": 2},
                           [{"epoch": e, "val_sum": v, "training_iteration": e} for e, v in ((1, 10.0), (2, 12.0))])
    assert row["epochs_run"] == 2 and row["stopped_early"] and row["best_val_sum"] == 12.0
