"""The Ray GPU path, run for real on one GPU: Ray Train (prompt tuning and full fine-tuning),
Ray Data evaluation with GPU actors, and the Serve app with its encoder on the GPU.

Runs on the GPU host from the repo root after the kit is installed (``bench/gpu_run.sh`` does
both; the kit comes from ``bench/gpu_kit.sh``). ViT-B-32 with random weights (open_clip
``pretrained=None``), one Ray Train worker (NCCL process group, bf16 autocast), synthetic data
generated on the host. Stages, each in try/except with its error recorded, results rewritten
after every stage (partial results survive a crash or a timeout):

  env        versions, where ray/torch/dialclip_ray were imported from, unmet requirements
  data       synthetic corpus (``pipelines.experiments.ensure_corpus``) for training + a small one for serving
  train_dialclip / train_finetune
             ``train.run.run_training`` (Ray Train TorchTrainer, 1 GPU worker): samples/s, step time,
             peak GPU memory (torch.cuda.max_memory_allocated in the worker), analytic MFU
  evaluate   ``evaluation.distributed.evaluate_with_ray`` (Ray Data actor pool; each actor takes
             1/actors of the GPU when the cluster has one: that function has no GPU argument)
  serve      ``index.build.build_index`` (flat) + ``serving.app.build_app`` (use_gpu: encoder and shards
             on the GPU) behind Serve's HTTP proxy on 127.0.0.1; p50/p99 latency, requests/s

FAISS: the host has none (faiss-gpu is ~200 MB and cannot travel). When ``import faiss`` fails,
this script writes a stand-in ``faiss`` module (exact inner-product "flat" search with torch, on
the GPU when the index is moved there) and puts it on PYTHONPATH for the driver and every Ray
worker; the index and serve stages then run with it and the results say so (``faiss``).

MFU: FLOPs per training step are estimated analytically with the 2 * params * tokens rule for
the transformer blocks of the ViT-B-32 towers (attention-score matmuls and the small added modules
left out), from the training split's real turn/image counts; forward = 1x, backward = 2x for a
trained tower, 1x for a frozen tower that gradients pass through (prompts), 0 for no-grad
context encoding. Divided by the dense bf16 peak of an H100/H200 (989 TFLOP/s).

    python bench/gpu_ray_check.py [--dialogs 8000] [--epochs 3] [--batch 128] [--stages ...]
    python bench/gpu_ray_check.py --smoke          # CPU plumbing check: tiny model and data, no GPU
    python bench/gpu_ray_check.py --features auto  # FEATURE STORE: passed through (see --features)

Writes bench/results/gpu_ray_check.json (and $OUT/gpu_ray_check.json when $OUT is set); every
path in it is repo-relative or a <placeholder>.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12}  # SXM, dense (no sparsity), per GPU
STAGES = ("env", "data", "train_dialclip", "train_finetune", "evaluate", "serve")

# ------------------------------------------------------------------------------------------------
# A stand-in for the FAISS calls dialclip_ray makes (flat index only), for hosts without FAISS.
# ------------------------------------------------------------------------------------------------
FAISS_SHIM = r'''"""Stand-in for the FAISS calls of dialclip_ray, for the GPU check's host (which has no FAISS).

