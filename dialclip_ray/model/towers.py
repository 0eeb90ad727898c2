"""open_clip's towers, run block by block so prompts can be injected.

We borrow the frozen modules of an open_clip ``CLIP`` (CoOp's approach) and
replay its ``encode_text`` / ``VisionTransformer.forward`` with our own loop over
``resblocks``; open_clip itself is never modified. Followed from open_clip 3.3.

Text layout (prompts are *extra* positions, so every text token keeps its own
positional embedding and a prompt-free run is exactly CLIP)::

    [SOT, D_1..D_Ld, (C_1..C_Lc from block Lins on), tok_1 .. EOT .. pad]

- domain prompts D carry no positional embedding; before each block ``l`` of the
  first ``depth`` blocks their slots are overwritten with that layer's prompts
  (deep prompt tuning, VPT-deep); after ``depth`` they flow on;
- context prompts C are spliced in right before block ``Lins`` and then flow
  through the remaining blocks;
- the causal mask is rebuilt for the current length, and the EOT index used for
  pooling shifts by the number of prompts before it.

Vision layout: ``[CLS, patches..., D_1..D_Ld]``: prompts are appended after the
positional embedding and before ``ln_pre``, refreshed before each of the first
``depth`` blocks, and dropped before pooling so CLS/avg pooling is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

_MASKS: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """open_clip's text mask (``-inf`` above the diagonal) for any length, cached."""
    key = (length, str(device), dtype)
    if key not in _MASKS:
        mask = torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)
        _MASKS[key] = mask
    return _MASKS[key]


def _run_block(transformer: nn.Module, block: nn.Module, x: torch.Tensor,
               attn_mask: torch.Tensor | None) -> torch.Tensor:
    if getattr(transformer, "batch_first", True):
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


def _splice(x: torch.Tensor, start: int, stop: int, values: torch.Tensor) -> torch.Tensor:
    """``x`` with positions ``start:stop`` replaced by ``values`` (broadcast over batch)."""
    values = values.to(x.dtype)
    if values.dim() == 2:
        values = values.unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], values, x[:, stop:]], dim=1)


def text_eot_index(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if clip.text_pool_type == "eos":
        return (tokens == clip.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def encode_text_features(clip: nn.Module, tokens: torch.Tensor, domain: torch.Tensor | None = None,
                         context: torch.Tensor | None = None, insertion_layer: int = 0) -> torch.Tensor:
    """Pooled text features *before* the projection.

    ``domain``: [depth, Ld, W] per-layer prompts; ``context``: [B, Lc, W] prompts
    entering before block ``insertion_layer``.
    """
    transformer = clip.transformer
    cast = transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)
    n_dom = 0 if domain is None else domain.shape[1]
    depth = 0 if domain is None else domain.shape[0]
    if n_dom:
        x = _splice(x, 1, 1, domain[0])
    n_ctx = 0
    for i, block in enumerate(transformer.resblocks):
        if context is not None and i == insertion_layer:
            x = _splice(x, 1 + n_dom, 1 + n_dom, context)
            n_ctx = context.shape[1]
        if 0 < i < depth:
            x = _splice(x, 1, 1 + n_dom, domain[i])
        x = _run_block(transformer, block, x, causal_mask(x.shape[1], x.device, x.dtype))
    x = clip.ln_final(x)
    eot = text_eot_index(clip, tokens) + n_dom + n_ctx
    return x[torch.arange(x.shape[0], device=x.device), eot]


def project_text(clip: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    proj = clip.text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def encode_image_features(visual: nn.Module, images: torch.Tensor,
                          domain: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled image features *before* ``visual.proj`` (follows ``VisionTransformer.forward``)."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    n_tok = x.shape[1]
    n_dom = 0 if domain is None else domain.shape[1]
    depth = 0 if domain is None else domain.shape[0]
    if n_dom:
        x = _splice(x, n_tok, n_tok, domain[0])
    x = visual.ln_pre(x)
    transformer = visual.transformer
    for i, block in enumerate(transformer.resblocks):
        if 0 < i < depth:
            x = _splice(x, n_tok, n_tok + n_dom, domain[i])
        x = _run_block(transformer, block, x, None)
    pooled, _ = visual._pool(x[:, :n_tok])
    return pooled


def project_image(visual: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return pooled if visual.proj is None else pooled @ visual.proj
