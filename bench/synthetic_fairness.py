"""Is the synthetic retrieval task a fair test? Numbers for README, "Is the synthetic task a fair test?".

Text-only bag-of-words matchers (TF-IDF cosine and word overlap) rank candidate
images by their attribute caption (the image's text stand-in). On the
PhotoChat-style test split (1,000 candidates) a matcher that sees only the last
turn before the share should fail and one that sees the whole context should
do well; on the MMDialog-style test split targets that need an earlier image
should defeat text matching, while adding the earlier images' captions
("image-aware oracle") recovers them. MMDialog-style reply (text) targets and
image targets are scored per query view (the last turn, the newest 77 tokens, the
whole text context, plus context-image captions, plus an object oracle) and grouped
by reply kind and by where the reply's values are (truth sidecar): replies must not
be predictable from the last turn alone, but from the context. Also: context lengths in CLIP ViT-B-32
BPE tokens against the 77-token window, for the synthetic data and the real
PhotoChat sample. The generated JSON is read with the project's own loaders
(dialclip_ray.data.photochat / mmdialog). Ties are scored at their expected
rank under random tie-breaking.

    python bench/synthetic_fairness.py [--root CORPUS | --dialogs 10000 --seed 0]
    python bench/synthetic_fairness.py --root runs/cache/synth-pc4000-500-1000-mm2800-360-720-cap30000-s0-64px/raw
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from dialclip_ray.data.mmdialog import load_mmdialog  # noqa: E402
from dialclip_ray.data.photochat import load_photochat  # noqa: E402
from dialclip_ray.data.synthetic import Scene, attribute_caption, differing, generate  # noqa: E402
from dialclip_ray.data.synthetic.vocab import (BACKGROUND_WORDS, COLOUR_WORDS, SHAPE_WORDS,  # noqa: E402
                                               SIZE_WORDS, attribute_words)
from dialclip_ray.model.text import token_length  # noqa: E402

KS = (1, 5, 10)
CLIP_WINDOW = 77
_STOP = {"a", "an", "the", "i", "it", "is", "are", "of", "in", "on", "at", "to", "and", "my", "me", "you", "ones",
         "some", "this", "that", "so", "by", "s", "them", "they", "its", "was", "be", "for", "with", "all", "too"}


def _synonyms() -> dict[str, str]:
    """Synonym -> canonical word (the knowledge a CLIP trained on the varied captions can pick up)."""
    out: dict[str, str] = {}
    for table in (COLOUR_WORDS, SIZE_WORDS):
        for opts in table.values():
            out.update({w: opts[0] for w in opts[1:]})
    for opts in SHAPE_WORDS.values():
        out.update({w: opts[0][0] for pair in opts[1:] for w in pair})
    for opts in BACKGROUND_WORDS.values():
        out.update({w: opts[0][0].split()[0] for noun, _ in opts[1:] for w in noun.split() if w != "sky"})
    out.update({"single": "one", "pair": "two", "couple": "two", "trio": "three"})
    return out


SYNONYMS = _synonyms()


def words(text: str, canonical: bool = False) -> list[str]:
    out = []
    for w in re.findall(r"[a-z]+", text.lower()):
        if w in _STOP:
            continue
        if canonical:
            w = SYNONYMS.get(w, w)
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = SYNONYMS.get(w[:-1], w[:-1]) if canonical else w[:-1]
        out.append(w)
    return out


class BoW:
    """TF-IDF (cosine) and word-overlap scorers over a fixed set of candidate texts."""

    def __init__(self, docs: dict[str, str]) -> None:
        self.ids = list(docs)
        self.index = {d: i for i, d in enumerate(self.ids)}
        toks = [words(docs[d]) for d in self.ids]
        self.vocab = {w: i for i, w in enumerate(sorted({w for t in toks for w in t}))}
        df = Counter(w for t in toks for w in set(t))
        n = len(self.ids)
        self.idf = np.array([math.log((1 + n) / (1 + df[w])) + 1 for w in self.vocab])
        self.tfidf = np.stack([self._vec(t) for t in toks])
        self.binary = (self.tfidf > 0).astype(np.float64)

    def _vec(self, toks: list[str]) -> np.ndarray:
        v = np.zeros(len(self.vocab))
        for w, c in Counter(toks).items():
            if w in self.vocab:
                v[self.vocab[w]] = c
        v *= self.idf
        norm = np.linalg.norm(v)
        return v / norm if norm else v

    def scores(self, query: str, kind: str, subset: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        ids = subset if subset is not None else self.ids
        rows = [self.index[i] for i in ids]
        q = self._vec(words(query, kind.endswith("+synonyms")))
        if kind.startswith("tfidf"):
            return self.tfidf[rows] @ q, ids
        return self.binary[rows] @ (q > 0), ids


def expected_hits(scores: np.ndarray, target: int) -> dict[int, float]:
    """P(rank <= k) for each k when ties are broken uniformly at random."""
    s = scores[target]
    greater = int((scores > s + 1e-12).sum())
    ties = int((np.abs(scores - s) <= 1e-12).sum())
    return {k: min(1.0, max(0.0, (k - greater) / ties)) for k in KS}


def recall(bow: BoW, queries: list[tuple[str, str, list[str] | None]], kind: str) -> dict[str, float]:
    totals = dict.fromkeys(KS, 0.0)
    for text, target, subset in queries:
        sc, ids = bow.scores(text, kind, subset)
        for k, v in expected_hits(sc, ids.index(target)).items():
            totals[k] += v
    n = max(1, len(queries))
    out = {f"R@{k}": round(100 * totals[k] / n, 2) for k in KS}
    out["Sum"] = round(sum(out.values()), 2)
    out["n"] = len(queries)
    return out


def newest_within(tokenizer, turns: list[str], budget: int) -> list[str]:
    """Whole turns, newest first, that fit in ``budget`` BPE tokens (what a 77-token CLIP window keeps)."""
    kept, room = [], budget
    for t in reversed(turns):
        n = token_length(tokenizer, t)
        if n > room:
            break
        kept.append(t)
        room -= n
    return kept[::-1]


def length_stats(tokenizer, contexts: list[list[str]]) -> dict:
    lens = np.array([sum(token_length(tokenizer, t) for t in c if t.strip()) + 2 for c in contexts])
    return {"n": int(len(lens)), "mean": round(float(lens.mean()), 1),
            **{f"p{p}": int(np.percentile(lens, p)) for p in (10, 50, 90)}, "max": int(lens.max()),
            f"share_over_{CLIP_WINDOW}": round(float((lens > CLIP_WINDOW).mean()), 3), "lengths": lens.tolist()}


def photochat_part(root: Path, tokenizer, truth: dict) -> tuple[dict, list[list[str]]]:
    rows = [r for r in load_photochat(root / "photochat" / "test", progress=False).examples]
    docs = {r["target_id"]: attribute_caption(Scene(*truth["photochat"][r["target_id"]])) for r in rows}
    bow = BoW(docs)
    contexts = [[t["text"] for t in r["context"]] for r in rows]
    views = {
        "last_turn": [c[-1:] for c in contexts],
        "newest_77_tokens": [newest_within(tokenizer, c, CLIP_WINDOW - 2) for c in contexts],
        "sharer_turns_only": [[t["text"] for t in r["context"] if t["speaker"] == 0] for r in rows],
        "whole_context": contexts,
    }
    res: dict = {"candidates": len(docs), "dialogs": len(rows), "matchers": {}}
    for name, view in views.items():
        queries = [(" ".join(v), r["target_id"], None) for v, r in zip(view, rows)]
        res["matchers"][name] = {kind: recall(bow, queries, kind) for kind in ("tfidf", "overlap", "tfidf+synonyms")}
    scenes = [Scene(*truth["photochat"][i]) for i in docs]
    pool = Counter(scenes)
    near = [sum(pool[n] for n in pool if len(differing(s, n)) == 1) for s in scenes]
    res["pool"] = {"distinct_scenes": len(pool),
                   "mean_one_attribute_neighbours_in_pool": round(float(np.mean(near)), 2),
                   "share_with_a_neighbour": round(float(np.mean([x > 0 for x in near])), 3)}
    return res, contexts


def resolve_reference(row: dict, images: dict) -> str:
    """What an image-aware reader adds: the earlier image's background/colour when the text refers to it."""
    text = row["current_text"].lower()
    earlier = [Scene(*images[i]) for t in row["context"] for i in t["image_ids"]]
    if not earlier:
        return ""
    first = earlier[0]
    if "same place" in text or "same spot" in text:
        return BACKGROUND_WORDS[first.background][0][0]
    if "colour" in text:
        return first.colour
    return ""


