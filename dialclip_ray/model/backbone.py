"""Loading the frozen open_clip backbone.

We pass the model name and ``pretrained`` through to open_clip unchanged (a tag
such as ``openai``, a local checkpoint path, or an ``hf-hub:`` model name), so
whatever open_clip can load we can load. Our own small configs (used by the
tests and the synthetic demo) are registered with ``open_clip.add_model_config``
rather than copied into open_clip.

Two things open_clip leaves to the caller are done here, in the one place backbones are built:
the activation a tag was trained with (OpenAI's CLIPs and several others used QuickGELU; open_clip
only warns when the model config disagrees, so ``ViT-B-32`` + ``openai`` would silently run GELU),
and where downloaded weights are cached (``weights_dir``: one directory every worker and replica
reads, filled once by ``dialclip weights fetch``).

Only ViT-based CLIPs of open_clip's ``CLIP`` class are supported: the prompt
injection runs its own loop over ``transformer.resblocks`` and the vision
tower's blocks, which ResNet towers, timm towers, HF text towers and CoCa's
attentional pooler do not have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import VisionTransformer

from dialclip_ray.model.standin import STANDIN_MODEL, STANDIN_TAG, is_standin, materialize

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
OUR_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))  # micro, small, tiny
_registered = False
RANDOM_INIT_SEED = 0
WEIGHTS_DIR_ENV = "DIALCLIP_WEIGHTS_DIR"


def register_model_configs() -> None:
    """Make our small configs (``OUR_MODELS``: dialclip-micro / -tiny / -small) known to open_clip (idempotent)."""
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


@dataclass(frozen=True)
class BackboneGeometry:
    """The sizes of a backbone that configs and data need before (or without) loading it."""

    model_name: str
    image_size: int       # input pixels per side
    text_layers: int      # blocks of the text transformer
    vision_layers: int    # blocks of the ViT image tower
    context_length: int   # text tokens per sequence
    embed_dim: int        # shared embedding size (output of the projections)


def _cfg_value(section: dict, cls: type, name: str) -> Any:
    """``section[name]``, or open_clip's own default for it (what open_clip builds when the key is absent)."""
    if name in section:
        return section[name]
    return {f.name: f for f in dataclasses.fields(cls)}[name].default


