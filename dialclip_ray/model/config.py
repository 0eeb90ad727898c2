"""Typed, validated configuration of the DialCLIP model.

One pydantic model describes everything that changes the model's parameters or
forward pass; presets are named instances of it. Training, Tune search spaces,
checkpoints and the serving app all read and write this same object, so a
sweep's best trial is a file ``dialclip train --config`` accepts as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Towers = Literal["text", "vision", "both", "none"]
PromptInit = Literal["random", "pretrain", "task"]
Variant = Literal["dialclip", "zeroshot", "finetune"]


class BackboneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = "dialclip-tiny"
    # An open_clip tag ("openai", "laion2b_s34b_b79k"), a local checkpoint path, or None (random init).
    pretrained: str | None = None
    cache_dir: str | None = Field(None, description="where downloaded weights are cached (None: "
                                  "$DIALCLIP_WEIGHTS_DIR, else open_clip's per-node ~/.cache); on a cluster a "
                                  "shared directory filled once by `dialclip weights fetch`")


class DialCLIPConfig(BaseModel):
    """The prompted model. Lengths of 0 switch a component off (the ablations)."""

    model_config = ConfigDict(extra="forbid")

    variant: Variant = "dialclip"
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)

    # Domain prompts (deep prompt tuning): Ld vectors at each of the first `depth` layers.
    domain_prompt_length: int = Field(4, ge=0, le=64)
    domain_prompt_depth: int | None = Field(None, ge=1, description="layers that get fresh prompts; None = all")
    domain_prompt_towers: Towers = "both"
    domain_prompt_init: PromptInit = "pretrain"
    task_words: list[str] = Field(default_factory=lambda: ["photo", "image", "picture", "dialog", "share", "reply"])

    # Context prompt generator: Lc prompts inserted into the query's text tower before block `insertion_layer`.
    context_prompt_length: int = Field(16, ge=0, le=128)
    insertion_layer: int = Field(2, ge=0)
    cpg_dim: int = Field(128, ge=8, description="hidden width of the mapping network and prompt generator")
    cpg_heads: int = Field(4, ge=1)
    max_context_turns: int = Field(16, ge=1)
    max_context_images: int = Field(4, ge=0)

    # How many of the newest turns go into the query text window; 0 = as many as fit in the 77 tokens.
    query_turns: int = Field(0, ge=0)

    # Mixture of projection experts over the query-side retrieval types.
    num_experts: int = Field(2, ge=1, le=16)
    expert_rank: int = Field(8, ge=1, le=512)
    router_hidden: int = Field(0, ge=0, description="0 = linear router")

    # Zero-init gated prompt attention (towers.py): a fresh model equals zero-shot CLIP (tests/test_prompt_gate.py).
    # On by default because the synthetic benchmark measured it above the paper's ungated form (preset
    # ``ungated``): bench/results/synthetic_benchmark.json, README "Synthetic benchmark".
    prompt_gate: bool = True

    # Loss.
    learn_temperature: bool = True

    @model_validator(mode="before")
    @classmethod
    def _baselines_ungated(cls, data: Any) -> Any:
        """A baseline (zeroshot, finetune) has no prompts, so an unset ``prompt_gate`` means off for it;
        setting it on for a baseline is still an error (below)."""
        if isinstance(data, Mapping) and data.get("variant", "dialclip") != "dialclip" and "prompt_gate" not in data:
            return {**data, "prompt_gate": False}
        return data

    @model_validator(mode="after")
    def _check(self) -> "DialCLIPConfig":
        # Contradictions are errors, never silently rewritten: what the user wrote is what runs and is saved.
        if self.variant != "dialclip":
            # Baselines have no added modules: a plain CLIP dual encoder, frozen or fully tuned.
            if self.domain_prompt_length or self.context_prompt_length:
                raise ValueError(
                    f"variant {self.variant!r} has no prompts: set domain_prompt_length: 0 and "
                    f"context_prompt_length: 0 (got {self.domain_prompt_length} and {self.context_prompt_length}), "
                    f"or use preset {self.variant!r}")
            if self.prompt_gate:
                raise ValueError(f"variant {self.variant!r} has no prompts to gate: set prompt_gate: false")
        if self.domain_prompt_length and self.domain_prompt_towers == "none":
            raise ValueError(f"domain_prompt_towers 'none' contradicts domain_prompt_length "
                             f"{self.domain_prompt_length}: set domain_prompt_length: 0 to switch domain prompts "
                             f"off, or name the towers (text, vision, both)")
        if self.cpg_dim % self.cpg_heads:
            raise ValueError(f"cpg_dim={self.cpg_dim} must be divisible by cpg_heads={self.cpg_heads}")
        return self

    # A domain_prompt_length of 0 switches domain prompts off whatever domain_prompt_towers says (sweeps vary
    # the length alone), so these derive the effective towers without touching the fields.
    @property
    def text_prompts(self) -> bool:
        return self.domain_prompt_length > 0 and self.domain_prompt_towers in ("text", "both")

    @property
    def vision_prompts(self) -> bool:
        return self.domain_prompt_length > 0 and self.domain_prompt_towers in ("vision", "both")

    @property
    def uses_experts(self) -> bool:
        return self.variant == "dialclip"

    def check_backbone_depth(self, text_layers: int, vision_layers: int) -> None:
        """Checks that need the backbone: layer indices must exist."""
        if self.context_prompt_length and not 0 <= self.insertion_layer < text_layers:
            raise ValueError(f"insertion_layer={self.insertion_layer} is outside the text tower's "
                             f"{text_layers} blocks (0..{text_layers - 1})")
        depth = self.domain_prompt_depth
        if depth is not None and depth > max(text_layers, vision_layers):
            raise ValueError(f"domain_prompt_depth={depth} exceeds the backbone depth "
                             f"({text_layers} text / {vision_layers} vision blocks)")


PRESETS: dict[str, dict] = {
    # What we recommend: about 0.25% of ViT-B-32, well under the 1% budget, with gated prompt attention.
    "default": {},
    "gated": dict(prompt_gate=True),  # the default, by what it is
    # The paper's form: prompts enter the frozen blocks' attention ungated.
    "ungated": dict(prompt_gate=False),
    # Within 0.03..0.05% of ViT-B-32, like the paper's 0.04%: text-only domain prompts, a narrow CPG, rank-1 experts.
    "paper-budget": dict(domain_prompt_length=2, domain_prompt_towers="text", context_prompt_length=8,
                         cpg_dim=32, cpg_heads=2, expert_rank=1, prompt_gate=False),
    # Baselines and ablations (the synthetic benchmark's variants, by these names). Every value they need
    # is stated here: the validator rejects contradictions instead of rewriting them. The ablations are
    # of the default (gated) form: each removes one component of what we ship.
    "zeroshot": dict(variant="zeroshot", domain_prompt_length=0, domain_prompt_towers="none", context_prompt_length=0,
                     prompt_gate=False),
    "finetune": dict(variant="finetune", domain_prompt_length=0, domain_prompt_towers="none", context_prompt_length=0,
                     prompt_gate=False),
    "no-context": dict(context_prompt_length=0),
    "no-domain": dict(domain_prompt_length=0, domain_prompt_towers="none"),
    "single-expert": dict(num_experts=1),
}


def merge_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve a ``preset`` key: the preset's fields, then every other key of ``values`` over them.

    The one place presets are expanded (``preset()``, training configs' ``model`` section,
    the experiment variants). ``values`` without a ``preset`` key come back as a plain copy;
    an unknown preset name raises ``ValueError`` naming the known ones.
    """
    values = dict(values)
    if "preset" not in values:
        return values
    name = values.pop("preset")
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return {**PRESETS[name], **values}


def preset(name: str, **overrides) -> DialCLIPConfig:
    """A named preset, optionally with field overrides (validated)."""
    return DialCLIPConfig(**merge_preset({**overrides, "preset": name}))
