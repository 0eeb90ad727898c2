"""The stand-in CLIP's pretraining text (data/synthetic/alttext.py) and its reading probes (pretrain/reading.py)."""

from __future__ import annotations

import json
import random
import re

import pyarrow.parquet as pq
import pytest
import torch

from dialclip_ray.data.prepare import prepare
from dialclip_ray.data.synthetic import ALL_SCENES, generate
from dialclip_ray.data.synthetic.alttext import alt_text, everyday_vocabulary
from dialclip_ray.data.synthetic.vocab import attribute_words, captions, words_of
from dialclip_ray.model import standin
from dialclip_ray.model.backbone import load_backbone
from dialclip_ray.pretrain.reading import eot_positions, reading_test, token_coverage

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    generate(root / "raw", dialogs=40, seed=0, image_size=32, workers=1, progress=False)
    prepare("photochat", root / "raw" / "photochat", root / "raw" / "photochat_images", root / "photochat", progress=False)
    return root


def test_filler_never_names_an_attribute_and_the_caption_stays_whole():
    rng = random.Random(0)
    banned = attribute_words()
    tok = load_backbone("dialclip-micro", load_weights=False).tokenizer
    for _ in range(300):
        scene = rng.choice(ALL_SCENES)
        plain = captions(rng, scene, 1)[0]
        text = alt_text(rng, plain)
        assert plain in text
        filler = text.replace(plain, " ")
        assert not words_of(filler) & banned, text
        assert tok([text])[0, -1] == 0, f"longer than the 77-token window: {text!r}"


def test_every_word_of_the_dialogs_can_occur_in_pretraining_text(corpus):
    """Token coverage by construction: each dialog word is an attribute word or an everyday word."""
    caption_words = {w for i, scene in enumerate(ALL_SCENES) for c in captions(random.Random(i), scene, 8)
                     for w in WORD.findall(c.lower())}
    known = everyday_vocabulary() | caption_words
    for shard in (corpus / "raw" / "photochat").rglob("*"):
        if shard.is_file():
            for dialog in json.loads(shard.read_text()):
                for turn in dialog["dialogue"]:
                    assert set(WORD.findall(turn["message"].lower())) <= known, turn["message"]
    for split in ("train", "valid", "test"):
        for record in json.loads((corpus / "raw" / "mmdialog" / split / "conversations.json").read_text()):
            for turn in record["conversation"]:
                for item in turn["turn"]:
                    text = item.get("__TEXT__", "")
                    assert set(WORD.findall(text.lower())) <= known, text


def test_first_caption_plain_others_alt_text(corpus):
    rows = pq.read_table(corpus / "raw" / "captions.parquet").to_pylist()
    by_image: dict[str, list[str]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r["caption"])
    firsts = [c[0] for c in by_image.values()]
    assert max(len(c.split()) for c in firsts) <= 14  # the plain attribute caption
    others = [c for caps in by_image.values() for c in caps[1:]]
    assert sum(len(c.split()) > 14 for c in others) > len(others) // 4  # filler on a good share of the rest


def test_reading_probes_run_on_a_real_open_clip_model(corpus):
    backbone = load_backbone("dialclip-micro")
    cov = token_coverage(corpus / "photochat", corpus / "raw", backbone.tokenizer)
    assert 0 < cov["types"] <= cov["tokens"] + 100 and 0 < cov["tokens"] <= 100 and cov["query_windows"] > 0
    eot = eot_positions(corpus / "raw", backbone.tokenizer)
    assert 3 <= eot["median"] <= eot["p90"] <= eot["max"] <= 76
    out = reading_test(backbone.model, corpus / "raw", backbone.preprocess_val, backbone.tokenizer)
    assert out["pool_size"] > 0
    for name in ("alone", "followed_by_chitchat", "preceded_by_chitchat"):
        assert 0 <= out[name]["R@1"] <= out[name]["R@10"] <= 100


# ------------------------------------------------------------------ the shipped stand-in (model/standin.py)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """The stand-in's held-out probe corpus (another seed than its pretraining corpus), generated here."""
    from dialclip_ray.pipelines.experiments import ensure_corpus

    return ensure_corpus(tmp_path_factory.mktemp("probe"), **standin.PROBE_CORPUS)


def test_the_packed_stand_in_is_small_and_loads_as_an_open_clip_tag(tmp_path, monkeypatch):
    assert standin.PACKED_FILE.is_file() and standin.PACKED_FILE.stat().st_size < 5 * 2**20
    monkeypatch.setenv("DIALCLIP_WEIGHTS_DIR", str(tmp_path))
    backbone = load_backbone(standin.STANDIN_MODEL, standin.STANDIN_TAG)
    expanded = standin.unpack()
    for name, tensor in backbone.model.state_dict().items():
        assert torch.equal(tensor, expanded[name]), name  # what open_clip loaded is the packed weights
    assert list(tmp_path.glob("standin/*.safetensors"))  # expanded once into the weights cache
    rows = standin.packed_token_ids()
    emb = backbone.model.token_embedding.weight
    unused = torch.ones(emb.shape[0], dtype=torch.bool)
    unused[list(rows)] = False
    assert {49406, 49407} <= rows and not emb[unused].any()  # never-seen token rows are the neutral zero
    info = standin.packed_info()
    assert info["eot_positions"]["p99"] >= 60  # the pretraining text reaches the end of the window
    with pytest.raises(FileNotFoundError, match="not a known open_clip tag|neither a file"):
        load_backbone("dialclip-tiny", standin.STANDIN_TAG)  # the tag is dialclip-small's only


def test_the_shipped_stand_in_reads_held_out_captions_as_recorded(probe, tmp_path, monkeypatch):
    """Re-measures held-out recall and the reading test on 1,000 photos it never saw (design 3.5)."""
    from dialclip_ray.pretrain.reading import standin_report

    monkeypatch.setenv("DIALCLIP_WEIGHTS_DIR", str(tmp_path))
    backbone = load_backbone(standin.STANDIN_MODEL, standin.STANDIN_TAG)
    report = standin_report(backbone, probe, standin.packed_token_ids(), {"probe": probe})
    info = standin.packed_info()
    r1 = report["heldout"]["caption_to_image_R@1"]
    assert report["heldout"]["pool_size"] == 1000
    assert r1 >= 40 and abs(r1 - info["heldout_probe"]["caption_to_image_R@1"]) <= 1.5
    rt = report["reading_test"]
    assert rt["followed_kept"] >= 0.8
    assert abs(rt["alone"]["R@1"] - info["reading_test"]["alone"]["R@1"]) <= 1.5
    for task, cov in report["token_coverage"].items():
        assert cov["tokens"] == 100.0, (task, cov["missing"])
