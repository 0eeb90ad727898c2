"""Training faults: a worker killed mid-epoch, the driver killed, a corrupt checkpoint, early stopping.

Each slow test runs real Ray Train on the session's local cluster with the micro backbone; the kills
are real SIGKILLs of the worker or driver process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from dialclip_ray.data.dataset import EpochSampler
from dialclip_ray.model.checkpoint import CorruptCheckpointError, read_checkpoint
from dialclip_ray.train.config import load_train_config
from dialclip_ray.train.loop import stale_epochs
from dialclip_ray.train.run import latest_history, run_training

from test_train import write_config


def _config(tmp: Path, corpus, name: str, epochs: int, **run) -> Path:
    path = write_config(tmp / f"{name}.yaml", corpus, tmp / "runs", epochs=epochs)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["max_train_examples"] = 64
    raw["run"].update(name=name, **run)
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------------------------- fast


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch_and_skips_exactly():
    data = list(range(50))
    a, b = EpochSampler(data, seed=3), EpochSampler(data, seed=3)
    for epoch in (0, 1, 2):  # b never saw the epochs before: same order anyway (a fresh process after resume)
        a.set_position(epoch)
    b.set_position(2)
    assert list(a) == list(b) and sorted(a) == data
    a.set_position(1)
    first = list(a)
    a.set_position(1, skip=16)
    assert list(a) == first[16:] and len(a) == 34
    shards = [EpochSampler(data, rank=r, world=2, seed=3) for r in (0, 1)]
    for s in shards:
        s.set_position(4)
    assert sorted(set(list(shards[0]) + list(shards[1]))) == data  # the ranks cover the epoch between them


def test_truncated_checkpoint_names_the_file(tmp_path):
    from dialclip_ray.model.config import DialCLIPConfig
    from dialclip_ray.model.checkpoint import save_checkpoint
    from dialclip_ray.model.dialclip import build_model

    model, _ = build_model(DialCLIPConfig(backbone={"model_name": "dialclip-micro"}, context_prompt_length=2,
                                          cpg_dim=16, cpg_heads=2))
    save_checkpoint(model, tmp_path)
    weights = tmp_path / "dialclip.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=r"dialclip\.pt: checkpoint file is truncated or corrupt"):
        read_checkpoint(tmp_path)
    weights.write_bytes(b"not a zip archive")
    with pytest.raises(CorruptCheckpointError, match=str(weights)):
        read_checkpoint(weights)


def test_stale_epochs_counts_from_the_best_validation_sum():
    sums = lambda *v: [{"val_sum": x} for x in v]  # noqa: E731
    assert stale_epochs([]) == 0
    assert stale_epochs(sums(1, 3)) == 0
    assert stale_epochs(sums(1, 3, 2, 2.5)) == 2
    assert stale_epochs(sums(3, 3)) == 1  # a tie is no improvement


# ---------------------------------------------------------------------------------------------- slow


def _log_rows(run_dir: Path) -> dict[int, list[dict]]:
    rows = defaultdict(list)
    for file in sorted((run_dir / "example_log").glob("rank*.jsonl")):
        rank = int(file.stem[4:])
        rows[rank] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return rows


def _check_epoch_coverage(rows: list[dict], epochs: int) -> None:
    """Per epoch, the last attempt at each batch: contiguous batches, no example twice; replays identical."""
    first_try, last_try = {}, {}
    for row in rows:
        key = (row["epoch"], row["batch"])
        first_try.setdefault(key, row["ids"])
        last_try[key] = row["ids"]
        assert row["ids"] == first_try[key], f"replayed batch {key} saw other examples"
    for epoch in range(epochs):
        batches = sorted(b for e, b in last_try if e == epoch)
        assert batches == list(range(1, len(batches) + 1)), f"epoch {epoch}: batches {batches}"
        ids = [i for b in batches for i in last_try[(epoch, b)]]
        assert len(ids) == len(set(ids)), f"epoch {epoch}: an example was trained on twice"


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_at_the_next_batch(ray_cluster, tiny_corpus, tmp_path):
    every = 2
    cfg = load_train_config(_config(tmp_path, tiny_corpus, "killed-worker", epochs=2, checkpoint_every_steps=every,
                                    example_log=True, max_failures=2))
    run_dir = tmp_path / "runs" / "killed-worker"
    outcome, errors = {}, []

    def train():
        try:
            outcome["run"] = run_training(cfg)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and thread.is_alive():
        rows = _log_rows(run_dir).get(0, [])
        mid = [r for r in rows if r["epoch"] == 0 and r["batch"] >= 2 * every + 1]
        if mid:
            killed = mid[0]
            os.kill(killed["pid"], signal.SIGKILL)
        time.sleep(0.02)
    thread.join(timeout=300)
    assert not errors, errors
    assert killed is not None, "the worker finished before it could be killed"
    run = outcome["run"]
    assert [h["epoch"] for h in run.history] == [1, 2]
    logs = _log_rows(run_dir)
    for rank, rows in logs.items():
        _check_epoch_coverage(rows, epochs=2)
    rows0 = logs[0]
    pids = list(dict.fromkeys(r["pid"] for r in rows0))
    assert len(pids) == 2 and pids[0] == killed["pid"], "exactly one restart, of the killed worker group"
    before = [r for r in rows0 if r["pid"] == pids[0]]
    resumed = next(r for r in rows0 if r["pid"] == pids[1])
    assert resumed["epoch"] == 0 and resumed["batch"] > 1, "resumed inside epoch 1, not from its start"
    assert (resumed["batch"] - 1) % every == 0, "resumed right after a step checkpoint"
    assert before[-1]["batch"] - (resumed["batch"] - 1) <= 2 * every, "lost more than the checkpoint interval"


def _dialclip(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dialclip_ray.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_driver_sigkill_then_rerun_equals_an_uninterrupted_run(ray_cluster, tiny_corpus, tmp_path):
    import ray

    epochs = 4
    straight = run_training(load_train_config(_config(tmp_path, tiny_corpus, "straight", epochs=epochs)))
    config = _config(tmp_path, tiny_corpus, "interrupted", epochs=epochs)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "runs" / "interrupted"
    driver = _dialclip("train", "--config", str(config), env=env)
    deadline = time.time() + 240
    # Kill once epoch 2's checkpoint is on disk: by then Ray has registered epoch 1's (it resumes from the
    # newest checkpoint it registered, which may lag the newest on disk by one).
    while time.time() < deadline and driver.poll() is None and len(latest_history(run_dir)) < 2:
        time.sleep(0.2)
    assert driver.poll() is None, f"driver ended before the kill: {driver.stderr.read()[-2000:]}"
    before = latest_history(run_dir)
    assert 2 <= len(before) < epochs
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    again = _dialclip("train", "--config", str(config), env=env)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    resumed = latest_history(run_dir)
    assert [h["epoch"] for h in resumed] == list(range(1, epochs + 1))
    assert resumed[0]["epoch_seconds"] == before[0]["epoch_seconds"], "epoch 1 came from the checkpoint"
    for mine, ref in zip(resumed, straight.history):
        for key in ("train_loss", "val_sum"):
            assert mine[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-4), (mine["epoch"], key)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_good_one(ray_cluster, tiny_corpus, tmp_path, capfd):
    config = _config(tmp_path, tiny_corpus, "corrupt", epochs=2)
    first = run_training(load_train_config(config))
    run_dir = first.run_dir
    newest = sorted(p for p in run_dir.glob("checkpoint_2*") if p.is_dir())[-1]  # Ray's dirs, named by time
    weights = newest / "dialclip.pt"
    weights.write_bytes(weights.read_bytes()[:100])  # a save cut short
    second = run_training(load_train_config(config, {"optim.epochs": 3}))
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[0]["epoch_seconds"] == first.history[0]["epoch_seconds"]  # epoch 1: restored
    assert second.history[1]["epoch_seconds"] != first.history[1]["epoch_seconds"]  # epoch 2: trained again
    read_checkpoint(second.best), read_checkpoint(second.latest)  # what the run hands on is readable
    out = capfd.readouterr()
    assert str(weights) in out.out + out.err and "truncated or corrupt" in out.out + out.err


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_a_rerun_does_not_train_again(ray_cluster, tiny_corpus, tmp_path):
    config = _config(tmp_path, tiny_corpus, "patient", epochs=6)
    raw = yaml.safe_load(config.read_text())
    raw["optim"].update(patience=1, lr=1e-9)  # nothing improves after epoch 1
    config.write_text(yaml.safe_dump(raw))
    first = run_training(load_train_config(config))
    assert len(first.history) < 6 and stale_epochs(first.history) == 1
    again = run_training(load_train_config(config))
    assert not again.trained and len(again.history) == len(first.history)
    assert again.best_metrics == first.best_metrics
