"""``dialclip demo``: the whole pipeline on the built-in synthetic data, in one command.

corpus -> small CLIP pretrained here -> DialCLIP prompt tuning (Ray Train, 2
workers) and full fine-tuning -> Ray Data evaluation against zero-shot CLIP
and full fine-tuning -> sharded FAISS index -> Ray Serve app on 127.0.0.1 ->
real HTTP queries -> report. Every expensive step is cached under
``runs/cache`` (keyed by its settings), so a rerun only evaluates, indexes and
serves again.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dialclip_ray.pipelines.stages import Stages


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dialogs: int = Field(1500, ge=20)
    seed: int = 0
    image_size: int = 64
    model_name: str = "dialclip-small"
    pretrained: str | None = Field("synthetic", description="the shipped stand-in tag (model/standin.py); "
                                   "None: pretrain model_name here on the corpus captions")
    pretrain_epochs: int = Field(6, ge=1, description="with pretrained None")
    epochs: int = Field(2, ge=1)
    workers: int = Field(2, ge=1)
    max_train_examples: int | None = None
    max_val_examples: int | None = 200
    shards: int = Field(2, ge=1)
    queries: int = Field(4, ge=1)
    actors: int = Field(2, ge=1)
    port: int = 8000
    out: str = "runs/demo"
    cache: str = "runs/cache"
    keep_serving: bool = False


LATEST = "latest"  # runs/demo/latest -> the newest complete demo output (see publish_latest)

TINY = dict(dialogs=40, image_size=32, model_name="dialclip-micro", pretrained=None, pretrain_epochs=1, epochs=1,
            max_train_examples=24, max_val_examples=12, queries=2, shards=2)


def _backbone(cfg: DemoConfig, corpus, cache: Path):
    """Stage 2: the shipped stand-in (no pretraining on the user's machine), or a small CLIP pretrained here.
    Returns (BackboneConfig, a name for its weights, its held-out facts)."""
    from dialclip_ray.model import standin
    from dialclip_ray.model.config import BackboneConfig
    from dialclip_ray.pipelines.experiments import ensure_small_clip

    if cfg.pretrained is not None:
        info = standin.packed_info() if standin.is_standin(cfg.model_name, cfg.pretrained) else {}
        print(f"    {cfg.model_name} + pretrained={cfg.pretrained!r}: held-out caption->image "
              f"{info.get('heldout_probe', {})}")
        return (BackboneConfig(model_name=cfg.model_name, pretrained=cfg.pretrained), cfg.pretrained,
                info.get("heldout_probe", {}))
    clip = ensure_small_clip(corpus, cache, cfg.model_name, cfg.pretrain_epochs, workers=cfg.workers)
    print(f"    {'reused' if clip.cached else 'trained'} {clip.path}: {clip.meta.get('metrics', {})}")
    return (BackboneConfig(model_name=cfg.model_name, pretrained=str(clip.path)), Path(clip.path).parent.name,
            clip.meta.get("metrics", {}))


def _train_variants(cfg: DemoConfig, stage: Stages, corpus, backbone, runs: Path, weights_name: str
                    ) -> tuple[dict, dict, dict]:
    """Stages 3-4: DialCLIP and full fine-tuning with Ray Train; zero-shot CLIP saved as a checkpoint."""
    from dialclip_ray.model.checkpoint import save_checkpoint
    from dialclip_ray.model.dialclip import build_model
    from dialclip_ray.pipelines.experiments import variant_config
    from dialclip_ray.train.run import run_training

    checkpoints, histories, run_dirs = {}, {}, {}
    for variant in ("default", "finetune"):
        stage(f"{'DialCLIP prompt tuning' if variant == 'default' else 'full fine-tuning baseline'} "
              f"(Ray Train, {cfg.workers} workers)")
        tcfg = variant_config(variant, corpus, backbone, runs, cfg.epochs, cfg.workers, cfg.seed,
                              max_train_examples=cfg.max_train_examples, max_val_examples=cfg.max_val_examples)
        outcome = run_training(tcfg)
        checkpoints[variant], histories[variant] = str(outcome.best), outcome.history
        run_dirs[variant] = outcome.run_dir
        print(f"    {'trained' if outcome.trained else 'reused'} {outcome.run_dir}")
    zs_dir = runs / "zeroshot" / f"{weights_name}-{cfg.model_name}"
    if not (zs_dir / "dialclip.pt").is_file():
        model, _ = build_model(variant_config("zeroshot", corpus, backbone, runs, 0).model)
        save_checkpoint(model, zs_dir)
    checkpoints = {"DialCLIP": checkpoints["default"], "zero-shot CLIP": str(zs_dir),
                   "full fine-tune": checkpoints["finetune"]}
    return checkpoints, histories, run_dirs


def _evaluate_index_serve(cfg: DemoConfig, stage: Stages, corpus, checkpoints: dict, out: Path
                          ) -> tuple[dict, str, list]:
    """Stages 5-7: Ray Data evaluation, the sharded index, the Serve app and real HTTP queries."""
    from ray import serve

    from dialclip_ray.index.build import build_index
    from dialclip_ray.pipelines.demo_report import ask_queries
    from dialclip_ray.pipelines.evaluate import evaluate_checkpoints
    from dialclip_ray.serving.app import build_app

    stage("evaluation on the test splits (Ray Data actor pool)")
    evaluation = {}
    for name, data in (("photochat", corpus.photochat), ("mmdialog", corpus.mmdialog)):
        evaluation[name] = evaluate_checkpoints(checkpoints, str(data), "test", str(out / f"eval_{name}"),
                                                distributed=True, actors=cfg.actors, compare=True)
        print(evaluation[name]["table"])
        print(evaluation[name].get("comparison_table", ""))

    stage(f"sharded FAISS index of every candidate ({cfg.shards} shards)")
    index_dir = out / "index"
    build_index(checkpoints["DialCLIP"], [corpus.photochat, corpus.mmdialog], index_dir, shards=cfg.shards,
                kind="flat", actors=cfg.actors)

    stage(f"Ray Serve app on http://127.0.0.1:{cfg.port} and real HTTP queries")
    app = build_app({"checkpoint": checkpoints["DialCLIP"], "index_dir": str(index_dir), "top_k": 5})
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(app, name="dialclip-demo", route_prefix="/")
    url = f"http://127.0.0.1:{cfg.port}"
    return evaluation, url, ask_queries(url, corpus, cfg.queries)


def _shutdown(owns_ray: bool) -> None:
    """Leave Ray as we found it: shut down what the demo started, else remove only its app."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        if owns_ray:
            serve.shutdown()
        else:
            serve.delete("dialclip-demo")
    finally:
        if owns_ray:
            ray.shutdown()


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns a summary (also written as ``report.json`` next to ``report.md``)."""
    import ray

    from dialclip_ray.pipelines.demo_report import write_report
    from dialclip_ray.pipelines.experiments import ensure_corpus
    from dialclip_ray.runtime import ensure_ray, wait_for_interrupt

    for noisy in ("ray.data", "ray.serve", "ray.train"):  # stage headers and our own output carry the progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_start = time.time()
    out = Path(cfg.out) / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache)
    stage = Stages(8)
    owns_ray = not ray.is_initialized()
    ensure_ray(num_cpus=max(cfg.workers, cfg.actors))
    try:
        stage("synthetic corpus in the PhotoChat and MMDialog formats (generate + prepare)")
        corpus = ensure_corpus(cache, cfg.dialogs, cfg.seed, cfg.image_size)

        stage(f"stand-in CLIP ({cfg.model_name}, " + (f"shipped weights {cfg.pretrained!r})" if cfg.pretrained
              else "pretrained here on the synthetic captions with Ray Train)"))
        backbone, weights_name, clip_metrics = _backbone(cfg, corpus, cache)
        checkpoints, histories, run_dirs = _train_variants(cfg, stage, corpus, backbone, cache / "demo_runs",
                                                           weights_name)
        evaluation, url, answers = _evaluate_index_serve(cfg, stage, corpus, checkpoints, out)

        stage("report")
        times = stage.finish()
        summary = {"config": cfg.model_dump(), "checkpoints": checkpoints, "url": url, "stage_seconds": times,
                   "total_seconds": time.time() - t_start, "pretrained_clip": clip_metrics,
                   "evaluation": {k: v["results"] for k, v in evaluation.items()}}
        report = write_report(out, summary, evaluation, histories, answers, corpus, run_dirs)
        (out / "report.json").write_text(json.dumps({**summary, "answers": answers}, indent=2, default=str))
        latest = publish_latest(out, run_dirs["default"])
        print(f"\nreport: {report}\ntotal: {summary['total_seconds']:.0f}s")
        if latest:
            print(f"latest: {latest} -> {out.name} (run/ = the DialCLIP run, index/ = its index; "
                  f"`make serve` serves them)")
        if cfg.keep_serving:
            print(f"\nThe endpoint stays up at {url} (docs: {url}/docs). Query it with\n"
                  f"  dialclip query --url {url} --dialog DIALOG.json\n"
                  f"Stop it with Ctrl-C here (or `serve shutdown` from another shell).")
            wait_for_interrupt()
        return {**summary, "report": str(report), "answers": answers, "out": str(out)}
    finally:
        stage.finish()
        _shutdown(owns_ray)


def publish_latest(out: Path, run_dir: Path) -> Path | None:
    """Stable paths to this demo's artifacts, for serve/serve_config.yaml (``make serve``):
    ``<out>/run`` -> the DialCLIP training run directory (best/, latest/, metrics) and
    ``<out parent>/latest`` -> ``<out>``, so ``runs/demo/latest/{run,index}`` name the newest demo's."""
    from dialclip_ray.rundir import publish_link

    if publish_link(out / "run", run_dir) is None:
        return None
    return publish_link(out.parent / LATEST, out)
