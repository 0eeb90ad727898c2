"""Deep domain prompts: ``Ld`` learnable vectors for each of the first ``depth`` blocks of a tower.

Initialisations (README, Model design; the paper found ``pretrain`` best):

- ``random``: N(0, 0.02), CLIP's own token-embedding init scale;
- ``pretrain``: text prompts copy randomly drawn rows of the backbone's token
  embedding (real vocabulary vectors); vision prompts copy the class embedding
  plus small noise, the only pre-trained "token" a ViT has;
- ``task``: text prompts copy the token embeddings of the configured task words
  (cycled to fill ``Ld``); vision prompts as ``pretrain``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from dialclip_ray.model.text import _bpe


class DomainPrompts(nn.Module):
    """A ``[depth, length, width]`` parameter; ``forward`` returns it (for the towers to splice)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.prompts = nn.Parameter(init.clone().float())

    def forward(self) -> torch.Tensor:
        return self.prompts

    @property
    def depth(self) -> int:
        return self.prompts.shape[0]


def _text_rows(clip: nn.Module, how: str, depth: int, length: int, gen: torch.Generator,
               tokenizer: Any | None, task_words: Sequence[str]) -> torch.Tensor:
    table = clip.token_embedding.weight.detach().float().cpu()
    if how == "pretrain":
        ids = torch.randint(0, table.shape[0] - 2, (depth, length), generator=gen)  # skip SOT/EOT at the end
        return table[ids]
    if how == "task":
        if tokenizer is None:
            raise ValueError("task-word initialisation needs the backbone's tokenizer")
        ids = [i for w in task_words for i in _bpe(tokenizer, w)]
        if not ids:
            raise ValueError(f"task words {list(task_words)!r} produced no tokens")
        rows = table[torch.tensor(ids)]
        reps = -(-length // len(ids))
        one = rows.repeat(reps, 1)[:length]
        return one.unsqueeze(0).repeat(depth, 1, 1)
    return torch.randn(depth, length, table.shape[1], generator=gen) * 0.02


def make_text_prompts(clip: nn.Module, how: str, depth: int, length: int, seed: int = 0,
                      tokenizer: Any | None = None, task_words: Sequence[str] = ()) -> DomainPrompts:
    gen = torch.Generator().manual_seed(seed)
    return DomainPrompts(_text_rows(clip, how, depth, length, gen, tokenizer, task_words))


def make_vision_prompts(visual: nn.Module, how: str, depth: int, length: int, seed: int = 1) -> DomainPrompts:
    gen = torch.Generator().manual_seed(seed)
    width = visual.class_embedding.shape[-1]
    noise = torch.randn(depth, length, width, generator=gen) * 0.02
    if how == "random":
        return DomainPrompts(noise)
    return DomainPrompts(visual.class_embedding.detach().float().cpu().view(1, 1, -1) + noise)


class PromptGates(nn.Module):
    """Zero-initialised gates of the gated prompt attention (towers.py), one per layer and head.

    ``text_domain`` [text layers, heads], ``text_context`` [text layers - insertion layer, heads]
    (context prompts exist from the insertion block on) and ``vision_domain`` [vision layers, heads];
    a tensor is None where its prompts are off. Zeros make a fresh model equal zero-shot CLIP.
    """

    def __init__(self, text_layers: int, text_heads: int, vision_layers: int, vision_heads: int,
                 text_domain: bool, text_context_layers: int, vision_domain: bool):
        super().__init__()

        def gate(on: bool, layers: int, heads: int) -> nn.Parameter | None:
            return nn.Parameter(torch.zeros(layers, heads)) if on and layers else None

        self.text_domain = gate(text_domain, text_layers, text_heads)
        self.text_context = gate(text_context_layers > 0, text_context_layers, text_heads)
        self.vision_domain = gate(vision_domain, vision_layers, vision_heads)
