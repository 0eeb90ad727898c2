"""The synthetic benchmark's reusable parts; ``bench/synthetic_benchmark.py`` is the entry point.

Stages (each cached on disk by ``pipelines.experiments``, so a rerun resumes):

1. corpus at the real protocols' sizes (``BENCH_CORPUS``): PhotoChat-style 4,000 / 1,000 / 1,000
   dialogs (test: 1,000 queries against the 1,000 test photos), MMDialog-style 2,800 / 360 / 720
   conversations (test: 1,008 image and 8,238 text targets, each against its own 999 negatives;
   validation 516 / 4,160) (plus 30,000 caption-only images with ``--pretrain-backbone``);
2. the backbone: the shipped stand-in CLIP (``STANDIN_BACKBONE``, model/standin.py; its facts from
   ``standin_facts``), or with ``--pretrain-backbone`` a small CLIP pretrained on this corpus (``BACKBONE``);
3. per-variant learning rate: the same grid for every trained variant, each point a proxy run of
   200+ steps, all of them one Ray Tune sweep; the best validation Sum wins (``select_lrs``);
4. training per variant and seed, keeping the best-validation-Sum epoch (``train_variant``);
5. per-query ranks of every test query (``rank_queries``): the same queries in the same order for
   every variant, so differences can be paired;
6. statistics (``dialclip_ray.evaluation.stats``) and the results files (``write_results``).

``write_results`` takes per-variant, per-seed rank arrays and writes
``<out>.json`` (backbone, protocol, one row per variant x dataset x retrieval type x seed,
seed-and-query bootstrap summaries, paired comparisons), ``<out>.md`` and ``<out>.png``
(bars with 95% CI whiskers). Paths in the JSON are relative to the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dialclip_ray.evaluation import stats

REPO = Path(__file__).resolve().parents[2]

# Stage 1: data at the real protocols' size (design 3.2 / 3.3); see the module docstring for the counts.
BENCH_CORPUS = dict(dialogs=6000, photochat_sizes=(4000, 1000, 1000), mmdialog_sizes=(2800, 360, 720),
                    caption_images=0)
PRETRAIN_CAPTION_IMAGES = 30_000  # added to the corpus with --pretrain-backbone (pretraining-only images)
QUICK_CORPUS = dict(dialogs=220, photochat_sizes=(120, 40, 60), mmdialog_sizes=(30, 10, 12), caption_images=0)
# Stage 2: the backbone. dialclip-small (ViT 64 px / patch 8, width 128, 4 + 4 layers, 7.8 M parameters);
# one epoch over the 118,122 training captions at batch 128 (922 steps).
BACKBONE = dict(model_name="dialclip-small", epochs=1, lr=2e-3, batch_size=128, warmup_steps=50,
                eval_max_images=1000, cache_images=False)  # one pass: caching 38k images buys nothing, costs GBs
QUICK_BACKBONE = dict(model_name="dialclip-micro", epochs=1, lr=2e-3, batch_size=32, warmup_steps=5,
                      eval_max_images=1000)
# Stage 3: one grid for every trained variant, 5e-5 to 5e-3 (finetune: its backbone_lr keeps the 1:20 ratio).
LR_GRID = (5e-5, 5e-4, 5e-3)

# The comparisons the benchmark answers (a, b): "does a beat b on the same queries?"
COMPARISONS = (("finetune", "zeroshot"), ("default", "zeroshot"), ("default", "finetune"),
               ("ungated", "zeroshot"), ("ungated", "finetune"), ("default", "ungated"),
               ("paper-budget", "zeroshot"), ("default", "no-context"), ("default", "no-domain"),
               ("default", "single-expert"))
COMPARISON_METRICS = ("Sum", "R@1")
DATASETS = ("photochat", "mmdialog")


def rel(path: str | os.PathLike | None) -> str | None:
    """``path`` relative to the repository (results files must not hold machine-specific paths)."""
    if path is None:
        return None
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return os.path.relpath(p, REPO)


# ----------------------------------------------------------------------------------------------- ranks


@dataclass
class QueryRanks:
    """Ranks of one model's test queries of one dataset and retrieval type (query order fixed by the data)."""

    ranks: np.ndarray  # [Q] 1-based
    query_ids: list[str]
    candidates: int  # candidates per query (shared pool size, or the per-example list length)
    target_ids: list[str] | None = None
    top1_ids: list[str] | None = None  # the best-scored candidate per query (shared-pool protocol only)

    @property
    def queries_digest(self) -> str:
        return hashlib.sha256("\n".join(self.query_ids).encode()).hexdigest()[:16]


