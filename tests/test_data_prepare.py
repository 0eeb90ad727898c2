"""prepare(): image checks, error policy, and atomic output (a failure leaves nothing behind)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from dialclip_ray.data.errors import DataError
from dialclip_ray.data.images import ImageLocator, open_image, resolve_image_path
from dialclip_ray.data.prepare import prepare
from dialclip_ray.data.schema import EXAMPLES_SCHEMA, IMAGES_SCHEMA, TEXTS_SCHEMA, write_dataset_dir
from test_data_support import listing, photochat_dialogue, sample_mmdialog, write_image, write_json


def _photochat(tmp_path, n=3):
    """n dialogues in one dev shard, images as <basename of photo_id>.png."""
    dialogs = [photochat_dialogue(i, share_at=2, n_turns=4, photo_id=f"train/{i:016x}") for i in range(n)]
    shard = write_json(tmp_path / "pc" / "dev_00.json", dialogs)
    for i in range(n):
        write_image(tmp_path / "img" / f"{i:016x}.png")
    return shard, tmp_path / "img"


def test_prepare_photochat_writes_schema_and_meta(tmp_path):
    shard, images = _photochat(tmp_path)
    meta = prepare("photochat", shard, images, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["examples.parquet", "images.parquet", "meta.json", "texts.parquet"]
    assert pq.read_schema(out / "examples.parquet").equals(EXAMPLES_SCHEMA)
    assert pq.read_schema(out / "images.parquet").equals(IMAGES_SCHEMA)
    assert pq.read_schema(out / "texts.parquet").equals(TEXTS_SCHEMA)
    images_t = pq.read_table(out / "images.parquet").to_pylist()
    assert images_t[0] == {"image_id": "train/0000000000000000", "path": "0000000000000000.png", "width": 8,
                           "height": 8}
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk["counts"] == meta["counts"] == {"examples": 3, "images": 3, "texts": 0,
                                                   "by_split": {"dev": {"image": 3}}}
    assert on_disk["format_version"] == 1 and on_disk["image_root"] == str(images.resolve())
    assert listing(tmp_path) >= {"out"} and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def _break_missing(images):
    (images / "0000000000000001.png").unlink()


def _break_unreadable(images):
    (images / "0000000000000001.png").write_bytes(b"this is not an image at all")


def _break_oversized(images):
    write_image(images / "0000000000000001.png", size=120)  # 14,400 px > max_pixels=10,000


def _break_escape(images):
    (images / "0000000000000001.png").unlink()
    outside = write_image(images.parent / "secret" / "x.png")
    os.symlink(outside, images / "0000000000000001.png")


@pytest.mark.parametrize("breaker, kind, message", [
    (_break_missing, "image_missing", "not found"),
    (_break_unreadable, "image_unreadable", "unreadable image"),
    (_break_oversized, "image_oversized", "too large"),
    (_break_escape, "image_path", "outside the image root"),
])
def test_bad_image_fails_cleanly_or_is_skipped(tmp_path, breaker, kind, message):
    shard, images = _photochat(tmp_path)
    breaker(images)
    before = listing(tmp_path)
    with pytest.raises(DataError) as info:
        prepare("photochat", shard, images, tmp_path / "out", max_pixels=10_000, progress=False)
    err = info.value
    assert err.kind == kind and message in str(err)
    assert err.record == "#1 (dialogue_id 1)" and err.field == "photo_id" and "field 'photo_id'" in str(err)
    assert str(shard) in str(err)  # the source file is always named
    assert listing(tmp_path) == before  # no partial output, no temp dir left

    meta = prepare("photochat", shard, images, tmp_path / "out", on_error="skip", max_pixels=10_000, progress=False)
    assert meta["counts"]["examples"] == 2 and meta["counts"]["images"] == 2
    assert meta["skipped"]["by_reason"] == {kind: 1} and meta["skipped"]["examples_dropped_for_images"] == 1
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["skipped"]["total"] == 1


def test_image_pattern_escaping_root_is_rejected(tmp_path):
    shard, images = _photochat(tmp_path, n=1)
    with pytest.raises(DataError, match="must not contain '..'") as info:
        prepare("photochat", shard, images, tmp_path / "out", image_patterns=["../{id_basename}.png"],
                progress=False)
    assert info.value.kind == "image_path" and info.value.field == "photo_id"
    assert not (tmp_path / "out").exists()


def test_resolve_image_path_rules(tmp_path):
    write_image(tmp_path / "root" / "a" / "b.png")
    assert resolve_image_path(tmp_path / "root", "a/b.png") == (tmp_path / "root" / "a" / "b.png").resolve()
    for bad in ("/etc/passwd", "../x.png", "a/../../x.png", "", "a\x00b"):
        with pytest.raises(DataError) as info:
            resolve_image_path(tmp_path / "root", bad, record="r1", field="path")
        assert info.value.record == "r1" and info.value.field == "path"


def test_open_image_bounds_and_converts(tmp_path):
    from PIL import Image

    gray = tmp_path / "g.png"
    Image.new("L", (10, 5), 128).save(gray)
    img = open_image(gray)
    assert img.mode == "RGB" and img.size == (10, 5)
    with pytest.raises(DataError, match="50 pixels > max_pixels=49"):
        open_image(gray, max_pixels=49, record="r", field="f")


def test_locator_tries_patterns_and_extensions(tmp_path):
    write_image(tmp_path / "624e.jpg", fmt="JPEG")
    loc = ImageLocator(tmp_path, ["{id}.{ext}", "{id_basename}.{ext}"], extensions=("png", "jpg"))
    assert loc.candidates("train/624e")[:2] == ["train/624e.png", "train/624e.jpg"]
    assert loc.find("train/624e") == "624e.jpg"
    with pytest.raises(ValueError, match="unknown field"):
        ImageLocator(tmp_path, ["{nope}.jpg"]).candidates("x")


def test_prepare_mmdialog_and_missing_negative_image(tmp_path):
    sample_mmdialog(tmp_path / "mm")
    meta = prepare("mmdialog", tmp_path / "mm", None, tmp_path / "out", progress=False)
    assert meta["counts"]["by_split"] == {"dev": {"image": 1, "text": 1}, "test": {"text": 1},
                                          "train": {"image": 2, "text": 2}}
    assert meta["counts"]["images"] == 8  # targets, context images and the dev image negatives
    assert pq.read_table(tmp_path / "out" / "images.parquet").to_pylist()[0]["path"].endswith(".jpg")
    one = prepare("mmdialog", tmp_path / "mm" / "valid", None, tmp_path / "valid_only", progress=False)
    assert one["counts"]["by_split"] == {"dev": {"image": 1, "text": 1}}  # image root = the split dir's parent

    (tmp_path / "mm" / "valid" / "negv1m2.jpg").unlink()
    before = listing(tmp_path)
    with pytest.raises(DataError) as info:
        prepare("mmdialog", tmp_path / "mm", None, tmp_path / "out2", progress=False)
    assert info.value.field == "negative_candidate_media_keys[2]" and "conversation_id v1" in str(info.value)
    assert listing(tmp_path) == before


def test_output_dir_rules(tmp_path):
    shard, images = _photochat(tmp_path, n=1)
    other = tmp_path / "notadataset"
    write_json(other / "keep.json", {"x": 1})
    with pytest.raises(FileExistsError, match="not a dataset directory"):
        prepare("photochat", shard, images, other, progress=False)
    assert listing(other) == {"keep.json"}

    out = tmp_path / "out"
    prepare("photochat", shard, images, out, progress=False)
    first = json.loads((out / "meta.json").read_text())["created"]
    write_json(shard, [photochat_dialogue(5, 1, 2, photo_id="train/0000000000000000")])
    prepare("photochat", shard, images, out, progress=False)  # replaces the old dataset dir
    rows = pq.read_table(out / "examples.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["photochat/dev/5"]
    assert json.loads((out / "meta.json").read_text())["counts"]["examples"] == 1 and first
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_write_dataset_dir_failure_keeps_old(tmp_path):
    out = tmp_path / "ds"
    write_dataset_dir(out, [], [], [{"text_id": "t:1", "text": "hi"}], {"source": "mmdialog"})
    with pytest.raises(Exception):
        write_dataset_dir(out, [{"id": "x"}], [], [], {"source": "mmdialog"})  # missing required columns
    assert pq.read_table(out / "texts.parquet").to_pylist() == [{"text_id": "t:1", "text": "hi"}]
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_empty_image_file_says_empty(tmp_path):
    shard, images = _photochat(tmp_path)
    empty = images / "0000000000000001.png"
    empty.write_bytes(b"")  # an interrupted download
    with pytest.raises(DataError) as info:
        prepare("photochat", shard, images, tmp_path / "out", progress=False)
    err = info.value
    assert err.kind == "image_unreadable" and "empty (0 bytes)" in str(err)
    assert err.file == str(empty.resolve()) and str(shard) in str(err)  # the image file and its referrer
    meta = prepare("photochat", shard, images, tmp_path / "out", on_error="skip", progress=False)
    assert meta["counts"]["examples"] == 2 and meta["skipped"]["by_reason"] == {"image_unreadable": 1}


def test_missing_image_lists_url_file_name_with_photo_id(tmp_path):
    """The real files have photo_id and photo_url: the Flickr file name is a name tried too, and shown."""
    url = "https://c2.staticflickr.com/3/2235/2421369081_a3628f3964_o.jpg"
    shard = write_json(tmp_path / "pc" / "dev_01.json",
                       [photochat_dialogue(500, share_at=2, n_turns=4, photo_id="train/624e5f6dd7f64d89", url=url)])
    (tmp_path / "img").mkdir()
    with pytest.raises(DataError) as info:
        prepare("photochat", shard, tmp_path / "img", tmp_path / "out", progress=False)
    msg = str(info.value)
    assert info.value.kind == "image_missing" and "2421369081_a3628f3964_o.jpg" in msg
    assert "624e5f6dd7f64d89.{jpg,jpeg,png,webp}" in msg and "train_624e5f6dd7f64d89.{jpg" in msg
    write_image(tmp_path / "img" / "2421369081_a3628f3964_o.jpg", fmt="JPEG")  # and it is found by that name
    meta = prepare("photochat", shard, tmp_path / "img", tmp_path / "out", progress=False)
    assert meta["counts"]["images"] == 1
    assert pq.read_table(tmp_path / "out" / "images.parquet").column("path").to_pylist() == [
        "2421369081_a3628f3964_o.jpg"]
