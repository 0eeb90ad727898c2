"""MMDialog loader: format detection, item dispatch, string media keys, per-element targets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialclip_ray.data.errors import DataError, ErrorPolicy
from dialclip_ray.data.mmdialog import load_mmdialog, parse_item, text_id
from test_data_support import mm_record, sample_mmdialog, write_mm_split

T, M = "__TEXT__", "__MEDIA__"


@pytest.mark.parametrize("jsonl", [False, True])
def test_array_and_jsonl_give_same_examples(tmp_path, jsonl):
    recs = sample_mmdialog(tmp_path, jsonl=jsonl)
    src = load_mmdialog(tmp_path, progress=False)
    rows = {r["id"]: r for r in src.examples}
    # one example per item of each turn after the first
    expected = sum(len(c["turn"]) for split in recs.values() for rec in split for c in rec["conversation"][1:])
    assert len(rows) == expected == 7
    r = rows["mmdialog/train/c1/2/0"]  # image target with text in the same turn
    assert (r["target_type"], r["target_id"], r["current_text"]) == ("image", "m2", "another")
    assert [(c["speaker"], c["text"], c["image_ids"]) for c in r["context"]] == [
        (0, "look at my dog", ["-101abc"]), (1, "cute!", [])]
    r = rows["mmdialog/train/c1/2/1"]
    assert (r["target_type"], r["target_id"], r["current_text"]) == ("text", text_id("another"), "")
    assert src.texts[text_id("another")] == "another"
    assert all(r["candidates"] is None for r in rows.values() if r["split"] == "train")
    dev_img = rows["mmdialog/dev/v1/1/1"]  # "valid" maps to dev; '-9' stays a string
    assert dev_img["target_id"] == "-9" and dev_img["split"] == "dev"
    assert dev_img["candidates"] == ["-9", "negv1m0", "negv1m1", "negv1m2"]
    dev_txt = rows["mmdialog/dev/v1/1/0"]
    assert dev_txt["candidates"] == [text_id("here")] + [text_id(f"negative text {i} of v1") for i in range(3)]
    assert all(src.texts[c] for c in dev_txt["candidates"])
    assert src.images["-101abc"].field == "conversation[0].turn[1].__MEDIA__"


def test_numeric_media_key_is_an_error(tmp_path):
    path = write_mm_split(tmp_path, "train", [mm_record("a", [[{T: "x"}], [{M: -123}]])])
    with pytest.raises(DataError) as info:
        load_mmdialog(tmp_path, progress=False)
    err = info.value
    assert err.kind == "media_key_type" and err.field == "conversation[1].turn[0].__MEDIA__"
    assert str(path) in str(err) and "conversation_id a" in str(err) and "number" in str(err)


def test_numeric_negative_key_is_an_error(tmp_path):
    rec = mm_record("v", [[{T: "x"}], [{M: "k"}]], negatives=2)
    rec["negative_candidate_media_keys"][1] = 77
    write_mm_split(tmp_path, "test", [rec])
    with pytest.raises(DataError, match=r"negative_candidate_media_keys\[1\]"):
        load_mmdialog(tmp_path, progress=False)


def test_unknown_item_key_and_skip(tmp_path):
    good = mm_record("g", [[{T: "x"}], [{T: "y"}]])
    bad = mm_record("b", [[{T: "x"}], [{"__VIDEO__": "v1"}]])
    path = write_mm_split(tmp_path, "train", [good, bad], jsonl=True)
    with pytest.raises(DataError) as info:
        load_mmdialog(tmp_path, progress=False)
    assert "'__VIDEO__'" in str(info.value) and str(path) in str(info.value)
    assert info.value.record == "line 2 (conversation_id b)" and info.value.field == "conversation[1].turn[0]"
    policy = ErrorPolicy("skip")
    assert [r["dialog_id"] for r in load_mmdialog(tmp_path, policy, progress=False).examples] == ["g"]
    assert policy.counts == {"unknown_item": 1}


def test_jsonl_bad_line_skipped_and_missing_negatives(tmp_path):
    path = tmp_path / "valid" / "conversations.json"
    path.parent.mkdir()
    ok = mm_record("ok", [[{T: "a"}], [{T: "b"}]], negatives=1)
    no_neg = mm_record("nn", [[{T: "a"}], [{T: "b"}]])
    path.write_text(json.dumps(ok) + "\n{not json\n" + json.dumps(no_neg) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2") as info:
        load_mmdialog(tmp_path, progress=False)
    assert info.value.kind == "malformed_json" and str(path) in str(info.value)
    policy = ErrorPolicy("skip")
    rows = load_mmdialog(tmp_path, policy, progress=False).examples
    assert [r["dialog_id"] for r in rows] == ["ok"]
    assert policy.counts == {"malformed_json": 1, "missing_field": 1}


item_values = st.one_of(st.text(max_size=8), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                        st.lists(st.integers(), max_size=2))
items = st.one_of(
    st.dictionaries(st.sampled_from([T, M, "__AUDIO__", "text", ""]), item_values, min_size=0, max_size=3),
    item_values)


@settings(max_examples=150, deadline=None)
@given(item=items)
def test_item_dispatch_property(item):
    """Dispatch depends only on the single key and the value's type; nothing is coerced."""
    valid = isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())), str)
    key = next(iter(item)) if isinstance(item, dict) and len(item) == 1 else None
    if valid and key == T:
        assert parse_item(item, file="f", record="r", field="x") == ("text", item[T])
    elif valid and key == M and item[M]:
        assert parse_item(item, file="f", record="r", field="x") == ("media", item[M])
    else:
        with pytest.raises(DataError) as info:
            parse_item(item, file="f", record="r", field="x")
        assert info.value.file == "f" and info.value.record == "r" and info.value.field.startswith("x")


@settings(max_examples=100, deadline=None)
@given(key=st.from_regex(r"-?[0-9]{1,6}[a-f]{0,3}", fullmatch=True))
def test_number_like_media_keys_stay_strings(key):
    assert parse_item({M: key}, file="f", record="r", field="x") == ("media", key)
    assert parse_item(json.loads(json.dumps({M: key})), file="f", record="r", field="x")[1] == key
