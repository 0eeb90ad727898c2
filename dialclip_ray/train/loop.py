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
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dialclip_ray.model.batch import TARGET_TYPES
from dialclip_ray.model.checkpoint import read_checkpoint, save_checkpoint
from dialclip_ray.data.dataset import CanonicalDataset, ReaderConfig, make_train_loader
from dialclip_ray.evaluation.local import evaluate_model
from dialclip_ray.features.store import FeatureStore, open_for_model
from dialclip_ray.model.dialclip import build_model
from dialclip_ray.model.params import parameter_report
from dialclip_ray.runtime import AmpStep, warmup_cosine
from dialclip_ray.train.config import TrainConfig

STATE_FILE = "train_state.pt"


def _interleave(lengths: list[int]) -> list[int]:
    """A fixed order of loader indices that spreads each loader's batches evenly over the epoch."""
    slots = [((j + 0.5) / n, i) for i, n in enumerate(lengths) for j in range(n)]
    return [i for _, i in sorted(slots)]


def build_loaders(cfg: TrainConfig, backbone, reader: ReaderConfig, prepare,
                  stores: dict[str, FeatureStore | None] | None = None) -> list:
    """One loader per dataset and target type; ``stores`` maps a dataset dir to its frozen feature store."""
    loaders = []
    for path in cfg.data.train:
        ds = CanonicalDataset.load(path)
        for ttype in TARGET_TYPES:
            if not ds.examples(cfg.data.train_split, ttype):
                continue
            loader = make_train_loader(ds, cfg.data.train_split, ttype, backbone.tokenizer, backbone.preprocess_train,
                                       reader, cfg.optim.batch_size, shuffle=True, seed=cfg.run.seed,
                                       num_workers=cfg.data.loader_workers, drop_last=True,
                                       max_examples=cfg.data.max_train_examples,
                                       features=(stores or {}).get(path))
            loaders.append(prepare(loader))
    if not loaders:
        raise ValueError(f"no training examples in split {cfg.data.train_split!r} of {cfg.data.train}")
    return loaders


def validate(model, backbone, cfg: TrainConfig, reader: ReaderConfig, device,
             stores: dict[str, FeatureStore | None] | None = None) -> dict:
    """Validation Sum averaged over datasets, plus each dataset's per-type metrics (flattened)."""
    flat, sums = {}, []
    for path in cfg.data.train:
        ds = CanonicalDataset.load(path)
        res = evaluate_model(model, backbone, ds, cfg.data.val_split, reader, cfg.optim.eval_batch_size, device,
                             cfg.data.max_val_examples, features=(stores or {}).get(path))
        if not res["per_type"]:
            continue
        sums.append(res["sum"])
        for rtype, m in res["per_type"].items():
            for key in ("R@1", "R@5", "R@10", "Sum", "MRR"):
                flat[f"val/{ds.source}/{rtype}/{key}"] = m[key]
    flat["val_sum"] = sum(sums) / len(sums) if sums else 0.0
    return flat


@dataclass
class _Worker:
    """What one Train worker builds once and every epoch uses."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    backbone: object
    reader: ReaderConfig
    trainable: list
    optimizer: torch.optim.Optimizer | None
    stores: dict[str, FeatureStore | None]
    step_seconds: list[float]
    first_step_unix: float | None = None
    launched_unix: float | None = None   # when the driver called fit(): start-up = first step - this
    setup_seconds: float | None = None


def _setup(loop_config: dict) -> _Worker:
    """Threads, device, seed, the model (frozen backbone loaded here) and its optimizer."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.run.threads_per_worker or max(1, (os.cpu_count() or 2) // world))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)
    model, backbone = build_model(cfg.model, seed=cfg.run.seed)
    model.to(device)
    added = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("clip.")]
    groups = [{"params": added, "lr": cfg.optim.lr}]
    if cfg.model.variant == "finetune":
        groups.append({"params": [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("clip.")],
                       "lr": cfg.optim.backbone_lr})
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay) if trainable else None
    # The driver built the stores (run_training); a worker only opens them and checks their backbone.
    stores = {path: open_for_model(path, model, cfg.data.features) for path in cfg.data.train}
    return _Worker(cfg, rank, world, device, model, backbone, ReaderConfig.from_model_config(cfg.model), trainable,
                   optimizer, stores, [])


def _restore(w: _Worker, scheduler) -> tuple[int, int, list[dict]]:
    """(start epoch, step, history) from Ray Train's latest checkpoint of this run, else a fresh start.

    Weights, optimizer and LR scheduler come back from their state dicts. A checkpoint written
    before the scheduler was saved sets the schedule's position from its step count instead.
    """
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        return 0, 0, []
    with restored.as_directory() as d:
        _, state = read_checkpoint(d)
        w.model.load_state_dict(state, strict=False)
        train_state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    step = int(train_state["step"])
    if w.optimizer is not None and train_state.get("optimizer"):
        w.optimizer.load_state_dict(train_state["optimizer"])
    if scheduler is not None and train_state.get("scheduler"):
        scheduler.load_state_dict(train_state["scheduler"])
    elif scheduler is not None and step:  # legacy checkpoint: jump to the step (closed-form schedule)
        scheduler.last_epoch = step - 1
        scheduler.step()
    return int(train_state["epoch"]), step, json.loads(train_state["history_json"])


