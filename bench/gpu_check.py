"""GPU check (run on a lent GPU machine): CUDA training step with AMP, DialCLIP vs full fine-tuning.

ViT-B-32 (random init; the architecture is what costs), batch 128, 8 context turns and
2 context images per dialog, bf16 autocast. Also re-checks the design invariants on
CUDA: prompts off == open_clip (fp32), frozen backbone bit-identical after AMP steps.
Writes $OUT/gpu_check.json (or bench/results/gpu_check.json).

    python bench/gpu_check.py [--batch 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


from dialclip_ray.model.backbone import load_backbone  # noqa: E402
from dialclip_ray.model.config import BackboneConfig, preset  # noqa: E402
from dialclip_ray.pipelines.costs import synthetic_batch, time_steps  # noqa: E402
from dialclip_ray.model.dialclip import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    bb = load_backbone(args.backbone)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "backbone": args.backbone,
           "batch": args.batch, "amp": "bf16"}

    # invariant 1 on CUDA, fp32
    off, _ = build_model(preset("default", domain_prompt_length=0, context_prompt_length=0,
                                backbone=BackboneConfig(model_name=args.backbone)), backbone=bb)
    off = off.to(dev).eval()
    tokens = bb.tokenizer(["a photo of a red circle", "a dialog about the beach " * 8]).to(dev)
    images = torch.randn(2, 3, bb.image_size, bb.image_size, device=dev)
    with torch.no_grad():
        out["equivalence_text_max_abs"] = float((off.encode_texts(tokens, False) - bb.model.encode_text(tokens)).abs().max())
        out["equivalence_image_max_abs"] = float((off.encode_images(images, False) - bb.model.encode_image(images)).abs().max())
    del off

    batch = synthetic_batch(bb.tokenizer, args.batch, bb.image_size)
    dim = int(bb.model.text_projection.shape[-1])
    stored = synthetic_batch(bb.tokenizer, args.batch, bb.image_size, feature_dim=dim)
    for variant in ("dialclip", "dialclip_feature_store", "finetune"):
        model, _ = build_model(preset("finetune" if variant == "finetune" else "default",
                                      backbone=BackboneConfig(model_name=args.backbone)), backbone=bb)
        model.to(dev)
        frozen = {k: v.clone() for k, v in model.clip.state_dict().items()} if variant != "finetune" else None
        torch.cuda.empty_cache()
        res = time_steps(model, stored if variant == "dialclip_feature_store" else batch, steps=args.steps, amp="bf16")
        if frozen is not None:
            res["frozen_backbone_bit_identical"] = all(torch.equal(v, frozen[k])
                                                       for k, v in model.clip.state_dict().items())
        out[variant] = res
        print(variant, res, flush=True)
        model.cpu()
        del model
        bb.model.requires_grad_(False)
    out["ratio_step_time_dialclip_over_finetune"] = out["dialclip"]["step_ms"] / out["finetune"]["step_ms"]
    out["ratio_step_time_store_dialclip_over_finetune"] = (out["dialclip_feature_store"]["step_ms"]
                                                           / out["finetune"]["step_ms"])
    out["ratio_peak_mem_dialclip_over_finetune"] = out["dialclip"]["peak_mem_mb"] / out["finetune"]["peak_mem_mb"]
    dest = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "gpu_check.json"
    dest.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
