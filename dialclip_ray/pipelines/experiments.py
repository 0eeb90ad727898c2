"""Reusable pipeline steps for the demo and the synthetic benchmark, each cached on disk.

corpus (generate + prepare) -> small CLIP (pretrain) -> one training config per
variant -> trained checkpoints. Every step is keyed by its inputs, so a rerun
reuses what exists and a changed setting recomputes only what it affects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dialclip_ray.model.config import PRESETS, BackboneConfig, DialCLIPConfig
from dialclip_ray.train.config import DataSection, OptimSection, RunSection, TrainConfig

# The variants of the paper's comparison: DialCLIP, its baselines and its three ablations.
VARIANTS = ("dialclip", "zeroshot", "finetune", "no-context", "no-domain", "single-expert")


@dataclass
class Corpus:
    raw: Path
    photochat: Path
    mmdialog: Path

    @property
    def datasets(self) -> list[str]:
        return [str(self.photochat), str(self.mmdialog)]


def ensure_corpus(cache: Path, dialogs: int, seed: int = 0, image_size: int = 64) -> Corpus:
    """Synthetic corpus in the real formats, converted by the real loaders (reused when present)."""
    from dialclip_ray.data.prepare import prepare
    from dialclip_ray.data.schema import is_dataset_dir
    from dialclip_ray.data.synthetic import generate

    root = Path(cache).resolve() / f"synth-{dialogs}-s{seed}-{image_size}px"
    corpus = Corpus(root / "raw", root / "photochat", root / "mmdialog")
    if not (corpus.raw / "synth_meta.json").is_file():
        generate(corpus.raw, dialogs=dialogs, seed=seed, image_size=image_size, overwrite=True)
    if not is_dataset_dir(corpus.photochat):
        prepare("photochat", corpus.raw / "photochat", corpus.raw / "photochat_images", corpus.photochat)
    if not is_dataset_dir(corpus.mmdialog):
        prepare("mmdialog", corpus.raw / "mmdialog", None, corpus.mmdialog)
    return corpus


def ensure_small_clip(corpus: Corpus, cache: Path, model_name: str = "dialclip-tiny", epochs: int = 6,
                      workers: int = 2, lr: float = 2e-3, batch_size: int = 128, use_gpu: bool = False):
    """The locally pretrained small CLIP (open_clip checkpoint path), trained once per config and corpus."""
    from dialclip_ray.pretrain import PretrainConfig, run_pretrain

    cfg = PretrainConfig(model_name=model_name, epochs=epochs, workers=workers, lr=lr, batch_size=batch_size,
                         use_gpu=use_gpu)
    return run_pretrain(cfg, corpus.raw, Path(cache).resolve() / "small_clip")


def variant_config(variant: str, corpus: Corpus, backbone: BackboneConfig, storage: Path, epochs: int,
                   workers: int = 2, seed: int = 0, batch_size: int = 32, lr: float = 2e-3,
                   finetune_lr: float = 1e-4, max_train_examples: int | None = None,
                   max_val_examples: int | None = 300, model_overrides: dict | None = None) -> TrainConfig:
    """The training config of one variant; the run name hashes it, so identical configs share a run."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    preset = "default" if variant == "dialclip" else variant
    model = DialCLIPConfig(**{**PRESETS[preset], **(model_overrides or {}), "backbone": backbone})
    cfg = TrainConfig(
        model=model,
        data=DataSection(train=corpus.datasets, max_train_examples=max_train_examples,
                         max_val_examples=max_val_examples),
        optim=OptimSection(epochs=0 if variant == "zeroshot" else epochs, batch_size=batch_size, lr=lr,
                           backbone_lr=finetune_lr),
        run=RunSection(name="pending", storage_path=str(storage), workers=workers, seed=seed))
    digest = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:10]
    cfg.run.name = f"{variant}-{digest}"
    return cfg
