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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

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


def cosine_lambda(warmup: int, total: int):
    """Linear warmup then cosine decay to 0, as a LambdaLR multiplier."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import open_clip
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
    from tqdm import tqdm

    from dialclip_ray.model.backbone import register_model_configs
    from dialclip_ray.pretrain.config import PretrainConfig
    from dialclip_ray.pretrain.data import CaptionDataset, read_captions
    from dialclip_ray.pretrain.encode import ClipForTraining

    logging.getLogger().setLevel(logging.WARNING)  # open_clip logs model-creation details at INFO
    cfg = PretrainConfig.model_validate(loop_config["config"])
    root = Path(loop_config["corpus_root"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads_per_worker or max(1, _cpu_cores() // cfg.workers))
    device = ray.train.torch.get_device()

    register_model_configs()
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(cfg.model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(cfg.model_name)
    rows = [r for r in read_captions(root) if r.split == cfg.train_split]
    if len(rows) < cfg.batch_size:
        raise ValueError(f"{root}: only {len(rows)} captions in split {cfg.train_split!r}, "
                         f"fewer than batch_size={cfg.batch_size}")
    dataset = CaptionDataset(root, rows, preprocess_train if cfg.augment else preprocess_val, tokenizer,
                             cache_images=not cfg.augment)
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
    else:
        generator = torch.Generator()
        sampler = RandomSampler(dataset, generator=generator)
    loader = DataLoader(dataset, batch_size=cfg.per_worker_batch, sampler=sampler, drop_last=True)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    model = ray.train.torch.prepare_model(ClipForTraining(clip))
    inner = model.module if hasattr(model, "module") else model
    loss_fn = open_clip.loss.ClipLoss(local_loss=cfg.local_loss and world > 1,
                                      gather_with_grad=cfg.local_loss and world > 1,
                                      cache_labels=True, rank=rank, world_size=world)
    optimizer = torch.optim.AdamW(_param_groups(inner, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(loader)
    total = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(min(cfg.warmup_steps, total // 4), total))

    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_epoch, step, log = 0, 0, {"steps": [], "epochs": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
            log = json.loads((Path(d) / LOG_FILE).read_text())
        inner.clip.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])

    for epoch in range(start_epoch, cfg.epochs):
        if step >= total:
            break
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        else:  # per-epoch seed: a resumed run sees the same order as an uninterrupted one
            generator.manual_seed(cfg.seed * 100_003 + epoch)
        model.train()
        t0, losses, seen = time.time(), [], 0
        bar = tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0,
                   mininterval=10, leave=False)
        for images, tokens in bar:
            autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
            with autocast:
                image_f, text_f, scale = model(images, tokens)
                loss = loss_fn(image_f, text_f, scale)
            optimizer.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            with torch.no_grad():  # open_clip clamps the temperature at 100
                inner.clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            seen += images.shape[0] * world
            losses.append(loss.item())
            log["steps"].append([step, losses[-1]])
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step >= total:
                break
        elapsed = time.time() - t0
        metrics = {"epoch": epoch + 1, "step": step, "loss": sum(losses) / max(1, len(losses)),
                   "lr": scheduler.get_last_lr()[-1], "logit_scale": float(inner.clip.logit_scale.exp()),
                   "samples_per_s": seen / max(elapsed, 1e-9), "epoch_s": elapsed}
        log["epochs"].append(metrics)
        if rank == 0:
            print(json.dumps({"pretrain": metrics}), flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({"model": {k: v.detach().cpu() for k, v in inner.clip.state_dict().items()},
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "epoch": epoch, "step": step}, Path(tmp) / STATE_FILE)
                (Path(tmp) / LOG_FILE).write_text(json.dumps(log))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
