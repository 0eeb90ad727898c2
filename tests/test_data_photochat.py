"""PhotoChat loader on the real sample files and on crafted bad shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dialclip_ray.data.errors import DataError, ErrorPolicy
from dialclip_ray.data.photochat import load_photochat, shard_files
from test_data_support import SAMPLE_DEV, SAMPLE_TEST, photochat_dialogue, write_json


def _raw(sample_dir: str, name: str) -> list[dict]:
    return json.loads(Path(sample_dir, name).read_text(encoding="utf-8"))


def test_real_sample_counts_ids_and_splits(photochat_sample_dir):
    src = load_photochat(photochat_sample_dir, progress=False)
    by_split = {}
    for row in src.examples:
        by_split.setdefault(row["split"], []).append(row)
    assert {k: len(v) for k, v in by_split.items()} == {"dev": 22, "test": 24}
    ids = [r["id"] for r in src.examples]
    assert len(set(ids)) == len(ids) == 46
    dev_raw, test_raw = _raw(photochat_sample_dir, SAMPLE_DEV), _raw(photochat_sample_dir, SAMPLE_TEST)
    assert [r["id"] for r in by_split["dev"]] == [f"photochat/dev/{d['dialogue_id']}" for d in dev_raw]
    # dev has photo_id (an Open Images id, kept as is); test has none: sha1(photo_url)[:16]
    assert [r["target_id"] for r in by_split["dev"]] == [d["photo_id"] for d in dev_raw]
    assert [r["target_id"] for r in by_split["test"]] == [
        hashlib.sha1(d["photo_url"].encode()).hexdigest()[:16] for d in test_raw]
    assert all(r["current_text"] == "" and r["candidates"] is None and r["target_type"] == "image"
               for r in src.examples)


def test_real_sample_context_stops_before_share_turn(photochat_sample_dir):
    """Context = exactly the turns before the share turn, for every dialogue of both real files."""
    src = load_photochat(photochat_sample_dir, progress=False)
    rows = {r["id"]: r for r in src.examples}
    share_last = 0
    for name, split in ((SAMPLE_DEV, "dev"), (SAMPLE_TEST, "test")):
        for d in _raw(photochat_sample_dir, name):
            turns = d["dialogue"]
            share = next(i for i, t in enumerate(turns) if t["share_photo"])
            share_last += share == len(turns) - 1
            ctx = rows[f"photochat/{split}/{d['dialogue_id']}"]["context"]
            assert [(c["speaker"], c["text"]) for c in ctx] == [(t["user_id"], t["message"]) for t in turns[:share]]
            after = {t["message"] for t in turns[share + 1:]} - {t["message"] for t in turns[:share]}
            assert not after & {c["text"] for c in ctx}
    assert share_last >= 1  # dev dialogue 501 shares the photo in its last turn


def test_dialogue_500_boundary_exact(photochat_sample_dir):
    src = load_photochat(Path(photochat_sample_dir) / SAMPLE_DEV, progress=False)
    row = next(r for r in src.examples if r["dialog_id"] == "500")
    assert len(row["context"]) == 5
    assert row["context"][-1]["text"] == "wow, time flies. sure that would be fun to see."
    assert "man, that makes me feel old!!!" not in [c["text"] for c in row["context"]]


def test_crafted_share_first_and_last_and_nested_dirs(tmp_path):
    write_json(tmp_path / "pc" / "train" / "train_00.json",
               [photochat_dialogue(0, share_at=0, n_turns=3), photochat_dialogue(1, share_at=3, n_turns=4)])
    write_json(tmp_path / "pc" / "dev" / "dev_00.json", [photochat_dialogue(0, share_at=1, n_turns=3)])
    assert [s for _, s in shard_files(tmp_path / "pc")] == ["dev", "train"]
    rows = {r["id"]: r for r in load_photochat(tmp_path / "pc", progress=False).examples}
    assert set(rows) == {"photochat/train/0", "photochat/train/1", "photochat/dev/0"}  # ids restart per split
    assert rows["photochat/train/0"]["context"] == []
    assert [c["text"] for c in rows["photochat/train/1"]["context"]] == [f"turn {i} of dialog 1" for i in range(3)]
    assert [c["text"] for c in rows["photochat/dev/0"]["context"]] == ["turn 0 of dialog 0"]


def _bad(obj_edit) -> list[dict]:
    good = photochat_dialogue(7, share_at=2, n_turns=4)
    bad = photochat_dialogue(8, share_at=2, n_turns=4)
    obj_edit(bad)
    return [good, bad]


@pytest.mark.parametrize("edit, field, kind", [
    (lambda d: d.pop("dialogue"), "dialogue", "missing_field"),
    (lambda d: d["dialogue"][1].pop("user_id"), "dialogue[1].user_id", "missing_field"),
    (lambda d: d["dialogue"][1].update(share_photo="false"), "dialogue[1].share_photo", "wrong_type"),
    (lambda d: d["dialogue"][0].update(message=5), "dialogue[0].message", "wrong_type"),
    (lambda d: d.update(photo_id=12), "photo_id", "wrong_type"),
    (lambda d: d["dialogue"][2].update(share_photo=False), "dialogue[*].share_photo", "share_turn"),
    (lambda d: d["dialogue"][0].update(share_photo=True), "dialogue[*].share_photo", "share_turn"),
])
def test_bad_dialogue_names_file_record_field(tmp_path, edit, field, kind):
    path = write_json(tmp_path / "test_00.json", _bad(edit))
    with pytest.raises(DataError) as info:
        load_photochat(path, progress=False)
    err = info.value
    assert (err.field, err.kind) == (field, kind)
    assert str(path) in str(err) and "dialogue_id 8" in str(err) and field in str(err)
    policy = ErrorPolicy("skip")
    rows = load_photochat(path, policy, progress=False).examples
    assert [r["dialog_id"] for r in rows] == ["7"]
    assert policy.counts == {kind: 1}


def test_share_turn_messages(tmp_path):
    none = write_json(tmp_path / "a" / "dev_00.json", _bad(lambda d: d["dialogue"][2].update(share_photo=False)))
    two = write_json(tmp_path / "b" / "dev_00.json", _bad(lambda d: d["dialogue"][0].update(share_photo=True)))
    with pytest.raises(DataError, match="no turn has share_photo"):
        load_photochat(none, progress=False)
    with pytest.raises(DataError, match=r"2 turns have share_photo: true \(turns \[0, 2\]\)"):
        load_photochat(two, progress=False)


def test_malformed_json_and_duplicates(tmp_path):
    path = tmp_path / "dev_00.json"
    path.write_text('[\n {"dialogue": [],\n  "dialogue_id": 1,,\n}\n]', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_photochat(path, ErrorPolicy("skip"), progress=False)  # a broken file fails even in skip mode
    assert str(path) in str(info.value) and "line 3" in str(info.value) and info.value.kind == "malformed_json"

    write_json(tmp_path / "d" / "dev_00.json", [photochat_dialogue(3, 1, 2)])
    write_json(tmp_path / "d" / "dev_01.json", [photochat_dialogue(3, 1, 2)])
    with pytest.raises(DataError, match="duplicate dialogue_id 3 in split dev") as info:
        load_photochat(tmp_path / "d", progress=False)
    assert info.value.field == "dialogue_id" and "dev_01.json" in info.value.file


def test_split_must_be_known(tmp_path):
    path = write_json(tmp_path / "shard.json", [photochat_dialogue(0, 1, 2)])
    with pytest.raises(DataError, match="cannot tell the split"):
        load_photochat(path, progress=False)


def _real_format(did: str, turns: list[tuple[str, bool, int]], revision: str) -> dict:
    """A dialogue exactly as real shards write it: key order, string dialogue_id, empty share messages.

    ``revision`` "photo_id" = newer files (dev_01: photo_id and photo_url), "url" = older ones (test_00).
    """
    obj = {"dialogue": [{"message": m, "share_photo": s, "user_id": u} for m, s, u in turns],
           "dialogue_id": did,
           "photo_description": "The photo has a cake. Objects in the photo: Food, Cake, Table",
           "photo_url": f"https://farm4.staticflickr.com/3948/157050716{did}_5d905852c2_o.jpg"}
    if revision == "photo_id":
        obj["photo_id"] = f"train/624e5f6dd7f64d{int(did):02d}"
    return obj


def _share_run(n_shares: int) -> list[tuple[str, bool, int]]:
    return [("I baked a cake for my mom's birthday", False, 0), ("nice! what kind?", False, 1),
            ("chocolate, want to see?", False, 0), *([("", True, 0)] * n_shares),
            ("wow, that looks delicious", False, 1), ("thanks!", False, 0)]


@pytest.mark.parametrize("revision", ["photo_id", "url"])
@pytest.mark.parametrize("n_shares", [2, 3])
def test_consecutive_share_turns_are_one_share(tmp_path, revision, n_shares):
    """Real shards record some shares as 2 (test shard) or 3 (old train revision) share turns in a row."""
    dialogs = [_real_format("10", _share_run(1), revision), _real_format("11", _share_run(n_shares), revision),
               _real_format("12", _share_run(1), revision)]
    path = tmp_path / ("test_01.json" if n_shares == 2 else "train_07.json")
    path.write_text(json.dumps(dialogs, indent=2), encoding="utf-8")  # the real files' layout
    policy = ErrorPolicy("skip")
    rows = load_photochat(path, policy, progress=False).examples
    assert policy.total == 0  # nothing dropped in skip mode
    assert rows == load_photochat(path, progress=False).examples  # and the default mode converts the shard
    assert [r["dialog_id"] for r in rows] == ["10", "11", "12"]
    multi = rows[1]
    assert [(c["speaker"], c["text"]) for c in multi["context"]] == [
        (0, "I baked a cake for my mom's birthday"), (1, "nice! what kind?"), (0, "chocolate, want to see?")]
    assert multi["context"] == rows[0]["context"]  # same as the single-share dialogue: turns after stay out
    want = dialogs[1]["photo_id"] if revision == "photo_id" else \
        hashlib.sha1(dialogs[1]["photo_url"].encode()).hexdigest()[:16]
    assert multi["target_id"] == want


@pytest.mark.parametrize("revision", ["photo_id", "url"])
def test_separate_share_turns_are_an_error(tmp_path, revision):
    turns = _share_run(1)
    turns.insert(1, ("", True, 0))  # a share at turn 1 and another at turn 4
    dialogs = [_real_format("20", _share_run(2), revision), _real_format("21", turns, revision)]
    path = tmp_path / "test_00.json"
    path.write_text(json.dumps(dialogs, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_photochat(path, progress=False)
    err = info.value
    assert (err.kind, err.field, err.record) == ("share_turn", "dialogue[*].share_photo", "#1 (dialogue_id '21')")
    assert str(path) in str(err) and "turns [1, 4]" in str(err) and "not consecutive" in str(err)
    policy = ErrorPolicy("skip")
    assert [r["dialog_id"] for r in load_photochat(path, policy, progress=False).examples] == ["20"]
    assert policy.counts == {"share_turn": 1}


def test_truncated_real_shard_says_it_ends_early(tmp_path, photochat_sample_dir):
    text = Path(photochat_sample_dir, SAMPLE_DEV).read_text(encoding="utf-8")
    for cut, inside in ((len(text) // 2, None), (text.index('"photo_url"', 5000) + 20, "string")):
        path = tmp_path / "dev_01.json"
        path.write_text(text[:cut], encoding="utf-8")  # a download cut off mid-file
        with pytest.raises(DataError) as info:
            load_photochat(path, ErrorPolicy("skip"), progress=False)
        err = info.value
        msg = str(err)
        last_line = text[:cut].rstrip().count("\n") + 1
        assert err.kind == "malformed_json" and str(path) in msg and "ends early" in msg
        assert err.record == f"line {last_line}" and f"line {last_line} column" in msg
        if inside:
            assert "Unterminated string" in msg
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="the file is empty"):
        load_photochat(path, progress=False)
    path.write_text('[{"dialogue": [], "dialogue_id": 1,, }]', encoding="utf-8")  # bad, but complete
    with pytest.raises(DataError, match="malformed JSON at line 1 column") as info:
        load_photochat(path, progress=False)
    assert "ends early" not in str(info.value)
