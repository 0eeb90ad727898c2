"""Training curves and the per-step log: what a person watches while a run trains.

``StepLog`` is rank 0's per-step record (loss per retrieval type, learning rate, logit scale,
samples/s): kept in each checkpoint so a resumed run's log is whole, written to ``steps.csv``
and TensorBoard event files under the run directory, and redrawn into ``training_curves.png``
at every epoch end, at per-step resolution.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

STEPS_FILE = "steps.csv"
TENSORBOARD_DIR = "tensorboard"
STEP_FIELDS = ("step", "epoch", "retrieval_type", "loss", "lr", "logit_scale", "samples_per_s")


def read_steps(run_dir) -> list[dict]:
    """The rows of a run's ``steps.csv`` (local path or URI); [] when there is none."""
    from dialclip_ray import storage

    path = storage.join(run_dir, STEPS_FILE)
    try:
        if not storage.is_file(path):
            return []
        text = storage.read_text(path)
    except (OSError, ValueError):
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        rows.append({k: (v if k == "retrieval_type" else float(v)) for k, v in row.items() if v not in (None, "")})
    return rows


def plot_training_curves(history: list[dict], path: Path, title: str = "", steps: list[dict] | None = None) -> Path:
    """Loss (per step and per retrieval type when ``steps`` are given, else per epoch), validation Sum,
    and with steps the learning rate and logit scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = steps or []
    panels = 4 if steps else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.5))
    ax1, ax2 = axes[0], axes[1]
    if steps:
        for rtype in dict.fromkeys(r.get("retrieval_type", "all") for r in steps):
            rows = [r for r in steps if r.get("retrieval_type", "all") == rtype]
            ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows], ".", ms=2, alpha=0.5, label=rtype)
        ax1.set(xlabel="step", ylabel="train loss (InfoNCE)", title="training loss per step")
        ax1.legend(fontsize=7)
        axes[2].plot([r["step"] for r in steps], [r.get("lr", float("nan")) for r in steps])
        axes[2].set(xlabel="step", ylabel="learning rate", title="learning rate")
        axes[3].plot([r["step"] for r in steps], [r.get("logit_scale", float("nan")) for r in steps])
        axes[3].set(xlabel="step", ylabel="logit scale (1/T)", title="logit scale")
    else:
        epochs = [row["epoch"] for row in history]
        ax1.plot(epochs, [row.get("train_loss", float("nan")) for row in history], "o-")
        ax1.set(xlabel="epoch", ylabel="train loss (InfoNCE)", title="training loss")
    x = [row.get("step", row["epoch"]) for row in history] if steps else [row["epoch"] for row in history]
    ax2.plot(x, [row.get("val_sum", float("nan")) for row in history], "o-", color="tab:green")
    ax2.set(xlabel="step" if steps else "epoch", ylabel="validation Sum (R@1+R@5+R@10)", title="validation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class StepLog:
    """Rank 0's per-step metrics; ``flush`` writes steps.csv, TensorBoard events and the curves to the run dir."""

    def __init__(self, run_dir, rows: list[dict] | None = None, tensorboard: bool = True):
        self.run_dir = run_dir
        self.rows = list(rows or [])
        self.tensorboard = tensorboard
        self._written = 0  # rows already in the event files of this process
        self._val_written = 0

    def add(self, **row) -> None:
        self.rows.append(row)

    def flush(self, history: list[dict], title: str = "") -> None:
        """Everything to the run dir (local or URI); the rows of a resumed run's earlier attempts included."""
        import tempfile

        from dialclip_ray import storage

        with storage.output_dir(self.run_dir) as out:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=STEP_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
            (out / STEPS_FILE).write_text(buf.getvalue())
            if history or self.rows:
                plot_training_curves(history, out / "training_curves.png", title=title, steps=self.rows)
        if self.tensorboard:
            with storage.output_dir(storage.join(self.run_dir, TENSORBOARD_DIR)) as tb:
                self._events(Path(tb), history)

    def _events(self, directory: Path, history: list[dict]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: steps.csv and the curves still have it all
            self.tensorboard = False
            return
        writer = SummaryWriter(str(directory), filename_suffix=f".{len(self.rows)}")
        for row in self.rows[self._written:]:
            step = int(row["step"])
            writer.add_scalar(f"train/loss/{row.get('retrieval_type', 'all')}", row["loss"], step)
            for key in ("lr", "logit_scale", "samples_per_s"):
                if key in row:
                    writer.add_scalar(f"train/{key}", row[key], step)
        for row in history[self._val_written:]:
            if "val_sum" in row and row.get("step") is not None:
                writer.add_scalar("val/sum", row["val_sum"], int(row["step"]))
        writer.close()
        self._written, self._val_written = len(self.rows), len(history)
