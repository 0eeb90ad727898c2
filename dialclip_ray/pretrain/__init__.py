"""Pretraining a small open_clip CLIP from scratch on the synthetic captions (a stand-in for OpenAI weights).

``pretrain(config, corpus_root, cache_dir) -> Path`` runs a Ray Train job once
per (config, seed, corpus) and returns a checkpoint that
``open_clip.create_model_and_transforms(name, pretrained=path)`` loads.
"""

from dialclip_ray.pretrain.config import PretrainConfig
from dialclip_ray.pretrain.run import MODEL_FILE, META_FILE, PretrainResult, cache_key, pretrain, run_pretrain

__all__ = ["PretrainConfig", "PretrainResult", "pretrain", "run_pretrain", "cache_key", "MODEL_FILE", "META_FILE"]
