"""Zero-init gated prompt attention (``prompt_gate``, design.md s2 invariant 4): a fresh prompted model
equals zero-shot CLIP, the gates learn first, and training then moves it away from CLIP."""

from __future__ import annotations

import pytest
import torch

from dialclip_ray.model.backbone import load_backbone
from dialclip_ray.model.batch import TrainBatch
from dialclip_ray.model.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from dialclip_ray.model.config import BackboneConfig, DialCLIPConfig, preset
from dialclip_ray.model.dialclip import build_model
from dialclip_ray.model.params import parameter_report
from dialclip_ray.model.text import tokenize_texts
from test_model import DIALOGS, FILLER, make_query

TINY = BackboneConfig(model_name="dialclip-tiny")
TEXTS = ["a reply about the beach", "a red circle on a blue background", "hello", FILLER + " " + FILLER]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("dialclip-tiny")  # random init (fixed seed)


def gated(tiny, seed: int = 0, **overrides):
    return build_model(preset("gated", backbone=TINY, **overrides), backbone=tiny, seed=seed)[0]


def query(tiny, retrieval_type: int = 0):
    q = make_query(tiny.tokenizer, DIALOGS, [2, 0, 1], image_size=64)
    q.retrieval_type[:] = retrieval_type
    return q


def test_gated_is_the_default_and_ungated_the_papers_form():
    assert preset("gated") == preset("default") == DialCLIPConfig() and DialCLIPConfig().prompt_gate is True
    assert preset("ungated") == DialCLIPConfig(prompt_gate=False)
    # a baseline has no prompts: unset means off, explicitly on is a contradiction
    assert preset("finetune").prompt_gate is False and preset("zeroshot").prompt_gate is False
    with pytest.raises(ValueError, match="no prompts to gate"):
        preset("finetune", prompt_gate=True)


@pytest.mark.parametrize("grad", [False, True])
def test_fresh_gated_model_equals_zero_shot_clip(tiny, grad):
    model = gated(tiny)
    cfg = model.cfg
    assert cfg.domain_prompt_length > 0 and cfg.context_prompt_length > 0
    for module in (model.text_prompts, model.vision_prompts, model.cpg, model.query_experts, model.prompt_gates):
        assert module is not None and all(p.requires_grad for p in module.parameters())
    assert torch.equal(model.logit_scale.detach(), tiny.model.logit_scale.detach())
    q = query(tiny)
    assert q.turn_mask.any() and q.image_mask.any()
    tokens = tokenize_texts(tiny.tokenizer, TEXTS)
    images = torch.randn(4, 3, 64, 64)
    with torch.set_grad_enabled(grad):
        with torch.no_grad():
            want_q, want_t = tiny.model.encode_text(q.query_tokens), tiny.model.encode_text(tokens)
            want_i = tiny.model.encode_image(images)
        for rtype in (0, 1):
            q.retrieval_type[:] = rtype
            assert (model.encode_query(q, normalize=False) - want_q).abs().max() < 1e-5
        assert (model.encode_texts(tokens, normalize=False) - want_t).abs().max() < 1e-5
        assert (model.encode_images(images, normalize=False) - want_i).abs().max() < 1e-5
        # the same prompts without the gate move the embeddings far away (the paper's form)
        ungated = build_model(preset("ungated", backbone=TINY), backbone=tiny)[0]
        assert (ungated.encode_query(q, normalize=False) - want_q).abs().max() > 0.1


def test_gates_learn_first_then_prompts(tiny):
    model = gated(tiny)
    q = query(tiny)
    batch = TrainBatch(q, "image", target_images=torch.randn(3, 3, 64, 64))
    model(batch)["loss"].backward()
    gates = dict(model.prompt_gates.named_parameters())
    assert set(gates) == {"text_domain", "text_context", "vision_domain"}
    for name, g in gates.items():
        assert g.grad is not None and g.grad.abs().max() > 0, name
    # at g = 0 the prompts do not reach the loss yet: their gradients are exactly zero
    for module in (model.text_prompts, model.vision_prompts, model.cpg):
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in module.parameters())
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for g in gates.values():
            g.fill_(0.1)
    model(batch)["loss"].backward()
    for module in (model.text_prompts, model.vision_prompts, model.cpg):
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in module.parameters())


