"""The evaluation job: one or more checkpoints on one prepared split -> JSON + Markdown table.

Several checkpoints (DialCLIP and its baselines) are scored in one run so
their rows sit in one table computed the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dialclip_ray.evaluation.metrics import markdown_table


def parse_named(specs: list[str]) -> dict[str, str]:
    """``name=path`` pairs (a bare path is named after its directory)."""
    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep and "://" in spec:  # a URI: name it after its run directory (never Path(...).resolve())
            parts = spec.rstrip("/").split("/")
            name, path = parts[-2] if parts[-1] in ("best", "latest") else parts[-1], spec
        elif not sep:
            name, path = Path(spec).resolve().parent.name if Path(spec).name in ("best", "latest") \
                else Path(spec).name, spec
        named[name] = path
    return named


def evaluate_checkpoints(checkpoints: dict[str, str], data: str, split: str = "test", out: str | None = None,
                         distributed: bool = True, actors: int = 2, batch_size: int = 64,
                         max_examples: int | None = None, compare: bool = False,
                         gpus_per_actor: float = 0.0) -> dict:
    """Evaluate each named checkpoint on ``data``; with ``compare`` (distributed only), also the paired
    difference of the first model against each other one, per retrieval type, on the same queries
    (Sum and R@1, 95% bootstrap CI over queries): ``report["comparisons"]`` and its Markdown table."""
    results, rows = {}, {}
    for name, path in checkpoints.items():
        t0 = time.time()
        if distributed:
            from dialclip_ray.evaluation.distributed import evaluate_with_ray
            from dialclip_ray.runtime import ensure_ray

            ensure_ray(num_cpus=actors)
            res = evaluate_with_ray(path, data, split, actors, batch_size, max_examples, return_ranks=compare,
                                    gpus_per_actor=gpus_per_actor)
        else:
            from dialclip_ray.model.checkpoint import load_checkpoint
            from dialclip_ray.data.dataset import CanonicalDataset
            from dialclip_ray.evaluation.local import evaluate_model

            from dialclip_ray.storage import local_dir

            model, backbone, _ = load_checkpoint(local_dir(path))
            res = evaluate_model(model, backbone, CanonicalDataset.load(data), split, batch_size=batch_size,
                                 max_examples=max_examples)
        res["seconds"] = time.time() - t0
        res["checkpoint"] = str(path)
        results[name] = res
        for rtype, m in res["per_type"].items():
            rows[f"{name} ({rtype})"] = m
    table = markdown_table(rows, title=f"model (split {split})")
    report = {"data": str(data), "split": split, "results": results, "table": table}
    if compare and all("ranks" in r for r in results.values()):
        report["comparisons"] = paired_comparisons({n: r.pop("ranks") for n, r in results.items()})
        report["comparison_table"] = comparison_table(report["comparisons"])
        table += "\n\n" + report["comparison_table"]
    if out:  # a local directory or an object-store URI
        from dialclip_ray import storage

        with storage.output_dir(storage.normalize(out)) as out_dir:
            (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
            (out_dir / "eval.md").write_text(table + "\n")
    return report


def paired_comparisons(ranks: dict[str, dict[str, list[int]]]) -> list[dict]:
    """The first model minus each other one, per retrieval type: Sum and R@1 with 95% CIs (same queries)."""
    from dialclip_ray.evaluation.stats import paired_differences

    names = list(ranks)
    rows = []
    for other in names[1:]:
        for rtype in ranks[names[0]]:
            if rtype not in ranks[other]:
                continue
            diffs = paired_differences(ranks[names[0]][rtype], ranks[other][rtype], ("Sum", "R@1"))
            for metric, d in diffs.items():
                rows.append({"a": names[0], "b": other, "retrieval_type": rtype, "metric": metric,
                             "diff": round(d.diff, 2), "ci95": [round(x, 2) for x in d.ci95],
                             "queries": d.n_queries, "decided": d.significant})
    return rows


def comparison_table(rows: list[dict]) -> str:
    lines = ["| a - b | retrieval | metric | diff | 95% CI | queries | decided |", "|---|---|---|---:|---|---:|---|"]
    lines += [f"| {r['a']} - {r['b']} | {r['retrieval_type']} | {r['metric']} | {r['diff']:+.2f} | "
              f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] | {r['queries']} | {'yes' if r['decided'] else 'no'} |"
              for r in rows]
    return "\n".join(lines)
