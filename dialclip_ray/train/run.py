"""Driver side of a training run: the TorchTrainer, resume, and the run's outputs.

Outputs under ``<storage_path>/<name>/`` (beside Ray's own checkpoint dirs):
``best/`` and ``latest/`` (DialCLIP checkpoints), ``metrics.json``,
``metrics.csv``, ``training_curves.png`` and ``train_config.yaml``.
A rerun with the same name resumes from the latest checkpoint (Ray Train's
``get_checkpoint``); a run whose latest checkpoint already reached the
requested epochs is not trained again.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dialclip_ray.model.checkpoint import META_FILE, WEIGHTS_FILE
from dialclip_ray.features.store import ensure_store
from dialclip_ray.runtime import build_trainer, ensure_ray
from dialclip_ray.train.config import TrainConfig, dump_train_config, resolve_paths
from dialclip_ray.train.plots import plot_training_curves


@dataclass
class TrainOutcome:
    run_dir: Path
    best: Path
    latest: Path
    history: list[dict] = field(default_factory=list)
    best_metrics: dict = field(default_factory=dict)
    trained: bool = True
    wall_seconds: float = 0.0


def _ray_checkpoints(run_dir: Path, partial: bool = False) -> list[tuple[int, float, Path]]:
    """(epoch, val_sum, dir) of every complete, readable checkpoint Ray wrote for this run, oldest first.

    Mid-epoch checkpoints (``run.checkpoint_every_steps``) have no validation score and are left out
    unless ``partial``; a checkpoint whose files are unreadable is reported and skipped.
    """
    found = []
    for meta in run_dir.glob("checkpoint_*/" + META_FILE):
        if not (meta.parent / WEIGHTS_FILE).is_file():
            continue
        try:
            extra = json.loads(meta.read_text()).get("extra", {})
        except (OSError, ValueError) as exc:
            print(f"[dialclip] skipping checkpoint {meta.parent}: {meta.name} is unreadable ({exc})", flush=True)
            continue
        if extra.get("partial") and not partial:
            continue
        found.append((int(extra.get("epoch", 0)), float(extra.get("metrics", {}).get("val_sum", 0.0)), meta.parent))
    return sorted(found, key=lambda t: (t[0], t[2].name))


def _readable(directory: Path) -> bool:
    from dialclip_ray.model.checkpoint import CorruptCheckpointError, read_checkpoint

    try:
        read_checkpoint(directory)
        return True
    except CorruptCheckpointError as exc:
        print(f"[dialclip] skipping checkpoint {directory}: {exc}", flush=True)
        return False


def _first_readable(candidates) -> Path:
    """The first checkpoint dir in ``candidates`` ((epoch, val_sum, dir) tuples) whose weights load."""
    for _, _, directory in candidates:
        if _readable(directory):
            return directory
    raise RuntimeError("no readable checkpoint among this run's checkpoints (see the messages above)")


def _warn_unreadable(run_dir: Path) -> None:
    """Before resuming: say so when the newest checkpoint is unreadable (the workers fall back past it)."""
    newest = _ray_checkpoints(run_dir, partial=True)
    if newest and not _readable(newest[-1][2]):
        print(f"[dialclip] resuming {run_dir.name} from an earlier checkpoint: the newest one is unreadable",
              flush=True)


def latest_history(run_dir: Path) -> list[dict]:
    """The epoch history (validated epochs, oldest first) kept in a run's newest checkpoint; [] if none."""
    done = _ray_checkpoints(Path(run_dir), partial=True)
    if not done:
        return []
    return json.loads((done[-1][2] / META_FILE).read_text())["extra"].get("history", [])


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a checkpoint's two files to ``dst`` atomically: an existing ``dst`` stays until the new one is in."""
    from dialclip_ray.fsio import copy_dir_atomic

    return copy_dir_atomic(src, dst, [WEIGHTS_FILE, META_FILE])


def _write_history(history: list[dict], run_dir: Path) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    keys = list(dict.fromkeys(k for row in history for k in row))
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    if history:
        plot_training_curves(history, run_dir / "training_curves.png", title=run_dir.name)


def _finished(cfg: TrainConfig, latest: tuple[int, float, Path]) -> bool:
    """All epochs done, or early-stopped (no better validation Sum for ``optim.patience`` epochs)."""
    from dialclip_ray.train.loop import stale_epochs

    if latest[0] >= cfg.optim.epochs:
        return True
    history = json.loads((latest[2] / META_FILE).read_text())["extra"].get("history", [])
    return bool(cfg.optim.patience) and stale_epochs(history) >= cfg.optim.patience


def run_training(cfg: TrainConfig) -> TrainOutcome:
    """Train (or resume, or reuse) the run ``cfg.run.name``; return its best and latest checkpoints."""
    from dialclip_ray.train.loop import train_loop_per_worker

    cfg = resolve_paths(cfg.model_copy(deep=True))
    storage = Path(cfg.run.storage_path).expanduser().resolve()
    run_dir = storage / cfg.run.name
    t0 = time.time()
    done = _ray_checkpoints(run_dir)
    trained = not done or not _finished(cfg, done[-1])
    if trained:
        _warn_unreadable(run_dir)
        ensure_ray(num_cpus=cfg.run.workers)
        for path in cfg.data.train:  # frozen context features, computed once per dataset and backbone
            ensure_store(path, cfg.model, cfg.data.features)
        loop_config = {"train": cfg.model_dump(mode="json"), "launched_unix": time.time()}
        build_trainer(train_loop_per_worker, loop_config, name=cfg.run.name,
                      storage_path=str(storage), workers=cfg.run.workers, use_gpu=cfg.run.use_gpu,
                      max_failures=cfg.run.max_failures, num_to_keep=cfg.run.num_to_keep,
                      score_attribute="val_sum", placement_strategy=cfg.run.placement_strategy).fit()
        done = _ray_checkpoints(run_dir)
    if not done:
        raise RuntimeError(f"training run {run_dir} produced no checkpoint")
    latest = _first_readable(reversed(done))
    best = _first_readable(sorted(done, key=lambda t: (t[1], t[0]), reverse=True))
    history = json.loads((latest / META_FILE).read_text())["extra"].get("history", [])
    outcome = TrainOutcome(run_dir, _copy_checkpoint(best, run_dir / "best"),
                           _copy_checkpoint(latest, run_dir / "latest"), history,
                           json.loads((best / META_FILE).read_text())["extra"].get("metrics", {}), trained,
                           time.time() - t0)
    _write_history(history, run_dir)
    dump_train_config(cfg, run_dir / "train_config.yaml")
    return outcome
