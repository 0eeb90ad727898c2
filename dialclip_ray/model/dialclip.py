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

Backbone sharing: ``build_model(cfg, backbone=bb)`` may wrap one open_clip module
in several models. Frozen variants share it and only ever freeze it (eval mode,
``requires_grad`` off); the finetune variant trains its own deep copy, so
building one never makes another model's backbone trainable, nor the reverse.

With ``prompt_gate`` the towers run zero-init gated prompt attention
(``towers.py``): with the experts' zero-init corrections and CLIP's temperature,
a fresh model equals zero-shot CLIP for queries, images and texts.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dialclip_ray.model.backbone import Backbone, load_backbone, weights_hash
from dialclip_ray.model.batch import RETRIEVAL_TYPES, QueryBatch, TrainBatch
from dialclip_ray.model.config import DialCLIPConfig
from dialclip_ray.model.cpg import ContextPromptGenerator
from dialclip_ray.model.experts import ProjectionExperts
from dialclip_ray.model.feature_cache import FeatureCache, tensor_key
from dialclip_ray.model.prompts import PromptGates, make_text_prompts, make_vision_prompts
from dialclip_ray.model.towers import (check_gateable, encode_image_features, encode_text_features, num_heads,
                                       project_image, project_text)

MAX_LOGIT_SCALE = 4.6052  # ln(100), CLIP's clamp


