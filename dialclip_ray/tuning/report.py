"""Sweep outputs: a table of every trial, the best config as a training file, sensitivity plots.

The plots follow the paper's sensitivity studies: validation Sum against each
parameter the sweep actually varied (each trial a dot, the mean per value a line).
The sweep directory may be an object-store URI: outputs are written locally and
uploaded (``storage.output_dir``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from dialclip_ray import storage
from dialclip_ray.train.config import TrainConfig, dump_train_config
from dialclip_ray.tuning.space import SweepSpec, apply_params


@dataclass
class SweepOutcome:
    """What ``run_sweep`` returns; defined beside the code that fills it, so sweep imports report, never back."""
    sweep_dir: Path
    table: list[dict]
    best_params: dict
    best_val_sum: float
    default_val_sum: float | None
    best_config_path: Path
    restored: bool


PLOTTED = (("context_prompt_length", "context prompts Lc"), ("insertion_layer", "insertion layer Lins"),
           ("num_experts", "experts K"), ("domain_prompt_length", "domain prompts Ld"))


def trial_table(results, spec: SweepSpec, trials_dir: Path | None = None) -> list[dict]:
    """One row per trial: its parameters, best validation Sum, epochs run and whether ASHA stopped it.

    A trial resumed after its sweep's driver died reports to Tune only from the resumed epoch on, so
    the epochs and scores come from the training history kept in the trial's own checkpoints
    (``trials_dir/trial-<id>``) where there is one, else from Tune's metrics.
    """
    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id", Path(result.path).name)
        history = _checkpoint_history(storage.join(trials_dir, f"trial-{trial_id}")) if trials_dir else []
        frame = result.metrics_dataframe
        seen = _last_epoch_seen(result)
        if seen is not None:  # a trial ASHA stopped may still checkpoint the epoch it was in: Tune did not see it
            history = [h for h in history if int(h.get("epoch", 0)) <= seen]
        if not history and frame is not None and "val_sum" in frame:
            frame = frame[frame["partial"] != 1] if "partial" in frame else frame
            history = frame[["epoch", "val_sum"]].to_dict("records") if "epoch" in frame else \
                [{"epoch": i + 1, "val_sum": v} for i, v in enumerate(frame["val_sum"])]
        scores = [float(h["val_sum"]) for h in history if not math.isnan(float(h.get("val_sum", math.nan)))]
        epochs_run = max((int(h.get("epoch", 0)) for h in history), default=0)
        rows.append({"trial_id": trial_id,
                     **{k: (result.config or {}).get(k) for k in spec.params},  # None: failed before reporting
                     "best_val_sum": max(scores) if scores else float("nan"), "epochs_run": epochs_run,
                     "stopped_early": bool(history) and epochs_run < spec.epochs,
                     "error": bool(result.error)})
    return sorted(rows, key=lambda r: -r["best_val_sum"] if not math.isnan(r["best_val_sum"]) else math.inf)


def _last_epoch_seen(result) -> int | None:
    """The last epoch the trial reported to Tune (what ASHA decided on), or None if it reported none."""
    frame = result.metrics_dataframe
    if frame is not None and "epoch" in frame and len(frame):
        return int(frame["epoch"].max())
    epoch = (result.metrics or {}).get("epoch")
    return int(epoch) if epoch is not None else None


def _checkpoint_history(run_dir: Path) -> list[dict]:
    """The per-epoch metrics history stored in a training run's newest checkpoint ([] if none)."""
    from dialclip_ray.train.run import latest_history

    return latest_history(run_dir)


def write_table(rows: list[dict], sweep_dir: Path) -> None:
    if not rows:
        return
    keys = list(rows[0])
    with open(sweep_dir / "trials.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    (sweep_dir / "trials.md").write_text("\n".join(lines) + "\n")


def plot_sensitivity(rows: list[dict], base: TrainConfig, path: Path, params: dict | None = None) -> Path:
    """Validation Sum against each swept parameter (``params``: the spec's; default the paper's four)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = dict(PLOTTED) | {"lr": "learning rate lr", "domain_prompt_length": "domain prompts Ld"}
    keys = list(params) if params else [k for k, _ in PLOTTED]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.5 * len(keys) + 0.5, 3.4), sharey=True, squeeze=False)
    axes = axes[0]
    defaults = {**base.optim.model_dump(), **base.model.model_dump()}
    for ax, key in zip(axes, keys):
        label = labels.get(key, key)
        pts = [(r[key] if r.get(key) is not None else defaults.get(key), r["best_val_sum"]) for r in rows
               if not math.isnan(r["best_val_sum"])]
        pts = [(x, y) for x, y in pts if isinstance(x, (int, float))]
        if key == "lr" or (params and getattr(params.get(key), "loguniform", None)):
            ax.set_xscale("log")
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, alpha=0.6)
            means = {x: sum(y for xx, y in pts if xx == x) / sum(1 for xx, _ in pts if xx == x) for x in set(xs)}
            order = sorted(means)
            ax.plot(order, [means[x] for x in order], "-", color="tab:red", label="mean")
        ax.set(xlabel=label, title=f"Sum vs {label.split()[-1]}")
    axes[0].set_ylabel("best validation Sum")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(results, spec: SweepSpec, base: TrainConfig, sweep_dir, restored: bool) -> SweepOutcome:
    rows = trial_table(results, spec, storage.join(sweep_dir, "trials"))
    with storage.output_dir(sweep_dir) as out:
        outcome = _write_outputs(rows, spec, base, sweep_dir, out, restored)
    return outcome


def _write_outputs(rows, spec: SweepSpec, base: TrainConfig, sweep_dir, out: Path, restored: bool) -> SweepOutcome:
    write_table(rows, out)
    plot_sensitivity(rows, base, out / "sensitivity.png", spec.params)
    best = rows[0]
    best_params = {k: best[k] for k in spec.params}
    best_cfg = apply_params(base, best_params)
    best_cfg.optim.epochs = spec.epochs
    best_cfg.run.name = f"{storage.name_of(sweep_dir)}-best"
    dump_train_config(best_cfg, out / "best_config.yaml")
    best_path = storage.join(sweep_dir, "best_config.yaml")
    base_model = base.model_dump(mode="json")
    default = [r for r in rows if all(r[k] == base_model["model"].get(k, base_model["optim"].get(k))
                                      for k in spec.params)]
    outcome = SweepOutcome(sweep_dir, rows, best_params, best["best_val_sum"],
                           default[0]["best_val_sum"] if default else None, best_path, restored)
    (out / "summary.json").write_text(json.dumps(
        {"best_params": best_params, "best_val_sum": outcome.best_val_sum, "default_val_sum": outcome.default_val_sum,
         "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows)}, indent=2))
    return outcome
