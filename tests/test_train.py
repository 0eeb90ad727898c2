"""Ray Train prompt tuning on CPU workers: it trains, checkpoints, resumes, and evaluates consistently."""

from __future__ import annotations


import pytest
import yaml

from dialclip_ray.model.checkpoint import load_checkpoint, read_checkpoint
from dialclip_ray.data.dataset import CanonicalDataset
from dialclip_ray.evaluation.local import evaluate_model
from dialclip_ray.train.config import ConfigError, load_train_config
from dialclip_ray.train.run import run_training

pytestmark = pytest.mark.slow


def write_config(path, corpus, storage, epochs=1, **model):
    cfg = {"model": {"preset": "default", "backbone": {"model_name": "dialclip-micro"}, "context_prompt_length": 4,
                     "cpg_dim": 32, "cpg_heads": 2, **model},
           "data": {"train": [str(corpus.photochat), str(corpus.mmdialog)], "max_train_examples": 32,
                    "max_val_examples": 16},
           "optim": {"epochs": epochs, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_batch_size": 32},
           "run": {"name": "tiny", "storage_path": str(storage), "workers": 2, "threads_per_worker": 1}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(ray_cluster, tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    config = write_config(tmp / "train.yaml", tiny_corpus, tmp / "runs", epochs=1)
    first = run_training(load_train_config(config))
    return tmp, config, first


def test_two_worker_run_writes_checkpoint_and_outputs(trained):
    _, _, first = trained
    meta, state = read_checkpoint(first.best)
    assert meta["params"]["trainable"] > 0 and state and not any(k.startswith("clip.") for k in state)
    assert meta["extra"]["epoch"] == 1 and "val_sum" in meta["extra"]["metrics"]
    for name in ("metrics.json", "metrics.csv", "training_curves.png", "train_config.yaml"):
        assert (first.run_dir / name).stat().st_size > 0
    assert load_train_config(first.run_dir / "train_config.yaml").run.name == "tiny"


def test_rerun_with_same_name_resumes(trained):
    tmp, config, first = trained
    second = run_training(load_train_config(config, {"optim.epochs": 2}))
    assert [row["epoch"] for row in second.history] == [1, 2]
    # epoch 1 was restored from the first run's checkpoint, not trained again
    assert second.history[0]["epoch_seconds"] == first.history[0]["epoch_seconds"]
    third = run_training(load_train_config(config, {"optim.epochs": 2}))
    assert not third.trained and len(third.history) == 2


def test_ray_data_evaluation_equals_single_process(trained, tiny_corpus):
    from dialclip_ray.evaluation.distributed import evaluate_with_ray

    _, _, first = trained
    model, backbone, _ = load_checkpoint(first.best)
    for data in (tiny_corpus.photochat, tiny_corpus.mmdialog):
        local = evaluate_model(model, backbone, CanonicalDataset.load(data), "test", batch_size=16)
        distributed = evaluate_with_ray(first.best, data, "test", actors=2, batch_size=16)
        assert local["per_type"] and local["per_type"].keys() == distributed["per_type"].keys()
        for rtype, m in local["per_type"].items():
            for key, value in m.items():
                assert distributed["per_type"][rtype][key] == pytest.approx(value, abs=1e-9), (data, rtype, key)


def test_invalid_config_names_the_key(tmp_path, tiny_corpus):
    bad = write_config(tmp_path / "bad.yaml", tiny_corpus, tmp_path, epochs=1)
    raw = yaml.safe_load(bad.read_text())
    raw["optim"]["lr"] = -1
    raw["model"]["insertion_laye"] = 2
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_train_config(bad)
    assert "optim.lr" in str(err.value) and "insertion_laye" in str(err.value)


def test_validate_at_start_keeps_the_model_as_built_as_a_candidate(ray_cluster, tiny_corpus, tmp_path):
    """Epoch 0 is the model as built, validated and checkpointed; the best of all epochs is kept."""
    import torch

    from dialclip_ray.model.dialclip import build_model

    config = write_config(tmp_path / "start.yaml", tiny_corpus, tmp_path / "runs", epochs=1)
    cfg = load_train_config(config, {"optim.validate_at_start": True, "optim.lr": 5.0, "run.name": "start"})
    out = run_training(cfg)
    assert [row["epoch"] for row in out.history] == [0, 1]
    sums = [row["val_sum"] for row in out.history]
    assert out.best_metrics["val_sum"] == max(sums)
    _, state = read_checkpoint(out.best)
    built, _ = build_model(cfg.model, seed=cfg.run.seed)
    as_built = {k: v for k, v in built.state_dict().items() if k in state}
    same = all(torch.equal(state[k], v) for k, v in as_built.items())
    # the best checkpoint is the untouched start exactly when epoch 0 won
    assert same == (out.best_metrics["epoch"] == 0), (sums, out.best_metrics["epoch"])
    assert not run_training(cfg).trained  # finished: a rerun reuses it
