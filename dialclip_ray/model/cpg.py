"""Context prompt generator (CPG): the dialog history distilled into ``Lc`` prompt vectors.

The frozen CLIP towers are the multi-modal context encoder: every context turn's
text and every context image is embedded into CLIP's joint space, which already
bridges the two modalities. A linear mapping network lifts those features into
the generator's width and adds what CLIP does not know: modality, speaker and
recency (turns counted back from the newest, so the latest turn always has the
same position code whatever the dialog length). The generator pools the set
with ``Lc`` learned queries (masked multi-head attention pooling), refines the
result with a residual feed-forward layer, and maps it to the text tower's width.

The output layer starts so that fresh prompts have the RMS of the backbone's token embedding rows
(``token_rms``). With PyTorch's default ``Linear`` init they came out 6-8x larger (0.12-0.16 against
0.02 for our small CLIPs), and the ungated form's training became chaotic: tests/test_model.py's
overfit check ended between 0.0 and 0.15 for starts that differed by 1e-6 (like another CPU's rounding);
at the token scale every such start converges (the frozen blocks see prompts like the tokens they know).

A learned null token is always in the set, so a dialog with no history still has
something to attend to, and padded turns/images are masked (never truncated to
the shortest dialog of a batch): an example's prompts do not depend on its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dialclip_ray.model.batch import MAX_SPEAKERS


class ContextPromptGenerator(nn.Module):
    def __init__(self, feature_dim: int, hidden: int, out_width: int, length: int, heads: int, max_turns: int,
                 token_rms: float | None = None):
        super().__init__()
        self.max_turns = max_turns
        self.map = nn.Linear(feature_dim, hidden)
        self.modality = nn.Embedding(2, hidden)
        self.speaker = nn.Embedding(MAX_SPEAKERS, hidden)
        self.recency = nn.Embedding(max_turns, hidden)
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))
        self.queries = nn.Parameter(torch.randn(length, hidden) * 0.02)
        self.pool = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.out_norm = nn.LayerNorm(hidden)  # unit-RMS input to ``out``, so its init sets the prompts' scale
        self.out = nn.Linear(hidden, out_width)
        for emb in (self.modality, self.speaker, self.recency):
            nn.init.normal_(emb.weight, std=0.02)
        if token_rms is not None:
            self._match_output_scale(token_rms)

    @torch.no_grad()
    def _match_output_scale(self, token_rms: float) -> None:
        """Rescale ``out`` so prompts of a fresh generator have RMS ``token_rms`` (module doc).

        ``out_norm`` gives ``out`` a unit-RMS input, so weights of std ``token_rms / sqrt(hidden)``
        and a zero bias give outputs of RMS ~``token_rms``.
        """
        nn.init.normal_(self.out.weight, std=token_rms / self.out.in_features ** 0.5)
        nn.init.zeros_(self.out.bias)

    def forward(self, turn_feats: torch.Tensor, turn_mask: torch.Tensor, turn_speaker: torch.Tensor,
                image_feats: torch.Tensor, image_mask: torch.Tensor, image_turn: torch.Tensor) -> torch.Tensor:
        """[B, T, E] turn features and [B, M, E] image features -> [B, Lc, out_width] prompts."""
        b, t = turn_mask.shape
        n_turns = turn_mask.sum(dim=1, keepdim=True)
        last = self.max_turns - 1
        rec_t = (n_turns - 1 - torch.arange(t, device=turn_mask.device)).clamp(0, last)
        rec_i = (n_turns - 1 - image_turn).clamp(0, last)
        spk_i = turn_speaker.gather(1, image_turn.clamp(0, t - 1))
        turns = (self.map(F.normalize(turn_feats.float(), dim=-1)) + self.modality.weight[0]
                 + self.speaker(turn_speaker.clamp(0, MAX_SPEAKERS - 1)) + self.recency(rec_t))
        images = (self.map(F.normalize(image_feats.float(), dim=-1)) + self.modality.weight[1]
                  + self.speaker(spk_i.clamp(0, MAX_SPEAKERS - 1)) + self.recency(rec_i))
        tokens = torch.cat([self.null.expand(b, -1, -1), turns, images], dim=1)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=tokens.device), turn_mask, image_mask], dim=1)
        queries = self.queries.unsqueeze(0).expand(b, -1, -1)
        pooled, _ = self.pool(queries, tokens, tokens, key_padding_mask=~keep, need_weights=False)
        pooled = pooled + self.ffn(self.norm(pooled))
        return self.out(self.out_norm(pooled))
