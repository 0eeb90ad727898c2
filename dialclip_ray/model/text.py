"""Dialog text to CLIP tokens, keeping the newest turns.

open_clip's tokenizer cuts the tail of a long text; in a dialog the tail is the
most recent and most important part. So we BPE-encode each turn on its own,
take turns from the newest backwards while they fit, and cut only the oldest
turn that no longer fits whole (keeping its end). The result has open_clip's
layout ``[SOT, tokens..., EOT, 0...]`` so CLIP's argmax-EOT pooling stays valid.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def _bpe(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without SOT/EOT, for open_clip's SimpleTokenizer and HF tokenizers."""
    if hasattr(tokenizer, "encoder") and hasattr(tokenizer, "encode"):  # SimpleTokenizer
        clean = getattr(tokenizer, "clean_fn", None)
        return tokenizer.encode(clean(text) if clean else text)
    if hasattr(tokenizer, "tokenizer"):  # open_clip HFTokenizer
        return tokenizer.tokenizer.encode(text, add_special_tokens=False)
    raise TypeError(f"unsupported tokenizer {type(tokenizer).__name__}")


def _special(tokenizer: Any) -> tuple[int, int]:
    sot = getattr(tokenizer, "sot_token_id", None)
    eot = getattr(tokenizer, "eot_token_id", None)
    if sot is None or eot is None:
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no SOT/EOT ids")
    return int(sot), int(eot)


def newest_first(pieces: Sequence[list[int]], budget: int) -> list[int]:
    """Concatenate token lists (oldest first) keeping the newest ones that fit in ``budget``.

    The oldest piece that fits only partly keeps its end (the words nearest the present).
    """
    kept: list[list[int]] = []
    room = budget
    for piece in reversed(pieces):
        if room <= 0:
            break
        if len(piece) <= room:
            kept.append(piece)
            room -= len(piece)
        else:
            kept.append(piece[len(piece) - room:])
            room = 0
    return [t for piece in reversed(kept) for t in piece]


def tokenize_dialog(tokenizer: Any, turns: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """Tokens ``[context_length]`` for the turns (oldest first), cut from the oldest turn."""
    sot, eot = _special(tokenizer)
    pieces = [_bpe(tokenizer, t) for t in turns if t and t.strip()]
    body = newest_first(pieces, context_length - 2)
    ids = [sot, *body, eot]
    out = torch.zeros(context_length, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def tokenize_texts(tokenizer: Any, texts: Sequence[str], context_length: int = 77) -> torch.Tensor:
    """Tokens ``[N, context_length]``, one text each (head kept, like open_clip)."""
    sot, eot = _special(tokenizer)
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot, *_bpe(tokenizer, text or "")[: context_length - 2], eot]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def token_length(tokenizer: Any, text: str) -> int:
    """Number of BPE tokens in ``text`` (without SOT/EOT): for length statistics."""
    return len(_bpe(tokenizer, text))
