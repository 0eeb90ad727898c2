"""The per-worker training loop run by Ray Train's ``TorchTrainer``.

Every worker loads the frozen backbone itself (it is never shipped over the
wire), wraps the model with ``prepare_model`` (DDP over gloo on CPU, NCCL on
GPU; only ``requires_grad`` parameters are all-reduced, so only the prompts,
CPG and experts are synchronised), and walks its DistributedSampler shard.
Batches hold one target type (in-batch negatives of one modality); datasets
with both are interleaved in a fixed order so every rank takes the same number
of steps. Rank 0 validates, checkpoints and keeps the metrics history inside
each checkpoint, because Ray keeps only metrics reported with a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from dialclip_ray.model.batch import TARGET_TYPES
from dialclip_ray.model.checkpoint import read_checkpoint, save_checkpoint
from dialclip_ray.data.dataset import CanonicalDataset, ReaderConfig, make_train_loader
from dialclip_ray.evaluation.local import evaluate_model
from dialclip_ray.model.dialclip import build_model
from dialclip_ray.model.params import parameter_report
from dialclip_ray.train.config import TrainConfig

STATE_FILE = "train_state.pt"


def _interleave(lengths: list[int]) -> list[int]:
    """A fixed order of loader indices that spreads each loader's batches evenly over the epoch."""
    slots = [((j + 0.5) / n, i) for i, n in enumerate(lengths) for j in range(n)]
    return [i for _, i in sorted(slots)]


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def build_loaders(cfg: TrainConfig, backbone, reader: ReaderConfig, prepare) -> list:
    loaders = []
    for path in cfg.data.train:
        ds = CanonicalDataset.load(path)
        for ttype in TARGET_TYPES:
            if not ds.examples(cfg.data.train_split, ttype):
                continue
            loader = make_train_loader(ds, cfg.data.train_split, ttype, backbone.tokenizer, backbone.preprocess_train,
                                       reader, cfg.optim.batch_size, shuffle=True, seed=cfg.run.seed,
                                       num_workers=cfg.data.loader_workers, drop_last=True,
                                       max_examples=cfg.data.max_train_examples)
            loaders.append(prepare(loader))
    if not loaders:
        raise ValueError(f"no training examples in split {cfg.data.train_split!r} of {cfg.data.train}")
    return loaders


def validate(model, backbone, cfg: TrainConfig, reader: ReaderConfig, device) -> dict:
    """Validation Sum averaged over datasets, plus each dataset's per-type metrics (flattened)."""
    flat, sums = {}, []
    for path in cfg.data.train:
        ds = CanonicalDataset.load(path)
        res = evaluate_model(model, backbone, ds, cfg.data.val_split, reader, cfg.optim.eval_batch_size, device,
                             cfg.data.max_val_examples)
        if not res["per_type"]:
            continue
        sums.append(res["sum"])
        for rtype, m in res["per_type"].items():
            for key in ("R@1", "R@5", "R@10", "Sum", "MRR"):
                flat[f"val/{ds.source}/{rtype}/{key}"] = m[key]
    flat["val_sum"] = sum(sums) / len(sums) if sums else 0.0
    return flat


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig.model_validate(loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.run.threads_per_worker or max(1, (os.cpu_count() or 2) // world))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)

    model, backbone = build_model(cfg.model, seed=cfg.run.seed)
    model.to(device)
    reader = ReaderConfig.from_model_config(cfg.model)
    added = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("clip.")]
    groups = [{"params": added, "lr": cfg.optim.lr}]
    if cfg.model.variant == "finetune":
        groups.append({"params": [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")],
                       "lr": cfg.optim.backbone_lr})
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay) if trainable else None

    history: list[dict] = []
    start_epoch, step = 0, 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            _, state = read_checkpoint(d)
            model.load_state_dict(state, strict=False)
            train_state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        start_epoch, step = int(train_state["epoch"]), int(train_state["step"])
        history = json.loads(train_state["history_json"])
        if optimizer is not None and train_state.get("optimizer"):
            optimizer.load_state_dict(train_state["optimizer"])

    loaders = build_loaders(cfg, backbone, reader, ray.train.torch.prepare_data_loader) if cfg.optim.epochs else []
    steps_per_epoch = sum(len(dl) for dl in loaders)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.optim.warmup_steps, max(1, steps_per_epoch * cfg.optim.epochs)), last_epoch=-1)
        if optimizer is not None else None)
    for _ in range(step):
        scheduler.step() if scheduler else None
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if trainable else model
    use_amp = device.type == "cuda" and cfg.run.amp != "none"
    amp_dtype = torch.bfloat16 if cfg.run.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and cfg.run.amp == "fp16")
    report_params = parameter_report(model).as_dict()

    for epoch in range(start_epoch, max(cfg.optim.epochs, 1 if start_epoch == 0 else 0)):
        t0, losses = time.time(), []
        if cfg.optim.epochs:
            for dl in loaders:
                if hasattr(dl.sampler, "set_epoch"):
                    dl.sampler.set_epoch(epoch)
            ddp.train()
            iters = [iter(dl) for dl in loaders]
            order = _interleave([len(dl) for dl in loaders])
            progress = _progress(len(order), f"epoch {epoch + 1}/{cfg.optim.epochs}", rank)
            for which in order:
                batch = next(iters[which]).to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    loss = ddp(batch)["loss"]
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                losses.append(loss.item())
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
            progress.close()
        train_s = time.time() - t0
        metrics = {"epoch": epoch + 1 if cfg.optim.epochs else 0, "step": step,
                   "train_loss": sum(losses) / len(losses) if losses else float("nan"), "epoch_seconds": train_s,
                   "trainable_params": report_params["trainable"], "trainable_percent": report_params["percent"],
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0}
        if rank == 0:
            metrics.update(validate(model, backbone, cfg, reader, device))
        metrics = _broadcast(metrics, world)
        history.append(metrics)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(model, tmp, extra={"epoch": metrics["epoch"], "metrics": metrics,
                                                   "history": history, "train_config": cfg.model_dump(mode="json")})
                torch.save({"epoch": metrics["epoch"], "step": step, "history_json": json.dumps(history),
                            "optimizer": optimizer.state_dict() if optimizer is not None else {}},
                           Path(tmp) / STATE_FILE)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _broadcast(metrics: dict, world: int) -> dict:
    """Rank 0's metrics on every rank, so every rank reports the same values."""
    if world == 1 or not torch.distributed.is_initialized():
        return metrics
    box = [metrics]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _progress(total: int, desc: str, rank: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=rank != 0, mininterval=2.0)
