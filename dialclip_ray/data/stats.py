"""``dialclip data stats``: what a prepared dataset contains, and how much of it a 77-token window sees."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dialclip_ray.model.text import token_length
from dialclip_ray.data.dataset import CanonicalDataset


def _dist(values: list[int]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values)
    return {"n": int(a.size), "mean": round(float(a.mean()), 2), "min": int(a.min()),
            "p50": round(float(np.percentile(a, 50)), 1), "p90": round(float(np.percentile(a, 90)), 1), "max": int(a.max())}


def dataset_stats(directory: str | Path, tokenizer: Any, context_length: int = 77,
                  max_examples: int | None = None, plot: str | Path | None = None) -> dict:
    """Counts per split and target type, turns/images per dialog, pool sizes, context token lengths.

    Token length of an example = BPE tokens of all context turns plus the current text;
    ``share_over_context`` is the fraction that does not fit in ``context_length`` (minus SOT/EOT).
    """
    ds = CanonicalDataset.load(directory)
    out: dict = {"directory": str(Path(directory).resolve()), "source": ds.source,
                 "images": len(ds._paths), "texts": len(ds._texts), "context_length": context_length, "splits": {}}
    token_lengths: dict[str, list[int]] = {}
    for split in ds.splits():
        records = ds.examples(split)
        sample = records[:max_examples] if max_examples else records
        lengths = [sum(token_length(tokenizer, t.text) for t in r.context) + token_length(tokenizer, r.current_text)
                   for r in sample]
        over = sum(n > context_length - 2 for n in lengths)
        pools = [len(r.candidates) for r in records if r.candidates is not None]
        out["splits"][split] = {
            "examples": len(records),
            "by_target_type": dict(Counter(r.target_type for r in records)),
            "dialogs": len({r.id.rsplit("/", 2)[0] if r.source == "mmdialog" else r.id for r in records}),
            "turns_per_example": _dist([len(r.context) for r in records]),
            "images_per_example": _dist([sum(len(t.image_ids) for t in r.context) for r in records]),
            "candidate_pool": _dist(pools) if pools else {"per_split_images": len(ds.image_ids(split)),
                                                          "per_split_texts": len(ds.text_ids(split))},
            "context_tokens": _dist(lengths),
            "share_over_context": round(over / len(lengths), 4) if lengths else 0.0,
        }
        token_lengths[split] = lengths
    if plot:
        plot_token_lengths(token_lengths, context_length, plot)
        out["plot"] = str(plot)
    return out


def plot_token_lengths(lengths: dict[str, list[int]], context_length: int, path: str | Path) -> Path:
    """Histogram of context token lengths per split, with the token window marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, values in lengths.items():
        if values:
            ax.hist(values, bins=30, alpha=0.5, label=f"{split} (n={len(values)})")
    ax.axvline(context_length - 2, color="k", linestyle="--", label=f"{context_length}-token window")
    ax.set_xlabel("BPE tokens in context + current text")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_stats(stats: dict) -> str:
    """A readable multi-line report of :func:`dataset_stats`."""
    lines = [f"{stats['directory']} ({stats['source']}): {stats['images']} images, {stats['texts']} texts"]

    def fmt(d: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items())

    for split, s in stats["splits"].items():
        lines.append(f"[{split}] {s['examples']} examples ({fmt(s['by_target_type'])}), {s['dialogs']} dialogs")
        lines.append(f"  turns/example:   {fmt(s['turns_per_example'])}")
        lines.append(f"  images/example:  {fmt(s['images_per_example'])}")
        lines.append(f"  candidate pool:  {fmt(s['candidate_pool'])}")
        lines.append(f"  context tokens:  {fmt(s['context_tokens'])}")
        lines.append(f"  share over the token window: {100 * s['share_over_context']:.1f}%")
    return "\n".join(lines)
