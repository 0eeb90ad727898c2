"""The DialCLIP core against the invariants of README "Model design" and model/*.py, on real open_clip modules."""

from __future__ import annotations

import copy

import pytest
import torch

from dialclip_ray.model.backbone import UnsupportedBackboneError, load_backbone
from dialclip_ray.model.batch import QueryBatch, TrainBatch
from dialclip_ray.model.checkpoint import BackboneMismatchError, load_checkpoint, read_checkpoint, save_checkpoint
from dialclip_ray.model.config import BackboneConfig, preset
from dialclip_ray.model.dialclip import build_model
from dialclip_ray.model.params import parameter_report
from dialclip_ray.model.text import tokenize_dialog, tokenize_texts

MICRO = BackboneConfig(model_name="dialclip-micro")


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return load_backbone("dialclip-micro")


def make_query(tok, dialogs: list[list[str]], images: list[int], image_size: int = 32, seed: int = 0,
               current: str = "want to see?") -> QueryBatch:
    """A query batch from raw dialogs: per-turn tokens, speakers alternating, ``images[i]`` images on dialog i."""
    b, t, m = len(dialogs), max(1, max(len(d) for d in dialogs)), max(1, max(images))
    q = QueryBatch(
        query_tokens=torch.stack([tokenize_dialog(tok, d + [current]) for d in dialogs]),
        turn_tokens=torch.zeros(b, t, 77, dtype=torch.long), turn_mask=torch.zeros(b, t, dtype=torch.bool),
        turn_speaker=torch.zeros(b, t, dtype=torch.long), images=torch.zeros(b, m, 3, image_size, image_size),
        image_mask=torch.zeros(b, m, dtype=torch.bool), image_turn=torch.zeros(b, m, dtype=torch.long),
        retrieval_type=torch.zeros(b, dtype=torch.long))
    for i, d in enumerate(dialogs):
        if d:
            q.turn_tokens[i, : len(d)] = tokenize_texts(tok, d)
            q.turn_mask[i, : len(d)] = True
            q.turn_speaker[i, : len(d)] = torch.arange(len(d)) % 2
        g = torch.Generator().manual_seed(seed + i)  # dialog i's images depend on (seed + i) only
        for j in range(images[i]):
            q.images[i, j] = torch.randn(3, image_size, image_size, generator=g)
            q.image_mask[i, j] = True
            q.image_turn[i, j] = max(0, len(d) - 1 - j)
    return q


FILLER = "so anyway how was your weekend it was pretty relaxing we watched a movie and cooked dinner"
DIALOGS = [
    ["i went to the beach", "nice", FILLER, "it had a red circle", "cool"],
    ["hello"],
    [FILLER, FILLER, "blue squares everywhere", FILLER, FILLER, "sure"],
]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_prompts_off_equals_open_clip(micro, batch_size):
    model, _ = build_model(preset("default", domain_prompt_length=0, context_prompt_length=0, backbone=MICRO),
                           backbone=micro)
    texts = ["a", "a red circle on a blue background", "word " * 90, "two\nlines"] * 2
    tokens = micro.tokenizer(texts[:batch_size])
    images = torch.randn(batch_size, 3, 32, 32)
    with torch.no_grad():
        assert (model.encode_texts(tokens, normalize=False) - micro.model.encode_text(tokens)).abs().max() < 1e-5
        assert (model.encode_images(images, normalize=False) - micro.model.encode_image(images)).abs().max() < 1e-5
        q = make_query(micro.tokenizer, [["x"]] * batch_size, [1] * batch_size)
        q.query_tokens = tokens
        assert (model.encode_query(q, normalize=False) - micro.model.encode_text(tokens)).abs().max() < 1e-5


def test_vit_b_32_equivalence_with_random_weights():
    bb = load_backbone("ViT-B-32")
    model, _ = build_model(preset("default", domain_prompt_length=0, context_prompt_length=0,
                                  backbone=BackboneConfig(model_name="ViT-B-32")), backbone=bb)
    tokens = bb.tokenizer(["a photo of a dog", "a dialog about the beach " * 10])
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model.encode_texts(tokens, normalize=False) - bb.model.encode_text(tokens)).abs().max() < 1e-5
        assert (model.encode_images(images, normalize=False) - bb.model.encode_image(images)).abs().max() < 1e-5
    assert 0.03 <= parameter_report(build_model(preset("paper-budget", backbone=BackboneConfig(
        model_name="ViT-B-32")), backbone=bb)[0]).percent <= 0.05
    assert parameter_report(build_model(preset("default", backbone=BackboneConfig(
        model_name="ViT-B-32")), backbone=bb)[0]).percent <= 1.0