def first_dialogs(records: list, max_queries: int | None) -> list:
    """The records of the first dialogs holding at least ``max_queries`` queries (whole dialogs, file order);
    every record when ``max_queries`` is None. A dialog is the record id up to its last two parts
    (``mmdialog/<split>/<conversation>/<turn>/<item>``)."""
    if max_queries is None or len(records) <= max_queries:
        return list(records)
    cut = max_queries
    dialog = records[cut - 1].id.rsplit("/", 2)[0]
    while cut < len(records) and records[cut].id.rsplit("/", 2)[0] == dialog:
        cut += 1
    return list(records[:cut])


def rank_queries(model, backbone, dataset_dir: str | os.PathLike, split: str = "test", batch_size: int = 64,
                 device: str = "cpu", features: str = "auto",
                 max_queries: Mapping[str, int | None] | None = None) -> dict[str, QueryRanks]:
    """Per retrieval type (``dialog_to_image`` / ``dialog_to_text``): the rank of every query of ``split``.

    The same computation as ``evaluation.local.evaluate_model`` (its helpers, its protocols), keeping
    the per-query ranks that its summary throws away. ``features``: the frozen feature store mode
    (``auto`` builds it when missing; ``off`` runs the frozen towers). ``max_queries`` (per target
    type, e.g. ``{"text": 2500}``) keeps the queries of the first whole dialogs only (``first_dialogs``),
    which cuts the candidates to embed as well: the lever when time is short (the full test split
    is the protocol).
    """
    from dialclip_ray.data.dataset import CanonicalDataset, ReaderConfig, image_loader
    from dialclip_ray.evaluation.local import (candidate_pool, embed_images, embed_queries, embed_texts,
                                               ranks_for)
    from dialclip_ray.model.batch import RETRIEVAL_TYPES, TARGET_TYPES

    dataset = CanonicalDataset.load(dataset_dir)
    store = None
    if features != "off":
        from dialclip_ray.features.build import ensure_store
        from dialclip_ray.features.store import open_for_model

        ensure_store(dataset_dir, model.cfg, features)
        store = open_for_model(dataset_dir, model, features)
    reader = ReaderConfig.from_model_config(model.cfg)
    load = image_loader(dataset, backbone.preprocess_val)
    model.eval()
    out: dict[str, QueryRanks] = {}
    for target_type, name in zip(TARGET_TYPES, RETRIEVAL_TYPES):
        records = first_dialogs(dataset.examples(split, target_type), (max_queries or {}).get(target_type))
        if not records:
            continue
        queries = embed_queries(model, records, backbone.tokenizer, load, reader, batch_size, device, store)
        pool_ids = candidate_pool(dataset, records, split, target_type)
        pool = (embed_images(model, pool_ids, load, batch_size, device) if target_type == "image" else
                embed_texts(model, [dataset.text(t) for t in pool_ids], backbone.tokenizer,
                            reader.context_length, batch_size, device))
        ranks = ranks_for(queries, records, pool_ids, pool)
        per_example = bool(records) and all(r.candidates for r in records)
        n_cand = max(len(r.candidates) for r in records) if per_example else len(pool_ids)
        top1 = None if per_example else [pool_ids[i] for i in np.argmax(queries @ pool.T, axis=1)]
        out[name] = QueryRanks(np.asarray(ranks, dtype=np.int64), [r.id for r in records], n_cand,
                               [r.target_id for r in records], top1)
    return out


def attribute_agreement(truth_file: str | os.PathLike, qr: QueryRanks) -> dict:
    """Which attributes the top-1 photo gets right (synthetic corpora only: ``synth_truth.json``).

    Per attribute, the share of queries whose top-1 photo has the target's value, over all queries and
    over the misses (top-1 is another photo): where a model's errors come from (say, colour right,
    count wrong), the evidence a bare R@1 hides."""
    truth = json.loads(Path(truth_file).read_text())
    scenes, names = truth["photochat"], truth["attributes"]
    if not qr.top1_ids or not qr.target_ids:
        return {}
    pairs = [(scenes.get(t), scenes.get(p)) for t, p in zip(qr.target_ids, qr.top1_ids)]
    pairs = [(t, p) for t, p in pairs if t is not None and p is not None]
    misses = [(t, p) for t, p in pairs if t != p]
    agree = lambda rows, i: round(100.0 * sum(t[i] == p[i] for t, p in rows) / max(1, len(rows)), 2)  # noqa: E731
    return {"queries": len(pairs), "misses": len(misses),
            "all_queries": {a: agree(pairs, i) for i, a in enumerate(names)},
            "misses_only": {a: agree(misses, i) for i, a in enumerate(names)}}


