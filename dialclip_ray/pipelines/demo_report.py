"""The demo's queries and report: what a person looks at to see what the system does.

``report.md`` holds the metrics tables and the stage timings; ``training_curves.png``
the validation Sum per epoch; ``contact_sheet.png`` for a few test dialogs the last
turns next to the top retrieved photos, with the true photo framed in green.
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


def plot_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        ax1.plot(epochs, [h["train_loss"] for h in hist], "o-", label=name)
        ax2.plot(epochs, [h["val_sum"] for h in hist], "o-", label=name)
    ax1.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax2.set(xlabel="epoch", ylabel="validation Sum", title="validation Sum (dev)")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def contact_sheet(answers: list[dict], corpus, path: Path) -> Path:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [a for a in answers if a["target_type"] == "image"]
    roots = {ds.source: ds for ds in (CanonicalDataset.load(corpus.photochat), CanonicalDataset.load(corpus.mmdialog))}
    k = max((len(a["hits"]) for a in rows), default=1)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(2.2 * (k + 1), 2.4 * len(rows)), squeeze=False)
    for r, answer in enumerate(rows):
        text = "\n".join(textwrap.fill(t, 38) for t in answer["context"][-4:])
        axes[r][0].text(0, 1, text, va="top", fontsize=6, wrap=True)
        axes[r][0].axis("off")
        for c, hit in enumerate(answer["hits"][:k]):
            ax = axes[r][c + 1]
            ds = next((d for d in roots.values() if d.has_image(hit["id"])), None)
            if ds is not None:
                ax.imshow(Image.open(ds.image_path(hit["id"])).convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            hit_ok = hit["id"] == answer["target_id"]
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if hit_ok else "lightgrey")
                spine.set_linewidth(4 if hit_ok else 1)
            ax.set_title(f"#{hit['rank']} {hit['score']:.2f}", fontsize=7)
    fig.suptitle("test dialogs (left) and the top photos the served model retrieved (true photo in green)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(out: Path, summary: dict, evaluation: dict, histories: dict, answers: list[dict],
                 corpus) -> Path:
    plot_curves({"DialCLIP": histories["dialclip"], "full fine-tune": histories["finetune"]},
                out / "training_curves.png")
    contact_sheet(answers, corpus, out / "contact_sheet.png")
    lines = ["# dialclip-ray demo report", "",
             f"Synthetic corpus: {summary['config']['dialogs']} dialogs; backbone "
             f"{summary['config']['model_name']} pretrained here "
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
