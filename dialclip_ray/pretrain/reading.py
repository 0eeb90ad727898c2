"""Does the stand-in CLIP know the dialogs' words, and does it read past them? (design 3.5)

Three measurements, all through the public loaders and open_clip's tokenizer:

- ``token_coverage``: the share of tokens (and of token types) in the test query
  windows (the newest turns that fit 77 tokens, as ``data.dataset`` builds them)
  that occur anywhere in the pretraining captions. A token row never seen in
  pretraining keeps its random init: a frozen model cannot read it.
- ``eot_positions``: where end-of-text falls in the pretraining captions
  (positional rows past the longest caption get no gradient under the causal mask).
- ``reading_test``: held-out caption-to-image R@1/R@10 over the held-out pool for
  the caption alone, followed by ~40 tokens of the dialogs' own chit-chat, and
  preceded by them (the chit-chat never names an attribute). A real CLIP that
  reads the start of its window well keeps most of the alone R@1 when chit-chat
  follows; "preceded" is reported, not targeted.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dialclip_ray.data.dataset import CanonicalDataset
from dialclip_ray.data.synthetic.dialogs import _CHITCHAT
from dialclip_ray.evaluation.metrics import ranks_all_candidates, recall_at_k
from dialclip_ray.model.text import tokenize_dialog, tokenize_texts
from dialclip_ray.pretrain.data import CaptionDataset, held_out_pairs, read_captions
from dialclip_ray.pretrain.encode import encode_text_trimmed

CHITCHAT_TOKENS = 40
SOT, EOT = 49406, 49407  # open_clip's SimpleTokenizer


def _ids(tokens: torch.Tensor) -> list[list[int]]:
    """Token ids between SOT and EOT of each row."""
    out = []
    for row in tokens.tolist():
        body = row[1:]
        end = body.index(EOT) if EOT in body else len(body)
        out.append(body[:end])
    return out


def pretraining_token_ids(caption_root: str | Path, tokenizer: Any) -> set[int]:
    """Every token id that occurs in the train captions, SOT and EOT included (the rows pretraining moved)."""
    captions = [r.caption for r in read_captions(caption_root) if r.split == "train"]
    seen: set[int] = {SOT, EOT}
    for start in range(0, len(captions), 4096):
        for ids in _ids(tokenize_texts(tokenizer, captions[start: start + 4096])):
            seen.update(ids)
    return seen


def token_coverage(dataset_dir: str | Path, seen: set[int] | str | Path, tokenizer: Any, split: str = "test",
                   target_type: str = "image") -> dict[str, Any]:
    """Share of query-window tokens (and types) of ``split`` that occur in the pretraining text.

    ``seen``: the pretraining token ids, or a caption root to read them from. ``missing`` lists the
    query token types never seen (decoded), most frequent first.
    """
    if not isinstance(seen, set):
        seen = pretraining_token_ids(seen, tokenizer)
    records = CanonicalDataset.load(dataset_dir).examples(split, target_type)
    counts: Counter[int] = Counter()
    for r in records:
        window = tokenize_dialog(tokenizer, [t.text for t in r.context] + [r.current_text])
        counts.update(_ids(window.unsqueeze(0))[0])
    total = sum(counts.values())
    covered = sum(n for tok, n in counts.items() if tok in seen)
    missing = [(tok, n) for tok, n in counts.most_common() if tok not in seen]
    decode = getattr(tokenizer, "decode", None)
    return {"tokens": 100.0 * covered / max(1, total), "types": 100.0 * len(set(counts) & seen) / max(1, len(counts)),
            "query_windows": len(records), "query_token_types": len(counts), "pretraining_token_types": len(seen),
            "missing": [{"token": decode([t]).strip() if decode else t, "count": n} for t, n in missing[:20]]}


def eot_positions(caption_root: str | Path, tokenizer: Any) -> dict[str, Any]:
    """Percentiles and a histogram (bins of 8) of the EOT position in the train captions."""
    captions = [r.caption for r in read_captions(caption_root) if r.split == "train"]
    pos = []
    for start in range(0, len(captions), 4096):
        tokens = tokenize_texts(tokenizer, captions[start: start + 4096])
        pos.extend((tokens == EOT).float().argmax(dim=1).tolist())
    arr = np.asarray(pos)
    hist, edges = np.histogram(arr, bins=np.arange(0, 81, 8))
    return {"median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "max": int(arr.max()),
            "histogram": {f"{int(a)}-{int(b) - 1}": int(n) for a, b, n in zip(edges[:-1], edges[1:], hist)}}


def _chitchat(rng: random.Random, tokenizer: Any, n_tokens: int) -> str:
    """About ``n_tokens`` BPE tokens of the dialogs' chit-chat lines (no attribute words)."""
    text, count = [], 0
    for line in rng.sample(_CHITCHAT, len(_CHITCHAT)):
        text.append(line)
        count += len(_ids(tokenize_texts(tokenizer, [line]))[0])
        if count >= n_tokens:
            break
    return " ".join(text)