def _train_epoch(w: _Worker, ddp, loaders: list, amp: AmpStep, scheduler, epoch: int, step: int
                 ) -> tuple[list[float], int]:
    """One pass over every loader in the fixed interleaved order; returns (step losses, step count)."""
    for dl in loaders:
        if hasattr(dl.sampler, "set_epoch"):
            dl.sampler.set_epoch(epoch)
    ddp.train()
    iters = [iter(dl) for dl in loaders]
    order = _interleave([len(dl) for dl in loaders])
    progress = _progress(len(order), f"epoch {epoch + 1}/{w.cfg.optim.epochs}", w.rank)
    losses = []
    for which in order:
        t0 = time.perf_counter()
        w.first_step_unix = w.first_step_unix or time.time()
        batch = next(iters[which]).to(w.device)
        with amp.autocast():
            loss = ddp(batch)["loss"]
        amp.backward_and_step(loss, w.optimizer, scheduler)
        w.step_seconds.append(time.perf_counter() - t0)
        step += 1
        losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
    progress.close()
    return losses, step


def _epoch_metrics(w: _Worker, epoch: int, step: int, losses: list[float], seconds: float, params: dict) -> dict:
    """The metrics every rank reports for one epoch (validation by rank 0, broadcast to all)."""
    metrics = {"epoch": epoch + 1 if w.cfg.optim.epochs else 0, "step": step,
               "train_loss": sum(losses) / len(losses) if losses else float("nan"), "epoch_seconds": seconds,
               "trainable_params": params["trainable"], "trainable_percent": params["percent"],
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if w.device.type == "cuda" else 0.0,
               **_timing(w)}
    if w.rank == 0:
        metrics.update(validate(w.model, w.backbone, w.cfg, w.reader, w.device, w.stores))
    return _broadcast(metrics, w.world)


def _timing(w: _Worker) -> dict:
    """Steady-state step time (the first step of a run warms up and is left out) and start-up cost."""
    steps = w.step_seconds[1:] or w.step_seconds
    out = {"step_ms_median": 1000 * statistics.median(steps) if steps else float("nan")}
    if w.first_step_unix and w.launched_unix:
        out["startup_s"] = w.first_step_unix - w.launched_unix
    if w.setup_seconds is not None:
        out["setup_s"] = w.setup_seconds
    return out


def _report(w: _Worker, metrics: dict, history: list[dict], step: int, scheduler) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint with weights and training state."""
    import ray.train
    from ray.train import Checkpoint

    if w.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(w.model, tmp, extra={"epoch": metrics["epoch"], "metrics": metrics, "history": history,
                                             "train_config": w.cfg.model_dump(mode="json")})
        torch.save({"epoch": metrics["epoch"], "step": step, "history_json": json.dumps(history),
                    "optimizer": w.optimizer.state_dict() if w.optimizer is not None else {},
                    "scheduler": scheduler.state_dict() if scheduler is not None else {}},
                   Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: set up, resume from this run's latest checkpoint, then train, validate and report."""
    import ray.train.torch

    t_setup = time.time()
    w = _setup(loop_config)
    w.launched_unix = loop_config.get("launched_unix")
    cfg = w.cfg
    loaders = (build_loaders(cfg, w.backbone, w.reader, ray.train.torch.prepare_data_loader, w.stores)
               if cfg.optim.epochs else [])
    total = max(1, sum(len(dl) for dl in loaders) * cfg.optim.epochs)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(w.optimizer, warmup_cosine(cfg.optim.warmup_steps, total))
                 if w.optimizer is not None else None)
    start_epoch, step, history = _restore(w, scheduler)
    ddp = ray.train.torch.prepare_model(w.model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if w.trainable else w.model
    amp = AmpStep(w.device, cfg.run.amp, w.trainable, cfg.optim.grad_clip)
    params = parameter_report(w.model).as_dict()
    w.setup_seconds = time.time() - t_setup
    for epoch in range(start_epoch, max(cfg.optim.epochs, 1 if start_epoch == 0 else 0)):
        if stale_epochs(history) >= (cfg.optim.patience or float("inf")):
            break  # early stop; every rank holds the same broadcast history, so all stop together
        t0, losses = time.time(), []
        if cfg.optim.epochs:
            losses, step = _train_epoch(w, ddp, loaders, amp, scheduler, epoch, step)
        metrics = _epoch_metrics(w, epoch, step, losses, time.time() - t0, params)
        history.append(metrics)
        _report(w, metrics, history, step, scheduler)


def stale_epochs(history: list[dict]) -> int:
    """Epochs since the best validation Sum (0 when the last epoch is the best so far).

    Computed from the checkpointed history, so a resumed run stops exactly where an uninterrupted one
    would have.
    """
    if not history:
        return 0
    best = max(range(len(history)), key=lambda i: (history[i].get("val_sum", float("-inf")), -i))
    return len(history) - 1 - best


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
