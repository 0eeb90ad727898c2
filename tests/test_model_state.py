"""Hidden state in the model core: no silent config rewrites, no shared trainability, no global caches,
no drift of unused experts, seeded prompts. Each test here failed on the code before the fix."""

from __future__ import annotations


import pytest
import torch
import yaml
from pydantic import ValidationError

from dialclip_ray.model.backbone import load_backbone
from dialclip_ray.model.batch import TrainBatch
from dialclip_ray.model.config import PRESETS, DialCLIPConfig, preset
from dialclip_ray.model.dialclip import build_model
from dialclip_ray.model.experts import ProjectionExperts
from dialclip_ray.model.text import tokenize_texts
from dialclip_ray.train.config import ConfigError, TrainConfig, load_train_config
from ddp_support import hard_routing_worker
from test_model import DIALOGS, MICRO, make_query


@pytest.fixture(scope="module")
def micro():
    return load_backbone("dialclip-micro")


def _step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    model(batch)["loss"].backward()
    opt.step()


# -- 1. validators reject contradictions instead of rewriting them ----------------------------------
def test_baseline_variants_with_prompts_are_rejected():
    with pytest.raises(ValidationError, match=r"variant 'zeroshot' has no prompts: set domain_prompt_length: 0 "
                                              r"and context_prompt_length: 0.*or use preset 'zeroshot'"):
        DialCLIPConfig(variant="zeroshot")
    with pytest.raises(ValidationError, match="variant 'finetune' has no prompts"):
        preset("finetune", context_prompt_length=8)
    with pytest.raises(ValidationError, match="prompt_gate"):
        preset("zeroshot", prompt_gate=True)
    for name in ("zeroshot", "finetune"):  # the presets state their values; nothing is rewritten
        assert PRESETS[name]["domain_prompt_length"] == PRESETS[name]["context_prompt_length"] == 0
        cfg = preset(name)
        assert cfg.model_dump(exclude_defaults=True) == PRESETS[name]
        assert not (cfg.text_prompts or cfg.vision_prompts or cfg.uses_experts)


def test_domain_towers_are_not_rewritten():
    cfg = DialCLIPConfig(domain_prompt_length=0)  # a sweep sets the length alone: prompts off, field kept
    assert cfg.domain_prompt_towers == "both" and not cfg.text_prompts and not cfg.vision_prompts
    assert DialCLIPConfig.model_validate(cfg.model_dump()) == cfg
    text_only = DialCLIPConfig(domain_prompt_towers="text")
    assert text_only.text_prompts and not text_only.vision_prompts
    with pytest.raises(ValidationError, match="domain_prompt_towers 'none' contradicts domain_prompt_length 4"):
        DialCLIPConfig(domain_prompt_towers="none")
    assert not preset("no-domain").text_prompts


def test_zeroshot_training_config_needs_zero_epochs(tmp_path):
    base = {"model": {"preset": "zeroshot"}, "data": {"train": [str(tmp_path)]}}
    with pytest.raises(ValidationError, match="set optim.epochs: 0"):
        TrainConfig.model_validate({**base, "optim": {"epochs": 3}})
    with pytest.raises(ValidationError, match="set optim.epochs: 0"):
        TrainConfig.model_validate(base)  # the default is 5 epochs
    assert TrainConfig.model_validate({**base, "optim": {"epochs": 0}}).optim.epochs == 0
    path = tmp_path / "zs.yaml"
    path.write_text(yaml.safe_dump({**base, "optim": {"epochs": 2}}))
    with pytest.raises(ConfigError, match="optim.epochs: 0"):
        load_train_config(path)
    assert load_train_config(path, {"optim.epochs": 0}).optim.epochs == 0


def test_every_benchmark_variant_builds_a_valid_config(tmp_path):
    from dialclip_ray.model.config import BackboneConfig
    from dialclip_ray.pipelines.experiments import VARIANTS, Corpus, variant_config

    corpus = Corpus(tmp_path / "raw", tmp_path / "photochat", tmp_path / "mmdialog")
    for variant in VARIANTS:
        cfg = variant_config(variant, corpus, BackboneConfig(model_name="dialclip-micro"), tmp_path, epochs=2)
        assert cfg.optim.epochs == (0 if variant == "zeroshot" else 2)
        assert TrainConfig.model_validate(cfg.model_dump()) == cfg