def backbone_geometry(model_name: str) -> BackboneGeometry:
    """Image size, depths, context length and embedding size of ``model_name`` from open_clip's config.

    The one place these are read. Reads the registered config (our own, open_clip's, or an
    ``hf-hub:``/``local-dir:`` one) without building the model or loading weights. There is no
    guessed fallback: a model whose config cannot be read, or whose towers are not the ViT +
    built-in text transformer the prompt injection wraps, raises ``UnsupportedBackboneError``.
    A key the config leaves out takes open_clip's own default, i.e. what open_clip would build.
    """
    register_model_configs()
    try:
        cfg = open_clip.get_model_config(model_name)
    except Exception as exc:  # hf-hub / local-dir: download or file errors
        raise UnsupportedBackboneError(f"cannot read open_clip's config of {model_name!r}: {exc}") from None
    if not cfg:
        raise UnsupportedBackboneError(
            f"unknown open_clip model {model_name!r}: open_clip has no config for it "
            f"(see open_clip.list_models(), or use an hf-hub:/local-dir: name)")
    vision, text = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise UnsupportedBackboneError(f"backbone {model_name!r}: vision_cfg/text_cfg are not mappings in its config")
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise UnsupportedBackboneError(
            f"backbone {model_name!r} uses a timm image tower or an HF text tower; supported: a ViT image "
            f"tower and open_clip's built-in text transformer")
    size = _cfg_value(vision, CLIPVisionCfg, "image_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UnsupportedBackboneError(f"backbone {model_name!r}: non-square image_size {list(size)}")
        size = size[0]
    vision_layers = _cfg_value(vision, CLIPVisionCfg, "layers")
    if not isinstance(vision_layers, int):
        raise UnsupportedBackboneError(
            f"backbone {model_name!r} has a ResNet image tower (layers {vision_layers}); supported: ViT towers")
    if "embed_dim" not in cfg:
        raise UnsupportedBackboneError(f"backbone {model_name!r}: its open_clip config has no embed_dim")
    return BackboneGeometry(model_name=model_name, image_size=int(size),
                            text_layers=int(_cfg_value(text, CLIPTextCfg, "layers")),
                            vision_layers=int(vision_layers),
                            context_length=int(_cfg_value(text, CLIPTextCfg, "context_length")),
                            embed_dim=int(cfg["embed_dim"]))


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


def weights_dir(configured: str | None = None) -> str | None:
    """open_clip's download cache: ``configured`` (``model.backbone.cache_dir``), else ``$DIALCLIP_WEIGHTS_DIR``.

    None leaves open_clip's default (``~/.cache``), which is per node: on a cluster point both at a
    shared directory so the weights are downloaded once, not by every worker and replica.
    """
    chosen = configured or os.environ.get(WEIGHTS_DIR_ENV) or None
    return str(Path(chosen).expanduser()) if chosen else None


def needs_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip's registry says the tag ``pretrained`` of ``model_name`` was trained with QuickGELU.

    Read from the tag's own pretrained config (``quick_gelu``), so it covers every such tag (all of
    OpenAI's and the ``-quickgelu`` families) as open_clip lists them. Local files and hf-hub names carry
    no tag: use the ``-quickgelu`` model config for OpenAI weights stored as a file.
    """
    if not pretrained or model_name.startswith(("hf-hub:", "local-dir:")):
        return False
    return bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))


def fetch_weights(model_name: str, pretrained: str, cache_dir: str | None = None) -> Path:
    """Download a tag's weights into the cache (``weights_dir(cache_dir)``) once; return the file.

    What ``dialclip weights fetch`` runs on one node before a cluster job, so workers find the file.
    """
    register_model_configs()
    if is_standin(model_name, pretrained):
        return materialize(weights_dir(cache_dir))
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise FileNotFoundError(f"{pretrained!r} is not an open_clip pretrained tag of {model_name!r} "
                                f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
    target = open_clip.pretrained.download_pretrained(cfg, cache_dir=weights_dir(cache_dir))
    if not target or not Path(target).is_file():
        raise FileNotFoundError(f"open_clip returned no file for {model_name}/{pretrained} (got {target!r})")
    return Path(target)


def load_backbone(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                  precision: str = "fp32", cache_dir: str | None = None, load_weights: bool = True) -> Backbone:
    """Create an open_clip model and its transforms and tokenizer; freeze nothing yet.

    The network is the one ``pretrained`` was trained as (QuickGELU where the tag says so).
    ``load_weights=False`` builds that network with random weights and downloads nothing (tests,
    ``device="meta"`` for a shape-only look).
    """
    register_model_configs()
    weights = pretrained
    if is_standin(model_name, pretrained):  # our shipped tag: expanded once into the weights cache
        weights = str(materialize(weights_dir(cache_dir)))
    elif pretrained and not model_name.startswith("hf-hub:") and not Path(pretrained).exists() \
            and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        raise FileNotFoundError(
            f"pretrained={pretrained!r} for {model_name!r} is neither a file nor a known open_clip tag "
            f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)}; ours: {STANDIN_MODEL} + {STANDIN_TAG!r})")
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise UnsupportedBackboneError(f"unknown open_clip model {model_name!r}")
    # Random-init backbones (pretrained=None) come from a fixed seed, so every worker, replica and
    # later reload builds the same weights and a checkpoint's weights hash stays valid.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained=(weights or None) if load_weights else None, device=device,
            precision=precision, force_quick_gelu=needs_quick_gelu(model_name, pretrained),
            cache_dir=weights_dir(cache_dir))
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
