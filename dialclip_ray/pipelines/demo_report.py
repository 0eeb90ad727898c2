"""The demo's queries and report: what a person looks at to see what the system does.

``report.md`` holds the metrics tables and the stage timings; ``training_curves.png``
the per-step training loss and the validation Sum; ``contact_sheet.png`` for a few test
dialogs the last turns and the context's attribute words next to the top retrieved
photos (the true one framed green) and the true photo.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from dialclip_ray.data.dataset import CanonicalDataset, ExampleRecord


def request_for(record: ExampleRecord, k: int = 5) -> dict:
    """The HTTP request body that asks the served model for ``record``'s next photo or reply."""
    return {"context": [{"speaker": t.speaker, "text": t.text, "images": [{"id": i} for i in t.image_ids]}
                        for t in record.context],
            "current": record.current_text, "k": k, "target": record.target_type}


def post_json(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def ask_queries(url: str, corpus, n: int) -> list[dict]:
    """Send ``n`` PhotoChat-style test dialogs (and one MMDialog reply query) over HTTP; print the hits."""
    photochat = CanonicalDataset.load(corpus.photochat)
    records = photochat.examples("test", "image")[:n]
    mm = CanonicalDataset.load(corpus.mmdialog).examples("test", "text")[:1]
    answers = []
    for record in records + mm:
        response = post_json(f"{url}/v1/retrieve", request_for(record))
        ids = [h["id"] for h in response["hits"]]
        answers.append({"id": record.id, "target_type": record.target_type, "target_id": record.target_id,
                        "context": [t.text for t in record.context], "hits": response["hits"],
                        "target_rank": ids.index(record.target_id) + 1 if record.target_id in ids else None})
        print(f"\n--- dialog {record.id} (wants the next {record.target_type})")
        for turn in record.context[-4:]:
            print(f"    speaker {turn.speaker}: {turn.text}")
        for hit in response["hits"]:
            mark = "  <== the true one" if hit["id"] == record.target_id else ""
            shown = hit["metadata"].get("text") or hit["metadata"].get("path") or ""
            print(f"    #{hit['rank']} {hit['score']:.3f} {hit['id']} {str(shown)[:60]}{mark}")
    return answers


def plot_curves(histories: dict[str, list[dict]], steps: dict[str, list[dict]], path: Path) -> Path:
    """Per-step training loss (a running mean over 20 steps) and validation Sum at each validation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for i, (name, hist) in enumerate(histories.items()):
        colour = f"C{i}"
        rows = steps.get(name) or []
        if rows:
            by_step: dict[float, list[float]] = {}
            for r in rows:  # one row per retrieval type and step: the step's mean over types
                by_step.setdefault(r["step"], []).append(r["loss"])
            x = np.array(sorted(by_step))
            y = np.array([np.mean(by_step[k]) for k in x])
            ax1.plot(x, y, ".", ms=2, alpha=0.3, color=colour)
            w = min(20, len(y))
            ax1.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), "-", color=colour, label=name)
        val = [h for h in hist if h.get("val_sum") is not None]
        ax2.plot([h.get("step", h["epoch"]) for h in val], [h["val_sum"] for h in val], "o-", color=colour,
                 label=name)
    ax1.set(xlabel="optimizer step", ylabel="train loss (InfoNCE)", title="training loss per step")
    ax2.set(xlabel="optimizer step (0 = as built)", ylabel="validation Sum (mean over tasks)",
            title="validation Sum (dev)")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _attribute_words_in(texts: list[str]) -> list[str]:
    """The words of ``texts`` that name an attribute value (what decides the photo), in order of use."""
    import re

    from dialclip_ray.data.synthetic.vocab import attribute_words

    names = attribute_words()
    words = [w for t in texts for w in re.findall(r"[a-z]+", t.lower())]
    return list(dict.fromkeys(w for w in words if w in names))


def contact_sheet(answers: list[dict], corpus, path: Path) -> Path:
    """Per test dialog: its last turns and the attribute words of the whole context, the top photos the
    served model returned (the true one framed green) and, last, the true photo itself."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [a for a in answers if a["target_type"] == "image"]
    datasets = [CanonicalDataset.load(corpus.photochat), CanonicalDataset.load(corpus.mmdialog)]
    k = max((len(a["hits"]) for a in rows), default=1)

    def show(ax, image_id: str) -> None:
        ds = next((d for d in datasets if d.has_image(image_id)), None)
        if ds is not None:
            ax.imshow(Image.open(ds.image_path(image_id)).convert("RGB"))
        ax.set_xticks([])
        ax.set_yticks([])

    fig, axes = plt.subplots(len(rows), k + 2, figsize=(2.2 * (k + 2), 2.5 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1] * (k + 1)})
    for r, answer in enumerate(rows):
        text = "\n".join(textwrap.fill(t, 48) for t in answer["context"][-4:])
        attrs = ", ".join(_attribute_words_in(answer["context"])) or "(none)"
        axes[r][0].text(0, 1, text, va="top", fontsize=6, wrap=True)
        axes[r][0].text(0, 0, "attribute words in the context:\n" + textwrap.fill(attrs, 48), va="bottom",
                        fontsize=6.5, color="tab:blue", weight="bold")
        axes[r][0].axis("off")
        for c, hit in enumerate(answer["hits"][:k]):
            ax = axes[r][c + 1]
            show(ax, hit["id"])
            hit_ok = hit["id"] == answer["target_id"]
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if hit_ok else "lightgrey")
                spine.set_linewidth(4 if hit_ok else 1)
            ax.set_title(f"#{hit['rank']} {hit['score']:.2f}" + (" TRUE" if hit_ok else ""), fontsize=7)
        truth = axes[r][k + 1]
        show(truth, answer["target_id"])
        for spine in truth.spines.values():
            spine.set_edgecolor("tab:green")
            spine.set_linewidth(2)
            spine.set_linestyle("--")
        rank = answer.get("target_rank")
        truth.set_title(f"true photo ({f'rank {rank}' if rank else f'not in top {k}'})", fontsize=7)
    fig.suptitle("test dialogs (left), the top photos the served model retrieved (true one framed green), "
                 "and the true photo (right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict, evaluation: dict, histories: dict, answers: list[dict],
                 corpus, run_dirs: dict | None = None) -> Path:
    from dialclip_ray.train.plots import read_steps

    names = {"DialCLIP": "default", "full fine-tune": "finetune"}
    plot_curves({n: histories[v] for n, v in names.items()},
                {n: read_steps(run_dirs[v]) for n, v in names.items() if run_dirs and v in run_dirs},
                out / "training_curves.png")
    contact_sheet(answers, corpus, out / "contact_sheet.png")
    lines = ["# dialclip-ray demo report", "",
             f"Synthetic corpus: {summary['config']['dialogs']} dialogs; backbone "
             f"{summary['config']['model_name']} "
             f"{'(shipped stand-in ' + repr(summary['config']['pretrained']) + ')' if summary['config'].get('pretrained') else 'pretrained here'} "
             f"(held-out caption->image R@1 {summary['pretrained_clip'].get('caption_to_image_R@1', float('nan')):.1f}% "
             f"of {summary['pretrained_clip'].get('pool_size', '?')} images).",
             "", "## Test metrics (Ray Data evaluation)", ""]
    for name, ev in evaluation.items():
        lines += [f"### {name}", "", ev["table"], ""]
        if ev.get("comparison_table"):
            lines += ["Paired differences on the same test queries (95% bootstrap CI over queries; "
                      "decided = the interval excludes 0):", "", ev["comparison_table"], ""]
    lines += ["## Training curves", "", "![training curves](training_curves.png)", "",
              "## What the served model retrieves", "", "![contact sheet](contact_sheet.png)", ""]
    for a in answers:
        rank = a["target_rank"]
        lines.append(f"- `{a['id']}` ({a['target_type']}): true item at rank {rank if rank else '>k'}")
    lines += ["", "## Stage timings (seconds)", "", "| stage | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["stage_seconds"].items()]
    lines += [f"| **total** | {summary['total_seconds']:.1f} |", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
