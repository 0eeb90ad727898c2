"""Loading the frozen open_clip backbone.

We pass the model name and ``pretrained`` through to open_clip unchanged (a tag
such as ``openai``, a local checkpoint path, or an ``hf-hub:`` model name), so
whatever open_clip can load we can load. Our own small configs (used by the
tests and the synthetic demo) are registered with ``open_clip.add_model_config``
rather than copied into open_clip.

Only ViT-based CLIPs of open_clip's ``CLIP`` class are supported: the prompt
injection runs its own loop over ``transformer.resblocks`` and the vision
tower's blocks, which ResNet towers, timm towers, HF text towers and CoCa's
attentional pooler do not have.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.transformer import VisionTransformer

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
OUR_MODELS = ("dialclip-micro", "dialclip-tiny")
_registered = False
RANDOM_INIT_SEED = 0


def register_model_configs() -> None:
    """Make ``dialclip-micro`` / ``dialclip-tiny`` known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


class UnsupportedBackboneError(ValueError):
    pass


@dataclass
class Backbone:
    """A loaded open_clip model with the pieces the data layer needs."""

    model_name: str
    pretrained: str | None
    model: open_clip.model.CLIP
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_val: Callable[[Any], torch.Tensor]
    tokenizer: Any

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)


def check_supported(model: torch.nn.Module, model_name: str) -> None:
    """Raise a clear error for architectures the prompt injection cannot wrap."""
    supported = "open_clip CLIP models with a ViT image tower and the built-in text transformer " \
                "(e.g. ViT-B-32, ViT-B-16, ViT-L-14, dialclip-tiny)"
    if type(model).__name__ != "CLIP" or not hasattr(model, "transformer"):
        raise UnsupportedBackboneError(
            f"backbone {model_name!r} is a {type(model).__name__} (custom or HF text tower); "
            f"supported: {supported}")
    if not isinstance(model.visual, VisionTransformer):
        raise UnsupportedBackboneError(
            f"backbone {model_name!r} has a {type(model.visual).__name__} image tower; supported: {supported}")
    if model.visual.attn_pool is not None:
        raise UnsupportedBackboneError(
            f"backbone {model_name!r} uses an attentional pooler (CoCa-style); supported: {supported}")
    if model.text_pool_type not in ("argmax", "eos"):
        raise UnsupportedBackboneError(
            f"backbone {model_name!r} pools text with {model.text_pool_type!r}; supported: argmax/eos pooling")


def load_backbone(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                  precision: str = "fp32") -> Backbone:
    """Create an open_clip model and its transforms and tokenizer; freeze nothing yet."""
    register_model_configs()
    if pretrained and not model_name.startswith("hf-hub:") and not Path(pretrained).exists() \
            and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        raise FileNotFoundError(
            f"pretrained={pretrained!r} for {model_name!r} is neither a file nor a known open_clip tag "
            f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise UnsupportedBackboneError(f"unknown open_clip model {model_name!r}")
    # Random-init backbones (pretrained=None) come from a fixed seed, so every worker, replica and
    # later reload builds the same weights and a checkpoint's weights hash stays valid.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained or None, device=device, precision=precision)
    check_supported(model, model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    return Backbone(model_name, pretrained, model, preprocess_train, preprocess_val, tokenizer)


def weights_hash(module: torch.nn.Module) -> str:
    """A stable digest of a module's parameters and buffers, to tie checkpoints to a backbone."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]
