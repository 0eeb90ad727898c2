"""Checkpoints hold trainable state only, tied to the backbone they were trained on.

A DialCLIP checkpoint is a few hundred KB: the added modules' tensors, the model
config, the backbone identity (open_clip model name, pretrained tag or path, and
a hash of the frozen weights) and the parameter counts. Everything in the file is
plain tensors and primitives, so it loads with ``torch.load(weights_only=True)``.
Loading refuses a backbone whose weights hash differs: prompts tuned on one CLIP
are meaningless on another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dialclip_ray.fsio import atomic_write, atomic_write_text
from dialclip_ray.model.backbone import Backbone, load_backbone
from dialclip_ray.model.config import DialCLIPConfig
from dialclip_ray.model.dialclip import DialCLIP, build_model
from dialclip_ray.model.params import parameter_report

FORMAT_VERSION = 1
WEIGHTS_FILE = "dialclip.pt"
META_FILE = "dialclip.json"


class BackboneMismatchError(ValueError):
    pass


class CorruptCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be read (truncated, overwritten, not ours)."""


def checkpoint_meta(model: DialCLIP, extra: dict | None = None) -> dict:
    return {"format_version": FORMAT_VERSION, "config": model.cfg.model_dump(mode="json"),
            "backbone": dict(model.identity), "params": parameter_report(model).as_dict(),
            "extra": extra or {}}


def save_checkpoint(model: DialCLIP, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``dialclip.pt`` (tensors + meta) and a readable ``dialclip.json`` into ``directory``."""
    directory = Path(directory)
    meta = checkpoint_meta(model, extra)
    payload = {"meta_json": json.dumps(meta), "state": model.trainable_state_dict()}
    atomic_write(directory / WEIGHTS_FILE, lambda p: torch.save(payload, p))
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
    return directory


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, trainable state) from a checkpoint directory or ``dialclip.pt`` file; never unpickles code."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no DialCLIP checkpoint at {path} (expected {WEIGHTS_FILE})")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, a pickle with code in it: all unreadable
        raise CorruptCheckpointError(f"{file}: checkpoint file is truncated or corrupt ({file.stat().st_size} bytes; "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(payload, dict) or "meta_json" not in payload or "state" not in payload:
        raise CorruptCheckpointError(f"{file}: not a DialCLIP checkpoint (missing meta_json/state)")
    meta = json.loads(payload["meta_json"])
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: checkpoint format {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta, payload["state"]


def load_checkpoint(path: str | os.PathLike, backbone: Backbone | None = None, pretrained: str | None = None,
                    device: str | torch.device = "cpu") -> tuple[DialCLIP, Backbone, dict]:
    """Rebuild the model: load the recorded backbone (or the one given), check its hash, load the state.

    ``pretrained`` overrides the recorded tag/path (the same weights moved to another path);
    the weights hash still has to match.
    """
    meta, state = read_checkpoint(path)
    cfg = DialCLIPConfig.model_validate(meta["config"])
    ident = meta["backbone"]
    if backbone is None:
        backbone = load_backbone(ident["model_name"], pretrained or ident.get("pretrained"),
                                 cache_dir=cfg.backbone.cache_dir)
    if backbone.model_name != ident["model_name"]:
        raise BackboneMismatchError(
            f"checkpoint {path} was trained on backbone {ident['model_name']!r}, not {backbone.model_name!r}")
    model, backbone = build_model(cfg, backbone)
    if model.identity["weights_hash"] != ident["weights_hash"]:
        raise BackboneMismatchError(
            f"checkpoint {path} was trained on {ident['model_name']} weights {ident['weights_hash']} "
            f"(pretrained={ident.get('pretrained')!r}) but the loaded backbone hashes to "
            f"{model.identity['weights_hash']} (pretrained={backbone.pretrained!r})")
    missing = set(model.trainable_state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    model.identity = dict(ident)
    return model.to(device), backbone, meta
