"""Driver side of a training run: the TorchTrainer, resume, and the run's outputs.

Outputs under ``<storage_path>/<name>/`` (beside Ray's own checkpoint dirs), where
``storage_path`` is a local (shared) directory or an object-store URI (``s3://``,
``gs://``; see ``dialclip_ray.storage``): ``best/`` and ``latest/`` (DialCLIP
checkpoints), ``metrics.json``, ``metrics.csv`` (per epoch), ``steps.csv`` (per
step, written by rank 0 as it trains), ``tensorboard/``, ``training_curves.png``
and ``train_config.yaml``.

A rerun with the same name resumes from the latest checkpoint (Ray Train's
``get_checkpoint``); a run whose latest checkpoint already reached the
requested epochs is not trained again. A rerun whose config differs from the
run's recorded ``train_config.yaml`` in anything that changes what is trained
is refused (``RunConfigChangedError`` names the fields); ``allow_config_change``
accepts it and appends the change to the run's ``config_changes.json``. Fields
that only say how long or where to run (``RESUME_SAFE``: more epochs, failure
handling, threads, actors) may change freely.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dialclip_ray import storage
from dialclip_ray.model.checkpoint import META_FILE, WEIGHTS_FILE
from dialclip_ray.features.build import ensure_store
from dialclip_ray.runtime import build_trainer, ensure_ray
from dialclip_ray.storage import Location
from dialclip_ray.train.config import TrainConfig, dump_train_config, resolve_paths
from dialclip_ray.train.plots import plot_training_curves

CONFIG_FILE = "train_config.yaml"
CHANGES_FILE = "config_changes.json"
# Fields a rerun may change without changing what is trained: how long, where, how robustly, how fast.
RESUME_SAFE = frozenset({
    "optim.epochs", "optim.patience", "optim.eval_batch_size", "run.storage_path", "run.max_failures",
    "run.num_to_keep", "run.threads_per_worker", "run.example_log", "run.placement_strategy",
    "run.checkpoint_every_steps", "run.tensorboard", "data.loader_workers", "data.features", "data.feature_actors",
    "data.feature_gpus_per_actor", "model.backbone.cache_dir"})


class RunConfigChangedError(ValueError):
    """A rerun of a run name with a config that would train something else."""


@dataclass
class TrainOutcome:
    run_dir: Location
    best: Location
    latest: Location
    history: list[dict] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)
    trained: bool = True
    wall_seconds: float = 0.0


def _ray_checkpoints(run_dir: Location, partial: bool = False) -> list[tuple[int, float, Location]]:
    """(epoch, val_sum, dir) of every complete, readable checkpoint Ray wrote for this run, oldest first.

    Mid-epoch checkpoints (``run.checkpoint_every_steps``) have no validation score and are left out
    unless ``partial``; a checkpoint whose files are unreadable is reported and skipped.
    """
    found = []
    for name in storage.list_names(run_dir):
        if not name.startswith("checkpoint_"):
            continue
        directory = storage.join(run_dir, name)
        if not storage.is_file(storage.join(directory, WEIGHTS_FILE)) or \
                not storage.is_file(storage.join(directory, META_FILE)):
            continue
        try:
            extra = json.loads(storage.read_text(storage.join(directory, META_FILE))).get("extra", {})
        except (OSError, ValueError) as exc:
            print(f"[dialclip] skipping checkpoint {directory}: {META_FILE} is unreadable ({exc})", flush=True)
            continue
        if extra.get("partial") and not partial:
            continue
        found.append((int(extra.get("epoch", 0)), float(extra.get("metrics", {}).get("val_sum", 0.0)), directory))
    return sorted(found, key=lambda t: (t[0], storage.name_of(t[2])))


def _extra(directory: Location) -> dict:
    return json.loads(storage.read_text(storage.join(directory, META_FILE))).get("extra", {})


def _readable(directory: Location) -> bool:
    from dialclip_ray.model.checkpoint import CorruptCheckpointError, read_checkpoint

    try:
        with storage.local_dir(directory, fresh=True) as here:
            read_checkpoint(here)
        return True
    except CorruptCheckpointError as exc:
        print(f"[dialclip] skipping checkpoint {directory}: {exc}", flush=True)
        return False


def _first_readable(candidates) -> Location:
    """The first checkpoint dir in ``candidates`` ((epoch, val_sum, dir) tuples) whose weights load."""
    for _, _, directory in candidates:
        if _readable(directory):
            return directory
    raise RuntimeError("no readable checkpoint among this run's checkpoints (see the messages above)")


def _warn_unreadable(run_dir: Location) -> None:
    """Before resuming: say so when the newest checkpoint is unreadable (the workers fall back past it)."""
    newest = _ray_checkpoints(run_dir, partial=True)
    if newest and not _readable(newest[-1][2]):
        print(f"[dialclip] resuming {storage.name_of(run_dir)} from an earlier checkpoint: the newest one is unreadable",
              flush=True)


def latest_history(run_dir: Location) -> list[dict]:
    """The epoch history (validated epochs, oldest first) kept in a run's newest checkpoint; [] if none."""
    done = _ray_checkpoints(run_dir if storage.is_uri(run_dir) else Path(run_dir), partial=True)
    if not done:
        return []
    return _extra(done[-1][2]).get("history", [])


