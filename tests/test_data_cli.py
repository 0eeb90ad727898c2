"""The ``dialclip data`` command group, called through the real entry point."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from dialclip_ray.cli import main
from test_data_support import photochat_dialogue, write_image, write_json


def test_prepare_and_stats_on_real_sample(photochat_sample_dir, tmp_path, capsys):
    """Real PhotoChat sample with the default pattern ({id_basename}.{ext}) and url-named images for test."""
    from dialclip_ray.data.photochat import load_photochat

    for ref in load_photochat(photochat_sample_dir, progress=False).images.values():
        name = ref.image_id.rsplit("/", 1)[-1] + ".jpg" if ref.field == "photo_id" else ref.hints["url_basename"]
        write_image(tmp_path / "img" / name, fmt="JPEG")
    rc = main(["data", "prepare", "--format", "photochat", "--input", photochat_sample_dir,
               "--images", str(tmp_path / "img"), "--out", str(tmp_path / "ds"), "--quiet"])
    assert rc == 0
    assert "46 examples, 46 images" in capsys.readouterr().out
    assert pq.read_metadata(tmp_path / "ds" / "examples.parquet").num_rows == 46

    assert main(["data", "stats", str(tmp_path / "ds"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    dev = stats["splits"]["dev"]
    assert dev["examples"] == 22 and dev["candidate_pool"]["per_split_images"] == 22
    assert 0 < dev["share_over_context"] < 1 and dev["context_tokens"]["max"] > 75
    assert main(["data", "stats", str(tmp_path / "ds"), "--plot", str(tmp_path / "len.png")]) == 0
    assert "share over the token window" in capsys.readouterr().out
    assert (tmp_path / "len.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_prints_one_line_and_exits_2(tmp_path, capsys):
    bad = photochat_dialogue(4, share_at=1, n_turns=3)
    bad["dialogue"][0]["user_id"] = "zero"
    shard = write_json(tmp_path / "dev_00.json", [bad])
    (tmp_path / "img").mkdir()
    rc = main(["data", "prepare", "--format", "photochat", "--input", str(shard), "--images",
               str(tmp_path / "img"), "--out", str(tmp_path / "ds"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(shard) in err and "dialogue_id 4" in err and "dialogue[0].user_id" in err
    assert not (tmp_path / "ds").exists()

    rc = main(["data", "prepare", "--format", "photochat", "--input", str(shard), "--images",
               str(tmp_path / "img"), "--out", str(tmp_path / "ds"), "--quiet", "--on-error", "skip"])
    assert rc == 0 and "skipped 1 {'wrong_type': 1}" in capsys.readouterr().out

    assert main(["data", "stats", str(tmp_path / "nothing")]) == 2
    assert "meta.json is missing" in capsys.readouterr().err


def test_synth_writes_the_split_sizes_it_is_given(tmp_path, capsys):
    """`data synth` runs the real generator with the benchmark's size options (tiny sizes here)."""
    out = tmp_path / "s"
    rc = main(["data", "synth", "--out", str(out), "--seed", "3", "--image-size", "32",
               "--photochat-sizes", "6", "2", "3", "--mmdialog-sizes", "2", "1", "1", "--caption-images", "4"])
    assert rc == 0
    meta = json.loads((out / "synth_meta.json").read_text())
    assert [meta["counts"]["photochat"][s]["dialogs"] for s in ("train", "dev", "test")] == [6, 2, 3]
    assert [meta["counts"]["mmdialog"][s]["conversations"] for s in ("train", "valid", "test")] == [2, 1, 1]
    assert meta["counts"]["caption_images"] == 4
    assert json.loads(capsys.readouterr().out)["counts"] == meta["counts"]
    assert main(["data", "synth", "--out", str(out), "--dialogs", "10"]) != 0  # an existing corpus is kept
    assert main(["data", "synth", "--out", str(out), "--dialogs", "10", "--image-size", "32", "--overwrite"]) == 0