@torch.no_grad()
def reading_test(model: torch.nn.Module, caption_root: str | Path, transform, tokenizer: Any,
                 splits: tuple[str, ...] = ("test",), max_images: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Caption-to-image R@1 / R@10 for the caption alone, followed by and preceded by chit-chat."""
    model.eval()
    pairs = held_out_pairs(read_captions(caption_root), splits)[:max_images]
    ds = CaptionDataset(caption_root, pairs, transform, tokenizer, cache_images=False)
    images = torch.cat([model.encode_image(torch.stack([ds.image(i) for i in range(s, min(s + 256, len(ds)))]),
                                           normalize=True).float() for s in range(0, len(ds), 256)])
    rng = random.Random(seed)
    noise = [_chitchat(rng, tokenizer, CHITCHAT_TOKENS) for _ in pairs]
    variants = {"alone": [p.caption for p in pairs],
                "followed_by_chitchat": [f"{p.caption} {n}" for p, n in zip(pairs, noise)],
                "preceded_by_chitchat": [f"{n} {p.caption}" for p, n in zip(pairs, noise)]}
    out: dict[str, Any] = {"pool_size": len(pairs), "chitchat_tokens": CHITCHAT_TOKENS}
    for name, texts in variants.items():
        tokens = tokenize_texts(tokenizer, texts)
        emb = torch.cat([encode_text_trimmed(model, tokens[s: s + 256], normalize=True).float()
                         for s in range(0, len(texts), 256)])
        ranks = ranks_all_candidates(emb.numpy(), images.numpy(), np.arange(len(texts)))
        out[name] = {"R@1": recall_at_k(ranks, 1), "R@10": recall_at_k(ranks, 10)}
    alone = out["alone"]["R@1"] or float("nan")
    out["followed_kept"] = out["followed_by_chitchat"]["R@1"] / alone
    out["preceded_kept"] = out["preceded_by_chitchat"]["R@1"] / alone
    return out


def standin_report(backbone, probe, seen: set[int], coverage_corpora: dict[str, Any],
                   max_images: int = 1000) -> dict[str, Any]:
    """Held-out recall and the reading test on ``probe``'s test photos, and token coverage of the test
    query windows of each corpus in ``coverage_corpora`` (name -> ``experiments.Corpus``)."""
    from dialclip_ray.pretrain.evaluate import caption_retrieval_metrics, embed_pairs

    tok = backbone.tokenizer
    pairs = held_out_pairs(read_captions(probe.raw), ("test",))[:max_images]
    images, texts = embed_pairs(backbone.model, probe.raw, pairs, backbone.preprocess_val, tok)
    coverage = {}
    for name, corpus in coverage_corpora.items():
        coverage[f"{name}/photochat/dialog_to_image"] = token_coverage(corpus.photochat, seen, tok)
        coverage[f"{name}/mmdialog/dialog_to_image"] = token_coverage(corpus.mmdialog, seen, tok)
        coverage[f"{name}/mmdialog/dialog_to_text"] = token_coverage(corpus.mmdialog, seen, tok, target_type="text")
    return {"heldout": caption_retrieval_metrics(images, texts), "token_coverage": coverage,
            "reading_test": reading_test(backbone.model, probe.raw, backbone.preprocess_val, tok,
                                         max_images=max_images)}