def test_frozen_backbone_bit_identical_and_grads_only_on_added_parts(micro):
    model, _ = build_model(preset("default", num_experts=3, backbone=MICRO), backbone=copy.deepcopy(micro))
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    q = make_query(micro.tokenizer, DIALOGS, [1, 0, 2])
    q.retrieval_type = torch.tensor([0, 1, 0])
    batch = TrainBatch(q, "image", target_images=torch.randn(3, 3, 32, 32))
    for _ in range(3):
        opt.zero_grad()
        model(batch)["loss"].backward()
        for name, p in model.named_parameters():
            if name.startswith("clip."):
                assert p.grad is None, name
        opt.step()
    for k, v in model.clip.state_dict().items():
        assert torch.equal(v, before[k]), k
    added = [n for n, p in model.named_parameters() if p.requires_grad]
    assert added and all(not n.startswith("clip.") for n in added)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("cpg."))


def test_query_embedding_is_batch_invariant(micro):
    model, _ = build_model(preset("default", backbone=MICRO), backbone=micro)
    for p in model.parameters():  # make every added module non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    q = make_query(micro.tokenizer, DIALOGS, [2, 0, 1])
    with torch.no_grad():
        together = model.encode_query(q)
        for i in range(len(DIALOGS)):
            alone = model.encode_query(make_query(micro.tokenizer, [DIALOGS[i]], [[2, 0, 1][i]], seed=i))
            assert (alone[0] - together[i]).abs().max() < 1e-5


def test_early_context_matters_only_with_context_prompts(micro):
    long_dialog = ["the photo shows a green star"] + [FILLER] * 6 + ["want to see it?"]
    changed = ["the photo shows a yellow moon"] + long_dialog[1:]
    tok = micro.tokenizer
    assert torch.equal(tokenize_dialog(tok, long_dialog + ["x"]), tokenize_dialog(tok, changed + ["x"])), \
        "the early turn must lie outside the 77-token query window"
    for lc, should_change in ((8, True), (0, False)):
        # the paper's (ungated) form: a fresh gated model ignores its prompts until the gates open
        model, _ = build_model(preset("ungated", context_prompt_length=lc, backbone=MICRO), backbone=micro)
        with torch.no_grad():
            a = model.encode_query(make_query(tok, [long_dialog], [0]))
            b = model.encode_query(make_query(tok, [changed], [0]))
        assert ((a - b).abs().max() > 1e-4) == should_change


# Why this test once depended on the CPU's vector unit: it trained at lr 1e-2, ten times the product's
# default (OptimSection.lr). Adam moves every element by ~lr per step, which for prompts of CLIP's token scale
# (std 0.02) is half their size: the loss oscillated chaotically around a plateau (one query pair of this
# random backbone is nearly collinear), and a 1e-6 relative change of the initial weights, like another
# vector unit's rounding, moved the final loss between 0.17 and 0.29 (ungated) or 0.001 and 1.0 (gated).
# Two causes, both fixed: the context prompts started 6-8x larger than token rows (model/cpg.py now starts
# them at the token scale), and the lr. At the default lr every one of 12 perturbed starts converged below
# 0.005 in 200 steps (ungated) and 400 (gated: its gates open from zero), on AVX-512 and with avx2.
@pytest.mark.parametrize("form,steps", [("ungated", 400), ("gated", 400)])
@pytest.mark.parametrize("perturbation", [0.0, 1e-6])
def test_overfits_a_small_fixed_batch(micro, form, steps, perturbation):
    from dialclip_ray.train.config import OptimSection

    torch.manual_seed(0)
    model, _ = build_model(preset(form, backbone=MICRO), backbone=micro)
    words = ["apple", "river", "engine", "violin", "desert", "castle"]
    dialogs = [d + [f"we talked about the {w}"] for d, w in zip(DIALOGS * 2, words)]
    q = make_query(micro.tokenizer, dialogs, [1, 0, 2] * 2, seed=1)
    replies = tokenize_texts(micro.tokenizer, [f"a reply about the {w}" for w in words])
    batch = TrainBatch(q, "text", target_tokens=replies)
    q.retrieval_type[:] = 1
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a relative nudge of every trainable tensor, standing in for other rounding
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * perturbation * p.abs().mean())
    opt = torch.optim.AdamW(params, lr=OptimSection().lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(batch)["loss"]
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[0] > 1.0
    assert max(losses[-20:]) < 0.05, f"not converged: last losses {losses[-5:]}"


def test_checkpoint_round_trip_and_backbone_check(micro, tmp_path):
    model, _ = build_model(preset("default", num_experts=3, backbone=MICRO), backbone=micro)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    save_checkpoint(model, tmp_path / "ckpt", extra={"epoch": 1})
    meta, state = read_checkpoint(tmp_path / "ckpt")
    assert meta["params"]["trainable"] == parameter_report(model).trainable > 0
    assert all(not k.startswith("clip.") for k in state)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt", backbone=micro)
    q = make_query(micro.tokenizer, DIALOGS, [1, 0, 2])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_query(q), loaded.encode_query(q))
        assert torch.equal(model.encode_images(images), loaded.encode_images(images))
    other = copy.deepcopy(micro)  # same name, other weights
    with torch.no_grad():
        other.model.ln_final.weight.add_(1.0)
    with pytest.raises(BackboneMismatchError, match="weights"):
        load_checkpoint(tmp_path / "ckpt", backbone=other)
    with pytest.raises(BackboneMismatchError, match="dialclip-tiny"):
        load_checkpoint(tmp_path / "ckpt", backbone=load_backbone("dialclip-tiny"))


