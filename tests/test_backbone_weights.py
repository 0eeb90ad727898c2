"""open_clip used as its tags were trained: QuickGELU where the registry says so; one weights cache."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from dialclip_ray.model.backbone import (WEIGHTS_DIR_ENV, UnsupportedBackboneError, backbone_geometry,
                                         load_backbone, needs_quick_gelu, weights_dir)


def _activations(model) -> set[str]:
    blocks = list(model.transformer.resblocks) + list(model.visual.transformer.resblocks)
    return {type(b.mlp.gelu).__name__ for b in blocks}


def _quick_gelu_tags() -> list[tuple[str, str]]:
    return [(m, t) for m, t in open_clip.list_pretrained()
            if open_clip.get_pretrained_cfg(m, t).get("quick_gelu")]


def test_every_openai_tag_is_a_quick_gelu_tag():
    openai = [(m, t) for m, t in open_clip.list_pretrained() if t == "openai"]
    assert ("ViT-B-32", "openai") in openai and len(openai) >= 9
    assert all(needs_quick_gelu(m, t) for m, t in openai)
    assert not needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not needs_quick_gelu("ViT-B-32", None) and not needs_quick_gelu("ViT-B-32", "/some/local/file.pt")


def test_every_quick_gelu_tag_asks_open_clip_for_quick_gelu(monkeypatch):
    """For each tag the registry marks, load_backbone passes force_quick_gelu (no model is built here)."""
    seen = []

    class Built(Exception):
        pass

    def stop(*args, **kwargs):
        seen.append(kwargs["force_quick_gelu"])
        raise Built

    monkeypatch.setattr(open_clip, "create_model_and_transforms", stop)
    tags = _quick_gelu_tags()
    assert len(tags) >= 30
    for model_name, tag in tags:
        with pytest.raises(Built):
            load_backbone(model_name, tag, load_weights=False)
    assert seen == [True] * len(tags)


@pytest.mark.parametrize("model_name,tag", [mt for mt in _quick_gelu_tags() if mt[1] == "openai"])
def test_openai_tag_builds_quick_gelu_network(model_name, tag):
    try:
        backbone_geometry(model_name)
    except UnsupportedBackboneError:
        pytest.skip(f"{model_name} is not a ViT + text transformer CLIP (the prompt injection cannot wrap it)")
    # meta device: the architecture the tag names, with no weights, no download and no memory
    backbone = load_backbone(model_name, tag, device="meta", load_weights=False)
    assert _activations(backbone.model) == {"QuickGELU"}
    assert all(isinstance(b.mlp.gelu, QuickGELU) for b in backbone.model.transformer.resblocks)


def test_gelu_tag_keeps_gelu():
    backbone = load_backbone("ViT-B-32", "laion2b_s34b_b79k", device="meta", load_weights=False)
    assert _activations(backbone.model) == {"GELU"}


def test_weights_dir_config_then_env(monkeypatch, tmp_path):
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    assert weights_dir(None) is None
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "env"))
    assert weights_dir(None) == str(tmp_path / "env")
    assert weights_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")


def test_weights_fetch_fills_the_cache_once_offline(monkeypatch, tmp_path, capsys):
    """`dialclip weights fetch` downloads into the cache dir; the download is replaced by a local file."""
    import os
    import shutil

    from dialclip_ray.cli import main

    source = tmp_path / "upstream.bin"
    source.write_bytes(b"\0" * 1024)
    calls = []

    def fake_url(url, cache_dir=None):
        calls.append((url, cache_dir))
        target = os.path.join(cache_dir, os.path.basename(url))
        if not os.path.exists(target):
            shutil.copy(source, target)
        return target

    monkeypatch.setattr(open_clip.pretrained, "has_hf_hub", lambda necessary=False: False)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", fake_url)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(cache))
    assert main(["weights", "fetch", "--backbone", "ViT-B-32", "--pretrained", "openai"]) == 0
    out = capsys.readouterr().out
    assert calls and calls[0][1] == str(cache) and "ViT-B-32.pt" in out and "QuickGELU" in out
    assert (cache / "ViT-B-32.pt").read_bytes() == source.read_bytes()
    assert main(["weights", "fetch", "--backbone", "ViT-B-32", "--pretrained", "no-such-tag"]) == 2


def test_load_backbone_passes_the_cache_dir(monkeypatch, tmp_path):
    """Every loader (workers, actors, replicas) hands open_clip the one cache directory."""
    seen = {}
    real = open_clip.create_model_and_transforms

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    load_backbone("dialclip-micro")
    assert seen["cache_dir"] == str(tmp_path) and seen["force_quick_gelu"] is False
    from dialclip_ray.model.config import BackboneConfig, preset
    from dialclip_ray.model.dialclip import build_model

    build_model(preset("default", backbone=BackboneConfig(model_name="dialclip-micro", cache_dir=str(tmp_path / "c"))))
    assert seen["cache_dir"] == str(tmp_path / "c")
    assert torch.is_tensor(next(iter(load_backbone("dialclip-micro").model.parameters())))
