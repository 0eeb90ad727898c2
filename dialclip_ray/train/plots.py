"""Training curves: loss and validation Sum per epoch, as a PNG people can look at."""

from __future__ import annotations

from pathlib import Path


def plot_training_curves(history: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [row.get("train_loss", float("nan")) for row in history], "o-")
    ax1.set(xlabel="epoch", ylabel="train loss (InfoNCE)", title="training loss")
    ax2.plot(epochs, [row.get("val_sum", float("nan")) for row in history], "o-", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="validation Sum (R@1+R@5+R@10)", title="validation")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