# ---------------------------------------------------------------------------------------- training stages


def proxy_score(history: Sequence[Mapping]) -> tuple[float, float | None]:
    """(best validation Sum after training started, the epoch-0 Sum) of a proxy run's history.

    The learning rate is judged by what training did: epoch 0 (the model as built) is the same for
    every lr of a variant, so it is recorded beside the score, not in it."""
    trained = [float(h["val_sum"]) for h in history if h.get("val_sum") is not None and h.get("epoch", 0) >= 1]
    start = next((float(h["val_sum"]) for h in history if h.get("epoch") == 0 and h.get("val_sum") is not None),
                 None)
    return (max(trained) if trained else float("-inf")), start


def _proxy_trial(params: dict, configs: dict) -> None:
    """One Tune trial: the proxy run of (variant, lr); a finished run with the same config is reused."""
    from ray import tune

    from dialclip_ray.train.config import TrainConfig
    from dialclip_ray.train.run import run_training

    cfg = TrainConfig.model_validate(configs[f"{params['variant']}@{params['lr']!r}"])
    outcome = run_training(cfg)
    score, start = proxy_score(outcome.history)
    tune.report({"val_sum": score, "val_sum_epoch0": start, "wall_s": outcome.wall_seconds,
                 "steps": max((int(h.get("step", 0)) for h in outcome.history), default=0),
                 "curve": [[h.get("step"), h.get("val_sum")] for h in outcome.history]})


def proxy_configs(variants: Sequence[str], make_config: Callable[..., Any], grid: Sequence[float]
                  ) -> tuple[str, dict[str, dict]]:
    """The sweep's name (a hash of the configs as the caller built them) and each trial's config, keyed
    ``variant@lr``, with absolute paths: a Tune trial runs in its own working directory under the Ray
    session, so a relative storage path would put its proxy run there, in /tmp, never to be reused."""
    from dialclip_ray.train.config import resolve_paths

    built = {f"{v}@{lr!r}": make_config(v, lr=lr, proxy=True) for v in variants for lr in grid}
    digest = hashlib.sha256(json.dumps({k: c.model_dump(mode="json") for k, c in built.items()},
                                       sort_keys=True).encode()).hexdigest()[:10]
    return f"sweep-{digest}", {k: resolve_paths(c).model_dump(mode="json") for k, c in built.items()}