def mmdialog_part(root: Path, truth: dict) -> tuple[dict, list[list[str]]]:
    rows = load_mmdialog(root / "mmdialog" / "test", progress=False).examples
    images = truth["mmdialog"]["images"]
    need = {t["media_key"]: t for t in truth["mmdialog"]["targets"] if t["split"] == "test"}
    img_rows = [r for r in rows if r["target_type"] == "image"]
    docs = {k: attribute_caption(Scene(*v)) for k, v in images.items()}
    bow = BoW(docs)
    groups: dict[str, list] = {"needs_earlier_image": [], "self_described": []}
    oracle: list = []
    current_only: dict[str, list] = {"needs_earlier_image": [], "self_described": []}
    hard = []
    for r in img_rows:
        text = " ".join([t["text"] for t in r["context"]] + [r["current_text"]])
        group = "needs_earlier_image" if need[r["target_id"]]["needs_earlier_image"] else "self_described"
        groups[group].append((text, r["target_id"], r["candidates"]))
        current_only[group].append((r["current_text"], r["target_id"], r["candidates"]))
        if group == "needs_earlier_image":
            oracle.append((r["current_text"] + " " + resolve_reference(r, images), r["target_id"], r["candidates"]))
        target = Scene(*images[r["target_id"]])
        hard.append(sum(len(differing(target, Scene(*images[c]))) == 1 for c in r["candidates"][1:]))
    res = {
        "image_targets": len(img_rows),
        "text_targets": len(rows) - len(img_rows),
        "share_needing_earlier_image": round(len(groups["needs_earlier_image"]) / max(1, len(img_rows)), 3),
        "hidden_attribute_counts": dict(Counter(need[q[1]]["hidden_attribute"] for q in groups["needs_earlier_image"])),
        "candidates_per_example": sorted({len(r["candidates"]) for r in rows}),
        "mean_one_attribute_hard_negatives": round(float(np.mean(hard)), 2),
        "tfidf_whole_context": {g: recall(bow, q, "tfidf+synonyms") for g, q in groups.items()},
        "tfidf_current_turn_only": {g: recall(bow, q, "tfidf+synonyms") for g, q in current_only.items()},
        "tfidf_reference_resolver_oracle": recall(bow, oracle, "tfidf+synonyms"),
    }
    contexts = [[t["text"] for t in r["context"]] + [r["current_text"]] for r in img_rows]
    return res, contexts