def test_router_and_prompt_inits(micro):
    model, _ = build_model(preset("default", num_experts=3, domain_prompt_init="task", backbone=MICRO),
                           backbone=micro)
    x = torch.randn(4, micro.model.transformer.width)
    gates = model.query_experts.gates(x, torch.tensor([0, 1, 0, 1]))
    assert gates.shape == (4, 3) and torch.allclose(gates.sum(-1), torch.ones(4))
    hard, _ = build_model(preset("default", num_experts=2, backbone=MICRO), backbone=micro)
    assert torch.equal(hard.query_experts.gates(x, torch.tensor([0, 1, 1, 0])),
                       torch.tensor([[1., 0], [0, 1], [0, 1], [1, 0]]))
    first_word = micro.tokenizer.encode("photo")[0]
    assert torch.equal(model.text_prompts.prompts[0, 0], micro.model.token_embedding.weight[first_word])


def test_unsupported_backbone_is_named():
    with pytest.raises(UnsupportedBackboneError, match="RN50.*ModifiedResNet"):
        load_backbone("RN50")
    with pytest.raises(ValueError, match="insertion_layer=7"):
        build_model(preset("default", insertion_layer=7, backbone=MICRO))


def test_merge_preset_equals_explicit_fields_and_rejects_unknown(tmp_path):
    import yaml

    from dialclip_ray.model.config import PRESETS, DialCLIPConfig, merge_preset
    from dialclip_ray.train.config import ConfigError, load_train_config

    assert merge_preset({"preset": "paper-budget", "cpg_dim": 64}) == {**PRESETS["paper-budget"], "cpg_dim": 64}
    assert merge_preset({"num_experts": 3}) == {"num_experts": 3}  # no preset key: a plain copy
    explicit = DialCLIPConfig(domain_prompt_length=2, domain_prompt_towers="text", context_prompt_length=8,
                              cpg_dim=32, cpg_heads=2, expert_rank=1, num_experts=3, prompt_gate=False)
    assert preset("paper-budget", num_experts=3) == explicit
    # The training config's ``model`` section resolves presets through the same function.
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "paper-budget", "num_experts": 3}, "data": {"train": ["x"]}}))
    assert load_train_config(path).model == explicit
    with pytest.raises(ValueError, match="unknown preset 'nope'; known: default, gated, ungated, paper-budget"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        merge_preset({"preset": "nope"})
    path.write_text(yaml.safe_dump({"model": {"preset": "nope"}, "data": {"train": ["x"]}}))
    with pytest.raises(ConfigError, match=r"invalid training config: model: Value error, unknown preset 'nope'"):
        load_train_config(path)


def test_backbone_geometry_from_open_clip_config(micro):
    from dialclip_ray.data.dataset import ReaderConfig
    from dialclip_ray.model.backbone import BackboneGeometry, backbone_geometry
    from dialclip_ray.model.config import DialCLIPConfig

    assert backbone_geometry("dialclip-tiny") == BackboneGeometry(
        model_name="dialclip-tiny", image_size=64, text_layers=6, vision_layers=6, context_length=77, embed_dim=128)
    # ViT-B-32's config ships with open_clip: no weights are needed to read it.
    assert backbone_geometry("ViT-B-32") == BackboneGeometry(
        model_name="ViT-B-32", image_size=224, text_layers=12, vision_layers=12, context_length=77, embed_dim=512)
    g = backbone_geometry("dialclip-micro")  # agrees with the model open_clip builds
    assert (g.image_size, g.context_length) == (micro.image_size, micro.context_length)
    assert g.text_layers == len(micro.model.transformer.resblocks)
    assert g.vision_layers == len(micro.model.visual.transformer.resblocks)
    assert g.embed_dim == micro.model.text_projection.shape[-1]
    reader = ReaderConfig.from_model_config(DialCLIPConfig(backbone=BackboneConfig(model_name="dialclip-tiny")))
    assert (reader.image_size, reader.context_length) == (64, 77)
    with pytest.raises(UnsupportedBackboneError, match="no-such-clip"):  # no silent 224 px / 12 layers
        backbone_geometry("no-such-clip")
    with pytest.raises(UnsupportedBackboneError, match="RN50.*ResNet"):
        backbone_geometry("RN50")