def select_lrs(variants: Sequence[str], make_config: Callable[..., Any], grid: Sequence[float] = LR_GRID,
               storage: str | os.PathLike = "runs/cache/bench_lr_sweep",
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """Every variant's proxy runs at every lr of ``grid`` as one Ray Tune grid sweep (one warm cluster,
    one trial at a time: the trial's Train workers take the cores); the best validation Sum wins.

    ``make_config(variant, lr=..., proxy=True)`` builds the proxy TrainConfig (the caller fixes its
    budget). Returns ``{variant: {"lr": best, "grid": {lr: val_sum}, "epoch0": val_sum, ...}}``.
    """
    from ray import tune

    from dialclip_ray.runtime import ensure_ray

    name, configs = proxy_configs(variants, make_config, grid)
    workers = next(iter(configs.values()))["run"]["workers"]
    ensure_ray(num_cpus=workers + 1)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_proxy_trial, configs=configs), {"cpu": 0.5}),
        param_space={"variant": tune.grid_search(list(variants)), "lr": tune.grid_search(list(grid))},
        tune_config=tune.TuneConfig(metric="val_sum", mode="max", max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(storage).resolve()), verbose=0))
    results = tuner.fit()
    scores: dict[str, dict[float, dict]] = {}
    for r in results:
        if r.error is not None or not r.metrics:
            raise RuntimeError(f"proxy trial {r.config} failed: {r.error}")
        scores.setdefault(r.config["variant"], {})[r.config["lr"]] = r.metrics
    out = {}
    for v in variants:
        by_lr = scores[v]
        best = max(grid, key=lambda lr: (by_lr[lr]["val_sum"], -abs(np.log(lr / grid[len(grid) // 2]))))
        out[v] = {"lr": best, "grid": {f"{lr:g}": round(by_lr[lr]["val_sum"], 3) for lr in grid},
                  "epoch0": by_lr[best].get("val_sum_epoch0"), "steps": by_lr[best].get("steps"),
                  "curves": {f"{lr:g}": by_lr[lr].get("curve") for lr in grid}}
        log(f"    {v}: " + ", ".join(f"lr {lr:g} -> {by_lr[lr]['val_sum']:.2f}" for lr in grid)
            + f" (epoch 0: {out[v]['epoch0']}); chosen {best:g}")
    return out


def check_variant(variant: str) -> None:
    """A clear error when a variant's model preset does not exist (yet) in ``model.config.PRESETS``."""
    from dialclip_ray.model.config import PRESETS
    from dialclip_ray.pipelines.experiments import VARIANTS

    if variant not in VARIANTS or variant not in PRESETS:
        raise SystemExit(f"variant {variant!r} needs the model preset {variant!r}, which "
                         f"dialclip_ray/model/config.py PRESETS does not define (known: {', '.join(PRESETS)}); "
                         f"drop it with --variants or add the preset")


# ----------------------------------------------------------------------------------------------- results


@dataclass
class BenchmarkRuns:
    """Ranks collected per (variant, dataset, retrieval type) and seed, plus per-run facts."""

    ranks: dict[tuple[str, str, str], dict[int, QueryRanks]] = field(default_factory=dict)
    runs: dict[str, dict[int, dict]] = field(default_factory=dict)  # variant -> seed -> facts (train s, ...)

    def add(self, variant: str, seed: int, dataset: str, per_type: Mapping[str, QueryRanks],
            facts: dict | None = None) -> None:
        for rtype, qr in per_type.items():
            self.ranks.setdefault((variant, dataset, rtype), {})[seed] = qr
        if facts is not None:
            self.runs.setdefault(variant, {})[seed] = facts

    def matrix(self, key: tuple[str, str, str]) -> tuple[np.ndarray, list[int], QueryRanks]:
        """``[S, Q]`` ranks over the seeds of ``key`` (seed order), the seeds, and one QueryRanks for metadata."""
        by_seed = self.ranks[key]
        seeds = sorted(by_seed)
        first = by_seed[seeds[0]]
        for s in seeds[1:]:
            if by_seed[s].queries_digest != first.queries_digest:
                raise ValueError(f"{key}: seed {s} ranked other queries than seed {seeds[0]}")
        return np.stack([by_seed[s].ranks for s in seeds]), seeds, first


def _row_metrics(ranks: np.ndarray) -> dict[str, float]:
    per = stats.per_query_metrics(ranks)
    return {m: round(float(v.mean()), 3) for m, v in per.items()}


def build_report(runs: BenchmarkRuns, backbone: dict, protocol: dict, comparisons: Sequence[tuple[str, str]] =
                 COMPARISONS, metrics: Sequence[str] = COMPARISON_METRICS, n_boot: int = stats.N_BOOT,
                 seed: int = 0) -> dict:
    """The JSON report: backbone, protocol, per-seed rows, bootstrap summaries, paired comparisons."""
    results, summary = [], []
    variant_order = list(dict.fromkeys(k[0] for k in runs.ranks))  # as run: the caller's variant order
    keys = sorted(runs.ranks, key=lambda k: (variant_order.index(k[0]), k[1], k[2]))
    for variant, dataset, rtype in keys:
        by_seed = runs.ranks[(variant, dataset, rtype)]
        for s in sorted(by_seed):
            qr = by_seed[s]
            results.append({"variant": variant, "dataset": dataset, "retrieval_type": rtype, "seed": s,
                             "queries": int(len(qr.ranks)), "candidates": qr.candidates, **_row_metrics(qr.ranks)})
        mat, seeds, first = runs.matrix((variant, dataset, rtype))
        est = stats.metric_estimates(mat, n_boot=n_boot, seed=seed)
        summary.append({"variant": variant, "dataset": dataset, "retrieval_type": rtype, "seeds": seeds,
                        "queries": int(mat.shape[1]), "candidates": first.candidates,
                        **{m: {"mean": round(e.mean, 3), "ci95": [round(x, 3) for x in e.ci95]}
                           for m, e in est.items()}})
    comps = []
    for a, b in comparisons:
        for dataset in DATASETS:
            for rtype in sorted({k[2] for k in runs.ranks}):
                ka, kb = (a, dataset, rtype), (b, dataset, rtype)
                if ka not in runs.ranks or kb not in runs.ranks:
                    continue
                ma, _, qa = runs.matrix(ka)
                mb, _, qb = runs.matrix(kb)
                if qa.queries_digest != qb.queries_digest:
                    raise ValueError(f"{a} and {b} ranked different {dataset} {rtype} queries")
                for metric, d in stats.paired_differences(ma, mb, metrics, n_boot=n_boot, seed=seed).items():
                    comps.append({"a": a, "b": b, "dataset": dataset, "retrieval_type": rtype, "metric": metric,
                                  "diff": round(d.diff, 3), "ci95": [round(x, 3) for x in d.ci95],
                                  "p_boot": round(d.p_boot, 5), "queries": d.n_queries, "seeds": list(d.seeds),
                                  "verdict": verdict(d)})
    return {"backbone": backbone, "protocol": protocol, "results": results, "summary": summary,
            "comparisons": comps, "variants": {v: {str(s): f for s, f in by.items()} for v, by in runs.runs.items()}}


def verdict(d: stats.PairedDiff) -> str:
    if d.ci95[0] > 0:
        return "a better"
    if d.ci95[1] < 0:
        return "b better"
    return "no decisive difference"


def _task(row: Mapping) -> str:
    return f"{row['dataset']}/{row['retrieval_type']}"


def markdown(report: dict) -> str:
    summ = report["summary"]
    tasks = sorted({_task(r) for r in summ})
    variants = list(dict.fromkeys(r["variant"] for r in summ))
    by = {(r["variant"], _task(r)): r for r in summ}
    bb = report["backbone"]
    origin = (f"+ `pretrained={bb['pretrained']!r}` (the shipped stand-in)" if bb.get("pretrained")
              else "pretrained here on this corpus")
    reading = bb.get("reading_test") or {}
    coverage = bb.get("token_coverage") or {}
    lines = ["# Synthetic benchmark", "",
             f"Backbone: `{bb.get('model_name')}` {origin}, held-out caption-to-image R@1 "
             f"**{bb.get('heldout_caption_to_image_R@1') or float('nan'):.1f}%** among {bb.get('heldout_pool')} "
             f"held-out photos"
             + (f"; followed by chit-chat it keeps {100 * reading['followed_kept']:.0f}% of that R@1, preceded "
                f"{100 * reading['preceded_kept']:.0f}%" if reading else "")
             + (f"; token coverage of the test query windows {min(c['tokens'] for c in coverage.values()):.1f}%"
                f"-{max(c['tokens'] for c in coverage.values()):.1f}%" if coverage else "") + ".", "",
             "Test-set means over seeds, 95% bootstrap CI over seeds and queries in brackets "
             "(`dialclip_ray.evaluation.stats`).", "",
             "| variant | seeds | " + " | ".join(f"{t} R@1 | {t} Sum" for t in tasks) + " |",
             "|---|---|" + "---:|---:|" * len(tasks)]
    for v in variants:
        cells, seeds = [], "-"
        for t in tasks:
            r = by.get((v, t))
            if r is None:
                cells += ["-", "-"]
                continue
            seeds = str(len(r["seeds"]))
            cells += [f"{r['R@1']['mean']:.1f} [{r['R@1']['ci95'][0]:.1f}, {r['R@1']['ci95'][1]:.1f}]",
                      f"{r['Sum']['mean']:.1f} [{r['Sum']['ci95'][0]:.1f}, {r['Sum']['ci95'][1]:.1f}]"]
        lines.append(f"| {v} | {seeds} | " + " | ".join(cells) + " |")
    counts = {t: next((f"{r['queries']} queries x {r['candidates']} candidates" for r in summ if _task(r) == t), "")
              for t in tasks}
    lines += ["", "Queries: " + "; ".join(f"{t}: {c}" for t, c in counts.items()) + ".", "",
              "## Paired comparisons (a - b on the same queries; 95% paired-bootstrap CI)", "",
              "| a | b | task | metric | diff | 95% CI | p | verdict |", "|---|---|---|---|---:|---|---:|---|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['a']} | {c['b']} | {_task(c)} | {c['metric']} | {c['diff']:+.2f} | "
                     f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | {c['p_boot']:.4f} | {c['verdict']} |")
    attrs = {v: [f["photochat_top1_attributes"] for f in by_seed.values() if f.get("photochat_top1_attributes")]
             for v, by_seed in report.get("variants", {}).items()}
    names = next((list(a[0]["all_queries"]) for a in attrs.values() if a), [])
    if names:
        lines += ["", "## Where the errors are (PhotoChat-style test: share of top-1 photos with the target's "
                  "value, all queries / misses only; mean over seeds)", "",
                  "| variant | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for v, rows in attrs.items():
            if rows:
                cells = [f"{np.mean([r['all_queries'][a] for r in rows]):.1f} / "
                         f"{np.mean([r['misses_only'][a] for r in rows]):.1f}" for a in names]
                lines.append(f"| {v} | " + " | ".join(cells) + " |")
    proto = report["protocol"]
    if proto.get("command"):
        lines += ["", f"Command: `{proto['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """One panel per task: Sum (mean over seeds) per variant with 95% CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = report["summary"]
    tasks = sorted({_task(r) for r in summ})
    variants = list(dict.fromkeys(r["variant"] for r in summ))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, task in zip(axes[0], tasks):
        rows = {r["variant"]: r for r in summ if _task(r) == task}
        names = [v for v in variants if v in rows]
        means = np.array([rows[v]["Sum"]["mean"] for v in names])
        lo = means - np.array([rows[v]["Sum"]["ci95"][0] for v in names])
        hi = np.array([rows[v]["Sum"]["ci95"][1] for v in names]) - means
        ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=3,
               color=[colours(variants.index(v) % 10) for v in names])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        first = next(iter(rows.values()))
        ax.set_title(f"{task}\n{first['queries']} queries x {first['candidates']} candidates", fontsize=9)
        ax.set_ylabel("Sum = R@1 + R@5 + R@10 (test, %)")
    fig.suptitle("Synthetic benchmark: mean over seeds, 95% bootstrap CI (seeds x queries)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: str | os.PathLike, runs: BenchmarkRuns, backbone: dict, protocol: dict,
                  comparisons: Sequence[tuple[str, str]] = COMPARISONS, n_boot: int = stats.N_BOOT) -> dict:
    """Write ``<out>.json``, ``<out>.md`` and ``<out>.png``; returns the report."""
    from dialclip_ray.fsio import atomic_write_text

    report = build_report(runs, backbone, protocol, comparisons, n_boot=n_boot)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(report))
    plot(report, out.with_suffix(".png"))
    return report


STANDIN_BACKBONE = ("dialclip-small", "synthetic")  # the shipped stand-in (model/standin.py)


def standin_facts(corpus) -> dict:
    """The ``backbone`` block for the shipped stand-in: what was measured on it at packing time
    (held-out recall on the probe corpus, reading test, EOT positions) plus the token coverage of
    this corpus's test query windows."""
    from dialclip_ray.model import standin
    from dialclip_ray.model.backbone import load_backbone
    from dialclip_ray.pretrain.reading import token_coverage

    info = standin.packed_info()
    seen = standin.packed_token_ids()
    tok = load_backbone(standin.STANDIN_MODEL, load_weights=False).tokenizer
    coverage = {"photochat/dialog_to_image": token_coverage(corpus.photochat, seen, tok),
                "mmdialog/dialog_to_image": token_coverage(corpus.mmdialog, seen, tok),
                "mmdialog/dialog_to_text": token_coverage(corpus.mmdialog, seen, tok, target_type="text")}
    heldout = info.get("heldout_probe", {})
    return {"model_name": standin.STANDIN_MODEL, "pretrained": standin.STANDIN_TAG,
            "heldout_caption_to_image_R@1": heldout.get("caption_to_image_R@1"),
            "heldout_pool": heldout.get("pool_size"), "metrics": heldout,
            "token_coverage": coverage, "reading_test": info.get("reading_test"),
            "eot_positions": info.get("eot_positions"), "pretrain": info.get("pretrain"),
            "pretrain_corpus": info.get("corpus"), "packed_file": rel(standin.PACKED_FILE),
            "measured_by": "python bench/standin_reading.py (bench/results/standin_reading.json)"}


def backbone_facts(clip_result) -> dict:
    """The ``backbone`` block of the report from a ``run_pretrain`` result."""
    meta = clip_result.meta
    metrics = meta.get("metrics", {})
    return {"model_name": meta.get("config", {}).get("model_name"),
            "heldout_caption_to_image_R@1": metrics.get("caption_to_image_R@1"),
            "heldout_pool": metrics.get("pool_size"), "metrics": metrics, "pretrain_seconds": meta.get("train_s"),
            "steps": meta.get("steps"), "config": meta.get("config"), "checkpoint": rel(clip_result.path),
            "cached": clip_result.cached}
