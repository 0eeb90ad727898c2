"""The one owner of the Ray runtime and of the training mechanics the training loops share.

- ``ensure_ray``: how every library entry point joins or starts Ray (one sizing rule).
- ``actor_pool``: the resources of every Ray Data encoder pool (features, evaluation, index):
  asked for, never read off the cluster, so an autoscaler sees the GPU demand.
- ``build_trainer``: the one ``TorchTrainer`` construction (``dialclip train``, sweep
  trials and CLIP pretraining), so failure handling and checkpoint retention cannot drift.
- ``warmup_cosine``: the one learning-rate schedule; loops resume it from the scheduler's
  ``state_dict`` (saved with every checkpoint), never by replaying steps.
- ``AmpStep``: the one mixed-precision optimisation step (autocast, loss scaling, clipping).
"""

from __future__ import annotations

import math
import os
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch

DEFAULT_LOCAL_CPUS = 4
CPUS_ENV = "DIALCLIP_RAY_CPUS"
LOG_LEVEL_ENV = "DIALCLIP_RAY_LOG_LEVEL"
# Driver settings every Ray worker of the job must see too (weights cache, download cache).
FORWARDED_ENV = ("DIALCLIP_WEIGHTS_DIR", "DIALCLIP_CACHE_DIR")


def disable_usage_stats() -> None:
    """Turn off Ray's usage reporting before a cluster starts (the head reads it at start-up).

    The one place the package sets it; scripts that call ``ray.init`` themselves call this first.
    An explicit ``RAY_USAGE_STATS_ENABLED`` in the environment is respected.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def local_cpus(num_cpus: float = 1) -> int:
    """Logical CPUs of a local cluster: ``max(what the job needs, DIALCLIP_RAY_CPUS or 4)``.

    A fixed small floor, not the host's core count: on a 2-core machine Ray would otherwise size
    itself from the host, and a floor of 4 lets fractional-CPU tasks (Serve replicas, sweep
    trials) sit beside the workers. Never below the job's need, or its placement would wait forever.
    """
    floor = int(os.environ.get(CPUS_ENV) or DEFAULT_LOCAL_CPUS)
    if floor < 1:
        raise ValueError(f"{CPUS_ENV} must be a positive integer, got {floor}")
    return max(math.ceil(num_cpus), floor)


def ensure_ray(num_cpus: float = 1, num_gpus: int | None = None) -> None:
    """Make sure this process is connected to Ray; ``num_cpus`` is what the calling job needs.

    Library entry points that use Ray (training, sweeps, pretraining, evaluation, index and
    feature builds, the demo, serving) call this themselves; CLI commands do not size Ray.
    An already-connected process is left alone; with ``RAY_ADDRESS`` set (``ray job submit``)
    the existing cluster is joined; otherwise a local cluster of ``local_cpus(num_cpus)``
    logical CPUs starts (GPUs detected unless ``num_gpus`` says otherwise).
    """
    import ray

    if ray.is_initialized():
        return
    disable_usage_stats()
    # WARNING by default: "waiting for resources", autoscaler and placement warnings stay visible.
    logging = ray.LoggingConfig(encoding="TEXT", log_level=os.environ.get(LOG_LEVEL_ENV, "WARNING").upper())
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    runtime_env = {"env_vars": env} if env else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", logging_config=logging, runtime_env=runtime_env)
    else:
        # address="local": a new cluster even where `ray start` left one behind (ray.init() would join it).
        # The dashboard hosts the State API that Ray Train V2 uses to clean up placement groups.
        ray.init(address="local", num_cpus=local_cpus(num_cpus), num_gpus=num_gpus, include_dashboard=True,
                 logging_config=logging, runtime_env=runtime_env)


def actor_pool(actors: int, gpus_per_actor: float = 0.0, cpus_per_actor: float | None = None) -> dict:
    """``map_batches`` keyword arguments for a pool of ``actors`` encoder actors.

    ``gpus_per_actor`` is requested (``num_gpus``), so the actors wait for, and an autoscaler adds,
    GPU nodes; 0 means CPU actors. CPUs default to 0.5 per CPU actor and 0.25 beside a GPU (the
    card does the work; the CPU share only decodes and tokenises).
    """
    from ray.data import ActorPoolStrategy

    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if gpus_per_actor < 0:
        raise ValueError(f"gpus_per_actor must be >= 0, got {gpus_per_actor}")
    cpus = cpus_per_actor if cpus_per_actor is not None else (0.25 if gpus_per_actor else 0.5)
    return {"compute": ActorPoolStrategy(size=actors), "num_cpus": cpus, "num_gpus": gpus_per_actor or None}


def build_trainer(loop_fn: Callable[[dict], None], loop_config: dict[str, Any], *, name: str, storage_path: str,
                  workers: int, use_gpu: bool, max_failures: int, num_to_keep: int | None = None,
                  score_attribute: str | None = None, callbacks: list | None = None,
                  placement_strategy: str = "PACK"):
    """The ``TorchTrainer`` of every training job (Ray Train V2).

    A fixed ``name`` under ``storage_path`` is what makes a rerun resume (``get_checkpoint``);
    ``max_failures`` restarts the worker group from its latest checkpoint; with
    ``score_attribute`` the kept checkpoints are the highest-scoring ones. The storage path must
    be visible from every node (``check_shared_storage``); ``SPREAD`` puts workers on different nodes.
    """
    check_shared_storage(storage_path)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    checkpoints = CheckpointConfig(num_to_keep=num_to_keep, checkpoint_score_attribute=score_attribute,
                                   checkpoint_score_order="max")
    return TorchTrainer(
        loop_fn, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, placement_strategy=placement_strategy),
        run_config=RunConfig(name=name, storage_path=str(storage_path),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=checkpoints, callbacks=callbacks))


class StorageNotSharedError(ValueError):
    """A local storage path on a cluster where some node cannot see it."""


def check_shared_storage(storage_path: str, timeout_s: float = 60.0) -> None:
    """Refuse a storage path that a node of a several-node cluster cannot see.

    Checkpoints are written by workers and read back by the driver and by workers started on other
    nodes after a failure, so on a real cluster ``storage_path`` must be a shared filesystem (NFS,
    EFS, Lustre) mounted at the same path everywhere, or object storage (``s3://``, ``gs://``,
    which Ray Train writes to directly). A local path is tested, not trusted: a marker written here
    must be visible from a task pinned to every alive node. One node: nothing to check.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if "://" in storage_path or not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    root = Path(storage_path).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".storage-check-{uuid.uuid4().hex}"
    marker.write_text("visible")
    try:
        probe = ray.remote(num_cpus=0)(lambda p: os.path.exists(p))
        refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(marker))
            for n in nodes}
        blind = [node for node, ref in refs.items() if not ray.get(ref, timeout=timeout_s)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise StorageNotSharedError(
            f"storage_path {root} is local to some nodes: {', '.join(blind)} cannot see it. On a cluster "
            f"of several nodes use a shared filesystem mounted at the same path on every node, or "
            f"object storage (s3://bucket/runs, gs://...)")


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LambdaLR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``.

    A plain function on purpose: ``LambdaLR.state_dict`` stores callable objects' fields but not
    functions, so a resumed run that asks for more epochs decays over its new ``total``.
    """
    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return multiplier


AmpMode = Literal["bf16", "fp16", "none"]


class AmpStep:
    """One optimisation step, with mixed precision on CUDA and optional gradient clipping.

    Autocast applies on CUDA only (on CPU, bf16 autocast is slower than float32 for these
    models); fp16 needs loss scaling, so a ``GradScaler`` is enabled for it alone and
    gradients are unscaled before clipping so ``grad_clip`` is a true norm.
    """

    def __init__(self, device: torch.device | str, amp: AmpMode = "none", params: Iterable[torch.nn.Parameter] = (),
                 grad_clip: float | None = None):
        if amp not in ("bf16", "fp16", "none"):
            raise ValueError(f"amp must be 'bf16', 'fp16' or 'none', got {amp!r}")
        self.device_type = torch.device(device).type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if self.device_type == "cuda" else None
        self.params = list(params)
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype is torch.float16)

    def autocast(self) -> AbstractContextManager:
        """Context for the forward pass and the loss."""
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
        """Zero the gradients, backpropagate ``loss``, clip, step the optimizer, then the scheduler."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        if scheduler is not None:
            scheduler.step()


def wait_for_interrupt() -> None:
    """Block a foreground service (``dialclip serve``, ``demo --keep-serving``) until Ctrl-C or SIGTERM."""
    import signal
    import time

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...")