def test_training_moves_the_gated_model_away_from_clip(tiny):
    model = gated(tiny)
    q = query(tiny, retrieval_type=1)
    replies = tokenize_texts(tiny.tokenizer, ["a reply about the circle", "hi", "blue squares"])
    batch = TrainBatch(q, "text", target_tokens=replies)
    with torch.no_grad():
        want = tiny.model.encode_text(q.query_tokens)
    backbone = {k: v.clone() for k, v in model.clip.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        opt.step()
    assert model.prompt_gates.text_domain.abs().min() > 0 and model.prompt_gates.text_context.abs().min() > 0
    with torch.no_grad():
        assert (model.encode_query(q, normalize=False) - want).abs().max() > 1e-3
    assert all(torch.equal(v, backbone[k]) for k, v in model.clip.state_dict().items())


def _randomise(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_gated_query_embedding_is_batch_invariant(tiny):
    model = gated(tiny)
    _randomise(model)
    q = query(tiny)
    images = torch.randn(3, 3, 64, 64)
    tokens = tokenize_texts(tiny.tokenizer, TEXTS[:3])
    with torch.no_grad():
        together = model.encode_query(q), model.encode_images(images), model.encode_texts(tokens)
        for i in range(len(DIALOGS)):
            alone = model.encode_query(make_query(tiny.tokenizer, [DIALOGS[i]], [[2, 0, 1][i]], image_size=64,
                                                  seed=i))
            assert (alone[0] - together[0][i]).abs().max() < 1e-5
            assert (model.encode_images(images[i:i + 1])[0] - together[1][i]).abs().max() < 1e-5
            assert (model.encode_texts(tokens[i:i + 1])[0] - together[2][i]).abs().max() < 1e-5


def test_gates_are_counted_and_checkpointed(tiny, tmp_path):
    model = gated(tiny, num_experts=3)
    _randomise(model)
    text_heads = tiny.model.transformer.resblocks[0].attn.num_heads
    vision_heads = tiny.model.visual.transformer.resblocks[0].attn.num_heads
    layers = len(tiny.model.transformer.resblocks)
    expected = layers * text_heads + (layers - model.cfg.insertion_layer) * text_heads \
        + len(tiny.model.visual.transformer.resblocks) * vision_heads
    rows = {name: (tr, tot) for name, tr, tot in parameter_report(model).rows}
    assert rows["prompt gates"] == (expected, expected)
    save_checkpoint(model, tmp_path / "ckpt")
    _, state = read_checkpoint(tmp_path / "ckpt")
    assert {k for k in state if k.startswith("prompt_gates.")} == {
        "prompt_gates.text_domain", "prompt_gates.text_context", "prompt_gates.vision_domain"}
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt", backbone=tiny)
    q = query(tiny)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_query(q), loaded.encode_query(q))
        assert torch.equal(model.encode_images(images), loaded.encode_images(images))


def test_gated_partial_prompt_setups(tiny):
    """Text-only domain prompts, no context, or a shallow depth: still CLIP at init, gates only where prompts are."""
    q = query(tiny)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want_q, want_i = tiny.model.encode_text(q.query_tokens), tiny.model.encode_image(images)
        for overrides in (dict(domain_prompt_towers="text"), dict(context_prompt_length=0),
                          dict(domain_prompt_length=0), dict(domain_prompt_depth=2, insertion_layer=4)):
            model = gated(tiny, **overrides)
            assert (model.encode_query(q, normalize=False) - want_q).abs().max() < 1e-5, overrides
            assert (model.encode_images(images, normalize=False) - want_i).abs().max() < 1e-5, overrides
            names = {n for n, _ in model.prompt_gates.named_parameters()}
            assert ("vision_domain" in names) == model.cfg.vision_prompts
            assert ("text_context" in names) == bool(model.cfg.context_prompt_length)


def test_gated_bf16_autocast_step(tiny):
    model = gated(tiny)
    _randomise(model)
    q = query(tiny)
    batch = TrainBatch(q, "image", target_images=torch.randn(3, 3, 64, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.prompt_gates.text_context.grad.abs().max() > 0
