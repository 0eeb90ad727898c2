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

Two attention forms (``DialCLIPConfig.prompt_gate``):

- *ungated* (the paper's form; `prompt_gate: false`): every block is open_clip's own
  ``ResidualAttentionBlock`` over the whole sequence, so a token's softmax mixes
  prompt and token columns. Fresh prompts therefore move every embedding at once
  (mean cosine 0.63-0.81 with zero-shot CLIP's): training starts
  away from CLIP's aligned space.
- *gated* (the default, `prompt_gate: true`; LLaMA-Adapter's zero-init gated attention): in each block where
  prompt positions exist, our own attention from the block's own weights
  (``ln_1``, ``attn.in_proj_*``, ``attn.out_proj``, ``ls_1``, ``ln_2``, ``mlp``,
  ``ls_2``; open_clip untouched). For the non-prompt rows (SOT, tokens, pad; CLS,
  patches) it is ``softmax over non-prompt columns`` (exactly CLIP's attention:
  same positions, same causal mask) ``+ sum_s tanh(g_s[layer, head]) * softmax
  over prompt span s``, with one span per prompt kind (domain; context) and its
  own softmax, added before the output projection. The gates ``g`` start at 0, so a
  fresh model's non-prompt rows, hence every pooled feature, equal CLIP's exactly
  (float rounding, ~1e-6); ``d out / d g`` is the prompt readout, nonzero, so the
  gates learn first and open the path along which the prompts (and the CPG) then
  get gradients. Separate spans and gates let domain and context prompts each
  find their own weight instead of competing inside one softmax. Prompt rows
  attend as in the ungated form (causal over everything before them in text,
  everything in vision), so prompts still read the tokens and each other. Causal
  text: SOT precedes every prompt, so its gated term is empty (zero). Blocks
  without prompt positions run open_clip's block, as in the ungated form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """open_clip's text mask (``-inf`` above the diagonal) for any length.

    Built per forward, never cached module-wide: a cache keeps whatever tensor was
    made first, and if that first call ran under ``torch.inference_mode()`` it is an
    inference tensor that autograd refuses to save in every later training step.
    A 77x77 fill costs microseconds.
    """
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


def check_gateable(transformer: nn.Module, tower: str) -> None:
    """The gated attention recomputes open_clip's ``ResidualAttentionBlock`` from its weights: check it can."""
    for i, block in enumerate(transformer.resblocks):
        attn = getattr(block, "attn", None)
        ok = (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim
              and attn.in_proj_weight is not None and attn.bias_k is None and not attn.add_zero_attn
              and attn.dropout == 0 and not hasattr(block, "ln_1_kv")
              and all(hasattr(block, n) for n in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))
        if not ok:
            raise ValueError(f"prompt_gate needs open_clip's ResidualAttentionBlock with a packed "
                             f"nn.MultiheadAttention; {tower} block {i} is a {type(block).__name__} "
                             f"(custom blocks: set prompt_gate: false)")


def num_heads(transformer: nn.Module) -> int:
    return int(transformer.resblocks[0].attn.num_heads)


class _Layout:
    """Where the prompt spans sit in a sequence, as index tensors and masks (built once per layout)."""

    def __init__(self, n: int, spans: list[tuple[int, int]], causal: bool, device: torch.device):
        prompt = [p for a, b in spans for p in range(a, b)]
        taken = set(prompt)
        tokens = [p for p in range(n) if p not in taken]
        order = tokens + prompt
        inverse = [0] * n
        for i, p in enumerate(order):
            inverse[p] = i
        self.tokens = torch.tensor(tokens, device=device)
        self.prompt = torch.tensor(prompt, device=device)
        self.inverse = torch.tensor(inverse, device=device)
        self.causal = causal
        self.prompt_rows_mask = self.span_masks = self.span_rows = None
        if causal:  # True = may attend; a position sees itself and everything before it
            pos = torch.arange(n, device=device)
            self.prompt_rows_mask = pos.unsqueeze(0) <= self.prompt.unsqueeze(1)  # [Np, n]
            self.span_masks = [self.tokens.unsqueeze(1) > torch.arange(a, b, device=device).unsqueeze(0)
                               for a, b in spans]  # [Nt, Ls]
            self.span_rows = [m.any(dim=1) for m in self.span_masks]  # rows that see any of the span


def _gated_block(block: nn.Module, x: torch.Tensor, spans: list[tuple[int, int]], gates: list[torch.Tensor],
                 layout: _Layout) -> torch.Tensor:
    """One ``ResidualAttentionBlock`` (batch-first ``x``) with zero-init gated prompt attention (module doc)."""
    attn = block.attn
    b, n, width = x.shape
    heads = attn.num_heads
    hd = width // heads
    h = block.ln_1(x)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, n, hd]
    qt, kt, vt = (t.index_select(2, layout.tokens) for t in (q, k, v))
    # Non-prompt rows over non-prompt columns: CLIP's own attention (tokens keep their relative order).
    out_t = F.scaled_dot_product_attention(qt, kt, vt, is_causal=layout.causal)
    scale = 1.0 / math.sqrt(hd)
    for j, ((start, stop), gate) in enumerate(zip(spans, gates)):
        scores = (qt @ k[:, :, start:stop].transpose(-2, -1)).float() * scale  # [B, H, Nt, Ls]
        if layout.causal:
            scores = scores.masked_fill(~layout.span_masks[j], torch.finfo(scores.dtype).min)
        read = torch.softmax(scores, dim=-1).to(v.dtype) @ v[:, :, start:stop]
        if layout.causal:
            read = read * layout.span_rows[j].view(1, 1, -1, 1).to(read.dtype)  # no visible prompt: no term
        out_t = out_t + torch.tanh(gate).view(1, heads, 1, 1).to(read.dtype) * read
    # Prompt rows: as in the ungated form (they read the tokens and the other prompts).
    qp = q.index_select(2, layout.prompt)
    out_p = F.scaled_dot_product_attention(qp, k, v, attn_mask=layout.prompt_rows_mask)
    out = torch.cat([out_t, out_p.to(out_t.dtype)], dim=2).index_select(2, layout.inverse)
    out = out.transpose(1, 2).reshape(b, n, width)
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


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


def _check_gates(gated: bool, present: bool, gate: torch.Tensor | None, what: str) -> None:
    if gated and present and gate is None:
        raise ValueError(f"gated attention needs a gate for the {what} prompts")


def encode_text_features(clip: nn.Module, tokens: torch.Tensor, domain: torch.Tensor | None = None,
                         context: torch.Tensor | None = None, insertion_layer: int = 0,
                         domain_gate: torch.Tensor | None = None,
                         context_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled text features *before* the projection.

    ``domain``: [depth, Ld, W] per-layer prompts; ``context``: [B, Lc, W] prompts
    entering before block ``insertion_layer``. ``domain_gate`` [layers, heads] and
    ``context_gate`` [layers - insertion_layer, heads] are the gated form's raw gates
    (module doc); without them the ungated form runs.
    """
    transformer = clip.transformer
    cast = transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)
    n_dom = 0 if domain is None else domain.shape[1]
    depth = 0 if domain is None else domain.shape[0]
    gated = domain_gate is not None or context_gate is not None
    _check_gates(gated, n_dom > 0, domain_gate, "domain")
    _check_gates(gated, context is not None, context_gate, "context")
    if n_dom:
        x = _splice(x, 1, 1, domain[0])
    n_ctx = 0
    mask, layouts = None, {}
    for i, block in enumerate(transformer.resblocks):
        if context is not None and i == insertion_layer:
            x = _splice(x, 1 + n_dom, 1 + n_dom, context)
            n_ctx = context.shape[1]
        if 0 < i < depth:
            x = _splice(x, 1, 1 + n_dom, domain[i])
        spans, gates = [], []
        if gated and n_dom:
            spans.append((1, 1 + n_dom))
            gates.append(domain_gate[i])
        if gated and n_ctx:
            spans.append((1 + n_dom, 1 + n_dom + n_ctx))
            gates.append(context_gate[i - insertion_layer])
        if spans:
            key = (x.shape[1], tuple(spans))
            if key not in layouts:
                layouts[key] = _Layout(x.shape[1], spans, True, x.device)
            x = _gated_block(block, x, spans, gates, layouts[key])
        else:
            if mask is None or mask.shape[0] != x.shape[1]:
                mask = causal_mask(x.shape[1], x.device, x.dtype)
            x = _run_block(transformer, block, x, mask)
    x = clip.ln_final(x)
    eot = text_eot_index(clip, tokens) + n_dom + n_ctx
    return x[torch.arange(x.shape[0], device=x.device), eot]


def project_text(clip: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    proj = clip.text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def encode_image_features(visual: nn.Module, images: torch.Tensor, domain: torch.Tensor | None = None,
                          domain_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled image features *before* ``visual.proj`` (follows ``VisionTransformer.forward``).

    ``domain_gate`` [layers, heads]: the gated form's raw gates (module doc); None = ungated.
    """
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
    layout = _Layout(x.shape[1], [(n_tok, n_tok + n_dom)], False, x.device) if n_dom and domain_gate is not None \
        else None
    for i, block in enumerate(transformer.resblocks):
        if 0 < i < depth:
            x = _splice(x, n_tok, n_tok + n_dom, domain[i])
        if layout is not None:
            x = _gated_block(block, x, [(n_tok, n_tok + n_dom)], [domain_gate[i]], layout)
        else:
            x = _run_block(transformer, block, x, None)
    pooled, _ = visual._pool(x[:, :n_tok])
    return pooled


def project_image(visual: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return pooled if visual.proj is None else pooled @ visual.proj
