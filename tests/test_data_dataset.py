"""CanonicalDataset, query/train batches (padding and masks), the truncation rule, Ray Data reading."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import transforms

from dialclip_ray.model.batch import MAX_SPEAKERS
from dialclip_ray.model.config import DialCLIPConfig
from dialclip_ray.data.dataset import (CanonicalDataset, ExampleRecord, ReaderConfig, Turn, build_query_batch,
                                       collate_train, image_loader, make_train_loader, ray_examples)
from dialclip_ray.data.errors import DataError
from dialclip_ray.data.prepare import prepare
from dialclip_ray.model.text import _bpe, newest_first, tokenize_dialog
from test_data_support import sample_mmdialog

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
TRANSFORM = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])
CFG = ReaderConfig(max_context_turns=3, max_context_images=2, image_size=32)


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    sample_mmdialog(root / "raw")
    prepare("mmdialog", root / "raw", None, root / "ds", progress=False)
    return root / "ds"


@pytest.fixture(scope="module")
def mm_shard_dir(tmp_path_factory):
    """The same corpus through the streaming converter: examples/part-*.parquet shards."""
    from dialclip_ray.data.mmdialog_stream import convert_mmdialog

    root = tmp_path_factory.mktemp("mm_shards")
    sample_mmdialog(root / "raw")
    meta = convert_mmdialog(root / "raw", root / "ds", processes=0, segment_bytes=64, progress=False)
    assert meta["layout"]["shards"] > 3
    return root / "ds"


def test_canonical_dataset_reads_shards_like_one_file(mm_dir, mm_shard_dir):
    one, shards = CanonicalDataset.load(mm_dir), CanonicalDataset.load(mm_shard_dir)
    assert not (mm_shard_dir / "examples.parquet").exists() and (mm_shard_dir / "examples").is_dir()
    assert shards.splits() == one.splits()
    for split in one.splits():
        assert shards.examples(split) == one.examples(split)
        assert shards.image_ids(split) == one.image_ids(split) and shards.text_ids(split) == one.text_ids(split)
    assert shards.image_path("-101abc").relative_to(shards.image_root) == Path("train/-101abc.jpg")
    assert one.image_path("-101abc").relative_to(one.image_root) == Path("train/-101abc.jpg")


def _fake_loader(image_id: str) -> torch.Tensor:
    return torch.full((3, 32, 32), float(len(image_id)))


def test_canonical_dataset_reader(mm_dir):
    ds = CanonicalDataset.load(mm_dir)
    assert ds.splits() == ["train", "dev", "test"]
    train = ds.examples("train")
    assert len(train) == 4 and len(ds.examples("train", "image")) == 2
    assert ds.image_ids("train") == ["m2", "m3"]
    text_rec = ds.examples("test", "text")[0]
    assert text_rec.target_text == "nice pic" and ds.text(text_rec.target_id) == "nice pic"
    assert len(text_rec.candidates) == 4 and all(ds.text(c) for c in text_rec.candidates)
    assert ds.image_path("-101abc").name == "-101abc.jpg" and ds.image_path("-101abc").is_file()
    with pytest.raises(KeyError):
        ds.image_path("nope")
    with pytest.raises(ValueError, match="split"):
        ds.examples("valid")


def test_query_batch_mixed_lengths_masks():
    recs = [
        ExampleRecord("a", "x", "train", [], "", "image", "t0", None),  # zero turns, zero images
        ExampleRecord("b", "x", "train", [Turn(0, "hello there", ["i1"]), Turn(1, "hi", []),
                                           Turn(5, "look", ["i2", "i33"]), Turn(0, "nice", [])], "cur", "text", "t1"),
        ExampleRecord("c", "x", "train", [Turn(1, "one turn only", [])], "", "image", "t2"),
    ]
    qb = build_query_batch(recs, TOKENIZER, _fake_loader, CFG)
    B, T, M, L = 3, 3, 2, 77
    assert qb.query_tokens.shape == (B, L) and qb.turn_tokens.shape == (B, T, L)
    assert qb.images.shape == (B, M, 3, 32, 32)
    assert qb.turn_mask.tolist() == [[False] * 3, [True] * 3, [True, False, False]]
    # newest 3 turns of b: "hi", "look" (speaker 5 clipped), "nice"
    assert qb.turn_speaker[1].tolist() == [1, min(5, MAX_SPEAKERS - 1), 0]
    assert torch.equal(qb.turn_tokens[1, 2], tokenize_dialog(TOKENIZER, ["nice"]))
    assert qb.turn_tokens[0].abs().sum() == 0 and qb.turn_tokens[2, 1:].abs().sum() == 0
    # newest 2 images of b's kept turns: i2, i33 (i1's turn was cut), both in kept turn 1
    assert qb.image_mask.tolist() == [[False, False], [True, True], [False, False]]
    assert qb.image_turn[1].tolist() == [1, 1]
    assert qb.images[1, 1, 0, 0, 0] == 3.0 and qb.images[0].abs().sum() == 0
    assert qb.retrieval_type.tolist() == [0, 1, 0]
    assert torch.equal(qb.query_tokens[1], tokenize_dialog(TOKENIZER, ["hello there", "hi", "look", "nice", "cur"]))
    assert torch.equal(qb.query_tokens[0], tokenize_dialog(TOKENIZER, []))


def test_query_batch_no_turns_no_images_anywhere():
    recs = [ExampleRecord(str(i), "x", "train", [], "", "image", "t", None) for i in range(2)]
    qb = build_query_batch(recs, TOKENIZER, _fake_loader, ReaderConfig(max_context_images=0, image_size=32))
    assert qb.turn_tokens.shape == (2, 1, 77) and qb.images.shape == (2, 1, 3, 32, 32)
    assert not qb.turn_mask.any() and not qb.image_mask.any()


def test_query_turns_window():
    rec = ExampleRecord("a", "x", "train", [Turn(0, "old words", []), Turn(1, "new words", [])], "", "image", "t")
    qb = build_query_batch([rec], TOKENIZER, _fake_loader, ReaderConfig(query_turns=1, image_size=32))
    assert torch.equal(qb.query_tokens[0], tokenize_dialog(TOKENIZER, ["new words"]))


def test_collate_and_loader_on_real_files(mm_dir):
    ds = CanonicalDataset.load(mm_dir)
    load = image_loader(ds, TRANSFORM)
    batch = collate_train(ds.examples("train", "image"), TOKENIZER, load, CFG)
    assert batch.target_type == "image" and batch.target_images.shape == (2, 3, 32, 32)
    assert batch.query.image_mask.tolist() == [[True], [False]]  # c1 has "-101abc" in context; M = 1
    assert batch.query.images[0, 0].abs().sum() > 0
    with pytest.raises(ValueError, match="one target type"):
        collate_train(ds.examples("train"), TOKENIZER, load, CFG)

    loader = make_train_loader(ds, "train", "text", TOKENIZER, TRANSFORM, CFG, batch_size=2, shuffle=True, seed=3)
    batches = list(loader)
    assert len(batches) == 1 and batches[0].target_tokens.shape == (2, 77)
    order = [b.target_tokens.tolist() for b in make_train_loader(ds, "train", "text", TOKENIZER, TRANSFORM, CFG,
                                                                  batch_size=1, shuffle=True, seed=3)]
    again = [b.target_tokens.tolist() for b in make_train_loader(ds, "train", "text", TOKENIZER, TRANSFORM, CFG,
                                                                  batch_size=1, shuffle=True, seed=3)]
    assert order == again  # seeded shuffle


def test_image_loader_is_safe(mm_dir, tmp_path):
    ds = CanonicalDataset.load(mm_dir)
    ds._paths["evil"] = "../../etc/passwd"
    load = image_loader(ds, TRANSFORM)
    with pytest.raises(DataError, match=r"record evil, field 'path'.*'\.\.'"):
        load("evil")
    with pytest.raises(DataError, match="unknown image id"):
        load("not-there")


def test_reader_config_from_model_config():
    cfg = ReaderConfig.from_model_config(DialCLIPConfig(backbone={"model_name": "dialclip-micro"},
                                                        max_context_turns=5, query_turns=2))
    assert (cfg.image_size, cfg.max_context_turns, cfg.query_turns, cfg.context_length) == (32, 5, 2, 77)
    with pytest.raises(ValueError):
        ReaderConfig(max_context_turns=0)


pieces_st = st.lists(st.lists(st.integers(1, 50), max_size=30), max_size=8)


@settings(max_examples=200, deadline=None)
@given(pieces=pieces_st, budget=st.integers(0, 80))
def test_newest_first_truncation_property(pieces, budget):
    out = newest_first(pieces, budget)
    flat = [t for p in pieces for t in p]
    assert len(out) == min(budget, len(flat))  # fills the budget whenever there is enough text
    assert out == (flat[len(flat) - len(out):] if out else [])  # a suffix of the concatenation
    if pieces and len(pieces[-1]) <= budget:
        assert out[len(out) - len(pieces[-1]):] == pieces[-1]  # the newest turn is kept whole when it fits


words = st.text(alphabet="abcdefgh xyz", min_size=0, max_size=40)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(words, max_size=12))
def test_tokenize_dialog_property(turns):
    tokens = tokenize_dialog(TOKENIZER, turns, 77)
    ids = [t for t in tokens.tolist() if t]
    body = ids[1:-1]
    assert ids[0] == TOKENIZER.sot_token_id and ids[-1] == TOKENIZER.eot_token_id and len(ids) <= 77
    pieces = [_bpe(TOKENIZER, t) for t in turns if t.strip()]
    flat = [t for p in pieces for t in p]
    assert body == flat[len(flat) - len(body):] if body else not flat
    if pieces and len(pieces[-1]) <= 75:
        assert body[len(body) - len(pieces[-1]):] == pieces[-1]


@pytest.mark.slow
def test_ray_examples(mm_dir, mm_shard_dir, ray_cluster):
    for directory in (mm_dir, mm_shard_dir):  # one examples.parquet, then a directory of shards
        ds = ray_examples(directory, "dev")
        rows = ds.take_all()
        assert sorted(r["id"] for r in rows) == ["mmdialog/dev/v1/1/0", "mmdialog/dev/v1/1/1"]
        assert all(r["split"] == "dev" for r in rows) and len(rows[0]["candidates"]) == 4


def test_false_negatives_mark_same_targets_and_what_the_context_holds():
    from dialclip_ray.data.dataset import ExampleRecord, Turn, false_negatives

    def rec(i, target, text, context):
        return ExampleRecord(f"e{i}", "mmdialog", "train", [Turn(0, c) for c in context], "", "text", target,
                             target_text=text)

    records = [rec(0, "t1", "hi there", []), rec(1, "t2", "nice dog", ["hi there"]),
               rec(2, "t1", "hi there", ["x"]), rec(3, "t9", "other", ["y"])]
    m = false_negatives(records).tolist()
    assert m[1][0] and m[1][2]          # query 1's context holds reply t1
    assert m[0][2] and m[2][0]          # the same target twice
    assert not any(m[i][i] for i in range(4)) and not any(m[3]) and not m[0][1]
