"""Reusable pipeline steps for the demo and the synthetic benchmark, each cached on disk.

corpus (generate + prepare) -> small CLIP (pretrain) -> one training config per
variant -> trained checkpoints. Every step is keyed by its inputs, so a rerun
reuses what exists and a changed setting recomputes only what it affects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dialclip_ray.model.config import BackboneConfig, DialCLIPConfig, merge_preset
from dialclip_ray.train.config import DataSection, OptimSection, RunSection, TrainConfig

# The variants of the comparison, each the model preset of the same name: the product default (gated
# prompts that start at zero-shot CLIP), the paper's ungated form, the paper's parameter budget, the
# two baselines, and the three ablations of the default.
VARIANTS = ("default", "ungated", "paper-budget", "zeroshot", "finetune", "no-context", "no-domain", "single-expert")


@dataclass
class Corpus:
    raw: Path
    photochat: Path
    mmdialog: Path

    @property
    def datasets(self) -> list[str]:
        return [str(self.photochat), str(self.mmdialog)]


def corpus_dir_name(dialogs: int, seed: int, image_size: int, photochat_sizes: tuple[int, int, int] | None = None,
                    mmdialog_sizes: tuple[int, int, int] | None = None, caption_images: int = 0) -> str:
    """``synth-<dialogs>-s<seed>-<px>px`` for the default split sizes, else every size spelled out."""
    if photochat_sizes is None and mmdialog_sizes is None and not caption_images:
        return f"synth-{dialogs}-s{seed}-{image_size}px"
    pc = "-".join(map(str, photochat_sizes)) if photochat_sizes else str(dialogs)
    mm = "-".join(map(str, mmdialog_sizes)) if mmdialog_sizes else "auto"
    return f"synth-pc{pc}-mm{mm}-cap{caption_images}-s{seed}-{image_size}px"


def ensure_corpus(cache: Path, dialogs: int, seed: int = 0, image_size: int = 64, *,
                  photochat_sizes: tuple[int, int, int] | None = None,
                  mmdialog_sizes: tuple[int, int, int] | None = None, caption_images: int = 0) -> Corpus:
    """Synthetic corpus in the real formats, converted by the real loaders (reused when present).

    Split sizes default to the generator's (from ``dialogs``); ``photochat_sizes`` /
    ``mmdialog_sizes`` set them (train, held-out, test), ``caption_images`` adds
    pretraining-only images. A corpus written by another generator version is regenerated.
    """
    from dialclip_ray.data.prepare import prepare
    from dialclip_ray.data.schema import is_dataset_dir
    from dialclip_ray.data.synthetic import GENERATOR_VERSION, generate

    name = corpus_dir_name(dialogs, seed, image_size, photochat_sizes, mmdialog_sizes, caption_images)
    root = Path(cache).resolve() / name
    corpus = Corpus(root / "raw", root / "photochat", root / "mmdialog")
    meta = corpus.raw / "synth_meta.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("version") != GENERATOR_VERSION:
        generate(corpus.raw, dialogs=dialogs, seed=seed, image_size=image_size, photochat_sizes=photochat_sizes,
                 mmdialog_sizes=mmdialog_sizes, caption_images=caption_images, overwrite=True)
        for stale in (corpus.photochat, corpus.mmdialog):  # prepared from the old raw files
            if stale.exists():
                shutil.rmtree(stale)
    if not is_dataset_dir(corpus.photochat):
        prepare("photochat", corpus.raw / "photochat", corpus.raw / "photochat_images", corpus.photochat)
    if not is_dataset_dir(corpus.mmdialog):
        prepare("mmdialog", corpus.raw / "mmdialog", None, corpus.mmdialog)
    return corpus


def ensure_small_clip(corpus: Corpus, cache: Path, model_name: str = "dialclip-tiny", epochs: int = 6,
                      workers: int = 2, lr: float = 2e-3, batch_size: int = 128, use_gpu: bool = False,
                      **overrides):
    """The locally pretrained small CLIP (open_clip checkpoint path), trained once per config and corpus.

    Cached under ``<cache>/small_clip/<key>/`` (the key hashes config and corpus); the stable link
    ``<cache>/small_clip/<model_name>-on-<corpus dir>/`` points at the latest one for this model and
    corpus, so configs can name it (configs/synthetic.yaml) without the hash. ``overrides``: any other
    ``PretrainConfig`` field (``warmup_steps``, ``eval_max_images``, ...).
    """
    from dialclip_ray.pretrain import PretrainConfig, run_pretrain
    from dialclip_ray.rundir import publish_link

    cfg = PretrainConfig(model_name=model_name, epochs=epochs, workers=workers, lr=lr, batch_size=batch_size,
                         use_gpu=use_gpu, **overrides)
    result = run_pretrain(cfg, corpus.raw, Path(cache).resolve() / "small_clip")
    publish_link(small_clip_link(cache, model_name, corpus), result.path.parent)
    return result


def small_clip_link(cache: Path, model_name: str, corpus: Corpus) -> Path:
    """``<cache>/small_clip/<model_name>-on-<corpus dir name>``: see ``ensure_small_clip``."""
    return Path(cache).resolve() / "small_clip" / f"{model_name}-on-{corpus.raw.parent.name}"


# Settings added after runs were cached under hashed names: left out of the hash while at their
# default, so a config that does not use them keeps its run (and its finished checkpoints).
# Run-control settings (checkpoint cadence, audit log, placement) never change what is learned.
_HASH_OMITS_AT_DEFAULT = {"optim": {"validate_at_start": False},
                          "run": {"checkpoint_every_steps": None, "example_log": False, "placement_strategy": "PACK"}}


def _hashed(cfg: TrainConfig) -> dict:
    dump = cfg.model_dump(mode="json")
    for section, fields in _HASH_OMITS_AT_DEFAULT.items():
        for name, default in fields.items():
            if dump[section].get(name) == default:
                del dump[section][name]
    return dump


def variant_config(variant: str, corpus: Corpus, backbone: BackboneConfig, storage: Path, epochs: int,
                   workers: int = 2, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
                   finetune_lr: float = 1e-4, max_train_examples: int | None = None,
                   max_val_examples: int | None = 300, model_overrides: dict | None = None,
                   patience: int | None = None, validate_at_start: bool = False) -> TrainConfig:
    """The training config of one variant; the run name hashes it, so identical configs share a run."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    model = DialCLIPConfig(**merge_preset({**(model_overrides or {}), "preset": variant, "backbone": backbone}))
    cfg = TrainConfig(
        model=model,
        data=DataSection(train=corpus.datasets, max_train_examples=max_train_examples,
                         max_val_examples=max_val_examples),
        optim=OptimSection(epochs=0 if variant == "zeroshot" else epochs, batch_size=batch_size, lr=lr,
                           backbone_lr=finetune_lr, patience=patience, validate_at_start=validate_at_start),
        run=RunSection(name="pending", storage_path=str(storage), workers=workers, seed=seed))
    digest = hashlib.sha256(json.dumps(_hashed(cfg), sort_keys=True).encode()).hexdigest()[:10]
    cfg.run.name = f"{variant}-{digest}"
    return cfg