def _content_vocabulary() -> set[str]:
    """Canonical attribute words: what a reply's content is made of. Template words (``here's how they
    turned out``) say which dialog act a text is, not what it is about; a bag-of-words over them
    matches templates, not replies (and so do anchor words like "sister", shared by one twelfth of
    all objects)."""
    return {SYNONYMS.get(w, w) for w in attribute_words()}


class SparseTfidf:
    """TF-IDF (+synonyms) vectors of many texts, kept sparse; dense blocks are built per candidate list.
    With ``content`` only those words count (see ``_content_vocabulary``)."""

    def __init__(self, texts: dict[str, str], content: set[str] | None = None) -> None:
        self.content = content
        toks = {k: self._words(v) for k, v in texts.items()}
        df = Counter(w for t in toks.values() for w in set(t))
        self.vocab = {w: i for i, w in enumerate(sorted(df))}
        n = len(texts)
        self.idf = np.array([math.log((1 + n) / (1 + df[w])) + 1 for w in self.vocab])
        self.docs = {k: self._sparse(t) for k, t in toks.items()}

    def _words(self, text: str) -> list[str]:
        toks = words(text, canonical=True)
        return toks if self.content is None else [w for w in toks if w in self.content]

    def _sparse(self, toks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        counts = Counter(w for w in toks if w in self.vocab)
        idx = np.array([self.vocab[w] for w in counts], dtype=np.int64)
        val = np.array([c * self.idf[self.vocab[w]] for w, c in counts.items()])
        norm = np.linalg.norm(val)
        return idx, (val / norm if norm else val)

    def query(self, text: str) -> np.ndarray:
        q = np.zeros(len(self.vocab))
        idx, val = self._sparse(self._words(text))
        q[idx] = val
        return q

    def block(self, ids: list[str]) -> np.ndarray:
        out = np.zeros((len(ids), len(self.vocab)))
        for i, k in enumerate(ids):
            idx, val = self.docs[k]
            out[i, idx] = val
        return out


def _mean_hits(hits: list[dict[int, float]]) -> dict[str, float]:
    n = max(1, len(hits))
    out = {f"R@{k}": round(100 * sum(h[k] for h in hits) / n, 2) for k in KS}
    out["Sum"] = round(sum(out.values()), 2)
    out["n"] = len(hits)
    return out


def _views(tokenizer, context: list[str], current: str, captions: list[str], oracle: str | None) -> dict[str, str]:
    """The query text each matcher sees: the last turn, the newest 77 tokens, the whole text context,
    the whole context with every context image replaced by its attribute caption (image-aware), and
    (text targets) only the turns about the reply's object, its photo as a caption (object oracle)."""
    turns = context + ([current] if current else [])
    out = {"last_turn": turns[-1] if turns else "",
           "newest_77_tokens": " ".join(newest_within(tokenizer, turns, CLIP_WINDOW - 2)),
           "whole_context": " ".join(turns),
           "whole_context+image_captions": " ".join(turns + captions)}
    if oracle is not None:
        out["object_oracle"] = oracle
    return out


VIEWS = ("last_turn", "newest_77_tokens", "whole_context", "whole_context+image_captions", "object_oracle")


def mmdialog_views(root: Path, tokenizer, truth: dict) -> dict:
    """TF-IDF+synonyms R@k per query view for MMDialog-style test targets, image and text (each ranked
    against its own 999 negatives), grouped by what the target needs (truth sidecar)."""
    src = load_mmdialog(root / "mmdialog" / "test", progress=False)
    images = truth["mmdialog"]["images"]
    img_need = {t["media_key"]: "needs_earlier_image" if t["needs_earlier_image"] else "self_described"
                for t in truth["mmdialog"]["targets"] if t["split"] == "test"}
    text_info = {(str(t["conversation_id"]), t["turn"], t["item"]): t
                 for t in truth["mmdialog"].get("text_targets", []) if t["split"] == "test"}
    caption = {k: attribute_caption(Scene(*v)) for k, v in images.items()}
    img_bow = SparseTfidf(caption)
    txt_bow = SparseTfidf(src.texts, _content_vocabulary())
    hits: dict[str, dict[str, dict[str, list]]] = {"image": {}, "text": {}}
    outside: list[bool] = []  # attribute-naming replies: is a turn that names their values outside the window?
    for r in src.examples:
        ttype = r["target_type"]
        oracle = None
        context = [t["text"] for t in r["context"]]
        caps = [caption[i] for t in r["context"] for i in t["image_ids"]]
        if ttype == "image":
            groups = ["all", img_need.get(r["target_id"], "unknown")]
            bow = img_bow
        else:
            _, _, cid, turn, item = r["id"].split("/")
            info = text_info.get((cid, int(turn), int(item)))
            groups = ["all"] + ([f"kind={info['kind']}", f"grounding={info['grounding']}"] if info else [])
            if info and info.get("attributes"):
                groups.append("names_attributes")
            bow = txt_bow
            oracle = None
            if info and "source_turns" in info:  # what binding the reply to its object gives
                parts = [context[u] for u in info["source_turns"]]
                if info["source_image_turn"] is not None:
                    parts += [caption[i] for i in r["context"][info["source_image_turn"]]["image_ids"]]
                oracle = " ".join(parts)
                if info["source_turns"]:
                    kept = len(newest_within(tokenizer, context, CLIP_WINDOW - 2))
                    outside.append(min(info["source_turns"]) < len(context) - kept)
        block = bow.block(r["candidates"])
        target = r["candidates"].index(r["target_id"])
        for view, text in _views(tokenizer, context, r["current_text"] if ttype == "image" else "", caps,
                                 oracle if ttype == "text" else None).items():
            h = expected_hits(block @ bow.query(text), target)
            for g in groups:
                hits[ttype].setdefault(g, {}).setdefault(view, []).append(h)
    out: dict = {ttype: {g: {v: _mean_hits(h) for v, h in views.items()} for g, views in sorted(by_group.items())}
                 for ttype, by_group in hits.items()}
    out["replies_with_a_source_turn_outside_77_tokens"] = {
        "share": round(float(np.mean(outside)), 3) if outside else None, "n": len(outside)}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, c, b) = plt.subplots(1, 3, figsize=(18, 4.6))
    m = result["photochat_test"]["matchers"]
    names = list(m)
    a.bar(names, [m[n]["tfidf"]["R@1"] for n in names], color="#4c72b0", label="TF-IDF R@1")
    a.bar(names, [m[n]["tfidf"]["R@10"] - m[n]["tfidf"]["R@1"] for n in names],
          bottom=[m[n]["tfidf"]["R@1"] for n in names], color="#a1c9f4", label="R@10")
    mm = result["mmdialog_test"]
    extra = {"MM needs-earlier": mm["tfidf_whole_context"]["needs_earlier_image"]["R@1"],
             "MM self-described": mm["tfidf_current_turn_only"]["self_described"]["R@1"],
             "MM needs-earlier +image oracle": mm["tfidf_reference_resolver_oracle"]["R@1"]}
    a.bar(list(extra), list(extra.values()), color="#dd8452", label="MMDialog TF-IDF R@1")
    a.set_ylabel("%")
    a.set_title("Bag-of-words text matchers (1,000 candidates)")
    a.tick_params(axis="x", rotation=35)
    a.legend(fontsize=8)
    views = result.get("mmdialog_test_by_view", {})
    groups = [("image", "all", "MM photos"), ("text", "all", "MM replies: all"),
              ("text", "names_attributes", "MM replies naming values"), ("text", "kind=answer", "MM answers")]
    groups = [g for g in groups if g[1] in views.get(g[0], {})]
    width = 0.8 / len(VIEWS)
    for i, view in enumerate(VIEWS):
        vals = [views[t][g].get(view, {}).get("R@1", 0.0) for t, g, _ in groups]
        c.bar(np.arange(len(groups)) + i * width, vals, width, label=view)
    c.set_xticks(np.arange(len(groups)) + width * (len(VIEWS) - 1) / 2, [lab for _, _, lab in groups], fontsize=8)
    c.set_ylabel("TF-IDF+synonyms R@1 (%), 999 negatives each")
    c.set_title("MMDialog-style test targets by what the matcher sees")
    c.legend(fontsize=7)
    for name, stats in result["token_lengths"].items():
        b.hist(stats["lengths"], bins=40, alpha=0.5, density=True, label=f"{name} (n={stats['n']})")
    b.axvline(CLIP_WINDOW, color="k", ls="--", label="CLIP window (77)")
    b.set_xlabel("context length, ViT-B-32 BPE tokens incl. SOT/EOT")
    b.set_title("Dialog context length")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(r: dict) -> str:
    pc, mm = r["photochat_test"], r["mmdialog_test"]
    lines = [f"# Synthetic corpus fairness ({r['dialogs']} dialogs, seed {r['seed']})", "",
             f"PhotoChat-style test split: {pc['dialogs']} dialogs, {pc['candidates']} candidates "
             f"({pc['pool']['distinct_scenes']} distinct scenes; each has on average "
             f"{pc['pool']['mean_one_attribute_neighbours_in_pool']} one-attribute neighbours in the pool).", "",
             "| query sees | TF-IDF R@1 | R@5 | R@10 | overlap R@1 | R@5 | R@10 | TF-IDF+synonyms R@1 | R@5 | R@10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in pc["matchers"].items():
        cells = [v[k][m] for k in ("tfidf", "overlap", "tfidf+synonyms") for m in ("R@1", "R@5", "R@10")]
        lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    w = mm["tfidf_whole_context"]
    lines += ["", f"MMDialog-style test split: {mm['image_targets']} image targets, {mm['text_targets']} text targets, "
              f"candidates per example {mm['candidates_per_example']}, on average "
              f"{mm['mean_one_attribute_hard_negatives']} one-attribute hard negatives per image target.",
              f"Share of image targets that need an earlier image: **{100 * mm['share_needing_earlier_image']:.1f}%** "
              f"(hidden attribute: {mm['hidden_attribute_counts']}).", "",
              "| image targets (TF-IDF+synonyms) | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    c = mm["tfidf_current_turn_only"]
    for name, v in [("need an earlier image, whole text context", w["needs_earlier_image"]),
                    ("need an earlier image, current turn only", c["needs_earlier_image"]),
                    ("need an earlier image, current turn + the referred image's attribute (image-aware oracle)",
                     mm["tfidf_reference_resolver_oracle"]),
                    ("self-described, whole text context", w["self_described"]),
                    ("self-described, current turn only", c["self_described"])]:
        lines.append(f"| {name} (n={v['n']}) | {v['R@1']} | {v['R@5']} | {v['R@10']} |")
    lines += ["", "MMDialog-style test targets, each against its own 999 negatives: TF-IDF+synonyms R@1 / R@10 "
              "by what the query sees (text targets are ranked by their text; image targets by their attribute "
              "caption; the last view adds the attribute captions of the context's images):", "",
              "| targets | n | " + " | ".join(VIEWS) + " |", "|---|---|" + "---|" * len(VIEWS)]
    by_view = r.get("mmdialog_test_by_view", {})
    for ttype in ("image", "text"):
        for g, views in by_view.get(ttype, {}).items():
            n = next(iter(views.values()))["n"]
            lines.append(f"| {ttype}: {g} | {n} | " + " | ".join(
                f"{views[v]['R@1']} / {views[v]['R@10']}" if v in views else "-" for v in VIEWS) + " |")
    far = by_view.get("replies_with_a_source_turn_outside_77_tokens", {})
    if far.get("n"):
        lines += ["", f"Of the {far['n']} reply targets that name attributes of an earlier object, "
                  f"{100 * far['share']:.1f}% have a turn naming one of those values outside the newest 77 tokens."]
    lines += ["", "Context length in CLIP ViT-B-32 BPE tokens (incl. SOT/EOT):", "",
              "| data | n | median | p90 | max | share > 77 |", "|---|---|---|---|---|---|"]
    for name, s in r["token_lengths"].items():
        lines.append(f"| {name} | {s['n']} | {s['p50']} | {s['p90']} | {s['max']} | "
                     f"{100 * s[f'share_over_{CLIP_WINDOW}']:.1f}% |")
    lines += ["", "Ties are counted at their expected rank under random tie-breaking. `newest_77_tokens` keeps the "
              "newest whole turns that fit in the window (what zero-shot CLIP sees); `sharer_turns_only` drops the "
              "other speaker's distractors; `TF-IDF+synonyms` maps synonyms to the caption's canonical words (what a "
              "CLIP trained on the varied captions can learn). The image-aware oracle adds the earlier image's "
              "background (\"same place\") or colour (\"same colour\") word, i.e. what looking at that image gives. "
              "Reply (text) targets are matched on attribute words only (template words say which dialog act a "
              "text is, not what it is about); `object_oracle` sees only the context turns that name the reply's "
              "object (and its photo as a caption): what binding the reply to the right object gives, the "
              "upper end of what the context determines. Kinds and groundings come from the generator's truth "
              "sidecar (`text_targets`).",
              f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="an existing synthetic corpus (default: generate one in a temp dir)")
    ap.add_argument("--dialogs", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "corpus"
        if not args.root:
            t0 = time.perf_counter()
            generate(root, dialogs=args.dialogs, seed=args.seed, progress=False)
            print(f"generated {args.dialogs} dialogs in {time.perf_counter() - t0:.1f}s")
        meta = json.loads((root / "synth_meta.json").read_text())
        truth = json.loads((root / "synth_truth.json").read_text())
        pc, pc_contexts = photochat_part(root, tokenizer, truth)
        mm, mm_contexts = mmdialog_part(root, truth)
        mm_views = mmdialog_views(root, tokenizer, truth)
    lengths = {"synthetic PhotoChat test": length_stats(tokenizer, pc_contexts),
               "synthetic MMDialog test (image targets)": length_stats(tokenizer, mm_contexts)}
    sample = REPO.parent / "shared" / "data" / "photochat-sample"
    if sample.is_dir():
        real = load_photochat(sample, progress=False).examples
        lengths["real PhotoChat sample"] = length_stats(tokenizer, [[t["text"] for t in r["context"]] for r in real])
    result = {"dialogs": meta["dialogs"], "seed": meta["seed"], "generator_version": meta["version"],
              "loaders": "dialclip_ray.data.photochat.load_photochat, dialclip_ray.data.mmdialog.load_mmdialog",
              "command": "python bench/synthetic_fairness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "photochat_test": pc, "mmdialog_test": mm, "mmdialog_test_by_view": mm_views,
              "token_lengths": lengths}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "synthetic_fairness.png")
    slim = json.loads(json.dumps(result))
    for s in slim["token_lengths"].values():
        s.pop("lengths")
    (out / "synthetic_fairness.json").write_text(json.dumps(slim, indent=2) + "\n")
    (out / "synthetic_fairness.md").write_text(markdown(slim))
    print(markdown(slim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
