"""docs/config-reference.md is generated from the pydantic models and must match them."""

from __future__ import annotations

from pathlib import Path

from dialclip_ray.reference import config_reference

DOC = Path(__file__).parent.parent / "docs" / "config-reference.md"


def test_config_reference_is_in_sync():
    assert DOC.read_text() == config_reference(), \
        "docs/config-reference.md is stale: python -m dialclip_ray.reference > docs/config-reference.md"


def test_reference_names_every_field_of_the_cluster_path():
    text = config_reference()
    for key in ("run.storage_path", "data.feature_actors", "data.feature_gpus_per_actor", "run.tensorboard",
                "model.backbone.cache_dir", "model.backbone.pretrained", "max_concurrent"):
        assert f"`{key}`" in text, key
