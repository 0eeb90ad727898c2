"""Write the synthetic corpus (layout: /tmp/data_contract.md "Synthetic corpus on disk").

Everything is built in a temporary sibling directory and renamed into place
at the end, so a failed run leaves nothing behind. Every random choice comes
from a ``random.Random`` seeded by a string naming its purpose, the seed and
the item, so the output bytes depend only on the arguments (not on workers).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dialclip_ray.data.synthetic.dialogs import (Conversation, ImageItem, TextItem, mmdialog_conversation,
                                                photochat_dialog, text_pool)
from dialclip_ray.data.synthetic.render_pool import ImageJob, render_all
from dialclip_ray.data.synthetic.alttext import alt_text
from dialclip_ray.data.synthetic.scenes import MAX_IMAGE_SIZE
from dialclip_ray.data.synthetic.vocab import ALL_SCENES, ATTRIBUTES, VALUES, Scene, captions, neighbours, photo_description
from dialclip_ray.fsio import staging_dir

GENERATOR_VERSION = 3  # 2: MMDialog replies determined by the context, hard negative texts, split sizes;
# 3: alt-text captions (alttext.py) that cover the dialogs' words at lengths up to the window
NEGATIVES = 999
PHOTOCHAT_SPLITS = ("train", "dev", "test")
MMDIALOG_SPLITS = ("train", "valid", "test")
CAPTION_SPLIT = {"train": "train", "dev": "val", "valid": "val", "test": "test"}
TRUTH_FILE = "synth_truth.json"
CAPTIONS_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("caption", pa.string()),
                             ("split", pa.string())])


@dataclass(frozen=True)
class SynthConfig:
    """Arguments of :func:`generate`, validated."""

    dialogs: int = 2000
    seed: int = 0
    image_size: int = 64
    workers: int | None = None
    shard_size: int = 500  # dialogs per PhotoChat shard (the real shards hold about 500)
    mmdialog_fraction: float = 0.2  # MMDialog conversations per PhotoChat dialog
    chain_fraction: float = 0.5  # MMDialog conversations whose later image refers to an earlier one
    captions_per_image: int = 3
    # "alttext": captions after each image's first carry everyday filler (alttext.py: the stand-in CLIP learns the
    # dialogs' words and reads past them); "templates": attribute captions only (generator version 2's text).
    caption_style: str = "alttext"
    # Explicit split sizes (train, dev, test) in dialogs / (train, valid, test) in conversations; None: derived
    # from ``dialogs`` (``photochat_split_sizes``, ``mmdialog_split_sizes``).
    photochat_sizes: tuple[int, int, int] | None = None
    mmdialog_sizes: tuple[int, int, int] | None = None
    caption_images: int = 0  # extra images with captions only (split train): pretraining data for the small CLIP
    text_hard_negatives: int = 300  # cap on one-attribute variants among a record's 999 negative texts

    def __post_init__(self) -> None:
        if not isinstance(self.dialogs, int) or self.dialogs < 10:
            raise ValueError(f"dialogs must be an integer >= 10, got {self.dialogs!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer within 16..{MAX_IMAGE_SIZE}, got {self.image_size!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ValueError(f"workers must be None or an integer >= 0, got {self.workers!r}")
        if self.shard_size < 1 or not 0 < self.mmdialog_fraction <= 1 or not 0 <= self.chain_fraction <= 1:
            raise ValueError("shard_size >= 1, 0 < mmdialog_fraction <= 1 and 0 <= chain_fraction <= 1 required")
        if self.caption_style not in ("alttext", "templates"):
            raise ValueError(f"caption_style must be 'alttext' or 'templates', got {self.caption_style!r}")
        if not 1 <= self.captions_per_image <= 8:
            raise ValueError(f"captions_per_image must be within 1..8, got {self.captions_per_image}")
        for name in ("photochat_sizes", "mmdialog_sizes"):
            sizes = getattr(self, name)
            if sizes is not None:
                if len(sizes) != 3 or not all(isinstance(n, int) and n >= 1 for n in sizes):
                    raise ValueError(f"{name} must be three integers >= 1 (train, held-out, test), got {sizes!r}")
                object.__setattr__(self, name, tuple(sizes))
        if not isinstance(self.caption_images, int) or self.caption_images < 0:
            raise ValueError(f"caption_images must be an integer >= 0, got {self.caption_images!r}")
        if not 0 <= self.text_hard_negatives <= NEGATIVES // 2:
            raise ValueError(f"text_hard_negatives must be within 0..{NEGATIVES // 2}")

    def photochat_splits(self) -> dict[str, int]:
        if self.photochat_sizes is None:
            return photochat_split_sizes(self.dialogs)
        return dict(zip(PHOTOCHAT_SPLITS, self.photochat_sizes))

    def mmdialog_splits(self) -> dict[str, int]:
        if self.mmdialog_sizes is None:
            return mmdialog_split_sizes(max(3, round(self.dialogs * self.mmdialog_fraction)))
        return dict(zip(MMDIALOG_SPLITS, self.mmdialog_sizes))


def photochat_split_sizes(n: int) -> dict[str, int]:
    """About 80/10/10, but a test split of exactly 1,000 once n >= 10,000 (the protocol's candidate pool)."""
    test = 1000 if n >= 10_000 else max(1, round(n * 0.1))
    dev = max(1, round(n * 0.1))
    return {"train": n - dev - test, "dev": dev, "test": test}


def mmdialog_split_sizes(n: int) -> dict[str, int]:
    held = max(1, round(n * 0.1))
    return {"train": max(1, n - 2 * held), "valid": held, "test": held}


def sample_scenes(rng: random.Random, n: int, unique: bool) -> list[Scene]:
    """``n`` scenes drawn in clusters of near-duplicates (each cluster: a scene plus 2-5 of its neighbours).

    With ``unique`` no scene repeats until all 1,152 are used, so a held-out split's
    pool is full of images that differ from each other in a single attribute.
    """
    out: list[Scene] = []
    used: set[Scene] = set()
    while len(out) < n:
        if len(used) == len(ALL_SCENES):
            used.clear()
        base = rng.choice([s for s in ALL_SCENES if s not in used]) if unique else rng.choice(ALL_SCENES)
        near = [s for s in neighbours(base) if not unique or s not in used]
        group = [base] + rng.sample(near, min(len(near), rng.randint(2, 5)))
        for s in group[: n - len(out)]:
            out.append(s)
            used.add(s)
    rng.shuffle(out)
    return out


class _Ids:
    """Unique random ids from one seeded stream."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(f"ids:{seed}")
        self.seen: set[str] = set()

    def _new(self, make) -> str:
        while True:
            value = make()
            if value not in self.seen:
                self.seen.add(value)
                return value

    def hex16(self) -> str:
        return self._new(lambda: f"{self.rng.getrandbits(64):016x}")

    def media_key(self) -> str:
        """Signed 63-bit decimal strings; about 40% start with '-' (never parse them as numbers)."""
        return self._new(lambda: ("-" if self.rng.random() < 0.4 else "") + str(self.rng.getrandbits(63)))


def _dump_json(path: Path, obj: Any, indent: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _photochat_json(obj) if indent == "photochat" else json.dumps(obj, indent=indent, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _photochat_json(records: list[dict]) -> str:
    """Exactly ``json.dumps(records, indent=2)`` (the real shards' layout), without the slow pure-Python
    indenting encoder: the record layout is fixed, so only the scalars go through ``json.dumps``."""
    if not records:
        return "[]"
    dumps = json.dumps
    out = []
    for rec in records:
        turns = ",\n".join(
            '      {\n        "message": %s,\n        "share_photo": %s,\n        "user_id": %d\n      }'
            % (dumps(t["message"]), "true" if t["share_photo"] else "false", t["user_id"]) for t in rec["dialogue"])
        out.append('  {\n    "dialogue": [\n%s\n    ],\n    "dialogue_id": %d,\n    "photo_description": %s,\n'
                   '    "photo_url": %s,\n    "photo_id": %s\n  }'
                   % (turns, rec["dialogue_id"], dumps(rec["photo_description"]), dumps(rec["photo_url"]),
                      dumps(rec["photo_id"])))
    return "[\n" + ",\n".join(out) + "\n]"


def _photochat(cfg: SynthConfig, ids: _Ids, root: Path, jobs: list[ImageJob], truth: dict,
               writes: list[tuple[Path, Any, Any]]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for split, n in cfg.photochat_splits().items():
        scenes = sample_scenes(random.Random(f"pc-scenes:{cfg.seed}:{split}"), n, unique=split != "train")
        records = []
        for i, scene in enumerate(scenes):
            hexid = ids.hex16()
            photo_id = f"train/{hexid}"  # Open Images style; the prefix is not the PhotoChat split
            records.append({
                "dialogue": photochat_dialog(random.Random(f"pc:{cfg.seed}:{split}:{i}"), scene),
                "dialogue_id": i,
                "photo_description": photo_description(scene),
                "photo_url": f"https://photos.example.org/synth/{hexid}_o.jpg",
                "photo_id": photo_id,
            })
            jobs.append(ImageJob(f"photochat_images/{photo_id}.jpg", scene, f"img:{cfg.seed}:{photo_id}", photo_id,
                                 CAPTION_SPLIT[split]))
            truth["photochat"][photo_id] = list(scene)
        shards = range(0, n, cfg.shard_size)
        for k, start in enumerate(shards):
            writes.append((root / "photochat" / split / f"{split}_{k:02d}.json",
                           records[start:start + cfg.shard_size], "photochat"))
        counts[split] = {"dialogs": n, "shards": len(shards)}
    return counts


def _conversation_json(conv: Conversation, keys: list[str]) -> list[dict]:
    it = iter(keys)
    return [{"turn": [{"__MEDIA__": next(it)} if isinstance(item, ImageItem) else {"__TEXT__": item.text}
                      for item in turn]} for turn in conv.turns]


def _negatives(rng: random.Random, targets: list[Scene], own: set[str], pool: dict[Scene, str],
               others: list[tuple[str, Scene]]) -> list[str]:
    """999 negative media keys: every one-attribute neighbour of each target, then random fill.

    No negative shows the same scene as a target (that would be an unresolvable tie).
    """
    banned = set(targets)
    hard = list(dict.fromkeys(pool[n] for t in targets for n in neighbours(t) if n not in banned))
    hard_set = set(hard)
    rest = [k for s, k in pool.items() if s not in banned and k not in hard_set]
    rest += [k for k, s in others if s not in banned and k not in own and k not in hard_set]
    picked = hard[:NEGATIVES] + rng.sample(rest, NEGATIVES - min(len(hard), NEGATIVES))
    rng.shuffle(picked)
    return picked


def _text_negatives(rng: random.Random, own: list[TextItem], targets: list[TextItem], pool: list[TextItem],
                    objects: list[Scene], max_hard: int) -> list[str]:
    """999 negative texts: one-attribute variants of the record's reply targets, then random fill.

    Negatives are shared by all text targets of a record (the MMDialog format), so none may
    be a valid reply in it: no own text, no paraphrase of a target (same kind and values) and
    nothing that is true of one of the conversation's objects (a random "love the red ones"
    when the conversation has red ones). The variants are false by construction; the filter
    drops the few that happen to describe another object of the conversation.
    """
    own_texts = {x.text for x in own}
    said = {x.signature for x in targets}

    def clean(x: TextItem) -> bool:
        return x.text not in own_texts and x.signature not in said and not any(x.true_of(o) for o in objects)

    hard = list({v.text: None for x in targets for v in x.variants(rng) if clean(v)})
    if len(hard) > max_hard:
        hard = rng.sample(hard, max_hard)
    taken = set(hard)
    fill = [x.text for x in pool if x.text not in taken and clean(x)]
    picked = hard + rng.sample(fill, NEGATIVES - len(hard))
    rng.shuffle(picked)
    return picked


def _mmdialog(cfg: SynthConfig, ids: _Ids, root: Path, jobs: list[ImageJob], truth: dict,
              writes: list[tuple[Path, Any, Any]]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    cid = 0
    for split, n in cfg.mmdialog_splits().items():
        split_dir = f"mmdialog/{split}"
        convs: list[tuple[int, Conversation, list[str]]] = []
        media: list[tuple[str, Scene]] = []
        for i in range(n):
            rng = random.Random(f"mm:{cfg.seed}:{split}:{i}")
            conv = mmdialog_conversation(rng, lambda r: r.choice(ALL_SCENES), rng.random() < cfg.chain_fraction)
            keys = [ids.media_key() for turn in conv.turns for item in turn if isinstance(item, ImageItem)]
            cid += 1
            convs.append((cid, conv, keys))
        records, targets = [], []
        texts: list[TextItem] = []
        held_out = split != "train"
        pool: dict[Scene, str] = {}
        if held_out:  # one image of every scene: hard negatives exist for every target
            pool = {s: ids.media_key() for s in ALL_SCENES}
            media += [(k, s) for s, k in pool.items()]
            texts = text_pool(random.Random(f"mm-texts:{cfg.seed}:{split}"), lambda r: r.choice(ALL_SCENES),
                              2 * NEGATIVES)
        conv_media = [(k, item.scene) for _, conv, keys in convs
                      for k, item in zip(keys, [x for t in conv.turns for x in t if isinstance(x, ImageItem)])]
        media += conv_media
        n_img_targets = n_text_targets = n_need = 0
        for cid_i, conv, keys in convs:
            items = [(t, x) for t, turn in enumerate(conv.turns) for x in turn if isinstance(x, ImageItem)]
            record: dict[str, Any] = {"conversation_id": cid_i, "conversation": _conversation_json(conv, keys)}
            for (t, item), key in zip(items, keys):
                if t == 0:
                    continue
                n_img_targets += 1
                n_need += item.hidden is not None
                targets.append({"split": split, "conversation_id": cid_i, "turn": t, "media_key": key,
                                "needs_earlier_image": item.hidden is not None, "hidden_attribute": item.hidden,
                                "source_media_key": keys[item.source] if item.source is not None else None})
            text_targets = [(t, j, x) for t, turn in enumerate(conv.turns) for j, x in enumerate(turn)
                            if t > 0 and isinstance(x, TextItem)]
            n_text_targets += len(text_targets)
            truth["mmdialog"]["text_targets"] += [
                {"split": split, "conversation_id": cid_i, "turn": t, "item": j, "kind": x.kind,
                 "grounding": x.grounding, "attributes": sorted(x.attrs), "source_turns": list(x.sources),
                 "source_image_turn": x.image_turn} for t, j, x in text_targets]
            if held_out:
                rng = random.Random(f"mm-neg:{cfg.seed}:{split}:{cid_i}")
                target_scenes = [x.scene for t, x in items if t > 0]
                record["negative_candidate_media_keys"] = _negatives(rng, target_scenes, set(keys), pool, conv_media)
                record["negative_candidate_texts"] = _text_negatives(
                    rng, [x for turn in conv.turns for x in turn if isinstance(x, TextItem)],
                    [x for _, _, x in text_targets], texts,
                    list({x.scene: None for turn in conv.turns for x in turn if x.scene is not None}),
                    cfg.text_hard_negatives)
            records.append(record)
        for key, scene in media:
            jobs.append(ImageJob(f"{split_dir}/{key}.jpg", scene, f"img:{cfg.seed}:{key}", key, CAPTION_SPLIT[split]))
            truth["mmdialog"]["images"][key] = list(scene)
        truth["mmdialog"]["targets"] += targets
        writes.append((root / split_dir / "conversations.json", records, None))
        counts[split] = {"conversations": n, "images": len(media), "image_targets": n_img_targets,
                         "image_targets_needing_earlier_image": n_need, "text_targets": n_text_targets}
    return counts


def _write_captions(cfg: SynthConfig, root: Path, jobs: list[ImageJob]) -> dict[str, int]:
    cols: dict[str, list[str]] = {"image_id": [], "path": [], "caption": [], "split": []}
    for job in jobs:
        rng = random.Random(f"cap:{cfg.seed}:{job.rel_path}")
        texts = captions(rng, job.scene, cfg.captions_per_image)
        if cfg.caption_style == "alttext":  # the first stays plain: held-out recall reads it (alttext.py)
            filler = random.Random(f"alt:{cfg.seed}:{job.rel_path}")
            texts = texts[:1] + [alt_text(filler, t) for t in texts[1:]]
        for caption in texts:
            cols["image_id"].append(job.image_id)
            cols["path"].append(job.rel_path)
            cols["caption"].append(caption)
            cols["split"].append(job.split)
    pq.write_table(pa.table(cols, schema=CAPTIONS_SCHEMA), root / "captions.parquet")
    return {s: cols["split"].count(s) for s in ("train", "val", "test")}


def _build(cfg: SynthConfig, root: Path, progress: bool) -> dict[str, Any]:
    ids = _Ids(cfg.seed)
    jobs: list[ImageJob] = []
    truth: dict[str, Any] = {"photochat": {}, "mmdialog": {"images": {}, "targets": [], "text_targets": []}}
    writes: list[tuple[Path, Any, Any]] = []
    pc_counts = _photochat(cfg, ids, root, jobs, truth, writes)
    mm_counts = _mmdialog(cfg, ids, root, jobs, truth, writes)
    scene_rng = random.Random(f"caption-scenes:{cfg.seed}")
    for _ in range(cfg.caption_images):  # pretraining-only images: uniform over the scenes, never in a dialog
        image_id = ids.hex16()
        jobs.append(ImageJob(f"caption_images/{image_id}.jpg", scene_rng.choice(ALL_SCENES),
                             f"img:{cfg.seed}:cap:{image_id}", image_id, "train"))
    truth["attributes"] = list(ATTRIBUTES)
    writes.append((root / TRUTH_FILE, truth, None))
    caption_counts: dict[str, int] = {}

    def write_text_files() -> None:  # overlaps with image rendering in the worker processes
        for path, obj, indent in writes:
            _dump_json(path, obj, indent)
        caption_counts.update(_write_captions(cfg, root, jobs))

    workers = min(2, os.cpu_count() or 1) if cfg.workers is None else cfg.workers
    render_all(root, jobs, cfg.image_size, workers, progress, meanwhile=write_text_files)
    meta = {
        "generator": "dialclip_ray.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "dialogs": cfg.dialogs,
        "image_size": cfg.image_size,
        "image_format": "JPEG",
        "photochat_image_pattern": "photochat_images/{photo_id}.jpg",
        "mmdialog_image_pattern": "mmdialog/{split}/{media_key}.jpg",
        "truth_file": TRUTH_FILE,
        "config": asdict(cfg) | {"workers": None},
        "counts": {"photochat": pc_counts, "mmdialog": mm_counts, "caption_images": cfg.caption_images,
                   "images": len(jobs), "captions": caption_counts},
        "vocab": {a: list(VALUES[a]) for a in ATTRIBUTES},
    }
    _dump_json(root / "synth_meta.json", meta, 2)
    return meta


def generate(out: str | os.PathLike, dialogs: int = 2000, seed: int = 0, image_size: int = 64,
             workers: int | None = None, *, photochat_sizes: tuple[int, int, int] | None = None,
             mmdialog_sizes: tuple[int, int, int] | None = None, caption_images: int = 0,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Write a synthetic PhotoChat + MMDialog corpus under ``out``; returns the meta also written to
    ``out/synth_meta.json``. ``out`` must not exist or be empty unless ``overwrite``.

    Split sizes default to ``photochat_split_sizes(dialogs)`` and ``mmdialog_split_sizes(dialogs / 5)``;
    ``photochat_sizes`` (train, dev, test dialogs) and ``mmdialog_sizes`` (train, valid, test
    conversations) set them explicitly (``dialogs`` then becomes the PhotoChat total).
    ``caption_images`` adds images that only have captions (pretraining data for the small CLIP)."""
    if photochat_sizes is not None:
        dialogs = sum(photochat_sizes)
    cfg = SynthConfig(dialogs=dialogs, seed=seed, image_size=image_size, workers=workers,
                      photochat_sizes=photochat_sizes, mmdialog_sizes=mmdialog_sizes, caption_images=caption_images)
    out = Path(out).absolute()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory (pass overwrite=True to replace it)")
    with staging_dir(out, tag="tmp") as tmp:  # an existing ``out`` is swapped aside only when done
        meta = _build(cfg, tmp, progress)
    return meta