def _copy_checkpoint(src: Location, dst: Location) -> Location:
    """Copy a checkpoint's two files to ``dst`` (locally atomically: an existing ``dst`` stays until the new one is in)."""
    from dialclip_ray.fsio import copy_dir_atomic

    if not storage.is_uri(src) and not storage.is_uri(dst):
        return copy_dir_atomic(src, dst, [WEIGHTS_FILE, META_FILE])
    with storage.local_dir(src, fresh=True) as here:
        with storage.output_dir(dst) as out:
            for name in (WEIGHTS_FILE, META_FILE):
                (out / name).write_bytes((here / name).read_bytes())
    return dst


def _write_history(history: list[dict], run_dir: Location) -> None:
    """The run's epoch table and curves (per-step resolution where ``steps.csv`` exists)."""
    from dialclip_ray.train.plots import read_steps

    keys = list(dict.fromkeys(k for row in history for k in row))
    with storage.output_dir(run_dir) as out:
        (out / "metrics.json").write_text(json.dumps(history, indent=2))
        with open(out / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
        if history:
            plot_training_curves(history, out / "training_curves.png", title=storage.name_of(run_dir),
                                 steps=read_steps(run_dir))


def _finished(cfg: TrainConfig, latest: tuple[int, float, Location]) -> bool:
    """All epochs done, or early-stopped (no better validation Sum for ``optim.patience`` epochs)."""
    from dialclip_ray.train.loop import stale_epochs

    if latest[0] >= cfg.optim.epochs:
        return True
    history = _extra(latest[2]).get("history", [])
    return bool(cfg.optim.patience) and stale_epochs(history) >= cfg.optim.patience


def _flatten(value: dict, prefix: str = "") -> dict:
    out = {}
    for key, item in value.items():
        dotted = f"{prefix}{key}"
        if isinstance(item, dict):
            out.update(_flatten(item, dotted + "."))
        else:
            out[dotted] = item
    return out


def config_changes(recorded: dict, new: dict) -> dict[str, tuple]:
    """``{dotted field: (recorded, new)}`` for every field outside ``RESUME_SAFE`` that differs."""
    old, now = _flatten(recorded), _flatten(new)
    return {k: (old.get(k), now.get(k)) for k in sorted(set(old) | set(now))
            if k not in RESUME_SAFE and old.get(k) != now.get(k)}


def recorded_config(run_dir: Location, done: list) -> dict | None:
    """The config a run was started with: its ``train_config.yaml``, else its newest checkpoint's copy."""
    path = storage.join(run_dir, CONFIG_FILE)
    if storage.is_file(path):
        return yaml.safe_load(storage.read_text(path))
    if done:
        return _extra(done[-1][2]).get("train_config")
    return None


def check_rerun(cfg: TrainConfig, run_dir: Location, done: list, allow_config_change: bool = False) -> dict:
    """Refuse (or, when allowed, return and record) a rerun whose config trains something else."""
    recorded = recorded_config(run_dir, done)
    if recorded is None:
        return {}
    try:  # the recorded file through the current schema (new fields with defaults compare as defaults)
        recorded = TrainConfig.model_validate(recorded).model_dump(mode="json")
    except ValueError:
        pass
    changed = config_changes(recorded, cfg.model_dump(mode="json"))
    if not changed:
        return {}
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
    if not allow_config_change:
        raise RunConfigChangedError(
            f"run {cfg.run.name!r} at {run_dir} was started with another config; differing fields: {shown}. "
            f"Use a new run name (run.name / --run-name), restore the recorded values "
            f"({storage.join(run_dir, CONFIG_FILE)}), or pass --allow-config-change "
            f"(allow_config_change=True) to continue this run with the change recorded in {CHANGES_FILE}")
    log_path = storage.join(run_dir, CHANGES_FILE)
    log = json.loads(storage.read_text(log_path)) if storage.is_file(log_path) else []
    log.append({"unix": time.time(), "checkpoints_before": len(done),
                "changed": {k: {"from": a, "to": b} for k, (a, b) in changed.items()}})
    storage.write_text(log_path, json.dumps(log, indent=2))
    print(f"[dialclip] run {cfg.run.name}: continuing with a changed config ({shown}); recorded in {log_path}",
          flush=True)
    return changed


def run_training(cfg: TrainConfig, allow_config_change: bool = False) -> TrainOutcome:
    """Train (or resume, or reuse) the run ``cfg.run.name``; return its best and latest checkpoints."""
    from dialclip_ray.train.loop import train_loop_per_worker

    cfg = resolve_paths(cfg.model_copy(deep=True))
    run_dir = storage.join(storage.normalize(cfg.run.storage_path), cfg.run.name)
    t0 = time.time()
    check_rerun(cfg, run_dir, _ray_checkpoints(run_dir, partial=True), allow_config_change)
    done = _ray_checkpoints(run_dir)
    trained = not done or not _finished(cfg, done[-1])
    if trained:
        _warn_unreadable(run_dir)
        dump_train_config(cfg, storage.join(run_dir, CONFIG_FILE))  # before fit: a killed run keeps its config
        ensure_ray(num_cpus=cfg.run.workers)
        for path in cfg.data.train:  # frozen context features, computed once per dataset and backbone
            ensure_store(path, cfg.model, cfg.data.features, cfg.data.feature_actors, cfg.data.feature_gpus_per_actor)
        loop_config = {"train": cfg.model_dump(mode="json"), "launched_unix": time.time()}
        build_trainer(train_loop_per_worker, loop_config, name=cfg.run.name,
                      storage_path=str(cfg.run.storage_path), workers=cfg.run.workers, use_gpu=cfg.run.use_gpu,
                      max_failures=cfg.run.max_failures, num_to_keep=cfg.run.num_to_keep,
                      score_attribute="val_sum", placement_strategy=cfg.run.placement_strategy).fit()
        done = _ray_checkpoints(run_dir)
    if not done:
        raise RuntimeError(f"training run {run_dir} produced no checkpoint")
    latest = _first_readable(reversed(done))
    best = _first_readable(sorted(done, key=lambda t: (t[1], t[0]), reverse=True))
    history = _extra(latest).get("history", [])
    outcome = TrainOutcome(run_dir, _copy_checkpoint(best, storage.join(run_dir, "best")),
                           _copy_checkpoint(latest, storage.join(run_dir, "latest")), history,
                           _extra(best).get("metrics", {}), trained, time.time() - t0)
    _write_steps_from(latest, run_dir, cfg)
    _write_history(history, run_dir)
    dump_train_config(cfg, storage.join(run_dir, CONFIG_FILE))
    return outcome


def _write_steps_from(checkpoint: Location, run_dir: Location, cfg: TrainConfig) -> None:
    """``steps.csv`` and the curves from the latest checkpoint's own step log (TensorBoard: rank 0's events).

    Rank 0 flushes steps.csv after each epoch's report, so a driver killed between the two leaves
    a steps.csv one epoch short while the checkpoint is whole; a rerun that finds the run complete
    trains nothing and would keep the short file. The checkpoint is the record that survives.
    """
    import torch

    from dialclip_ray.train.loop import STATE_FILE
    from dialclip_ray.train.plots import StepLog

    with storage.local_dir(checkpoint, fresh=True) as here:
        file = Path(here) / STATE_FILE
        if not file.is_file():
            return
        rows = json.loads(torch.load(file, map_location="cpu", weights_only=True).get("steps_json", "[]"))
    if rows:
        StepLog(run_dir, rows, tensorboard=False).flush(_extra(checkpoint).get("history", []), title=cfg.run.name)
