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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dialclip_ray.model.batch import TARGET_TYPES
from dialclip_ray.model.checkpoint import CorruptCheckpointError, read_checkpoint, save_checkpoint
from dialclip_ray.data.dataset import CanonicalDataset, ReaderConfig, make_train_loader
from dialclip_ray.evaluation.local import evaluate_model
from dialclip_ray import storage
from dialclip_ray.features.store import FeatureStore, open_for_model
from dialclip_ray.model.dialclip import build_model
from dialclip_ray.model.params import parameter_report
from dialclip_ray.runtime import AmpStep, warmup_cosine
from dialclip_ray.train.config import TrainConfig
from dialclip_ray.train.plots import StepLog

STATE_FILE = "train_state.pt"


def _interleave(lengths: list[int]) -> list[int]:
    """A fixed order of loader indices that spreads each loader's batches evenly over the epoch."""
    slots = [((j + 0.5) / n, i) for i, n in enumerate(lengths) for j in range(n)]
    return [i for _, i in sorted(slots)]


def build_loaders(cfg: TrainConfig, backbone, reader: ReaderConfig, prepare,
                  stores: dict[str, FeatureStore | None] | None = None, rank: int = 0, world: int = 1) -> list:
    """One loader per dataset and target type; ``stores`` maps a dataset dir to its frozen feature store.

    Each loader's sampler is an ``EpochSampler`` sharded by rank (so ``prepare`` must not add its own):
    an epoch's order is a function of (seed, epoch), which is what makes resuming exact.
    """
    loaders = []
    for path in cfg.data.train:
        ds = CanonicalDataset.load(path)
        for ttype in TARGET_TYPES:
            if not ds.examples(cfg.data.train_split, ttype):
                continue
            transform = backbone.preprocess_val if cfg.data.target_transform == "eval" else backbone.preprocess_train
            loader = make_train_loader(ds, cfg.data.train_split, ttype, backbone.tokenizer, transform,
                                       reader, cfg.optim.batch_size, shuffle=True, seed=cfg.run.seed,
                                       num_workers=cfg.data.loader_workers, drop_last=True,
                                       max_examples=cfg.data.max_train_examples,
                                       features=(stores or {}).get(path), rank=rank, world=world)
            loaders.append(prepare(loader))
    if not loaders:
        raise ValueError(f"no training examples in split {cfg.data.train_split!r} of {cfg.data.train}")
    return loaders


def validate(model, backbone, cfg: TrainConfig, reader: ReaderConfig, device,
             stores: dict[str, FeatureStore | None] | None = None) -> dict:
    """Validation Sum averaged over tasks (each dataset's retrieval types), plus every task's metrics (flattened).

    Tasks weigh equally, as the benchmark's test comparison does (PhotoChat-style photos, MMDialog-style
    photos, MMDialog-style replies): averaging per dataset first gave PhotoChat half the weight.
    """
    flat, sums = {}, []
    for path in cfg.data.train:
        ds = CanonicalDataset.load(path)
        res = evaluate_model(model, backbone, ds, cfg.data.val_split, reader, cfg.optim.eval_batch_size, device,
                             cfg.data.max_val_examples, features=(stores or {}).get(path))
        if not res["per_type"]:
            continue
        for rtype, m in res["per_type"].items():
            sums.append(m["Sum"])
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
    example_log: Any = None  # open text file when run.example_log is on
    steps: StepLog | None = None  # rank 0's per-step metrics
    node: str = ""  # Ray node id (several-node runs: which node did what)


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


@dataclass
class _Position:
    """Where training stands: ``epoch`` epochs complete, ``batch`` batches of the next one done."""
    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    epoch_losses: list = field(default_factory=list)  # losses of the epoch in progress (mid-epoch resume)
    steps: list = field(default_factory=list)  # rank 0's per-step rows so far (StepLog), kept across resumes


def _restore(w: _Worker, scheduler) -> _Position:
    """The position, weights, optimizer, scheduler and RNG state of the latest readable checkpoint.

    Ray Train hands over its latest checkpoint; if that one is unreadable (truncated, corrupt), the
    error names the file and the run falls back to the newest good checkpoint in its storage dir.
    """
    import ray.train

    restored = ray.train.get_checkpoint()
    if restored is None:
        return _Position()
    with restored.as_directory() as d:
        loaded = _load_state(Path(d))
    if loaded is None:
        loaded = _fallback_state(w.cfg)
    if loaded is None:
        raise RuntimeError(f"run {w.cfg.run.name}: no readable checkpoint to resume from (see the errors above)")
    state, train_state = loaded
    load_trainable_strict(w.model, state, w.cfg.run.name)
    step = int(train_state["step"])
    if w.optimizer is not None and train_state.get("optimizer"):
        w.optimizer.load_state_dict(train_state["optimizer"])
    if scheduler is not None and train_state.get("scheduler"):
        scheduler.load_state_dict(train_state["scheduler"])
    elif scheduler is not None and step:  # legacy checkpoint: jump to the step (closed-form schedule)
        scheduler.last_epoch = step - 1
        scheduler.step()
    rng = train_state.get("torch_rng")
    if rng:  # augmentation draws continue as if never interrupted (same world size: each rank its own)
        torch.set_rng_state(rng[w.rank] if w.rank < len(rng) else rng[0])
    return _Position(int(train_state["epoch"]), int(train_state.get("batch_in_epoch", 0)), step,
                     json.loads(train_state["history_json"]), list(train_state.get("epoch_losses", [])),
                     json.loads(train_state.get("steps_json", "[]")))