class DialCLIP(nn.Module):
    def __init__(self, clip: nn.Module, cfg: DialCLIPConfig, tokenizer: Any | None = None,
                 backbone_identity: dict | None = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        # Finetune trains its own copy: the module passed in may be shared with frozen models (module doc).
        clip = copy.deepcopy(clip) if cfg.variant == "finetune" else clip
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
        # Prompt init streams derive from the model seed (2s text, 2s+1 vision): seeds give different prompts.
        self.text_prompts = make_text_prompts(
            clip, cfg.domain_prompt_init, min(depth or text_layers, text_layers), cfg.domain_prompt_length,
            seed=2 * seed, tokenizer=tokenizer, task_words=cfg.task_words) if cfg.text_prompts else None
        self.vision_prompts = make_vision_prompts(
            clip.visual, cfg.domain_prompt_init, min(depth or vision_layers, vision_layers),
            cfg.domain_prompt_length, seed=2 * seed + 1) if cfg.vision_prompts else None
        # float64 and 6 significant digits: a float32 mean's last bits depend on the thread count's reduction
        # order, and the CPG init (hence a fresh model) must not depend on how many threads built it.
        token_rms = float(f"{clip.token_embedding.weight.detach().double().pow(2).mean().sqrt().item():.6g}")
        self.cpg = ContextPromptGenerator(embed_dim, cfg.cpg_dim, text_width, cfg.context_prompt_length,
                                          cfg.cpg_heads, cfg.max_context_turns,
                                          token_rms=token_rms) if cfg.context_prompt_length else None
        self.query_experts = self.image_expert = self.text_expert = None
        if cfg.uses_experts:
            text_base = lambda x: project_text(self.clip, x)  # noqa: E731
            self.query_experts = ProjectionExperts(text_base, text_width, embed_dim, cfg.num_experts,
                                                   cfg.expert_rank, len(RETRIEVAL_TYPES), cfg.router_hidden)
            self.text_expert = ProjectionExperts(text_base, text_width, embed_dim, 1, cfg.expert_rank)
            self.image_expert = ProjectionExperts(lambda x: project_image(self.clip.visual, x),
                                                  vision_width, embed_dim, 1, cfg.expert_rank)
        self.prompt_gates = None
        if cfg.prompt_gate:
            check_gateable(clip.transformer, "text")
            check_gateable(clip.visual.transformer, "vision")
            self.prompt_gates = PromptGates(
                text_layers, num_heads(clip.transformer), vision_layers, num_heads(clip.visual.transformer),
                text_domain=self.text_prompts is not None,
                text_context_layers=text_layers - cfg.insertion_layer if self.cpg is not None else 0,
                vision_domain=self.vision_prompts is not None)
        scale = clip.logit_scale.detach().clone().float().reshape(())
        if cfg.learn_temperature and cfg.variant != "zeroshot":
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        if cfg.variant == "finetune":  # our own copy
            self.clip.requires_grad_(True)
            self.clip.train(self.training)
        else:  # possibly shared: only ever frozen
            self.clip.requires_grad_(False)
            self.clip.eval()
        self.clip.logit_scale.requires_grad_(False)  # ours replaces it; an unused parameter would upset DDP
        if getattr(self.clip, "logit_bias", None) is not None:
            self.clip.logit_bias.requires_grad_(False)

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

    def _gate(self, name: str) -> torch.Tensor | None:
        """A raw gate tensor of the gated form, or None (the ungated form)."""
        return None if self.prompt_gates is None else getattr(self.prompt_gates, name)

    @torch.no_grad()
    def context_features(self, q: QueryBatch, cache: FeatureCache | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen CLIP embeddings of every context turn [B, T, E] and image [B, M, E] (zeros where padded).

        Taken from the batch when the feature store filled it; otherwise computed by the frozen towers
        (through ``cache`` when given: the online encoder's LRU). Always float32, outside autocast, so
        the features do not depend on the training precision.
        """
        if q.has_features:
            return (q.turn_features.float() * q.turn_mask.unsqueeze(-1),
                    q.image_features.float() * q.image_mask.unsqueeze(-1))
        b, t, _ = q.turn_tokens.shape
        embed_dim = self.clip.text_projection.shape[-1]
        device = q.turn_tokens.device
        turns = torch.zeros(b, t, embed_dim, device=device)
        images = torch.zeros(b, q.image_mask.shape[1], embed_dim, device=device)
        with torch.autocast(device.type, enabled=False):
            if q.turn_mask.any():
                turns[q.turn_mask] = self._frozen(self.clip.encode_text, q.turn_tokens[q.turn_mask], cache)
            if q.image_mask.any():
                images[q.image_mask] = self._frozen(self.clip.encode_image, q.images[q.image_mask].float(), cache)
        return turns, images

    @staticmethod
    def _frozen(encode, rows: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        if cache is None:
            return encode(rows).float()
        return cache.lookup([tensor_key(r) for r in rows], lambda idx: encode(rows[idx]).float(), rows.device)

    def context_prompts(self, q: QueryBatch, cache: FeatureCache | None = None) -> torch.Tensor | None:
        if self.cpg is None:
            return None
        turns, images = self.context_features(q, cache)
        return self.cpg(turns, q.turn_mask, q.turn_speaker, images, q.image_mask, q.image_turn)

    def encode_query(self, q: QueryBatch, normalize: bool = True,
                     feature_cache: FeatureCache | None = None) -> torch.Tensor:
        ctx = self.context_prompts(q, feature_cache)
        pooled = encode_text_features(self.clip, q.query_tokens, self._domain(self.text_prompts),
                                      ctx, self.cfg.insertion_layer, domain_gate=self._gate("text_domain"),
                                      context_gate=self._gate("text_context"))
        out = (self.query_experts(pooled, q.retrieval_type) if self.query_experts is not None
               else project_text(self.clip, pooled))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_texts(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = encode_text_features(self.clip, tokens, self._domain(self.text_prompts),
                                      domain_gate=self._gate("text_domain"))
        out = self.text_expert(pooled) if self.text_expert is not None else project_text(self.clip, pooled)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = encode_image_features(self.clip.visual, images, self._domain(self.vision_prompts),
                                       domain_gate=self._gate("vision_domain"))
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
        """Symmetric InfoNCE over in-batch negatives (query->target and target->query); pairs the batch
        marks as false negatives are left out of both softmaxes (the diagonal never is)."""
        q = self.encode_query(batch.query)
        t = self.encode_targets(batch)
        logits = self.temperature_scale() * q @ t.t()
        labels = torch.arange(len(q), device=q.device)
        masked = logits if batch.false_negatives is None else logits.masked_fill(batch.false_negatives, float("-inf"))
        loss = (F.cross_entropy(masked, labels) + F.cross_entropy(masked.t(), labels)) / 2
        return {"loss": loss, "logits": logits}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: the checkpoint payload (the backbone is identified, not stored)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in self.state_dict().items() if k in names}


def build_model(cfg: DialCLIPConfig, backbone: Backbone | None = None, device: str | torch.device = "cpu",
                seed: int = 0) -> tuple[DialCLIP, Backbone]:
    """Factory: load (or reuse) the backbone, then wrap it.

    ``seed`` fixes the added modules' init, the domain prompts included; a reused ``backbone`` is
    never made trainable by a frozen variant, and a finetune model trains a copy of it.
    """
    if backbone is None:
        backbone = load_backbone(cfg.backbone.model_name, cfg.backbone.pretrained, device="cpu",
                                 cache_dir=cfg.backbone.cache_dir)
    identity = {"model_name": backbone.model_name, "pretrained": backbone.pretrained}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG stream
        torch.manual_seed(seed)
        model = DialCLIP(backbone.model, cfg, tokenizer=backbone.tokenizer, backbone_identity=identity, seed=seed)
    return model.to(device), backbone
