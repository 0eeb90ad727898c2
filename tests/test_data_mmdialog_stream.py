"""Streaming MMDialog converter: same output and errors as the in-memory loader, bounded batches, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialclip_ray.cli import main
from dialclip_ray.data.errors import DataError, ErrorPolicy
from dialclip_ray.data.jsonio import load_json_file
from dialclip_ray.data.layout import examples_files, read_examples
from dialclip_ray.data.mmdialog import load_mmdialog
from dialclip_ray.data.mmdialog_stream import ArrayReader, convert_mmdialog, plan
from dialclip_ray.data.prepare import prepare
from test_data_support import mm_images, mm_record, write_mm_split

T, M = "__TEXT__", "__MEDIA__"
REPO = Path(__file__).resolve().parents[1]


def _train(n: int = 24) -> list[dict]:
    """Conversations of 2-5 turns, text and image items in both orders, keys that look like numbers."""
    recs = []
    for i in range(n):
        turns = [[{T: f"hello {i} ünïcode ✓ \"quoted\" [x] {{y}}"}, {M: f"-{i}0a"}]]
        for t in range(1 + i % 4):
            turns.append([{M: f"0{i}{t}"}, {T: f"turn {t} of {i}"}] if (i + t) % 2 else [{T: f"reply {t}/{i}"}])
        recs.append(mm_record(f"c{i}", turns))
    return recs


def _valid(n: int = 4, negatives: int = 5) -> list[dict]:
    return [mm_record(f"v{i}", [[{T: f"hi {i}"}], [{T: f"here {i}"}, {M: f"-9{i}"}], [{T: "nice"}]],
                      negatives=negatives) for i in range(n)]


def _corpus(root: Path, jsonl: bool, train: list[dict] | None = None, valid: list[dict] | None = None) -> Path:
    for split, recs in (("train", train if train is not None else _train()),
                        ("valid", valid if valid is not None else _valid())):
        write_mm_split(root, split, recs, jsonl=jsonl)
        mm_images(root, split, recs)
    return root


def _tables(directory: Path) -> dict:
    return {"examples": read_examples(directory).to_pylist(),
            **{name: sorted(map(json.dumps, pq.read_table(directory / f"{name}.parquet").to_pylist()))
               for name in ("images", "texts")}}


def _same_as_in_memory(tmp_path: Path, src: Path, stream_meta: dict, stream_out: Path, **kw) -> None:
    mem = prepare("mmdialog", src, None, tmp_path / "in_memory", progress=False, **kw)
    assert _tables(stream_out) == _tables(tmp_path / "in_memory")
    assert {k: v for k, v in stream_meta["counts"].items() if k != "conversations"} == mem["counts"]
    assert stream_meta["skipped"] == mem["skipped"]


@pytest.mark.parametrize("jsonl", [False, True], ids=["array", "jsonl"])
def test_streaming_equals_in_memory(tmp_path, jsonl):
    src = _corpus(tmp_path / "mm", jsonl)
    meta = convert_mmdialog(src, tmp_path / "out", processes=0, segment_bytes=400, batch_rows=3, progress=False)
    assert meta["streaming"]["segments"] >= 6 and meta["streaming"]["forms"] == ["jsonl" if jsonl else "array"]
    _same_as_in_memory(tmp_path, src, meta, tmp_path / "out")
    shards = examples_files(tmp_path / "out")
    assert len(shards) == meta["layout"]["shards"] and [p.name for p in shards][:2] == ["part-00000.parquet",
                                                                                        "part-00001.parquet"]
    assert max(pq.ParquetFile(p).metadata.row_group(g).num_rows for p in shards
               for g in range(pq.ParquetFile(p).metadata.num_row_groups)) <= 3
    assert sorted(os.listdir(tmp_path)) == ["in_memory", "mm", "out"]  # work dir gone, nothing hidden left
    assert sorted(os.listdir(tmp_path / "out")) == ["examples", "images.parquet", "meta.json", "texts.parquet"]


def test_worker_processes_and_replacing_a_dataset(tmp_path):
    src = _corpus(tmp_path / "mm", jsonl=False, train=_train(40))
    meta = convert_mmdialog(src, tmp_path / "out", processes=2, segment_bytes=500, progress=False)
    assert meta["streaming"]["processes"] == 2 and meta["streaming"]["segments"] > 4
    _same_as_in_memory(tmp_path, src, meta, tmp_path / "out")
    write_mm_split(src, "train", _train(3))  # a second conversion replaces the first
    meta = convert_mmdialog(src, tmp_path / "out", processes=2, segment_bytes=500, progress=False)
    assert meta["counts"]["conversations"] == 3 + 4
    assert {r["dialog_id"] for r in read_examples(tmp_path / "out").to_pylist() if r["split"] == "train"} == {
        "c0", "c1", "c2"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(elements=st.lists(json_values, max_size=12), indent=st.sampled_from([None, 1, "\t"]),
       ascii_only=st.booleans(), chunk=st.sampled_from([1, 2, 3, 7, 64]), segment=st.sampled_from([1, 9, 40, 10**6]))
def test_array_reader_property(tmp_path_factory, elements, indent, ascii_only, chunk, segment):
    """Any JSON array, any layout, any chunk size (multi-byte characters split across chunks) and any
    segmentation: the elements and their indices are exactly json.loads's."""
    path = tmp_path_factory.mktemp("arr") / "train" / "conversations.json"
    path.parent.mkdir()
    path.write_text(json.dumps(elements, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
    with ArrayReader(path, chunk=chunk) as reader:
        assert [(i, obj) for i, _, obj in reader.elements()] == list(enumerate(elements))
    got = []
    for seg in plan([(path, "train", "train")], segment):
        with ArrayReader(path, seg.start, seg.end, chunk=chunk) as reader:
            got.extend((i, obj) for i, _, obj in reader.elements(seg.first))
    assert got == list(enumerate(elements))


def test_truncated_array_file_says_it_ends_early(tmp_path):
    recs = _train(6)
    path = write_mm_split(tmp_path / "mm", "train", recs)
    text = path.read_text(encoding="utf-8")
    pretty = json.dumps(recs, indent=2)
    for body, cut in ((text, len(text) // 2), (text, len(text) - 1), (pretty, len(pretty) // 3),
                      (pretty, pretty.index('"-30a"') + 3)):
        path.write_text(body[:cut], encoding="utf-8")
        with pytest.raises(DataError) as streamed:
            convert_mmdialog(tmp_path / "mm", tmp_path / "out", processes=0, on_error="skip", progress=False)
        with pytest.raises(DataError) as whole:
            load_json_file(path)
        line = body[:cut].rstrip().count("\n") + 1
        for err in (streamed.value, whole.value):  # both readers, fails even with --on-error skip
            assert err.kind == "malformed_json" and "ends early" in str(err) and str(path) in str(err)
            assert err.record == f"line {line}" and f"line {line} column" in str(err)
        assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("body, message", [
    ('[{"conversation_id": "a", "conversation": []}\n {"conversation_id": "b"}]', "line 2 column 2: Expecting ','"),
    ('[{"conversation_id": "a", "conversation": []}] x', "Extra data"),
    ('[{"conversation_id": "a", "conversation": [}]', "Expecting value"),
])
def test_malformed_array_names_line(tmp_path, body, message):
    path = tmp_path / "mm" / "valid" / "conversations.json"
    path.parent.mkdir(parents=True)
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON") as info:
        convert_mmdialog(tmp_path / "mm", tmp_path / "out", processes=0, on_error="skip", progress=False)
    assert message in str(info.value) and str(path) in str(info.value) and "ends early" not in str(info.value)
    path.write_bytes(b'[{"conversation_id": "\xff"}]')
    with pytest.raises(DataError, match="not UTF-8"):
        convert_mmdialog(tmp_path / "mm", tmp_path / "out", processes=0, progress=False)


def test_jsonl_cut_off_last_line(tmp_path):
    recs = _train(5)
    path = write_mm_split(tmp_path / "mm", "train", recs, jsonl=True)
    mm_images(tmp_path / "mm", "train", recs)
    path.write_text(path.read_text()[:-30], encoding="utf-8")
    for run in (lambda **kw: load_mmdialog(tmp_path / "mm", ErrorPolicy(kw["on_error"]), progress=False),
                lambda **kw: convert_mmdialog(tmp_path / "mm", tmp_path / "out", processes=0, segment_bytes=100,
                                              progress=False, restart=True, **kw)):
        with pytest.raises(DataError) as info:
            run(on_error="fail")
        assert "ends early" in str(info.value) and info.value.record == "line 5" and str(path) in str(info.value)
        run(on_error="skip")  # one record lost, the rest converted
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["skipped"]["by_reason"] == {"malformed_json": 1} and meta["counts"]["conversations"] == 4


def _bad_media_number(recs):
    recs[17]["conversation"][1]["turn"] = [{M: -17}]


def _bad_item_key(recs):
    recs[20]["conversation"][0]["turn"].append({"__VIDEO__": "v"})


def _bad_missing_conversation(recs):
    del recs[9]["conversation"]


def _bad_duplicate(recs):
    recs[21]["conversation_id"] = "c2"  # repeats an id of an earlier segment


@pytest.mark.parametrize("jsonl", [False, True], ids=["array", "jsonl"])
@pytest.mark.parametrize("breaker, kind, field", [
    (_bad_media_number, "media_key_type", "conversation[1].turn[0].__MEDIA__"),
    (_bad_item_key, "unknown_item", "conversation[0].turn[2]"),
    (_bad_missing_conversation, "missing_field", "conversation"),
    (_bad_duplicate, "duplicate_id", "conversation_id"),
])
def test_record_errors_same_as_in_memory(tmp_path, jsonl, breaker, kind, field):
    src = _corpus(tmp_path / "mm", jsonl)  # images of the intact records
    recs = _train()
    breaker(recs)
    write_mm_split(src, "train", recs, jsonl=jsonl)
    with pytest.raises(DataError) as mem:
        load_mmdialog(src, progress=False)
    with pytest.raises(DataError) as streamed:
        convert_mmdialog(src, tmp_path / "out", processes=0, segment_bytes=300, progress=False)
    assert (streamed.value.kind, streamed.value.field) == (kind, field)
    assert str(streamed.value) == str(mem.value)  # same file, record ("line 18 (conversation_id c17)"), message
    assert str(src / "train" / "conversations.json") in str(streamed.value)
    meta = convert_mmdialog(src, tmp_path / "out", processes=0, segment_bytes=300, on_error="skip", progress=False)
    assert meta["skipped"]["by_reason"] == {kind: 1}
    _same_as_in_memory(tmp_path, src, meta, tmp_path / "out", on_error="skip")


def test_bounded_batches(tmp_path):
    """Rows are written in batches of at most batch_rows; rows with many candidates make smaller batches."""
    src = _corpus(tmp_path / "mm", jsonl=True, valid=_valid(n=6, negatives=300))
    meta = convert_mmdialog(src, tmp_path / "out", processes=0, batch_rows=4, batch_bytes=20_000, progress=False)
    sizes = {}
    for shard in examples_files(tmp_path / "out"):
        pf = pq.ParquetFile(shard)
        for g in range(pf.metadata.num_row_groups):
            split = pf.read_row_group(g, columns=["split"]).column("split").to_pylist()
            sizes.setdefault(split[0], []).append(len(split))
    assert max(sizes["train"]) == 4 and meta["streaming"]["max_batch_rows"] == 4
    assert max(sizes["dev"]) == 2  # 301 candidates x 40 B per row: two rows reach 20,000 B
    _same_as_in_memory(tmp_path, src, meta, tmp_path / "out")


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    import dialclip_ray.data.mmdialog_stream as ms

    original, calls = ms._SegmentWriter.run, []

    def run(self):
        calls.append(1)
        if len(calls) == int(sys.argv[3]):
            (self.dir / "examples.parquet").write_bytes(b"PAR1 half a shard")  # killed while writing
            os._exit(9)
        return original(self)

    ms._SegmentWriter.run = run
    ms.convert_mmdialog(sys.argv[1], sys.argv[2], processes=0, segment_bytes=400, progress=False)
""")


def _killed_run(src: Path, out: Path, at: int) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(out), str(at)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr


@pytest.mark.parametrize("jsonl", [False, True], ids=["array", "jsonl"])
def test_resume_after_kill(tmp_path, jsonl):
    src = _corpus(tmp_path / "mm", jsonl)
    out = tmp_path / "out"
    _killed_run(src, out, at=4)
    work = tmp_path / ".out.convert"
    segments = sorted(os.listdir(work / "segments"))  # 3 done, the 4th's staging dir half written
    assert segments[1:] == ["00000", "00001", "00002"] and segments[0].startswith(".00003.building-")
    assert not out.exists()
    meta = convert_mmdialog(src, out, processes=0, segment_bytes=400, progress=False)
    assert meta["streaming"]["resumed_segments"] == 3 and meta["streaming"]["segments"] > 4
    _same_as_in_memory(tmp_path, src, meta, out)
    assert not work.exists()

    # a shard deleted (or damaged) after its segment finished is converted again
    _killed_run(src, tmp_path / "out2", at=3)
    (tmp_path / ".out2.convert" / "segments" / "00001" / "examples.parquet").unlink()
    meta = convert_mmdialog(src, tmp_path / "out2", processes=0, segment_bytes=400, progress=False)
    assert meta["streaming"]["resumed_segments"] == 1
    assert _tables(tmp_path / "out2") == _tables(out)

    # changed input: nothing is reused; --restart discards finished segments
    _killed_run(src, tmp_path / "out3", at=3)
    write_mm_split(src, "valid", _valid(n=3), jsonl=jsonl)
    meta = convert_mmdialog(src, tmp_path / "out3", processes=0, segment_bytes=400, progress=False)
    assert meta["streaming"]["resumed_segments"] == 0 and meta["counts"]["conversations"] == 24 + 3
    _killed_run(src, tmp_path / "out4", at=3)
    meta = convert_mmdialog(src, tmp_path / "out4", processes=0, segment_bytes=400, restart=True, progress=False)
    assert meta["streaming"]["resumed_segments"] == 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_foreign_work_dir_is_not_touched(tmp_path):
    src = _corpus(tmp_path / "mm", jsonl=True)
    (tmp_path / ".out.convert").mkdir()
    (tmp_path / ".out.convert" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a conversion work dir"):
        convert_mmdialog(src, tmp_path / "out", processes=0, progress=False)
    assert (tmp_path / ".out.convert" / "mine.txt").read_text() == "keep"


def test_images_checked_skipped_or_not_checked(tmp_path):
    src = _corpus(tmp_path / "mm", jsonl=False)
    (src / "valid" / "negv2m3.jpg").unlink()
    (src / "train" / "-50a.jpg").write_bytes(b"")
    with pytest.raises(DataError) as mem:
        prepare("mmdialog", src, None, tmp_path / "in_memory", progress=False)
    with pytest.raises(DataError) as streamed:
        convert_mmdialog(src, tmp_path / "out", processes=0, segment_bytes=300, progress=False)
    assert str(streamed.value) == str(mem.value) and "empty (0 bytes)" in str(mem.value)
    assert not (tmp_path / "out").exists()
    meta = convert_mmdialog(src, tmp_path / "out", processes=0, segment_bytes=300, on_error="skip", progress=False)
    assert meta["skipped"]["by_reason"] == {"image_missing": 1, "image_unreadable": 1}
    assert any("empty (0 bytes)" in e for e in meta["skipped"]["examples"])
    _same_as_in_memory(tmp_path, src, meta, tmp_path / "out", on_error="skip")

    meta = convert_mmdialog(src, tmp_path / "out", processes=0, check_images=False, progress=False)
    assert meta["image_check"] is False and meta["skipped"]["total"] == 0
    rows = {r["image_id"]: r for r in pq.read_table(tmp_path / "out" / "images.parquet").to_pylist()}
    assert rows["negv2m3"] == {"image_id": "negv2m3", "path": "valid/negv2m3.jpg", "width": None, "height": None}
    assert rows["-50a"]["path"] == "train/-50a.jpg"
    no_check = prepare("mmdialog", src, None, tmp_path / "in_memory", progress=False, check_images=False)
    assert _tables(tmp_path / "out") == _tables(tmp_path / "in_memory") and no_check["image_check"] is False


def test_image_found_in_another_split_dir(tmp_path):
    """An image is looked up in its own split dir first, then in the other split dirs of the input."""
    src = _corpus(tmp_path / "mm", jsonl=True)
    os.replace(src / "valid" / "-91.jpg", src / "train" / "-91.jpg")
    meta = convert_mmdialog(src, tmp_path / "out", processes=0, progress=False)
    rows = {r["image_id"]: r for r in pq.read_table(tmp_path / "out" / "images.parquet").to_pylist()}
    assert rows["-91"]["path"] == "train/-91.jpg" and rows["negv0m0"]["path"] == "valid/negv0m0.jpg"
    assert meta["skipped"]["total"] == 0


def test_cli_streams_mmdialog_by_default(tmp_path, capsys):
    src = _corpus(tmp_path / "mm", jsonl=True)
    rc = main(["data", "prepare", "--format", "mmdialog", "--input", str(src), "--out", str(tmp_path / "ds"),
               "--quiet", "--processes", "0", "--segment-mb", "0.0005", "--batch-rows", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "example shards" in out and "0 segments reused" in out
    assert (tmp_path / "ds" / "examples").is_dir() and not (tmp_path / "ds" / "examples.parquet").exists()
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["streaming"]["batch_rows"] == 5 and meta["layout"]["shards"] > 1
    rc = main(["data", "prepare", "--format", "mmdialog", "--input", str(src), "--out", str(tmp_path / "mem"),
               "--quiet", "--in-memory", "--no-image-check"])
    assert rc == 0 and (tmp_path / "mem" / "examples.parquet").is_file()
    assert read_examples(tmp_path / "mem").to_pylist() == read_examples(tmp_path / "ds").to_pylist()
    capsys.readouterr()
    rc = main(["data", "prepare", "--format", "photochat", "--input", str(src), "--images", str(src),
               "--out", str(tmp_path / "pc"), "--processes", "2"])
    assert rc == 2 and "--processes only apply to the streaming MMDialog converter" in capsys.readouterr().err
    (src / "train" / "conversations.json").write_text('{"conversation_id": "a", "conversation": [{"turn": '
                                                      '[{"__MEDIA__": 5}]}, {"turn": []}]}\n')
    rc = main(["data", "prepare", "--format", "mmdialog", "--input", str(src), "--out", str(tmp_path / "bad"),
               "--quiet", "--processes", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "line 1 (conversation_id a)" in err and "number" in err
