"""Alt-text captions: the pretraining text of the stand-in CLIP, made to read like web alt text.

A real CLIP knows the words of a dialog from web-scale captions, not from dialogs.
The stand-in must share that (design 3.5): every word type the dialog generator
can emit occurs in its pretraining text, at lengths from a few tokens to the whole
77-token window (mostly short), while dialog structure stays out (no turns,
speakers, question/answer pairs or references back): that caption-to-dialog gap
is what domain prompts exist to close.

So a caption is the scene's attribute caption (``vocab.captions``), which alone
determines the image, with optional "everyday" fragments before and after it:
contiguous spans of single utterances from the dialog generator's phrase lists,
with every attribute word removed (filler never names or contradicts the image),
joined like alt text joins tags and titles (``,`` ``-`` ``|``). The first caption
of every image is the plain attribute caption, so held-out caption-to-image recall
("caption alone") is measured on the same text as before.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from dialclip_ray.data.synthetic import dialogs
from dialclip_ray.data.synthetic.vocab import attribute_words

P_PLAIN = 0.35       # share of captions after the first with no filler (short alt text is the common case)
MAX_FILLER_WORDS = 36  # with separators: EOT at most at 74 of 77 in 20,000 draws, none truncated
SEPARATORS = (" ", ", ", " - ", " | ", ". ")
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[?!.,:-]")
_PLACEHOLDER = re.compile(r"\{[^}]*\}")


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


@lru_cache(maxsize=1)
def everyday_fragments() -> tuple[tuple[str, ...], ...]:
    """Every phrase the dialog generator writes (module-level string lists of ``dialogs``), placeholders
    cut out, as word sequences with the attribute words removed."""
    banned = attribute_words()
    out = []
    for name, value in sorted(vars(dialogs).items()):
        if not name.startswith("_") or not isinstance(value, (list, tuple, dict)):
            continue
        for text in _strings(value):
            for piece in _PLACEHOLDER.split(text.lower()):
                words = tuple(w for w in _TOKEN.findall(piece) if w not in banned)
                if words:
                    out.append(words)
    return tuple(out)


def everyday_vocabulary() -> set[str]:
    """The word and punctuation types the filler can use."""
    return {w for frag in everyday_fragments() for w in frag}


def _filler(rng: random.Random, n_words: int) -> str:
    frags = everyday_fragments()
    parts, count = [], 0
    while count < n_words:
        frag = rng.choice(frags)
        start = rng.randrange(len(frag))
        span = frag[start: start + rng.randint(1, len(frag))][: n_words - count]
        parts.append(" ".join(span))
        count += len(span)
    text = parts[0]
    for part in parts[1:]:
        text += rng.choice(SEPARATORS) + part
    return text


def filler_length(rng: random.Random) -> int:
    """Words of filler: none for ``P_PLAIN``, else a long-tailed length (median ~6 words, a tail to the cap)."""
    if rng.random() < P_PLAIN:
        return 0
    return min(MAX_FILLER_WORDS, max(1, int(rng.paretovariate(1.1) * 3)))


def alt_text(rng: random.Random, caption: str) -> str:
    """``caption`` with everyday filler before and/or after it (module doc)."""
    n = filler_length(rng)
    if n == 0:
        return caption
    before = rng.randint(0, n) if rng.random() < 0.5 else 0
    pre, post = _filler(rng, before) if before else "", _filler(rng, n - before) if n - before else ""
    text = caption
    if pre:
        text = pre + rng.choice(SEPARATORS) + text
    if post:
        text = text + rng.choice(SEPARATORS) + post
    return text
