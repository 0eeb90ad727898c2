"""A tiny DialCLIP checkpoint for the index and serving tests.

Its backbone weights are written to a file and loaded back as a local ``pretrained`` path,
so the tests also exercise open_clip's local-checkpoint loading in every Ray process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dialclip_ray.model.backbone import load_backbone
from dialclip_ray.model.checkpoint import save_checkpoint
from dialclip_ray.model.config import BackboneConfig, preset
from dialclip_ray.model.dialclip import build_model


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A dialclip-micro checkpoint whose backbone weights live in a file, so every replica loads the same ones."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "micro-backbone.pt"
    if not weights.exists():
        torch.manual_seed(0)
        torch.save(load_backbone("dialclip-micro").model.state_dict(), weights)
    backbone = load_backbone("dialclip-micro", str(weights))
    cfg = preset("default", backbone=BackboneConfig(model_name="dialclip-micro", pretrained=str(weights)),
                 context_prompt_length=4, cpg_dim=32, cpg_heads=2)
    model, _ = build_model(cfg, backbone, seed=seed)
    return save_checkpoint(model, directory / f"ckpt-{seed}")
