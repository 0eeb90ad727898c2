"""``dialclip model summary``: the trainable-parameter table of a preset on a backbone."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect the DialCLIP model")
    msub = p.add_subparsers(dest="model_command", required=True)
    s = msub.add_parser("summary", help="trainable parameters per component")
    s.add_argument("--backbone", default="ViT-B-32", help="open_clip model name")
    s.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint (default: random init)")
    s.add_argument("--preset", default="default", help="model preset (see dialclip_ray.model.config.PRESETS)")
    s.add_argument("--config", default=None, help="a training config YAML whose `model` section is used instead")
    s.set_defaults(func=summary)


def summary(args: argparse.Namespace) -> int:
    from dialclip_ray.model.config import BackboneConfig, preset
    from dialclip_ray.model.dialclip import build_model
    from dialclip_ray.model.params import parameter_report

    if args.config:
        from dialclip_ray.train.config import load_train_config

        cfg = load_train_config(args.config).model
    else:
        cfg = preset(args.preset, backbone=BackboneConfig(model_name=args.backbone, pretrained=args.pretrained))
    model, _ = build_model(cfg)
    report = parameter_report(model)
    print(f"backbone: {cfg.backbone.model_name} (pretrained={cfg.backbone.pretrained}), "
          f"preset: {args.preset if not args.config else args.config}")
    print(report.table())
    return 0
