"""Run a sweep: a Ray Tune ``Tuner`` over a function trainable that launches our ``TorchTrainer``.

Each trial builds the training config from the base config plus its sampled
parameters and runs the very same Train loop as ``dialclip train`` (a
``TorchTrainer`` inside the function trainable, reporting through
``TuneReportCallback``: the Ray 2.60 pattern, not ``Tuner(trainer)``). ASHA
stops weak trials on validation Sum. The trial's inner run is named after its
trial id, so a restored sweep (``Tuner.restore``) resumes unfinished trials from
their own checkpoints and leaves finished ones alone. The base config's own
values are the first point evaluated, so every sweep answers "does tuning beat
the default?" within one run.

Resources: a trial's own process (the function trainable, which only drives its
``TorchTrainer``) reserves CPU and never a GPU (``trial_resources``); the GPUs are
its Train workers', one each when ``use_gpu``, which comes from the base config
unless the command overrides it (``trial_use_gpu``). So a sweep whose
``max_concurrent`` exceeds the GPUs queues: the extra trials' workers wait for
GPUs that running trials release, instead of idle drivers holding the GPUs the
workers need (the deadlock a GPU per driver caused). ``storage`` may be an
object-store URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dialclip_ray import storage as store
from dialclip_ray.runtime import build_trainer, ensure_ray
from dialclip_ray.tuning.report import SweepOutcome, write_outputs
from dialclip_ray.tuning.space import SweepSpec, apply_params

METRIC = "val_sum"


def trial_resources(cpus_per_trial: float) -> dict:
    """What a trial's driver process reserves: CPU only (its Train workers request their own GPUs)."""
    return {"cpu": cpus_per_trial, "gpu": 0}


def trial_use_gpu(base_use_gpu: bool, override: bool | None) -> bool:
    """Whether trials' Train workers take a GPU each: the command's override, else the base config's."""
    return base_use_gpu if override is None else bool(override)


def trial_fn(config: dict[str, Any], base: dict, epochs: int, trials_dir: str, use_gpu: bool) -> None:
    """One trial: the training loop of ``dialclip train``, built by the same ``build_trainer``."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dialclip_ray.train.config import TrainConfig
    from dialclip_ray.train.loop import train_loop_per_worker

    cfg = apply_params(TrainConfig.model_validate(base), config)
    cfg.optim.epochs = epochs
    cfg.run.name = f"trial-{tune.get_context().get_trial_id()}"
    cfg.run.storage_path = trials_dir
    cfg.run.use_gpu = use_gpu
    build_trainer(train_loop_per_worker, {"train": cfg.model_dump(mode="json")}, name=cfg.run.name,
                  storage_path=trials_dir, workers=cfg.run.workers, use_gpu=use_gpu,
                  max_failures=cfg.run.max_failures, num_to_keep=1, callbacks=[TuneReportCallback()]).fit()


def _search_alg(spec: SweepSpec, default_point: dict):
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=[default_point], seed=0)
    if spec.search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(points_to_evaluate=[default_point], random_state=0,
                                     max_concurrent=spec.max_concurrent)
    return None


def run_sweep(space_path: str | Path, name: str, storage: str | Path = "runs/tune", samples: int | None = None,
              cpus_per_trial: float = 0.5, use_gpu: bool | None = None) -> SweepOutcome:
    """Run (or resume) the sweep ``name`` under ``storage``; ``use_gpu`` None keeps the base config's."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from dialclip_ray.train.config import resolve_paths
    from dialclip_ray.tuning.space import load_space

    spec, base = load_space(space_path)
    base = resolve_paths(base)
    storage = store.normalize(storage)
    sweep_dir = store.join(storage, name)
    use_gpu = trial_use_gpu(base.run.use_gpu, use_gpu)
    # a running trial holds its own CPUs plus its TorchTrainer workers' (one each)
    ensure_ray(num_cpus=spec.max_concurrent * (cpus_per_trial + base.run.workers))
    if base.data.features != "off" and base.model.variant == "dialclip":
        # Trials may switch the CPG on even where the base has it off: build each store once, up front.
        from dialclip_ray.features.build import build_feature_store

        for path in base.data.train:
            build_feature_store(path, base.model.backbone.model_name, base.model.backbone.pretrained,
                                actors=base.data.feature_actors, gpus_per_actor=base.data.feature_gpus_per_actor,
                                cache_dir=base.model.backbone.cache_dir)
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base=base.model_dump(mode="json"), epochs=spec.epochs,
                             trials_dir=str(store.join(sweep_dir, "trials")), use_gpu=use_gpu),
        trial_resources(cpus_per_trial))
    restored = tune.Tuner.can_restore(str(sweep_dir))
    if restored:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True)
    else:
        base_values = base.model_dump(mode="json")
        default_point = {k: base_values["model"].get(k, base_values["optim"].get(k)) for k in spec.params}
        param_space = {k: d.to_tune() for k, d in spec.params.items()}
        scheduler = (ASHAScheduler(max_t=spec.epochs, grace_period=spec.scheduler.grace_period,
                                   reduction_factor=spec.scheduler.reduction_factor,
                                   # epochs, not Tune's report count: a trial resumed after the sweep's
                                   # driver died counts its reports from 1 again, its epochs do not
                                   time_attr="epoch")
                     if spec.scheduler.type == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                        num_samples=1 if spec.search == "grid" else (samples or spec.samples),
                                        max_concurrent_trials=spec.max_concurrent,
                                        search_alg=_search_alg(spec, default_point)),
            run_config=tune.RunConfig(name=name, storage_path=str(storage)))
    results = tuner.fit()
    return write_outputs(results, spec, base, sweep_dir, restored)
