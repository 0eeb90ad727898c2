"""Small-CLIP pretraining: a real 2-worker Ray Train run on a hand-made caption corpus."""

from __future__ import annotations

import json
import random

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

from dialclip_ray.model.backbone import register_model_configs
from dialclip_ray.data.errors import DataError
from dialclip_ray.pretrain import PretrainConfig, cache_key, run_pretrain
from dialclip_ray.pretrain import run as run_mod
from dialclip_ray.pretrain.data import CaptionDataset, CaptionRow, read_captions
from dialclip_ray.pretrain.encode import encode_text_trimmed
from dialclip_ray.pretrain.evaluate import caption_retrieval_metrics, paired_ranks

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 80, 230), "yellow": (240, 220, 30)}
BACKGROUNDS = {"dark": (20, 20, 30), "light": (225, 225, 215)}
SHAPES = ("circle", "square")


def write_corpus(root, n_images: int = 40, size: int = 32, seed: int = 0):
    """A few dozen PNG scenes (colour x shape x background) plus captions.parquet and synth_meta.json."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True)
    rows = {"image_id": [], "path": [], "caption": [], "split": []}
    for i in range(n_images):
        colour, shape, bg = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
        r, cx, cy = rng.randint(7, 10), rng.randint(11, 21), rng.randint(11, 21)
        box = [cx - r, cy - r, cx + r, cy + r]
        (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=COLOURS[colour])
        rel = f"img/{i:03d}.png"
        img.save(root / rel)
        split = "train" if i < n_images * 3 // 4 else "test"
        for caption in (f"a {colour} {shape} on a {bg} background", f"{bg} picture with one {colour} {shape}"):
            for k, v in zip(rows, (f"im{i:03d}", rel, caption, split)):
                rows[k].append(v)
    pq.write_table(pa.table(rows), root / "captions.parquet")
    (root / "synth_meta.json").write_text(json.dumps({"seed": seed, "images": n_images, "image_size": size}))
    return root


CONFIG = PretrainConfig(model_name="dialclip-micro", epochs=3, batch_size=16, lr=2e-3, warmup_steps=2,
                        workers=2, seed=3)


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    root = write_corpus(tmp_path_factory.mktemp("corpus"))
    cache = tmp_path_factory.mktemp("cache")
    return root, cache, run_pretrain(CONFIG, root, cache)


@pytest.mark.slow
def test_pretrain_writes_loadable_checkpoint_and_loss_falls(trained):
    root, cache, result = trained
    assert not result.cached
    assert result.path == cache / result.meta["key"] / "open_clip_model.pt"
    meta = json.loads((result.path.parent / "pretrain_meta.json").read_text())
    assert meta["config"] == CONFIG.model_dump(mode="json")
    assert (result.path.parent / "training_curve.png").stat().st_size > 0
    epochs = meta["train_epochs"]
    assert len(epochs) == CONFIG.epochs and epochs[-1]["step"] == meta["steps"] > 0
    assert epochs[-1]["loss"] < epochs[0]["loss"]
    m = meta["metrics"]
    assert m["pool_size"] == 10  # one caption per held-out (test) image
    assert 0 <= m["caption_to_image_R@1"] <= m["caption_to_image_R@5"] <= m["caption_to_image_R@10"] <= 100
    assert not any(p.name.startswith(".") for p in cache.iterdir())  # no temp leftovers

    register_model_configs()
    saved = torch.load(result.path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    loaded, _, _ = open_clip.create_model_and_transforms("dialclip-micro", pretrained=str(result.path))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    torch.manual_seed(CONFIG.seed)  # the exact initialisation the workers started from
    init, _, _ = open_clip.create_model_and_transforms("dialclip-micro", pretrained=None)
    assert not torch.equal(init.visual.conv1.weight, loaded.visual.conv1.weight)
    assert not torch.equal(init.transformer.resblocks[0].mlp.c_fc.weight,
                           loaded.transformer.resblocks[0].mlp.c_fc.weight)


@pytest.mark.slow
def test_second_call_hits_cache_without_training(trained, monkeypatch, capsys):
    root, cache, result = trained
    mtime = result.path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("cache hit must not train")

    monkeypatch.setattr(run_mod, "_train", no_training)
    again = run_pretrain(CONFIG, root, cache)
    assert again.cached and again.path == result.path and again.meta["created"] == result.meta["created"]
    assert result.path.stat().st_mtime_ns == mtime

    from dialclip_ray.cli import main  # the CLI with the same settings finds the same artifact
    assert main(["pretrain", "--data", str(root), "--cache-dir", str(cache), "--model", "dialclip-micro",
                 "--epochs", "3", "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "2", "--workers", "2",
                 "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert str(result.path) in out and "[cached]" in out


def test_cache_key_depends_on_config_seed_and_corpus():
    base = cache_key(CONFIG, "corpusA")
    assert base == cache_key(PretrainConfig(**CONFIG.model_dump()), "corpusA")
    assert base != cache_key(CONFIG.model_copy(update={"seed": 4}), "corpusA")
    assert base != cache_key(CONFIG.model_copy(update={"lr": 1e-3}), "corpusA")
    assert base != cache_key(CONFIG, "corpusB")
    assert base == cache_key(CONFIG.model_copy(update={"eval_batch_size": 7, "threads_per_worker": 1}), "corpusA")


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        PretrainConfig(batch_size=15, workers=2)
    with pytest.raises(ValueError):
        PretrainConfig(train_split="test")
    with pytest.raises(ValueError):
        PretrainConfig(unknown_field=1)


def test_trimmed_text_encoding_equals_open_clip():
    register_model_configs()
    model, _, _ = open_clip.create_model_and_transforms("dialclip-micro", pretrained=None)
    tokens = open_clip.get_tokenizer("dialclip-micro")(["a red circle", "two small blue squares on the beach at night"])
    with torch.no_grad():
        diff = (encode_text_trimmed(model, tokens, normalize=True) - model.encode_text(tokens, normalize=True))
    assert diff.abs().max() < 1e-5


def test_held_out_recall_counts_ranks_and_ties_in_percent():
    q = torch.eye(4)
    m = caption_retrieval_metrics(q, q, ks=(1,))
    assert m["caption_to_image_R@1"] == m["image_to_caption_R@1"] == 100.0
    cands = torch.tensor([[0.6, 0, 0, 0], [0.9, 0.8, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    assert paired_ranks(q, cands).tolist() == [2, 1, 1, 1]  # query 0's target ranks 2nd
    m = caption_retrieval_metrics(cands, q, ks=(1, 2))  # caption (query q) -> image (candidates cands)
    assert (m["caption_to_image_R@1"], m["caption_to_image_R@2"]) == (75.0, 100.0)
    assert m["pool_size"] == 4 and m["chance_R@1"] == 25.0
    tie = caption_retrieval_metrics(torch.ones(4, 4), q, ks=(1,))
    assert tie["caption_to_image_R@1"] == 0.0  # a tie is not a hit
    # The keys pretrain writes into its meta (bench/results/pretrain_small_clip.json, demo report, CLI).
    assert set(caption_retrieval_metrics(q, q)) == {f"{d}_R@{k}" for d in ("caption_to_image", "image_to_caption")
                                                    for k in (1, 5, 10)} | {"pool_size", "chance_R@1"}


def test_bad_captions_name_file_row_and_field(tmp_path):
    pq.write_table(pa.table({"image_id": ["a"], "path": ["x.png"], "caption": [""], "split": ["train"]}),
                   tmp_path / "captions.parquet")
    with pytest.raises(DataError, match=r"captions\.parquet.*row 0.*'caption'"):
        read_captions(tmp_path)
    pq.write_table(pa.table({"image_id": ["a"], "path": ["x.png"]}), tmp_path / "captions.parquet")
    with pytest.raises(DataError, match="missing column"):
        read_captions(tmp_path)


def test_image_paths_confined_to_root(tmp_path):
    (tmp_path / "root").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    ds = CaptionDataset(tmp_path / "root", [CaptionRow("a", "../outside.png", "x", "train")], lambda im: im,
                        lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    with pytest.raises(DataError, match="image_id='a'"):
        ds[0]