# -- 2. one backbone, several models ---------------------------------------------------------------
@pytest.mark.parametrize("finetune_first", [False, True])
def test_finetune_and_frozen_models_on_one_backbone_stay_independent(finetune_first):
    bb = load_backbone("dialclip-micro")
    order = ["finetune", "default"] if finetune_first else ["default", "finetune"]
    models = {name: build_model(preset(name, backbone=MICRO), backbone=bb)[0] for name in order}
    frozen, tuned = models["default"], models["finetune"]
    assert not any(p.requires_grad for p in frozen.clip.parameters())
    assert all(p.requires_grad for n, p in tuned.clip.named_parameters() if n not in ("logit_scale", "logit_bias"))
    frozen.train()
    tuned.train()
    assert not any(m.training for m in frozen.clip.modules())
    assert all(m.training for m in tuned.clip.modules())
    assert frozen.clip is bb.model and tuned.clip is not bb.model  # frozen models share, finetune copies

    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    tuned_before = tuned.clip.transformer.resblocks[0].mlp.c_fc.weight.detach().clone()
    q = make_query(bb.tokenizer, DIALOGS, [1, 0, 2])
    batch = TrainBatch(q, "image", target_images=torch.randn(3, 3, 32, 32))
    _step(tuned, torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2), batch)
    assert not torch.equal(tuned.clip.transformer.resblocks[0].mlp.c_fc.weight, tuned_before)
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    _step(frozen, torch.optim.AdamW([p for p in frozen.parameters() if p.requires_grad], lr=1e-2), batch)
    assert all(p.grad is None for p in frozen.clip.parameters())


# -- 3. the causal mask is not cached across calls --------------------------------------------------
@pytest.mark.parametrize("gate", [False, True])
def test_inference_mode_forward_then_training_step(micro, gate):
    # Unusual prompt lengths: text sequences of 90 and 101 positions, which no other test builds first.
    gating = {"prompt_gate": True} if gate else {}
    model, _ = build_model(preset("default", domain_prompt_length=13, context_prompt_length=11, backbone=MICRO,
                                  **gating), backbone=micro)
    q = make_query(micro.tokenizer, DIALOGS, [1, 0, 2])
    replies = tokenize_texts(micro.tokenizer, ["one", "two", "three"])
    with torch.inference_mode():
        model.encode_query(q)
        model.encode_texts(replies)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _step(model, opt, TrainBatch(q, "text", target_tokens=replies))  # raised "Inference tensors cannot be saved"
    assert model.text_prompts.prompts.grad is not None


# -- 4. hard routing computes only each example's own expert ----------------------------------------
def test_hard_routing_leaves_the_absent_expert_untouched(micro):
    model, _ = build_model(preset("default", num_experts=2, backbone=MICRO), backbone=micro)
    assert model.query_experts.hard
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    q = make_query(micro.tokenizer, DIALOGS, [1, 0, 2])
    batch = TrainBatch(q, "image", target_images=torch.randn(3, 3, 32, 32))
    q.retrieval_type = torch.tensor([0, 1, 0])
    _step(model, opt, batch)  # both experts now have AdamW moments
    unused, used = model.query_experts.experts[1], model.query_experts.experts[0]
    snap = {n: p.detach().clone() for n, p in unused.named_parameters()}
    used_before = used.up.detach().clone()
    q.retrieval_type = torch.tensor([0, 0, 0])
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        assert all(p.grad is None for p in unused.parameters())
        assert all(p.grad is not None for p in used.parameters())
        opt.step()
    for n, p in unused.named_parameters():
        assert torch.equal(p, snap[n]), n
    assert not torch.equal(used.up, used_before)


def test_hard_routing_output_is_each_examples_own_expert():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 4)
    experts = ProjectionExperts(base, 8, 4, num_experts=2, rank=2, num_types=2)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    x, types = torch.randn(5, 8), torch.tensor([1, 0, 1, 1, 0])
    want = torch.stack([base(x[i]) + experts.experts[int(t)](x[i : i + 1])[0] for i, t in enumerate(types)])
    assert torch.allclose(experts(x, types), want, atol=1e-6)
    assert torch.allclose(experts(x[:0], types[:0]), base(x[:0]))


def test_hard_routing_under_ddp(tmp_path):
    """Experts used on one rank only are synchronised; experts unused on every rank keep grad None."""
    import torch.multiprocessing as mp

    mp.spawn(hard_routing_worker, args=(str(tmp_path),), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for rank in (r0, r1):
        assert rank["grads_none"] == [[False, False], [True, True], [True, True]]
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k


# -- 5. domain prompts follow build_model's seed ----------------------------------------------------
def test_domain_prompts_follow_the_build_seed(micro):
    cfg = preset("default", backbone=MICRO)
    a, b, a2 = (build_model(cfg, backbone=micro, seed=s)[0] for s in (0, 1, 0))
    for name in ("text_prompts", "vision_prompts"):
        pa, pb, pa2 = (getattr(m, name).prompts for m in (a, b, a2))
        assert not torch.equal(pa, pb), name
        assert torch.equal(pa, pa2), name


def test_build_model_leaves_the_global_rng_alone():
    import torch

    from dialclip_ray.model.config import DialCLIPConfig
    from dialclip_ray.model.dialclip import build_model

    cfg = DialCLIPConfig(backbone={"model_name": "dialclip-micro"}, context_prompt_length=2, cpg_dim=16, cpg_heads=2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = build_model(cfg, seed=5)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream is where it was
    b, _ = build_model(cfg, seed=5)
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # and init is still seeded
