"""Mixture of projection experts (MoP).

Each expert is CLIP's frozen projection plus a trainable low-rank correction
``x A B`` with ``B`` zero-initialised, so a fresh model projects exactly like
CLIP and training starts from CLIP's aligned space (README, Model design).

Routing by retrieval type (``dialog_to_image``, ``dialog_to_text``):

- ``K == number of types``: hard routing, type ``i`` uses expert ``i`` (the paper).
  Only each example's own expert is computed: an expert whose type is absent from
  the batch is not in the graph, so its gradient is None and AdamW skips it (no
  weight decay, no momentum drift on steps of the other type). A 0/1 gate over
  all experts would give it a zero gradient, which AdamW still acts on. DDP copes
  with the missing gradients because the trainer sets ``find_unused_parameters``;
- ``K == 1``: one shared projection (the "no MoP" ablation);
- otherwise a learned router: softmax over K experts of a linear function of the
  pooled feature plus a learned bias per retrieval type, so experts can be shared
  or split between types and the type still steers the choice.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class LowRankExpert(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.randn(in_dim, rank) / in_dim ** 0.5)
        self.up = nn.Parameter(torch.zeros(rank, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.down.to(x.dtype)) @ self.up.to(x.dtype)


class ProjectionExperts(nn.Module):
    def __init__(self, base: Callable[[torch.Tensor], torch.Tensor], in_dim: int, out_dim: int,
                 num_experts: int, rank: int, num_types: int = 1, router_hidden: int = 0):
        super().__init__()
        self._base = [base]  # a plain list: the frozen projection belongs to the backbone, not to us
        self.num_types = num_types
        self.experts = nn.ModuleList(LowRankExpert(in_dim, out_dim, rank) for _ in range(num_experts))
        self.hard = num_experts == num_types and num_types > 1
        self.router: nn.Module | None = None
        if num_experts > 1 and not self.hard:
            self.router = (nn.Linear(in_dim, num_experts) if router_hidden == 0 else
                           nn.Sequential(nn.Linear(in_dim, router_hidden), nn.GELU(),
                                         nn.Linear(router_hidden, num_experts)))
            self.type_bias = nn.Parameter(torch.zeros(num_types, num_experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def gates(self, x: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """[B, K] expert weights for each example."""
        k = self.num_experts
        if k == 1:
            return torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)
        if self.hard:
            return nn.functional.one_hot(types.long(), k).to(x.dtype)
        return torch.softmax(self.router(x.float()) + self.type_bias[types.long()], dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        out = self._base[0](x)
        if types is None:
            types = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if self.num_experts == 1:
            return out + self.experts[0](x)
        if self.hard:
            types = types.long()
            delta = None
            for k, expert in enumerate(self.experts):
                rows = (types == k).nonzero(as_tuple=True)[0]
                if rows.numel():
                    part = expert(x.index_select(0, rows))
                    delta = (torch.zeros(x.shape[0], part.shape[-1], device=x.device, dtype=part.dtype)
                             if delta is None else delta).index_add(0, rows, part)
            return out if delta is None else out + delta.to(out.dtype)
        deltas = torch.stack([e(x) for e in self.experts], dim=1)  # [B, K, D]
        return out + (self.gates(x, types).unsqueeze(-1) * deltas).sum(dim=1)