class ResumeMismatchError(RuntimeError):
    """A checkpoint whose trainable tensors do not fit the model being resumed."""


def load_trainable_strict(model: torch.nn.Module, state: dict, run: str) -> None:
    """Load a checkpoint's trainable state, refusing missing, unexpected or misshapen tensors.

    The checkpoint holds only the trainable tensors (the frozen backbone is identified, not
    stored), so ``strict=True`` over the whole model cannot apply; this is strict over exactly the
    tensors a checkpoint must hold: every trainable one, nothing else, each of the same shape.
    """
    own = model.state_dict()
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise ResumeMismatchError(
            f"run {run}: the checkpoint does not fit the model being resumed: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shape {shapes[:5]} (a changed model config: "
            f"use a new run name)")
    model.load_state_dict(state, strict=False)


def _load_state(directory: Path) -> tuple[dict, dict] | None:
    """(model state, training state) of one checkpoint dir, or None (with the reason printed) if unreadable."""
    try:
        _, state = read_checkpoint(directory)
        file = directory / STATE_FILE
        try:
            train_state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CorruptCheckpointError(f"{file}: training state is truncated or corrupt "
                                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
        return state, train_state
    except (CorruptCheckpointError, FileNotFoundError) as exc:
        print(f"[dialclip] cannot resume from {directory}: {exc}", flush=True)
        return None


def _fallback_state(cfg: TrainConfig) -> tuple[dict, dict] | None:
    """The newest readable checkpoint of this run in its storage dir (newest first by position)."""
    run_dir = storage.join(storage.normalize(cfg.run.storage_path), cfg.run.name)
    candidates = [storage.join(run_dir, n) for n in storage.list_names(run_dir) if n.startswith("checkpoint_")]
    candidates = [d for d in candidates if storage.is_file(storage.join(d, STATE_FILE))]
    for directory in sorted(candidates, key=storage.name_of, reverse=True):  # Ray names them by time
        with storage.local_dir(directory, fresh=True) as here:
            loaded = _load_state(here)
        if loaded is not None:
            print(f"[dialclip] resuming from the previous good checkpoint {directory}", flush=True)
            return loaded
    return None


def _epoch_order(loaders: list, epoch: int, skip: int) -> list[int]:
    """The epoch's interleaved batch order after its first ``skip`` batches; samplers positioned to match."""
    full = [dl.sampler.num_samples // dl.batch_size if dl.drop_last else -(-dl.sampler.num_samples // dl.batch_size)
            for dl in loaders]
    order = _interleave(full)
    for i, dl in enumerate(loaders):
        dl.sampler.set_position(epoch, order[:skip].count(i) * dl.batch_size)
    return order[skip:]


def _train_epoch(w: _Worker, ddp, loaders: list, amp: AmpStep, scheduler, epoch: int, pos: "_Position",
                 checkpoint: "Callable[[_Position], None]") -> "_Position":
    """One pass over every loader in the fixed interleaved order, from batch ``pos.batch`` of ``epoch``.

    Every ``run.checkpoint_every_steps`` steps (not at the epoch's end, which has its own checkpoint
    with validation) ``checkpoint`` is called with the position reached.
    """
    ddp.train()
    order = _epoch_order(loaders, epoch, pos.batch)
    iters = [iter(dl) for dl in loaders]
    done = pos.batch + len(order)
    progress = _progress(done, f"epoch {epoch + 1}/{w.cfg.optim.epochs}", w.rank, initial=pos.batch)
    every = w.cfg.run.checkpoint_every_steps
    for which in order:
        t0 = time.perf_counter()
        w.first_step_unix = w.first_step_unix or time.time()
        batch = next(iters[which]).to(w.device)
        with amp.autocast():
            loss = ddp(batch)["loss"]
        lr = w.optimizer.param_groups[0]["lr"] if w.optimizer is not None else 0.0
        amp.backward_and_step(loss, w.optimizer, scheduler)
        w.step_seconds.append(time.perf_counter() - t0)
        pos.step, pos.batch = pos.step + 1, pos.batch + 1
        pos.epoch_losses.append(loss.item())
        if w.steps is not None:
            core = getattr(ddp, "module", ddp)
            w.steps.add(step=pos.step, epoch=epoch + 1, retrieval_type=_rtype(batch.target_type),
                        loss=pos.epoch_losses[-1], lr=lr, logit_scale=float(core.temperature_scale().detach()),
                        samples_per_s=len(batch) * w.world / max(w.step_seconds[-1], 1e-9))
        if w.example_log is not None:
            w.example_log.write(json.dumps({"epoch": epoch, "batch": pos.batch, "step": pos.step, "t": time.time(),
                                            "pid": os.getpid(), "node": w.node, "ids": list(batch.example_ids)}) + "\n")
            w.example_log.flush()
        progress.update(1)
        progress.set_postfix(loss=f"{pos.epoch_losses[-1]:.3f}")
        if every and pos.step % every == 0 and pos.batch < done:
            checkpoint(pos)
    progress.close()
    return pos


def _epoch_metrics(w: _Worker, epoch: int, step: int, losses: list[float], seconds: float, params: dict) -> dict:
    """The metrics every rank reports for one epoch (validation by rank 0, broadcast to all)."""
    metrics = {"epoch": epoch + 1 if w.cfg.optim.epochs else 0, "step": step,  # epoch -1: before training
               "train_loss": sum(losses) / len(losses) if losses else float("nan"), "epoch_seconds": seconds,
               "trainable_params": params["trainable"], "trainable_percent": params["percent"],
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if w.device.type == "cuda" else 0.0,
               **_timing(w)}
    if w.rank == 0:
        metrics.update(_step_summary(w.steps.rows if w.steps is not None else [], epoch + 1))
        metrics.update(validate(w.model, w.backbone, w.cfg, w.reader, w.device, w.stores))
    return _broadcast(metrics, w.world)


def _step_summary(rows: list[dict], epoch: int) -> dict:
    """Per-epoch means of the step log: loss per retrieval type, last lr and logit scale, median samples/s."""
    rows = [r for r in rows if r["epoch"] == epoch]
    if not rows:
        return {}
    out = {}
    for rtype in dict.fromkeys(r["retrieval_type"] for r in rows):
        losses = [r["loss"] for r in rows if r["retrieval_type"] == rtype]
        out[f"train_loss/{rtype}"] = sum(losses) / len(losses)
    out.update(lr=rows[-1]["lr"], logit_scale=rows[-1]["logit_scale"],
               samples_per_s=statistics.median(r["samples_per_s"] for r in rows))
    return out


def _timing(w: _Worker) -> dict:
    """Steady-state step time (the first step of a run warms up and is left out) and start-up cost."""
    steps = w.step_seconds[1:] or w.step_seconds
    out = {"step_ms_median": 1000 * statistics.median(steps) if steps else float("nan")}
    if w.first_step_unix and w.launched_unix:
        out["startup_s"] = w.first_step_unix - w.launched_unix
    if w.setup_seconds is not None:
        out["setup_s"] = w.setup_seconds
    return out


def _report(w: _Worker, metrics: dict, pos: _Position, scheduler) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint with weights and training state.

    ``pos.batch == 0`` is an epoch-end checkpoint (validated); otherwise a mid-epoch one, marked
    ``partial`` and never chosen as the best.
    """
    import ray.train
    from ray.train import Checkpoint

    rng = _gather_rng(w)
    if w.rank != 0:
        ray.train.report(metrics)
        return
    partial = pos.batch > 0
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(w.model, tmp, extra={"epoch": pos.epoch, "batch_in_epoch": pos.batch, "partial": partial,
                                             "metrics": metrics, "history": pos.history,
                                             "train_config": w.cfg.model_dump(mode="json")})
        torch.save({"epoch": pos.epoch, "batch_in_epoch": pos.batch, "step": pos.step,
                    "epoch_losses": pos.epoch_losses if partial else [],
                    "history_json": json.dumps(pos.history), "torch_rng": rng,
                    "steps_json": json.dumps(w.steps.rows if w.steps is not None else []),
                    "optimizer": w.optimizer.state_dict() if w.optimizer is not None else {},
                    "scheduler": scheduler.state_dict() if scheduler is not None else {}},
                   Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _gather_rng(w: _Worker) -> list[torch.Tensor]:
    """Every rank's torch RNG state (augmentation draws), so each rank resumes its own stream."""
    state = torch.get_rng_state()
    if w.world == 1 or not torch.distributed.is_initialized():
        return [state]
    states: list = [None] * w.world
    torch.distributed.all_gather_object(states, state)
    return states


def _partial_metrics(pos: _Position) -> dict:
    """What a mid-epoch checkpoint reports: no validation, so its score sorts below every real one."""
    return {"epoch": pos.epoch, "step": pos.step, "batch_in_epoch": pos.batch, "partial": 1,
            "train_loss": sum(pos.epoch_losses) / max(1, len(pos.epoch_losses)), "val_sum": float("nan")}


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry: set up, resume from this run's latest checkpoint, then train, validate and report."""
    from functools import partial

    import ray
    import ray.train.torch

    t_setup = time.time()
    w = _setup(loop_config)
    w.launched_unix = loop_config.get("launched_unix")
    cfg = w.cfg
    prepare = partial(ray.train.torch.prepare_data_loader, add_dist_sampler=False)
    loaders = build_loaders(cfg, w.backbone, w.reader, prepare, w.stores, w.rank, w.world) if cfg.optim.epochs else []
    total = max(1, sum(len(dl) for dl in loaders) * cfg.optim.epochs)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(w.optimizer, warmup_cosine(cfg.optim.warmup_steps, total))
                 if w.optimizer is not None else None)
    pos = _restore(w, scheduler)
    ddp = ray.train.torch.prepare_model(w.model, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if w.trainable else w.model
    amp = AmpStep(w.device, cfg.run.amp, w.trainable, cfg.optim.grad_clip)
    params = parameter_report(w.model).as_dict()
    w.setup_seconds = time.time() - t_setup
    w.example_log = _open_example_log(cfg, w.rank)
    if w.rank == 0:
        w.steps = StepLog(storage.join(storage.normalize(cfg.run.storage_path), cfg.run.name), pos.steps,
                          cfg.run.tensorboard)
    w.node = ray.get_runtime_context().get_node_id()
    checkpoint = lambda p: _report(w, _partial_metrics(p), p, scheduler)  # noqa: E731
    if cfg.optim.validate_at_start and cfg.optim.epochs and not pos.history and pos.step == 0:
        start = _epoch_metrics(w, -1, 0, [], 0.0, params)  # epoch 0: the model as built, a candidate best
        pos.history.append(start)
        _report(w, start, pos, scheduler)
    for epoch in range(pos.epoch, max(cfg.optim.epochs, 1 if pos.epoch == 0 else 0)):
        if stale_epochs(pos.history) >= (cfg.optim.patience or float("inf")):
            break  # early stop; every rank holds the same broadcast history, so all stop together
        t0 = time.time()
        if cfg.optim.epochs:
            pos = _train_epoch(w, ddp, loaders, amp, scheduler, epoch, pos, checkpoint)
        metrics = _epoch_metrics(w, epoch, pos.step, pos.epoch_losses, time.time() - t0, params)
        pos.history.append(metrics)
        pos.epoch, pos.batch, pos.epoch_losses = metrics["epoch"], 0, []
        _report(w, metrics, pos, scheduler)
        if w.steps is not None:  # curves redrawn every epoch, at per-step resolution
            w.steps.flush(pos.history, title=cfg.run.name)


def _rtype(target_type: str) -> str:
    from dialclip_ray.model.batch import RETRIEVAL_TYPES

    return RETRIEVAL_TYPES[TARGET_TYPES.index(target_type)]


def stale_epochs(history: list[dict]) -> int:
    """Epochs since the best validation Sum (0 when the last epoch is the best so far).

    Computed from the checkpointed history, so a resumed run stops exactly where an uninterrupted one
    would have.
    """
    if not history:
        return 0
    best = max(range(len(history)), key=lambda i: (history[i].get("val_sum", float("-inf")), -i))
    return len(history) - 1 - best


def _open_example_log(cfg: TrainConfig, rank: int):
    """This rank's append-only example-id log when ``run.example_log`` is on (else None)."""
    if not cfg.run.example_log:
        return None
    if storage.is_uri(cfg.run.storage_path):
        raise ValueError(f"run.example_log appends to local files; storage_path {cfg.run.storage_path} is "
                         f"object storage (switch example_log off, or use a shared filesystem)")
    directory = Path(cfg.run.storage_path) / cfg.run.name / "example_log"
    directory.mkdir(parents=True, exist_ok=True)
    return open(directory / f"rank{rank}.jsonl", "a", encoding="utf-8")


def _broadcast(metrics: dict, world: int) -> dict:
    """Rank 0's metrics on every rank, so every rank reports the same values."""
    if world == 1 or not torch.distributed.is_initialized():
        return metrics
    box = [metrics]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _progress(total: int, desc: str, rank: int, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=rank != 0, mininterval=2.0)
