"""Driver side: cache lookup, the ``TorchTrainer`` job, the final artifact and its evaluation.

The artifact ``<cache_dir>/<key>/`` holds ``open_clip_model.pt`` (a plain
state_dict of tensors, so ``open_clip.create_model_and_transforms(name,
pretrained=path)`` and ``torch.load(weights_only=True)`` both load it),
``pretrain_meta.json`` and ``training_curve.png``. The key hashes the config
(seed included) and the corpus fingerprint; an existing artifact is reused.
The directory is assembled under a temporary name and renamed, so a crash
leaves no half-written artifact. The Ray run is named after the key, so an
interrupted run resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dialclip_ray.pretrain.config import PretrainConfig
from dialclip_ray.pretrain.data import corpus_fingerprint, held_out_pairs, read_captions
from dialclip_ray.fsio import atomic_write_text, staging_dir
from dialclip_ray.runtime import build_trainer, ensure_ray

MODEL_FILE = "open_clip_model.pt"
META_FILE = "pretrain_meta.json"
CURVE_FILE = "training_curve.png"
RAY_RUNS = "_ray_runs"


@dataclass
class PretrainResult:
    path: Path  # the checkpoint file
    meta: dict[str, Any]
    cached: bool  # True when an existing artifact was reused (no training)


# Settings that change speed only, not the weights or the metrics: left out of the key.
KEY_EXCLUDE = {"eval_batch_size", "threads_per_worker", "cache_images"}


def cache_key(config: PretrainConfig, fingerprint: str) -> str:
    settings = config.model_dump(mode="json", exclude=KEY_EXCLUDE)
    payload = json.dumps({"config": settings, "seed": config.seed, "corpus": fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _train(config: PretrainConfig, root: Path, storage: Path, run_name: str, fresh: bool) -> tuple[dict, dict]:
    """Run the TorchTrainer; return (model state_dict, step/epoch log) from its last checkpoint."""
    from dialclip_ray.pretrain.loop import LOG_FILE, STATE_FILE, train_loop_per_worker

    if fresh:
        shutil.rmtree(storage / run_name, ignore_errors=True)
    trainer = build_trainer(train_loop_per_worker,
                            {"config": config.model_dump(mode="json"), "corpus_root": str(root)},
                            name=run_name, storage_path=str(storage), workers=config.workers,
                            use_gpu=config.use_gpu, max_failures=1, num_to_keep=1)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pretrain run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        log = json.loads((Path(d) / LOG_FILE).read_text())
    return state["model"], log


def plot_curve(log: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if log["steps"]:
        steps, losses = zip(*log["steps"])
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="step loss (rank 0)")
    ends = [e["step"] for e in log["epochs"]]
    ax.plot(ends, [e["loss"] for e in log["epochs"]], "o-", label="epoch mean")
    ax.set(xlabel="optimizer step", ylabel="ClipLoss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_checkpoint(model_name: str, checkpoint: Path, root: Path, splits: tuple[str, ...],
                        batch_size: int = 256, max_images: int | None = None) -> dict[str, float]:
    """Load through open_clip's own pretrained path (proving the file is loadable) and score held-out recall."""
    import open_clip

    from dialclip_ray.model.backbone import register_model_configs
    from dialclip_ray.pretrain.evaluate import caption_retrieval_metrics, embed_pairs

    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    pairs = held_out_pairs(read_captions(root), splits)[:max_images]
    if not pairs:
        raise ValueError(f"{root / 'captions.parquet'}: no rows in held-out split(s) {splits}")
    images, texts = embed_pairs(model, root, pairs, preprocess, open_clip.get_tokenizer(model_name), batch_size)
    return caption_retrieval_metrics(images, texts)


def run_pretrain(config: PretrainConfig, corpus_root: str | Path, cache_dir: str | Path,
                 force: bool = False) -> PretrainResult:
    root = Path(corpus_root).resolve()
    cache = Path(cache_dir).resolve()
    fingerprint = corpus_fingerprint(root)
    key = cache_key(config, fingerprint)
    final = cache / key
    if not force and (final / MODEL_FILE).is_file() and (final / META_FILE).is_file():
        return PretrainResult(final / MODEL_FILE, json.loads((final / META_FILE).read_text()), cached=True)

    from dialclip_ray.model.backbone import register_model_configs

    register_model_configs()
    ensure_ray(num_cpus=config.workers)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    state, log = _train(config, root, cache / RAY_RUNS, f"pretrain-{key}", fresh=force)
    train_s = time.time() - t0

    with staging_dir(final) as tmp:  # --force/overwrite: the old one is swapped aside, then dropped
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp / MODEL_FILE)
        t1 = time.time()
        metrics = evaluate_checkpoint(config.model_name, tmp / MODEL_FILE, root, config.eval_splits,
                                      config.eval_batch_size, config.eval_max_images)
        plot_curve(log, tmp / CURVE_FILE, f"{config.model_name} pretraining ({key})")
        meta = {"key": key, "config": config.model_dump(mode="json"), "seed": config.seed,
                "corpus_root": str(root), "corpus_fingerprint": fingerprint,
                "created": datetime.now(timezone.utc).isoformat(), "train_s": round(train_s, 2),
                "eval_s": round(time.time() - t1, 2), "train_epochs": log["epochs"],
                "final_loss": log["epochs"][-1]["loss"] if log["epochs"] else None,
                "first_loss": log["steps"][0][1] if log["steps"] else None,
                "steps": log["epochs"][-1]["step"] if log["epochs"] else 0,
                "metrics": metrics, "files": {"model": MODEL_FILE, "curve": CURVE_FILE}}
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
    shutil.rmtree(cache / RAY_RUNS / f"pretrain-{key}", ignore_errors=True)  # the artifact supersedes it
    return PretrainResult(final / MODEL_FILE, meta, cached=False)


def pretrain(config: PretrainConfig, corpus_root: str | Path, cache_dir: str | Path, force: bool = False) -> Path:
    """Train (or reuse) the small CLIP for ``corpus_root``; return the open_clip checkpoint path."""
    return run_pretrain(config, corpus_root, cache_dir, force).path
