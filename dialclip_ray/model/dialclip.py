"""DialCLIP: a frozen open_clip CLIP with domain prompts, a context prompt generator and projection experts.

Three encoders share the one backbone:

- ``encode_query``: the query text window (newest turns + current input) runs
  through the prompted text tower; the CPG turns the whole history (every turn's
  text and image, beyond the 77-token window) into context prompts inserted
  before block ``Lins``; the routed query experts project it;
- ``encode_images``: candidate images through the prompted vision tower and the
  image expert;
- ``encode_texts``: candidate texts through the prompted text tower (no context
  prompts) and the text expert.

Variants: ``dialclip`` (the above), ``zeroshot`` (plain frozen CLIP on the query
window) and ``finetune`` (both CLIP towers trained, a DE++-style dual encoder).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dialclip_ray.model.backbone import Backbone, load_backbone, weights_hash
from dialclip_ray.model.batch import RETRIEVAL_TYPES, QueryBatch, TrainBatch
from dialclip_ray.model.config import DialCLIPConfig
from dialclip_ray.model.cpg import ContextPromptGenerator
from dialclip_ray.model.experts import ProjectionExperts
from dialclip_ray.model.prompts import make_text_prompts, make_vision_prompts
from dialclip_ray.model.towers import encode_image_features, encode_text_features, project_image, project_text

MAX_LOGIT_SCALE = 4.6052  # ln(100), CLIP's clamp


class DialCLIP(nn.Module):
    def __init__(self, clip: nn.Module, cfg: DialCLIPConfig, tokenizer: Any | None = None,
                 backbone_identity: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        text_layers = len(clip.transformer.resblocks)
        vision_layers = len(clip.visual.transformer.resblocks)
        cfg.check_backbone_depth(text_layers, vision_layers)
        text_width = clip.transformer.width
        vision_width = clip.visual.class_embedding.shape[-1]
        embed_dim = clip.text_projection.shape[-1]
        self.identity = dict(backbone_identity or {})
        self.identity.setdefault("weights_hash", weights_hash(clip))

        depth = cfg.domain_prompt_depth
        self.text_prompts = make_text_prompts(
            clip, cfg.domain_prompt_init, min(depth or text_layers, text_layers), cfg.domain_prompt_length,
            tokenizer=tokenizer, task_words=cfg.task_words) if cfg.text_prompts else None
        self.vision_prompts = make_vision_prompts(
            clip.visual, cfg.domain_prompt_init, min(depth or vision_layers, vision_layers),
            cfg.domain_prompt_length) if cfg.vision_prompts else None
        self.cpg = ContextPromptGenerator(embed_dim, cfg.cpg_dim, text_width, cfg.context_prompt_length,
                                          cfg.cpg_heads, cfg.max_context_turns) if cfg.context_prompt_length else None
        self.query_experts = self.image_expert = self.text_expert = None
        if cfg.uses_experts:
            text_base = lambda x: project_text(self.clip, x)  # noqa: E731
            self.query_experts = ProjectionExperts(text_base, text_width, embed_dim, cfg.num_experts,
                                                   cfg.expert_rank, len(RETRIEVAL_TYPES), cfg.router_hidden)
            self.text_expert = ProjectionExperts(text_base, text_width, embed_dim, 1, cfg.expert_rank)
            self.image_expert = ProjectionExperts(lambda x: project_image(self.clip.visual, x),
                                                  vision_width, embed_dim, 1, cfg.expert_rank)
        scale = clip.logit_scale.detach().clone().float().reshape(())
        if cfg.learn_temperature and cfg.variant != "zeroshot":
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self._turn_cache: dict[bytes, torch.Tensor] = {}
        self.turn_cache_size = 200_000
        self.clip.requires_grad_(cfg.variant == "finetune")
        self.clip.logit_scale.requires_grad_(False)  # ours replaces it; an unused parameter would upset DDP
        if getattr(self.clip, "logit_bias", None) is not None:
            self.clip.logit_bias.requires_grad_(False)
        if cfg.variant != "finetune":
            self.clip.eval()

    # -- modes ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "DialCLIP":
        super().train(mode)
        if self.cfg.variant != "finetune":
            self.clip.eval()  # a frozen backbone stays in eval mode (no dropout, fixed norms)
        return self

    @property
    def frozen_backbone(self) -> bool:
        return self.cfg.variant != "finetune"

    # -- encoders ------------------------------------------------------------------------------
    def _domain(self, prompts: nn.Module | None) -> torch.Tensor | None:
        return None if prompts is None else prompts()

    @torch.no_grad()
    def _turn_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen text embeddings of turn tokens [N, L], each distinct turn encoded once.

        The backbone is frozen, so a turn's embedding never changes: they are memoised
        (bounded) across batches and epochs, which removes most of the CPG's cost.
        """
        cache = self._turn_cache if self.frozen_backbone and self.turn_cache_size else None
        keys = [row.tobytes() for row in tokens.cpu().numpy()]
        todo = list(dict.fromkeys(k for k in keys if cache is None or k not in cache))
        fresh = {}
        if todo:
            index = {k: i for i, k in enumerate(keys)}
            rows = tokens[[index[k] for k in todo]]
            fresh = dict(zip(todo, self.clip.encode_text(rows).float()))
            if cache is not None:
                if len(cache) + len(fresh) > self.turn_cache_size:
                    cache.clear()
                cache.update({k: v.detach() for k, v in fresh.items()})
        return torch.stack([fresh[k] if k in fresh else cache[k].to(tokens.device) for k in keys])

    @torch.no_grad()
    def context_features(self, q: QueryBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen CLIP embeddings of every context turn [B, T, E] and image [B, M, E] (zeros where padded)."""
        b, t, length = q.turn_tokens.shape
        embed_dim = self.clip.text_projection.shape[-1]
        turns = torch.zeros(b, t, embed_dim, device=q.turn_tokens.device)
        if q.turn_mask.any():
            turns[q.turn_mask] = self._turn_features(q.turn_tokens[q.turn_mask])
        m = q.image_mask.shape[1]
        images = torch.zeros(b, m, embed_dim, device=q.turn_tokens.device)
        if q.image_mask.any():
            images[q.image_mask] = self.clip.encode_image(q.images[q.image_mask]).float()
        return turns, images

    def context_prompts(self, q: QueryBatch) -> torch.Tensor | None:
        if self.cpg is None:
            return None
        turns, images = self.context_features(q)
        return self.cpg(turns, q.turn_mask, q.turn_speaker, images, q.image_mask, q.image_turn)

    def encode_query(self, q: QueryBatch, normalize: bool = True) -> torch.Tensor:
        ctx = self.context_prompts(q)
        pooled = encode_text_features(self.clip, q.query_tokens, self._domain(self.text_prompts),
                                      ctx, self.cfg.insertion_layer)
        out = (self.query_experts(pooled, q.retrieval_type) if self.query_experts is not None
               else project_text(self.clip, pooled))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_texts(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = encode_text_features(self.clip, tokens, self._domain(self.text_prompts))
        out = self.text_expert(pooled) if self.text_expert is not None else project_text(self.clip, pooled)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = encode_image_features(self.clip.visual, images, self._domain(self.vision_prompts))
        out = (self.image_expert(pooled) if self.image_expert is not None
               else project_image(self.clip.visual, pooled))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_targets(self, batch: TrainBatch) -> torch.Tensor:
        if batch.target_type == "image":
            return self.encode_images(batch.target_images)
        return self.encode_texts(batch.target_tokens)

    # -- loss ----------------------------------------------------------------------------------
    def temperature_scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Symmetric InfoNCE over in-batch negatives (query->target and target->query)."""
        q = self.encode_query(batch.query)
        t = self.encode_targets(batch)
        logits = self.temperature_scale() * q @ t.t()
        labels = torch.arange(len(q), device=q.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return {"loss": loss, "logits": logits}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the checkpoint payload (the backbone is identified, not stored)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k in names}


def build_model(cfg: DialCLIPConfig, backbone: Backbone | None = None, device: str | torch.device = "cpu",
                seed: int = 0) -> tuple[DialCLIP, Backbone]:
    """Factory: load (or reuse) the backbone, then wrap it. Seeds the added modules' init."""
    if backbone is None:
        backbone = load_backbone(cfg.backbone.model_name, cfg.backbone.pretrained, device="cpu")
    torch.manual_seed(seed)
    identity = {"model_name": backbone.model_name, "pretrained": backbone.pretrained}
    model = DialCLIP(backbone.model, cfg, tokenizer=backbone.tokenizer, backbone_identity=identity)
    return model.to(device), backbone