Exact inner-product search ("flat") with torch, on the GPU after index_cpu_to_gpu. Written by
bench/gpu_ray_check.py. IVF, IVF-PQ and HNSW are not provided (they raise NotImplementedError).
"""
import numpy as np
import torch

__version__ = "0.0+dialclip-torch-shim"
IS_DIALCLIP_SHIM = True
METRIC_INNER_PRODUCT = 0
METRIC_L2 = 1
_LOWEST = np.float32(-3.4028235e38)
_HIGHEST = np.float32(3.4028235e38)


def omp_set_num_threads(n):
    torch.set_num_threads(max(1, int(n)))


def get_num_gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def normalize_L2(x):
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 2):
        raise TypeError("normalize_L2 needs a C-contiguous float32 [n, d] array (it works in place)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    x /= norms


class Index:
    pass


class IndexFlatIP(Index):
    def __init__(self, d, _device="cpu"):
        self.d = int(d)
        self.metric_type = METRIC_INNER_PRODUCT
        self.is_trained = True
        self._x = torch.zeros(0, self.d, dtype=torch.float32, device=_device)

    @property
    def ntotal(self):
        return int(self._x.shape[0])

    def train(self, x):
        pass

    def reset(self):
        self._x = self._x[:0]

    def add(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"add: expected [n, {self.d}], got {x.shape}")
        self._x = torch.cat([self._x, torch.from_numpy(x).to(self._x.device)])

    def search(self, x, k):
        q = np.ascontiguousarray(x, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"search: expected [n, {self.d}], got {q.shape}")
        k = int(k)
        D = np.full((q.shape[0], k), _LOWEST, np.float32)
        I = np.full((q.shape[0], k), -1, np.int64)
        kk = min(k, self.ntotal)
        if kk and q.shape[0]:
            scores = torch.from_numpy(q).to(self._x.device) @ self._x.T
            v, i = torch.topk(scores, kk, dim=1)
            D[:, :kk] = v.cpu().numpy()
            I[:, :kk] = i.cpu().numpy()
        return D, I


class GpuIndexFlatIP(IndexFlatIP):
    pass


class IndexHNSWFlat(Index):
    def __init__(self, *a, **k):
        raise NotImplementedError("faiss stand-in: only flat indexes")


def index_factory(d, description, metric=METRIC_INNER_PRODUCT):
    if description.strip() == "Flat" and metric == METRIC_INNER_PRODUCT:
        return IndexFlatIP(d)
    raise NotImplementedError(f"faiss stand-in: only 'Flat' inner-product indexes, not {description!r}")


def extract_index_ivf(index):
    raise NotImplementedError("faiss stand-in: no IVF indexes")


def downcast_index(index):
    return index


class IndexRefine(Index):  # never built: isinstance checks of dialclip_ray.index.factory answer False
    pass


class IndexHNSW(Index):
    pass


def clone_index(index):
    new = type(index).__new__(type(index))
    new.__dict__.update(index.__dict__)
    new._x = index._x.clone()
    return new


class StandardGpuResources:
    pass


class GpuClonerOptions:
    useFloat16 = False


class GpuParameterSpace:
    def set_index_parameter(self, index, name, value):
        pass  # flat indexes have no search parameters


def index_cpu_to_gpu(resources, device, index, options=None):
    gpu = GpuIndexFlatIP(index.d, _device=f"cuda:{int(device)}")
    gpu._x = index._x.to(f"cuda:{int(device)}")
    return gpu


def index_gpu_to_cpu(index):
    cpu = IndexFlatIP(index.d)
    cpu._x = index._x.cpu()
    return cpu


def write_index(index, path):
    with open(path, "wb") as f:
        np.save(f, index._x.cpu().numpy(), allow_pickle=False)


def read_index(path):
    try:
        with open(path, "rb") as f:
            x = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"faiss stand-in cannot read {path}: {err}") from None
    index = IndexFlatIP(x.shape[1])
    index._x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return index


class ResultHeap:
    """Top-k merge of (D, I) blocks, like faiss.ResultHeap (keep_max=True: largest scores first)."""

    def __init__(self, nq, k, keep_max=False):
        self.nq, self.k, self.keep_max = int(nq), int(k), bool(keep_max)
        self.D = np.full((self.nq, self.k), _LOWEST if keep_max else _HIGHEST, np.float32)
        self.I = np.full((self.nq, self.k), -1, np.int64)
        self._blocks = []

    def add_result(self, D, I):
        D = np.ascontiguousarray(D, dtype=np.float32)
        I = np.ascontiguousarray(I, dtype=np.int64)
        if D.shape != I.shape or D.ndim != 2 or D.shape[0] != self.nq:
            raise ValueError(f"add_result: D {D.shape} / I {I.shape} for {self.nq} queries")
        self._blocks.append((D, I))

    def finalize(self):
        D = np.concatenate([self.D] + [d for d, _ in self._blocks], axis=1)
        I = np.concatenate([self.I] + [i for _, i in self._blocks], axis=1)
        order = np.argsort(-D if self.keep_max else D, axis=1, kind="stable")[:, : self.k]
        self.D = np.take_along_axis(D, order, axis=1)
        self.I = np.take_along_axis(I, order, axis=1)
        self._blocks = []
'''


def install_faiss_shim(directory: Path) -> Path:
    """Write the stand-in as ``directory/faiss/__init__.py``; put ``directory`` on sys.path and PYTHONPATH."""
    pkg = directory / "faiss"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(FAISS_SHIM)
    sys.path.insert(0, str(directory))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH", "")]))
    for name in [m for m in sys.modules if m == "faiss" or m.startswith("faiss.")]:
        del sys.modules[name]
    return directory


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
class Results:
    """The JSON file, rewritten after every stage; absolute paths are replaced by public names."""

    def __init__(self, dests: list[Path], bases: dict[str, str]):
        self.dests, self.bases = dests, bases
        self.data: dict = {"script": "bench/gpu_ray_check.py", "started_unix": round(time.time()), "stages": {}}

    def public(self, value):
        if isinstance(value, dict):
            return {k: self.public(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.public(v) for v in value]
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, str) and os.sep in value:
            for label, base in self.bases.items():
                if base and (value == base or value.startswith(base.rstrip(os.sep) + os.sep)):
                    rel = os.path.relpath(value, base)
                    return rel if label == "repo" else f"<{label}>/{rel}".rstrip("/.")
            if os.path.isabs(value):
                parts = Path(value).parts
                return "<abs>/" + "/".join(parts[-2:])
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    def write(self) -> None:
        self.data["updated_unix"] = round(time.time())
        text = json.dumps(self.public(self.data), indent=2, default=str)
        for dest in self.dests:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            tmp.write_text(text)
            tmp.replace(dest)


def run_stage(res: Results, name: str, fn, deadline: float, min_left_s: float = 0.0) -> dict | None:
    entry: dict = {}
    res.data["stages"][name] = entry
    left = deadline - time.time()
    if left < min_left_s:
        entry.update(ok=False, skipped=f"time budget: {left:.0f} s left, stage needs about {min_left_s:.0f} s")
        print(f"[{name}] skipped ({entry['skipped']})", flush=True)
        res.write()
        return None
    t0 = time.time()
    print(f"[{name}] start", flush=True)
    try:
        out = fn(entry)
        entry["ok"] = True
        return out
    except BaseException as exc:  # a stage failure (or Ctrl-C) must still leave its record
        entry["ok"] = False
        entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        entry["traceback"] = traceback.format_exc()[-4000:]
        print(f"[{name}] FAILED: {entry['error']}", flush=True)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return None
    finally:
        entry["seconds"] = round(time.time() - t0, 2)
        print(f"[{name}] {entry['seconds']} s", flush=True)
        res.write()


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------
def _where(module) -> str:
    return str(Path(module.__file__).resolve().parent)


def unmet_requirements() -> list[dict]:
    """Requirements of ray[data,train,tune,serve] and of this project that this environment does not meet."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    roots = []
    try:
        import tomllib

        roots = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    except Exception:  # noqa: BLE001 - tomllib is 3.11+, pyproject may be mid-edit
        pass
    todo = [(r, "<project>") for r in map(Requirement, roots) if r.marker is None or r.marker.evaluate()]
    seen, unmet = set(), []
    while todo:
        req, parent = todo.pop()
        key = (req.name.lower(), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            unmet.append({"name": req.name, "spec": str(req.specifier), "installed": None, "by": parent})
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            unmet.append({"name": req.name, "spec": str(req.specifier), "installed": dist.version, "by": parent})
        for line in dist.requires or []:
            child = Requirement(line)
            envs = [{"extra": e} for e in (req.extras or {""})]
            if child.marker is None or any(child.marker.evaluate(e) for e in envs):
                child.marker = None
                todo.append((child, req.name))
    return unmet


def stage_env(entry: dict, args, ctx: dict) -> None:
    import importlib.metadata as md
    import platform

    import torch

    entry["python"] = platform.python_version()
    entry["torch"] = torch.__version__
    entry["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        entry["device"] = torch.cuda.get_device_name(0)
        entry["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        entry["cuda"] = torch.version.cuda
        entry["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
    entry["cpus"] = os.cpu_count()
    versions = {}
    for name in ("ray", "numpy", "pyarrow", "pandas", "pydantic", "open_clip_torch", "protobuf", "grpcio",
                 "aiohttp", "fastapi", "starlette", "uvicorn", "timm", "torchvision", "dialclip-ray"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    entry["versions"] = versions
    import ray

    import dialclip_ray

    entry["imported_from"] = {"ray": _where(ray), "torch": _where(torch), "dialclip_ray": _where(dialclip_ray)}
    try:
        import faiss

        entry["faiss"] = "torch stand-in (flat only)" if getattr(faiss, "IS_DIALCLIP_SHIM", False) \
            else f"faiss {faiss.__version__}"
    except ImportError as exc:
        entry["faiss"] = f"missing ({exc})"
    entry["unmet_requirements"] = unmet_requirements()
    entry["features_flag"] = args.features


def stage_data(entry: dict, args, ctx: dict) -> None:
    from dialclip_ray.data.dataset import CanonicalDataset
    from dialclip_ray.pipelines.experiments import ensure_corpus

    t0 = time.time()
    corpus = ensure_corpus(ctx["work"] / "corpus", dialogs=args.dialogs, seed=0, image_size=args.image_size)
    entry["train_corpus_seconds"] = round(time.time() - t0, 2)
    t0 = time.time()
    serve_corpus = ensure_corpus(ctx["work"] / "corpus", dialogs=args.serve_dialogs, seed=1,
                                 image_size=args.image_size)
    entry["serve_corpus_seconds"] = round(time.time() - t0, 2)
    ctx["corpus"], ctx["serve_corpus"] = corpus, serve_corpus
    counts, stats = {}, {}
    for d in corpus.datasets:
        ds = CanonicalDataset.load(d)
        for split in ("train", "dev", "test"):
            for t in ("image", "text"):
                ex = ds.examples(split, t)
                if ex:
                    counts[f"{Path(d).name}/{split}/{t}"] = len(ex)
                    if split == "train":
                        stats[(d, t)] = _context_counts(ex, ctx["max_turns"], ctx["max_images"])
    entry.update(dialogs=args.dialogs, serve_dialogs=args.serve_dialogs, image_size=args.image_size,
                 examples=counts)
    ctx["train_stats"] = stats


def _context_counts(records, max_turns: int, max_images: int) -> dict:
    n = len(records)
    turns = sum(min(len(r.context), max_turns) for r in records) / n
    images = 0
    for r in records:
        kept = r.context[-max_turns:]
        k = sum(len(t.image_ids) for t in kept)
        images += min(k, max_images) if max_images else 0
    return {"examples": n, "turns": turns, "images": images / n}


def tower_geometry(model_name: str) -> dict:
    """Matmul parameter counts and token counts of the two towers, from open_clip's config."""
    import open_clip

    from dialclip_ray.model.backbone import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    t, v = cfg["text_cfg"], cfg["vision_cfg"]

    def block_params(width: int, layers: int, mlp_ratio: float) -> int:
        return layers * (4 * width * width + 2 * width * int(width * mlp_ratio))

    image, patch = int(v.get("image_size", 224)), int(v.get("patch_size", 32))
    patches = (image // patch) ** 2
    return {"text_params": block_params(t["width"], t["layers"], t.get("mlp_ratio", 4.0)),
            "text_tokens": int(t.get("context_length", 77)), "text_layers": int(t["layers"]),
            "vision_params": block_params(v["width"], v["layers"], v.get("mlp_ratio", 4.0)),
            "vision_tokens": patches + 1, "vision_layers": int(v["layers"]),
            "patch_embed_flops": 2 * 3 * patch * patch * v["width"] * patches}


def step_flops(geo: dict, model_cfg, stats: dict, batch: int, features: bool) -> tuple[float, dict]:
    """Analytic FLOPs of the epoch's average training step (see the module doc)."""
    trained = model_cfg.variant == "finetune"
    bwd = 2.0 if trained else 1.0            # backward: activations (+ weights when the tower trains)
    ld = model_cfg.domain_prompt_length
    lc = model_cfg.context_prompt_length
    ins = getattr(model_cfg, "insertion_layer", 0)
    text_fwd = lambda tokens: 2 * geo["text_params"] * tokens
    vis_fwd = lambda tokens: 2 * geo["vision_params"] * tokens + geo["patch_embed_flops"]
    q_tokens = geo["text_tokens"] + ld + lc * (1 - ins / geo["text_layers"])
    per_type, total = {}, 0.0
    for (dataset, ttype), s in stats.items():
        query = text_fwd(q_tokens) * (1 + bwd)
        target = (vis_fwd(geo["vision_tokens"] + ld) if ttype == "image" else text_fwd(geo["text_tokens"] + ld)) \
            * (1 + bwd)
        context = 0.0
        if lc and not features:  # no-grad forward of every kept turn / context image through the frozen towers
            context = s["turns"] * text_fwd(geo["text_tokens"]) + s["images"] * vis_fwd(geo["vision_tokens"])
        per_example = query + target + context
        n_batches = s["examples"] // batch
        per_type[f"{Path(dataset).name}/{ttype}"] = {"batches": n_batches, "gflop_per_example": per_example / 1e9,
                                                     "context_share": context / per_example}
        total += per_example * n_batches * batch
    steps = sum(v["batches"] for v in per_type.values())
    return (total / steps if steps else float("nan")), per_type


def train_config(args, ctx: dict, variant: str) -> dict:
    cfg = {
        "model": {"preset": "finetune" if variant == "finetune" else "default",
                  "backbone": {"model_name": args.backbone, "pretrained": None}},
        "data": {"train": ctx["corpus"].datasets, "max_val_examples": args.max_val_examples,
                 "loader_workers": args.loader_workers},
        "optim": {"epochs": args.epochs, "batch_size": args.batch, "lr": 1e-3, "backbone_lr": 1e-5,
                  "warmup_steps": 20, "eval_batch_size": 256},
        "run": {"name": f"gpu-check-{variant}", "storage_path": str(ctx["work"] / "runs"), "workers": 1,
                "use_gpu": ctx["gpu"], "amp": "bf16" if ctx["gpu"] else "none", "seed": 0, "max_failures": 0,
                "num_to_keep": 1},
    }
    if args.features is not None:
        # FEATURE STORE (being added): the value of --features goes to this config key unchanged.
        node = cfg
        *parents, leaf = args.features_key.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = args.features
    return cfg


def stage_train(entry: dict, args, ctx: dict, variant: str) -> None:
    from dialclip_ray.train.config import TrainConfig
    from dialclip_ray.train.run import run_training

    raw = train_config(args, ctx, variant)
    cfg = TrainConfig.model_validate(raw)
    entry["config"] = {"variant": variant, "backbone": args.backbone, "pretrained": None, "batch": args.batch,
                       "epochs": args.epochs, "workers": 1, "use_gpu": ctx["gpu"], "amp": raw["run"]["amp"],
                       "loader_workers": args.loader_workers, "features": args.features,
                       "process_group": "nccl (Ray Train's default for GPU workers)" if ctx["gpu"] else "gloo"}
    import shutil

    shutil.rmtree(ctx["work"] / "runs" / raw["run"]["name"], ignore_errors=True)  # always train, never resume
    t0 = time.time()
    outcome = run_training(cfg)
    entry["wall_seconds"] = round(time.time() - t0, 2)
    hist = outcome.history
    epochs, prev_step = [], 0
    for h in hist:
        steps = int(h["step"]) - prev_step
        prev_step = int(h["step"])
        sec = float(h["epoch_seconds"])
        epochs.append({"epoch": h["epoch"], "steps": steps, "epoch_seconds": round(sec, 3),
                       "step_ms": round(1000 * sec / steps, 2) if steps else None,
                       "samples_per_s": round(steps * args.batch / sec, 1) if steps and sec else None,
                       "train_loss": h.get("train_loss"), "val_sum": h.get("val_sum"),
                       "peak_gpu_mb": h.get("peak_gpu_mb")})
    entry["epochs"] = epochs
    entry["total_steps"] = prev_step
    entry["trainable_params"] = hist[-1].get("trainable_params") if hist else None
    entry["trainable_percent"] = hist[-1].get("trainable_percent") if hist else None
    steady = epochs[1:] or epochs  # the first epoch carries CUDA/cuDNN warm-up and DataLoader start-up
    steps = sum(e["steps"] for e in steady)
    secs = sum(e["epoch_seconds"] for e in steady)
    entry["steady_epochs"] = [e["epoch"] for e in steady]
    entry["samples_per_s"] = round(steps * args.batch / secs, 1) if secs else None
    entry["step_ms"] = round(1000 * secs / steps, 2) if steps else None
    entry["peak_gpu_mb"] = max((e["peak_gpu_mb"] or 0) for e in epochs) if epochs else None
    entry["peak_gpu_note"] = "torch.cuda.max_memory_allocated() in the Train worker (validation included)"
    try:
        flops, per_type = step_flops(ctx["geometry"], cfg.model, ctx["train_stats"], args.batch,
                                     args.features is not None)
        entry["flops_per_step_tflop"] = round(flops / 1e12, 3)
        entry["flops_by_loader"] = per_type
        peak = ctx.get("peak_flops")
        entry["achieved_tflops"] = round(flops / (entry["step_ms"] / 1000) / 1e12, 2) if entry["step_ms"] else None
        entry["mfu"] = round(flops / (entry["step_ms"] / 1000) / peak, 4) if peak and entry["step_ms"] else None
        entry["mfu_note"] = ("analytic 2*params*tokens of the tower blocks (module doc); step time = the training "
                             "loop's wall time per step (data loading waits and the optimizer included, the "
                             "per-epoch validation excluded); peak " + (f"{peak / 1e12:.0f} TFLOP/s bf16 dense"
                                                                       if peak else "unknown for this device"))
    except Exception as exc:  # noqa: BLE001 - the estimate must not lose the measured numbers
        entry["mfu_error"] = f"{type(exc).__name__}: {exc}"
    ctx[f"run_{variant}"] = outcome


def stage_evaluate(entry: dict, args, ctx: dict) -> None:
    from dialclip_ray.evaluation import distributed

    run = ctx.get("run_dialclip") or ctx.get("run_finetune")
    if run is None:
        raise RuntimeError("no trained checkpoint (both training stages failed or were skipped)")
    params = inspect.signature(distributed.evaluate_with_ray).parameters
    kwargs = {"actors": args.eval_actors, "batch_size": args.eval_batch}
    if args.features is not None and "features" in params:
        kwargs["features"] = args.features  # FEATURE STORE pass-through
    entry["signature"] = str(inspect.signature(distributed.evaluate_with_ray))
    entry["gpu_per_actor"] = (f"1/{args.eval_actors} (automatic: the cluster has a GPU)" if ctx["gpu"]
                              else "0 (no GPU)")
    entry["kwargs"] = kwargs
    entry["checkpoint"] = run.best
    per = {}
    for d in ctx["corpus"].datasets:
        t0 = time.time()
        m = distributed.evaluate_with_ray(run.best, d, "test", **kwargs)
        sec = time.time() - t0
        per[Path(d).name] = {"seconds": round(sec, 2), "sum": m.get("sum"),
                             "per_type": {k: {kk: v[kk] for kk in ("R@1", "R@10", "MRR") if kk in v}
                                          for k, v in m.get("per_type", {}).items()}}
    entry["datasets"] = per


def _requests_from_corpus(dataset_dirs: list[str], n: int) -> list[dict]:
    """Request bodies from the dev/test dialogs of the serving corpora (context images by corpus id)."""
    from dialclip_ray.data.dataset import CanonicalDataset

    per = max(1, n // len(dataset_dirs))
    out = []
    for d in dataset_dirs:
        ds = CanonicalDataset.load(d)
        taken = 0
        for r in ds.examples("test") + ds.examples("dev"):
            images_left, turns = 16, []
            for t in r.context[-16:]:
                ids = [i for i in t.image_ids if ds.has_image(i)][:max(0, min(8, images_left))]
                images_left -= len(ids)
                turns.append({"speaker": int(t.speaker), "text": t.text[:4000], "images": [{"id": i} for i in ids]})
            body = {"context": turns, "current": r.current_text[:4000], "k": 10, "target": r.target_type}
            if any(t["text"].strip() or t["images"] for t in turns) or body["current"].strip():
                out.append(body)
                taken += 1
            if taken >= per:
                break
    if not out:
        raise RuntimeError(f"no usable dialog in {dataset_dirs}")
    return out


def _post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, float, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
            return resp.status, time.perf_counter() - t0, data
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - t0, err.read()


def _latency(ms: list[float]) -> dict:
    ms = sorted(ms)
    if not ms:
        return {}
    def pick(q: float) -> float:  # nearest rank
        return ms[min(len(ms) - 1, max(0, math.ceil(q * len(ms)) - 1))]

    return {"n": len(ms), "p50_ms": round(pick(0.50), 2), "p90_ms": round(pick(0.90), 2),
            "p99_ms": round(pick(0.99), 2), "mean_ms": round(statistics.fmean(ms), 2), "max_ms": round(ms[-1], 2)}


def stage_serve(entry: dict, args, ctx: dict) -> None:
    import ray
    from ray import serve

    from dialclip_ray.index.build import build_index
    from dialclip_ray.serving.app import build_app
    from dialclip_ray.serving.loopback import free_port

    run = ctx.get("run_dialclip") or ctx.get("run_finetune")
    if run is None:
        raise RuntimeError("no trained checkpoint (both training stages failed or were skipped)")
    serve_dirs = ctx["serve_corpus"].datasets
    index_dir = ctx["work"] / "index"
    t0 = time.time()
    build_index(run.best, serve_dirs, index_dir, shards=2, kind="flat", actors=args.eval_actors,
                batch_size=args.eval_batch, overwrite=True)
    entry["index_build_seconds"] = round(time.time() - t0, 2)
    app_args = {"checkpoint": str(run.best), "index_dir": str(index_dir), "use_gpu": ctx["gpu"], "top_k": 10,
                "encoder_gpus": 0.5, "shard_gpus": 0.125, "encoder_cpus": 1, "shard_cpus": 0.5,
                "shard_autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2}}
    from dialclip_ray.serving.schemas import AppArgs

    app_args = {k: v for k, v in app_args.items() if k in AppArgs.model_fields}
    entry["app_args"] = app_args
    port = free_port()
    t0 = time.time()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="gpu-check", route_prefix="/")
    entry["serve_start_seconds"] = round(time.time() - t0, 2)
    url = f"http://127.0.0.1:{port}/v1/retrieve"
    requests = _requests_from_corpus(serve_dirs, 64)
    entry["request_mix"] = {"dialogs": len(requests),
                            "with_context_images": sum(any(t["images"] for t in b["context"]) for b in requests),
                            "text_targets": sum(b["target"] == "text" for b in requests)}
    bodies = [json.dumps(b).encode() for b in requests]
    codes: dict[str, int] = {}
    first_err = None

    def one(i: int) -> float | None:
        nonlocal first_err
        code, sec, data = _post(url, bodies[i % len(bodies)])
        codes[str(code)] = codes.get(str(code), 0) + 1
        if code != 200:
            first_err = first_err or data[:300].decode(errors="replace")
            return None
        return sec * 1000

    for i in range(args.serve_warmup):
        one(i)
    codes.clear()
    seq = [one(i) for i in range(args.serve_requests)]
    entry["sequential"] = _latency([x for x in seq if x is not None])
    t0 = time.time()
    with ThreadPoolExecutor(args.serve_concurrency) as pool:
        conc = list(pool.map(one, range(args.serve_requests * 2)))
    wall = time.time() - t0
    entry["concurrent"] = {**_latency([x for x in conc if x is not None]), "concurrency": args.serve_concurrency,
                           "requests_per_s": round(len(conc) / wall, 1)}
    entry["status_codes"] = codes
    if first_err:
        entry["first_error_body"] = first_err
    sample = json.loads(_post(url, bodies[0])[2] or b"{}")
    entry["sample_hits"] = len(sample.get("hits", []))
    try:
        entry["serve_placement"] = {k: v for k, v in ray.available_resources().items() if k in ("GPU", "CPU")}
    finally:
        serve.shutdown()


# ------------------------------------------------------------------------------------------------
def start_ray(ray, cpus: int, gpus: int, attempts: int = 3) -> None:
    """``ray.init`` of a cluster of our own; retried, since Ray gives its raylet a fixed 30 s to register."""
    for attempt in range(1, attempts + 1):
        try:
            # address="local": a cluster of our own even where another one runs (ray.init would join it)
            ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=True,
                     logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"),
                     runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"}})
            return
        except Exception as exc:  # noqa: BLE001
            print(f"ray.init attempt {attempt} failed: {exc}", flush=True)
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
            if attempt == attempts:
                raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--dialogs", type=int, default=8000, help="training corpus (about 110 steps/epoch at batch 128)")
    ap.add_argument("--serve-dialogs", type=int, default=400, help="corpus the serving index is built from")
    ap.add_argument("--image-size", type=int, default=64, help="synthetic image size (the model resizes to 224)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default: CPUs - 4)")
    ap.add_argument("--max-val-examples", type=int, default=256)
    ap.add_argument("--eval-actors", type=int, default=2)
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--serve-requests", type=int, default=200, help="sequential; twice as many concurrent")
    ap.add_argument("--serve-concurrency", type=int, default=8)
    ap.add_argument("--serve-warmup", type=int, default=10)
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stages that would not fit are skipped (default 420; --smoke: no limit)")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--out", default=None,
                    help="default bench/results/gpu_ray_check.json (--smoke: <work>/gpu_ray_check.smoke.json)")
    ap.add_argument("--faiss", choices=("auto", "shim"), default="auto",
                    help="auto: the stand-in only when faiss cannot be imported; shim: always the stand-in")
    # ---- FEATURE STORE (the lead is adding precomputed frozen CLIP features for context turns/images) ----
    ap.add_argument("--features", default=None,
                    help="FEATURE STORE flag, passed through unchanged: set as the training config key "
                         "--features-key and as evaluate_with_ray(features=...) when that accepts it; "
                         "the MFU estimate then counts no context-encoding FLOPs. Default: not passed.")
    ap.add_argument("--features-key", default="data.features", help="dotted training-config key for --features")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU plumbing check: dialclip-micro, 60 dialogs, 1 epoch, batch 8, no GPU")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backbone, args.dialogs, args.serve_dialogs, args.image_size = "dialclip-micro", 60, 40, 32
        args.epochs, args.batch, args.max_val_examples, args.eval_batch = 1, 8, 16, 32
        args.serve_requests, args.serve_concurrency, args.serve_warmup = 10, 2, 2
        args.loader_workers = 0 if args.loader_workers is None else args.loader_workers
    if args.budget_s is None:
        args.budget_s = float("inf") if args.smoke else 420.0
    if args.loader_workers is None:
        args.loader_workers = max(0, min(12, (os.cpu_count() or 2) - 4))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    t_start = time.time()
    deadline = t_start + args.budget_s
    work = Path(args.work or tempfile.mkdtemp(prefix="dialclip-gpu-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    default_out = work / "gpu_ray_check.smoke.json" if args.smoke else REPO / "bench" / "results" / "gpu_ray_check.json"
    dests = [Path(args.out or default_out).resolve()]
    if os.environ.get("OUT") and not args.smoke:
        dests.append(Path(os.environ["OUT"]) / "gpu_ray_check.json")
    bases = {"repo": str(REPO), "work": str(work), "kit-site": os.environ.get("KIT_SITE", ""),
             "out": os.environ.get("OUT", ""), "python": str(Path(sys.prefix).resolve())}
    res = Results(dests, bases)
    res.data["args"] = vars(args)
    shim = args.faiss == "shim"
    if not shim:
        try:
            import faiss  # noqa: F401
        except ImportError:
            shim = True
    if shim:
        install_faiss_shim(work / "faiss_shim")
    res.data["faiss"] = "torch stand-in (bench/gpu_ray_check.py FAISS_SHIM; flat exact search)" if shim \
        else "faiss"
    res.write()

    import ray
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    ctx: dict = {"work": work, "gpu": gpu,
                 "peak_flops": next((v for k, v in PEAK_BF16_DENSE.items() if k in name), None) if gpu else None}
    res.data["device"] = name
    if not gpu and not args.smoke:
        res.data["error"] = "no CUDA device (use --smoke for the CPU plumbing check)"
        res.write()
        print(res.data["error"], flush=True)
        return 2
    from dialclip_ray.model.config import preset

    default_cfg = preset("default")
    ctx["max_turns"], ctx["max_images"] = default_cfg.max_context_turns, default_cfg.max_context_images
    try:
        ctx["geometry"] = tower_geometry(args.backbone)
        res.data["geometry"] = ctx["geometry"]
    except Exception as exc:  # noqa: BLE001
        res.data["geometry_error"] = str(exc)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; known: {STAGES}")
    # rough minimum seconds each stage needs on an H100 (skipped when less is left)
    need = {"env": 0, "data": 0, "train_dialclip": 60, "train_finetune": 60, "evaluate": 30, "serve": 45}
    fns = {"env": stage_env, "data": stage_data, "evaluate": stage_evaluate, "serve": stage_serve,
           "train_dialclip": lambda e, a, c: stage_train(e, a, c, "dialclip"),
           "train_finetune": lambda e, a, c: stage_train(e, a, c, "finetune")}
    started = False
    try:
        for stage in STAGES:
            if stage not in wanted:
                continue
            if stage not in ("env", "data") and "corpus" not in ctx:
                res.data["stages"][stage] = {"ok": False, "skipped": "no corpus (data stage failed or skipped)"}
                res.write()
                continue
            if stage not in ("env", "data") and not started:
                # After the data stage: its process pool then forks a process without Ray's signal handlers.
                try:
                    start_ray(ray, (os.cpu_count() or 2) if not args.smoke else 4, 1 if gpu else 0)
                except Exception as exc:  # noqa: BLE001 - recorded; the Ray stages cannot run
                    res.data["ray_init_error"] = f"{type(exc).__name__}: {exc}"
                    for rest in [s for s in STAGES if s in wanted and s not in res.data["stages"]]:
                        res.data["stages"][rest] = {"ok": False, "skipped": "ray.init failed (ray_init_error)"}
                    break
                started = True
                res.data["ray_cluster"] = {k: v for k, v in ray.cluster_resources().items()
                                           if not k.startswith("node:")}
            run_stage(res, stage, lambda e, f=fns[stage]: f(e, args, ctx), deadline,
                      0 if args.smoke else need[stage])
    finally:
        res.data["total_seconds"] = round(time.time() - t_start, 1)
        res.write()
        if started:
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
    ok = [s for s, e in res.data["stages"].items() if e.get("ok")]
    print(json.dumps({s: {k: e.get(k) for k in ("ok", "samples_per_s", "step_ms", "peak_gpu_mb", "mfu", "error",
                                                 "skipped") if k in e}
                      for s, e in res.public(res.data)["stages"].items()}, indent=1), flush=True)
    print(f"wrote {', '.join(str(d) for d in dests)}: {len(ok)}/{len(res.data['stages'])} stages ok, "
          f"{res.data['total_seconds']} s", flush=True)
    return 0 if len(ok) == len(res.data["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
