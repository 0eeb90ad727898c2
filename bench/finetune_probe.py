"""Why full fine-tuning does not beat zero-shot on the synthetic benchmark: does what training fits transfer?

The benchmark (bench/synthetic_benchmark.py) found every trained variant selecting epoch 0. This probe
separates the candidate causes on the benchmark's own corpus and the shipped stand-in, single process
(no Ray: the question is the objective, not the cluster):

  [1] false in-batch negatives: per task, how many in-batch pairs are no negatives (the same target,
      or one the query's context holds), and the zero-shot loss with and without them masked;
  [2] fit vs transfer: the ``finetune`` preset trained on PhotoChat-style photos for ``--steps``
      steps (backbone learning rate ``--lrs``), with random batches and with TAS-style batches
      (k-means over the frozen target embeddings, one cluster per batch: hard in-batch negatives);
      then one tower alone (``--tower-lrs``), and task mixes round robin (``--mixes``: ``all``, each
      PhotoChat-style step followed by an MMDialog-style photo and reply step, as the benchmark's
      runs train one model on every task; ``photos``, the two photo tasks). Before and after:
      in-batch accuracy and loss on 8 fixed training batches, the Sum of the
      first 400 *trained* queries against the training pool, and the dev Sum (500 queries, the
      protocol's 1,000-photo pool).

Writes bench/results/finetune_probe.{json,md}. About 20 minutes on 2 cores.

    python bench/finetune_probe.py [--steps 250] [--lrs 1e-5,1e-4,3e-4] [--tower-lrs text=3e-4,vision=1e-4]
                                   [--mixes all] [--mix-lr 3e-4] [--clusters 60]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from dialclip_ray.data.dataset import CanonicalDataset, ReaderConfig, image_loader, make_train_loader
from dialclip_ray.evaluation.local import embed_images, evaluate_model
from dialclip_ray.fsio import atomic_write_text
from dialclip_ray.model.config import preset
from dialclip_ray.model.dialclip import build_model
from dialclip_ray.pipelines import benchmark as B
from dialclip_ray.pipelines.experiments import ensure_corpus

RESULTS = Path(__file__).resolve().parent / "results"
STANDIN = dict(zip(("model_name", "pretrained"), B.STANDIN_BACKBONE))  # the shipped stand-in
TASKS = (("photochat", "image"), ("mmdialog", "image"), ("mmdialog", "text"))
BATCH, PROBE_BATCHES, MAX_TRAIN = 32, 8, 4000
MIXES = {"photo": (), "photos": ("image",), "all": ("image", "text")}  # MMDialog-style tasks beside PhotoChat's
MIX_NAMES = {"photo": "PhotoChat photos", "photos": "+ MMDialog photos", "all": "+ MMDialog photos and replies"}


def loader(ds, tt, bb, reader, sampler=None):
    ld = make_train_loader(ds, "train", tt, bb.tokenizer, bb.preprocess_val, reader, BATCH, seed=0,
                           sampler=sampler, drop_last=True, max_examples=MAX_TRAIN)
    if sampler is None:
        ld.sampler.set_position(0)
    return ld


@torch.no_grad()
def in_batch(model, ld) -> dict:
    """Query->target accuracy and symmetric loss (masked as training masks, and unmasked) on fixed batches."""
    model.eval()
    acc = loss = raw = fn = 0.0
    for k, b in enumerate(ld):
        if k == PROBE_BATCHES:
            break
        out = model(b)
        lg, lab = out["logits"], torch.arange(len(b))
        acc += (lg.argmax(1) == lab).float().mean().item()
        loss += out["loss"].item()
        raw += ((F.cross_entropy(lg, lab) + F.cross_entropy(lg.t(), lab)) / 2).item()
        fn += 0 if b.false_negatives is None else b.false_negatives.sum().item()
    n = min(PROBE_BATCHES, len(ld))
    return {"accuracy": acc / n, "loss": loss / n, "loss_unmasked": raw / n, "false_negatives_per_batch": fn / n}


def pool_sums(model, bb, ds, reader) -> dict:
    seen = evaluate_model(model, bb, ds, "train", reader, 64, "cpu", 400)["per_type"]["dialog_to_image"]["Sum"]
    dev = evaluate_model(model, bb, ds, "dev", reader, 64, "cpu", 500)["per_type"]["dialog_to_image"]["Sum"]
    return {"trained_queries_vs_train_pool_Sum": seen, "dev_Sum": dev}


def cluster_order(model, ds, bb, k: int, seed: int):
    """TAS-style sampler: batches drawn from one k-means cluster of the frozen target embeddings."""
    recs = ds.examples("train", "image")[:MAX_TRAIN]
    emb = embed_images(model, [r.target_id for r in recs], image_loader(ds, bb.preprocess_val)).astype("float32")
    km = faiss.Kmeans(emb.shape[1], k, niter=20, seed=seed)
    km.train(emb)
    labels = km.index.search(emb, 1)[1][:, 0]
    rng = random.Random(seed)

    def order() -> list[int]:
        idx = []
        for c in rng.sample(range(k), k):
            members = list(np.flatnonzero(labels == c))
            rng.shuffle(members)
            idx += members
        chunks = [idx[i:i + BATCH] for i in range(0, len(idx) - BATCH + 1, BATCH)]
        rng.shuffle(chunks)
        return [int(i) for c in chunks for i in c]
    return order


def _freeze(model, towers: str) -> None:
    """Leave only ``towers`` of CLIP trainable (both, text, vision); the temperature always trains."""
    if towers == "text":
        model.clip.visual.requires_grad_(False)
    elif towers == "vision":
        for n, p in model.clip.named_parameters():
            if not n.startswith("visual."):
                p.requires_grad_(False)


def _endless(make):
    """Batches forever: a fresh epoch (next sampler position) whenever a loader runs out."""
    epoch = 0
    while True:
        ld = make()
        if hasattr(ld.sampler, "set_position"):
            ld.sampler.set_position(epoch)
        yield from ld
        epoch += 1


def finetune(corpus, lr: float, steps: int, batching: str, clusters: int, towers: str = "both",
             tasks: str = "photo") -> dict:
    """``steps`` PhotoChat-style steps; with ``tasks="all"`` each is followed by one MMDialog-style photo
    and one reply step (round robin, as the benchmark's runs train one model on every task), with
    ``"photos"`` by one MMDialog-style photo step."""
    torch.manual_seed(0)
    cfg = preset("finetune", backbone=STANDIN)
    model, bb = build_model(cfg, seed=0)
    reader = ReaderConfig.from_model_config(cfg)
    ds = CanonicalDataset.load(corpus.photochat)
    probe = loader(ds, "image", bb, reader)
    row = {"lr": lr, "steps": steps, "batching": batching, "towers": towers, "tasks": tasks,
           "before": {**in_batch(model, probe), **pool_sums(model, bb, ds, reader)}}
    order = cluster_order(model, ds, bb, clusters, 0) if batching == "clustered" else None
    _freeze(model, towers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    streams = [_endless(lambda: loader(ds, "image", bb, reader, sampler=order()) if order
                        else loader(ds, "image", bb, reader))]
    if tasks != "photo":
        mm = CanonicalDataset.load(corpus.mmdialog)
        streams += [_endless(lambda tt=tt: loader(mm, tt, bb, reader)) for tt in MIXES[tasks]]
    losses, t0 = [], time.time()
    model.train()
    for done in range(1, steps + 1):
        for k, stream in enumerate(streams):
            loss = model(next(stream))["loss"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if k == 0:
                losses.append(loss.item())
        if done % 50 == 0:
            print(f"  [{batching} lr={lr:g} {towers} {tasks}] step {done}/{steps} loss {np.mean(losses[-50:]):.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    row["train_loss_first_last_50"] = [float(np.mean(losses[:50])), float(np.mean(losses[-50:]))]
    row["after"] = {**in_batch(model, probe), **pool_sums(model, bb, ds, reader)}
    row["seconds"] = time.time() - t0
    return row


def markdown(report: dict) -> str:
    lines = ["# Fine-tuning probe: what training fits, and whether it transfers", "",
             f"Command: `{report['command']}`. Stand-in `{report['backbone']}`, corpus `{report['corpus']}`.", "",
             "## False in-batch negatives (zero-shot, batches of 32)", "",
             "| task | pairs masked per batch | loss | loss unmasked | in-batch accuracy |", "|---|---|---|---|---|"]
    for t in report["false_negatives"]:
        lines.append(f"| {t['task']} | {t['false_negatives_per_batch']:.2f} | {t['loss']:.2f} | "
                     f"{t['loss_unmasked']:.2f} | {t['accuracy']:.3f} |")
    lines += ["", "## `finetune` on PhotoChat-style photos: fit vs transfer", "",
              "| batching | lr | towers trained | tasks trained | PhotoChat steps | in-batch acc | in-batch loss | "
              "trained queries vs train pool Sum | dev Sum |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["finetune"]:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['batching']} | {r['lr']:g} | {r['towers']} | {MIX_NAMES[r['tasks']]} | {r['steps']} | "
                     f"{b['accuracy']:.3f} -> {a['accuracy']:.3f} | "
                     f"{b['loss']:.2f} -> {a['loss']:.2f} | {b['trained_queries_vs_train_pool_Sum']:.1f} -> "
                     f"{a['trained_queries_vs_train_pool_Sum']:.1f} | {b['dev_Sum']:.1f} -> {a['dev_Sum']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lrs", default="1e-5,1e-4,3e-4", help="backbone learning rates, random batches, both towers")
    ap.add_argument("--cluster-lr", type=float, default=1e-4, help="the clustered row's learning rate (0: none)")
    ap.add_argument("--tower-lrs", default="text=3e-4,vision=1e-4", help="rows training one tower only")
    ap.add_argument("--mix-lr", type=float, default=3e-4, help="learning rate of the task-mix rows")
    ap.add_argument("--mixes", default="all", help="task-mix rows, round robin: all = the three tasks, "
                    "photos = the two photo tasks (no replies)")
    ap.add_argument("--clusters", type=int, default=60, help="k-means clusters for the clustered row")
    ap.add_argument("--cache", default="runs/cache")
    ap.add_argument("--out", default=str(RESULTS / "finetune_probe"))
    args = ap.parse_args(argv)
    spec = dict(B.BENCH_CORPUS)
    corpus = ensure_corpus(Path(args.cache), spec.pop("dialogs"), 0, 64, **spec)

    cfg = preset("finetune", backbone=STANDIN)
    model, bb = build_model(cfg, seed=0)
    reader = ReaderConfig.from_model_config(cfg)
    fns = []
    for name, tt in TASKS:
        ds = CanonicalDataset.load(getattr(corpus, name))
        fns.append({"task": f"{name}/{tt}", **in_batch(model, loader(ds, tt, bb, reader))})
        print(f"[1] {fns[-1]}", flush=True)
    lrs = [float(x) for x in args.lrs.split(",") if x]
    rows = [finetune(corpus, lr, args.steps, "random", args.clusters) for lr in lrs]
    if args.cluster_lr:
        rows.append(finetune(corpus, args.cluster_lr, args.steps, "clustered", args.clusters))
    for item in filter(None, args.tower_lrs.split(",")):
        towers, lr = item.split("=")
        rows.append(finetune(corpus, float(lr), args.steps, "random", args.clusters, towers=towers))
    for mix in filter(None, args.mixes.split(",")):
        rows.append(finetune(corpus, args.mix_lr, args.steps, "random", args.clusters, tasks=mix))
    report = {"command": "python bench/finetune_probe.py" + (f" {' '.join(argv)}" if argv else ""),
              "backbone": " + ".join(B.STANDIN_BACKBONE),
              "corpus": B.rel(corpus.raw), "batch_size": BATCH, "max_train": MAX_TRAIN,
              "false_negatives": fns, "finetune": rows}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
