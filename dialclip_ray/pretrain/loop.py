"""The Ray Train worker loop: data-parallel open_clip training with ``ClipLoss``.

Each worker builds the model from its open_clip config (``pretrained=None``),
wraps it with ``prepare_model`` (DDP, gloo on CPU) and trains on its shard of
the training captions. ``ClipLoss(local_loss=True, gather_with_grad=True)``
gives every rank the global batch as negatives at local-loss cost, as in
open_clip's own distributed training. Every epoch all ranks call
``ray.train.report``; rank 0 attaches a checkpoint (weights, optimizer,
scheduler, step log) so a rerun with the same run name resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dialclip_ray.runtime import AmpStep, warmup_cosine

STATE_FILE = "state.pt"
LOG_FILE = "log.json"


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's rule: no decay on gains, biases, embeddings' scale and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class _Job:
    """What one Train worker builds once and every epoch uses."""
    cfg: Any
    rank: int
    world: int
    loader: Any
    sampler: Any
    generator: torch.Generator | None  # the single-worker sampler's, reseeded per epoch
    model: torch.nn.Module  # DDP-wrapped when world > 1
    inner: torch.nn.Module  # the unwrapped ClipForTraining
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp: AmpStep
    total: int  # optimizer steps of the whole run


def _loader(cfg, root: Path, rank: int, world: int, preprocess, tokenizer):
    """(loader, sampler, generator) over this rank's shard of the training captions."""
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    from dialclip_ray.pretrain.data import CaptionDataset, read_captions

    rows = [r for r in read_captions(root) if r.split == cfg.train_split]
    if len(rows) < cfg.batch_size:
        raise ValueError(f"{root}: only {len(rows)} captions in split {cfg.train_split!r}, "
                         f"fewer than batch_size={cfg.batch_size}")
    dataset = CaptionDataset(root, rows, preprocess, tokenizer, cache_images=cfg.cache_images and not cfg.augment)
    generator = None
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
    else:
        generator = torch.Generator()
        sampler = RandomSampler(dataset, generator=generator)
    loader = DataLoader(dataset, batch_size=cfg.per_worker_batch, sampler=sampler, drop_last=True)
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False), sampler, generator


def _setup(loop_config: dict[str, Any]) -> _Job:
    """Threads, the model from its open_clip config, data, ClipLoss, optimizer, schedule and AMP."""
    import open_clip
    import ray.train
    import ray.train.torch

    from dialclip_ray.model.backbone import register_model_configs
    from dialclip_ray.pretrain.config import PretrainConfig
    from dialclip_ray.pretrain.encode import ClipForTraining

    logging.getLogger().setLevel(logging.WARNING)  # open_clip logs model-creation details at INFO
    cfg = PretrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker or max(1, _cpu_cores() // cfg.workers))
    device = ray.train.torch.get_device()

    register_model_configs()
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(cfg.model_name, pretrained=None)
    loader, sampler, generator = _loader(cfg, Path(loop_config["corpus_root"]), rank, world,
                                         preprocess_train if cfg.augment else preprocess_val,
                                         open_clip.get_tokenizer(cfg.model_name))
    model = ray.train.torch.prepare_model(ClipForTraining(clip))
    inner = model.module if hasattr(model, "module") else model
    loss_fn = open_clip.loss.ClipLoss(local_loss=cfg.local_loss and world > 1,
                                      gather_with_grad=cfg.local_loss and world > 1,
                                      cache_labels=True, rank=rank, world_size=world)
    optimizer = torch.optim.AdamW(_param_groups(inner, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    total = min(cfg.max_steps or 10**12, len(loader) * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(cfg.warmup_steps, total // 4), total))
    amp = "none"
    if device.type == "cuda":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return _Job(cfg, rank, world, loader, sampler, generator, model, inner, loss_fn, optimizer, scheduler,
                AmpStep(device, amp), total)


def _restore(job: _Job) -> tuple[int, int, dict]:
    """(start epoch, step, log) from Ray Train's latest checkpoint of this run, else a fresh start."""
    import ray.train
    import ray.train.torch

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, 0, {"steps": [], "epochs": []}
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location=ray.train.torch.get_device(), weights_only=True)
        log = json.loads((Path(d) / LOG_FILE).read_text())
    job.inner.clip.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1, int(state["step"]), log


def _train_epoch(job: _Job, epoch: int, step: int, log: dict) -> tuple[list[float], int, int]:
    """One epoch (or up to the step limit); returns (step losses, samples seen globally, step count)."""
    from torch.utils.data import DistributedSampler
    from tqdm import tqdm

    if isinstance(job.sampler, DistributedSampler):
        job.sampler.set_epoch(epoch)
    else:  # per-epoch seed: a resumed run sees the same order as an uninterrupted one
        job.generator.manual_seed(job.cfg.seed * 100_003 + epoch)
    job.model.train()
    losses, seen = [], 0
    bar = tqdm(job.loader, desc=f"pretrain epoch {epoch + 1}/{job.cfg.epochs}", disable=job.rank != 0,
               mininterval=10, leave=False)
    for images, tokens in bar:
        with job.amp.autocast():
            image_f, text_f, scale = job.model(images, tokens)
            loss = job.loss_fn(image_f, text_f, scale)
        job.amp.backward_and_step(loss, job.optimizer, job.scheduler)
        with torch.no_grad():  # open_clip clamps the temperature at 100
            job.inner.clip.logit_scale.clamp_(0, math.log(100))
        step += 1
        seen += images.shape[0] * job.world
        losses.append(loss.item())
        log["steps"].append([step, losses[-1]])
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step >= job.total:
            break
    return losses, seen, step


def _report(job: _Job, metrics: dict, epoch: int, step: int, log: dict) -> None:
    """Every rank reports (a barrier); rank 0 attaches weights, optimizer, scheduler and the step log."""
    import ray.train

    if job.rank != 0:
        ray.train.report(metrics)
        return
    print(json.dumps({"pretrain": metrics}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": {k: v.detach().cpu() for k, v in job.inner.clip.state_dict().items()},
                    "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict(),
                    "epoch": epoch, "step": step}, Path(tmp) / STATE_FILE)
        (Path(tmp) / LOG_FILE).write_text(json.dumps(log))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: set up, resume from this run's latest checkpoint, then train and report per epoch."""
    job = _setup(loop_config)
    start_epoch, step, log = _restore(job)
    for epoch in range(start_epoch, job.cfg.epochs):
        if step >= job.total:
            break
        t0 = time.time()
        losses, seen, step = _train_epoch(job, epoch, step, log)
        elapsed = time.time() - t0
        metrics = {"epoch": epoch + 1, "step": step, "loss": sum(losses) / max(1, len(losses)),
                   "lr": job.scheduler.get_last_lr()[-1],
                   "logit_scale": float(job.inner.clip.logit_scale.detach().exp()),
                   "samples_per_s": seen / max(elapsed, 1e-9), "epoch_s": elapsed}
        log["epochs"].append(metrics)
        _report(job, metrics, epoch, step, log)
