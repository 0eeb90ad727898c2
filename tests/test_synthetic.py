"""The synthetic corpus generator: real file formats, determinism, hard negatives, fairness invariants."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dialclip_ray.data.synthetic import ALL_SCENES, Scene, differing, generate, neighbours, photochat_split_sizes
from dialclip_ray.data.synthetic import dialogs as dialog_text
from dialclip_ray.data.synthetic import writer
from dialclip_ray.data.synthetic.vocab import attribute_words, value_words, words_of

N = 40  # dialogs per test corpus (the MMDialog valid/test pools of 1,152 images dominate the cost anyway)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    out = {"a": base / "a", "b": base / "b", "c": base / "c"}
    generate(out["a"], dialogs=N, seed=0, image_size=32, workers=2, progress=False)
    generate(out["b"], dialogs=N, seed=0, image_size=32, workers=1, progress=False)  # other worker count
    generate(out["c"], dialogs=N, seed=1, image_size=48, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def a(corpora) -> Path:
    return corpora["a"]


def _photochat(root: Path) -> list[dict]:
    return [r for f in sorted((root / "photochat").rglob("*.json")) for r in json.loads(f.read_text())]


def _truth(root: Path) -> dict:
    return json.loads((root / "synth_truth.json").read_text())


def test_same_seed_gives_identical_files_whatever_the_worker_count(corpora):
    ha, hb = _hashes(corpora["a"]), _hashes(corpora["b"])
    assert len(ha) > 2000
    assert ha == hb


def test_different_seed_differs(corpora):
    ha, hc = _hashes(corpora["a"]), _hashes(corpora["c"])
    assert ha["photochat/test/test_00.json"] != hc["photochat/test/test_00.json"]
    assert ha["captions.parquet"] != hc["captions.parquet"]
    assert not set(ha.values()) & set(hc.values())


def test_photochat_records_match_the_real_sample(a, photochat_sample_dir):
    real = json.loads((Path(photochat_sample_dir) / "dev_01.head.json").read_text())

    def shape(rec: dict) -> tuple:
        turns = {tuple((k, type(v).__name__) for k, v in t.items()) for t in rec["dialogue"]}
        return tuple((k, type(v).__name__) for k, v in rec.items()), frozenset(turns)

    assert {shape(r) for r in real} == {shape(r) for r in _photochat(a)}
    for split, n in photochat_split_sizes(N).items():
        recs = json.loads((a / "photochat" / split / f"{split}_00.json").read_text())
        assert len(recs) == n and [r["dialogue_id"] for r in recs] == list(range(n))  # restarts per split
        # same whitespace layout as the real shards (json indent 2)
        assert (a / "photochat" / split / f"{split}_00.json").read_text() == json.dumps(recs, indent=2) + "\n"
    for rec in _photochat(a):
        assert re.fullmatch(r"train/[0-9a-f]{16}", rec["photo_id"])
        assert rec["photo_url"].startswith("https://")
        assert re.fullmatch(r"The photo has .+\. Objects in the photo: \w[\w ]*(, \w[\w ]*)+", rec["photo_description"])


def test_exactly_one_share_turn_by_the_sharer_with_turns_after_it(a):
    after = 0
    for rec in _photochat(a):
        shares = [i for i, t in enumerate(rec["dialogue"]) if t["share_photo"]]
        assert len(shares) == 1
        share = rec["dialogue"][shares[0]]
        assert share == {"message": "", "share_photo": True, "user_id": 0}
        assert shares[0] >= 8 and all(t["message"] for t in rec["dialogue"] if not t["share_photo"])
        assert {t["user_id"] for t in rec["dialogue"]} == {0, 1}
        after += len(rec["dialogue"]) - shares[0] - 1
    assert after >= N  # reactions after the share, which loaders must drop


def test_images_exist_with_the_requested_size_and_no_two_are_equal(corpora):
    for key, size in (("a", 32), ("c", 48)):
        root = corpora[key]
        meta = json.loads((root / "synth_meta.json").read_text())
        for rec in _photochat(root):
            with Image.open(root / meta["photochat_image_pattern"].format(photo_id=rec["photo_id"])) as im:
                assert im.size == (size, size) and im.format == "JPEG"
        images = [p for p in root.rglob("*.jpg")]
        assert len(images) == meta["counts"]["images"]
        digests = [hashlib.sha256(p.read_bytes()).digest() for p in images]
        assert len(set(digests)) == len(digests)


def test_mmdialog_format_keys_and_negatives(a):
    truth = _truth(a)
    scene = {k: Scene(*v) for k, v in truth["mmdialog"]["images"].items()}
    keys = []
    for split in ("train", "valid", "test"):
        records = json.loads((a / "mmdialog" / split / "conversations.json").read_text())
        assert records
        for rec in records:
            held_out = split != "train"
            expected = {"conversation_id", "conversation"} | (
                {"negative_candidate_media_keys", "negative_candidate_texts"} if held_out else set())
            assert set(rec) == expected
            own, targets, texts = [], [], set()
            for t, turn in enumerate(rec["conversation"]):
                assert set(turn) == {"turn"}
                for item in turn["turn"]:
                    assert len(item) == 1 and set(item) <= {"__TEXT__", "__MEDIA__"}
                    if "__MEDIA__" in item:
                        key = item["__MEDIA__"]
                        assert isinstance(key, str) and (a / "mmdialog" / split / f"{key}.jpg").is_file()
                        own.append(key)
                        if t > 0:
                            targets.append(scene[key])
                    else:
                        texts.add(item["__TEXT__"])
            keys += own
            assert targets  # every conversation has an image response
            if held_out:
                neg = rec["negative_candidate_media_keys"]
                assert len(neg) == len(set(neg)) == 999 and not set(neg) & set(own)
                assert all(isinstance(k, str) and (a / "mmdialog" / split / f"{k}.jpg").is_file() for k in neg)
                for target in targets:
                    diffs = [len(differing(target, scene[k])) for k in neg]
                    assert 0 not in diffs  # no negative shows the target's scene
                    assert diffs.count(1) >= 10  # hard negatives: one attribute away
                negt = rec["negative_candidate_texts"]
                assert len(negt) == len(set(negt)) == 999 and not set(negt) & texts
    assert all(isinstance(k, str) for k in keys)
    assert any(k.startswith("-") for k in truth["mmdialog"]["images"])
    assert any(k.startswith("-") for k in keys)


def test_targets_needing_an_earlier_image_are_not_named_in_the_text(a):
    truth = _truth(a)
    scene = {k: Scene(*v) for k, v in truth["mmdialog"]["images"].items()}
    need = [t for t in truth["mmdialog"]["targets"] if t["needs_earlier_image"]]
    assert need and any(not t["needs_earlier_image"] for t in truth["mmdialog"]["targets"])
    convs = {r["conversation_id"]: r for s in ("train", "valid", "test")
             for r in json.loads((a / "mmdialog" / s / "conversations.json").read_text())}
    for t in need:
        target, source = scene[t["media_key"]], scene[t["source_media_key"]]
        attr = t["hidden_attribute"]
        assert getattr(target, attr) == getattr(source, attr) and target != source
        text = " ".join(i["__TEXT__"] for turn in convs[t["conversation_id"]]["conversation"][: t["turn"] + 1]
                        for i in turn["turn"] if "__TEXT__" in i)
        assert not words_of(text) & value_words(attr, getattr(target, attr)), text


def test_filler_text_never_names_an_attribute():
    banned = attribute_words()
    for bank in (dialog_text._GREETINGS, dialog_text._GREETING_REPLIES, dialog_text._CHITCHAT,
                 dialog_text._CHITCHAT_REPLIES, dialog_text._INTROS, dialog_text._REACTIONS, dialog_text._ANSWERS,
                 dialog_text._LAST_PLAIN_SHARER, dialog_text._LAST_PLAIN_OTHER, dialog_text._MM_OPENERS,
                 dialog_text._MM_OPENERS_IMG, dialog_text._AFTER_SHARE, dialog_text._PREFIXES,
                 dialog_text._MM_OPENER_REPLIES, dialog_text._MM_REACTIONS,
                 [w for pair in dialog_text._ANCHORS for w in pair],
                 [q.format(ref="the ones for your sister") for qs in dialog_text._MM_QUESTIONS.values() for q in qs]):
        for line in bank:
            assert not words_of(line) & banned, line


def test_held_out_photochat_pool_is_full_of_near_duplicates():
    scenes = writer.sample_scenes(random.Random("t"), 300, unique=True)
    assert len(set(scenes)) == 300
    pool = set(scenes)
    with_neighbour = sum(any(n in pool for n in neighbours(s)) for s in scenes)
    assert with_neighbour >= 290
    assert len(writer.sample_scenes(random.Random("t"), 1500, unique=True)) == 1500  # wraps after 1,152
    assert len(ALL_SCENES) == 1152 and all(len(differing(s, n)) == 1 for s in ALL_SCENES[:5] for n in neighbours(s))


def test_captions_parquet_schema_and_variety(a):
    table = pq.read_table(a / "captions.parquet")
    assert table.schema == writer.CAPTIONS_SCHEMA
    rows = table.to_pylist()
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    by_image: dict[str, list[str]] = {}
    for r in rows:
        assert (a / r["path"]).is_file() and not Path(r["path"]).is_absolute()
        by_image.setdefault(r["image_id"], []).append(r["caption"])
    assert all(len(set(c)) == 3 for c in by_image.values())
    assert len({c for cs in by_image.values() for c in cs}) > 0.9 * len(rows)
    pc = {r["photo_id"] for r in _photochat(a)}
    assert pc <= set(by_image)


def test_meta_counts_and_split_sizes(a):
    meta = json.loads((a / "synth_meta.json").read_text())
    assert meta["seed"] == 0 and meta["image_size"] == 32 and meta["dialogs"] == N
    assert sum(v["dialogs"] for v in meta["counts"]["photochat"].values()) == N
    assert photochat_split_sizes(10_000) == {"train": 8000, "dev": 1000, "test": 1000}
    assert photochat_split_sizes(20_000)["test"] == 1000
    assert sum(photochat_split_sizes(2000).values()) == 2000


def test_real_loaders_read_the_corpus(a):
    from dialclip_ray.data.mmdialog import load_mmdialog
    from dialclip_ray.data.photochat import load_photochat

    pc = load_photochat(a / "photochat", progress=False)
    assert len(pc.examples) == N
    by_id = {r["photo_id"]: r for r in _photochat(a)}
    for row in pc.examples:
        rec = by_id[row["target_id"]]
        share = next(i for i, t in enumerate(rec["dialogue"]) if t["share_photo"])
        assert [c["text"] for c in row["context"]] == [t["message"] for t in rec["dialogue"][:share]]
    mm = load_mmdialog(a / "mmdialog", progress=False)
    held = [r for r in mm.examples if r["split"] != "train"]
    assert held and all(len(r["candidates"]) == 1000 for r in held)
    assert {r["target_type"] for r in mm.examples} == {"image", "text"}


def test_bad_arguments_and_atomic_output(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dialogs"):
        generate(tmp_path / "x", dialogs=3)
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path / "x", dialogs=20, image_size=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full"):
        generate(tmp_path / "full", dialogs=20)

    def boom(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(writer, "render_all", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        generate(tmp_path / "out", dialogs=20, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no partial output, no temp dir


# ----------------------------------------------------------------------------- MMDialog-style replies (generator v2)

REPLY_KINDS = dialog_text.REPLY_KINDS


def _conversations(n: int = 200, chain: float = 0.5) -> list:
    out = []
    for i in range(n):
        rng = random.Random(f"test-conv:{i}")
        out.append(dialog_text.mmdialog_conversation(rng, lambda r: r.choice(ALL_SCENES), rng.random() < chain))
    return out


def _turn_text(turn) -> str:
    return " ".join(x.text for x in turn if isinstance(x, dialog_text.TextItem))


def test_replies_name_values_the_context_holds_and_the_last_turn_does_not():
    kinds: dict[str, int] = {}
    for conv in _conversations():
        images = {t: x.scene for t, turn in enumerate(conv.turns) for x in turn
                  if isinstance(x, dialog_text.ImageItem)}
        for t, turn in enumerate(conv.turns):
            for x in turn:
                if not isinstance(x, dialog_text.TextItem) or x.kind not in REPLY_KINDS:
                    continue
                kinds[x.kind] = kinds.get(x.kind, 0) + 1
                assert x.attrs and x.scene is not None and x.grounding != "new", (x.kind, x.text)
                for a in x.attrs:  # every named value is in an earlier turn's text or an earlier photo of it
                    words = value_words(a, getattr(x.scene, a))
                    in_text = any(words & words_of(_turn_text(conv.turns[u])) for u in x.sources)
                    in_photo = x.image_turn is not None and images.get(x.image_turn) == x.scene
                    assert in_text or in_photo, (x.text, a)
                assert all(u < t for u in x.sources) and (x.image_turn is None or x.image_turn < t)
                if x.kind in ("comment", "ack", "answer"):  # the previous turn alone does not give them
                    assert x.grounding in ("earlier_text", "image"), (x.kind, x.grounding, x.text)
                if x.kind == "answer":
                    question = _turn_text(conv.turns[t - 1])
                    asked = x.extra["asked"]
                    assert not words_of(question) & value_words(asked, getattr(x.scene, asked)), question
                if x.kind == "echo":
                    assert x.grounding == "last_turn"
    assert set(kinds) == set(REPLY_KINDS) and min(kinds.values()) >= 20, kinds
    n_text = sum(isinstance(x, dialog_text.TextItem) for c in _conversations() for turn in c.turns[1:] for x in turn)
    assert sum(kinds.values()) >= 0.35 * n_text  # a good share of all reply targets is context-determined


def test_reply_hard_negatives_change_exactly_one_named_value():
    rng = random.Random(0)
    seen = 0
    for conv in _conversations(60):
        for x in (x for turn in conv.turns for x in turn if isinstance(x, dialog_text.TextItem)):
            variants = x.variants(rng)
            if x.kind not in REPLY_KINDS:
                assert variants == []
                continue
            assert variants and all(v.kind == x.kind and v.text != x.text for v in variants)
            for v in variants:
                diff = differing(x.scene, v.scene)
                assert len(diff) == 1 and diff[0] in x.attrs and not v.true_of(x.scene)
                changed = diff[0]
                assert value_words(changed, getattr(v.scene, changed)) & words_of(v.text), v.text
            seen += len(variants)
    assert seen > 500


def test_text_negatives_are_never_valid_replies_of_their_record():
    conv = _conversations(3, chain=1.0)[0]
    items = [x for turn in conv.turns for x in turn if isinstance(x, dialog_text.TextItem)]
    targets = [x for t, turn in enumerate(conv.turns) if t > 0 for x in turn if isinstance(x, dialog_text.TextItem)]
    objects = list({x.scene: None for x in items if x.scene is not None})
    pool = dialog_text.text_pool(random.Random(1), lambda r: r.choice(ALL_SCENES), 2 * writer.NEGATIVES)
    pool += [v for x in targets for v in x.variants(random.Random(2)) if v.true_of(objects[0])][:5]  # must go
    neg = writer._text_negatives(random.Random(3), items, targets, pool, objects, 300)
    assert len(neg) == len(set(neg)) == writer.NEGATIVES
    assert not set(neg) & {x.text for x in items}
    by_text = {x.text: x for x in pool}
    said = {x.signature for x in targets}
    hard = 0
    for text in neg:
        x = by_text.get(text)
        if x is None:  # a hard variant made inside _text_negatives
            hard += 1
            continue
        assert x.signature not in said and not any(x.true_of(o) for o in objects)
    assert hard >= 10


def test_configurable_split_sizes_and_caption_only_images(tmp_path):
    meta = generate(tmp_path / "s", seed=3, image_size=32, workers=1, progress=False, photochat_sizes=(12, 3, 4),
                    mmdialog_sizes=(3, 2, 2), caption_images=25)
    assert meta["dialogs"] == 19
    assert {k: v["dialogs"] for k, v in meta["counts"]["photochat"].items()} == {"train": 12, "dev": 3, "test": 4}
    assert {k: v["conversations"] for k, v in meta["counts"]["mmdialog"].items()} == \
        {"train": 3, "valid": 2, "test": 2}
    extra = sorted((tmp_path / "s" / "caption_images").glob("*.jpg"))
    assert len(extra) == meta["counts"]["caption_images"] == 25
    rows = pq.read_table(tmp_path / "s" / "captions.parquet").to_pylist()
    assert {r["split"] for r in rows if r["path"].startswith("caption_images/")} == {"train"}
    truth = _truth(tmp_path / "s")
    kinds = {t["kind"] for t in truth["mmdialog"]["text_targets"]}
    assert {"comment", "answer", "setup", "share"} <= kinds
    with pytest.raises(ValueError, match="photochat_sizes"):
        generate(tmp_path / "bad", photochat_sizes=(10, 0, 5))
