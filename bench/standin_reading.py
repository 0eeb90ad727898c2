"""Does the stand-in CLIP know the dialogs' words and read past them? -> bench/results/standin_reading.json

Builds (or reuses from runs/cache) a synthetic corpus and the small CLIP pretrained on its captions,
then measures what design 3.5 asks (dialclip_ray/pretrain/reading.py): token coverage of the test
query windows, the EOT positions of the pretraining text, the reading test (held-out caption alone /
followed by ~40 tokens of chit-chat / preceded by them) and held-out caption-to-image recall.

    python bench/standin_reading.py                       # the demo's stand-in (1,500 dialogs, dialclip-tiny)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dialogs", type=int, default=1500)
    p.add_argument("--model", default="dialclip-tiny")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--caption-images", type=int, default=0)
    p.add_argument("--cache", default=str(REPO / "runs" / "cache"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "standin_reading.json"))
    args = p.parse_args(argv)

    from dialclip_ray.fsio import atomic_write_text
    from dialclip_ray.model.backbone import load_backbone
    from dialclip_ray.pipelines.benchmark import rel
    from dialclip_ray.pipelines.experiments import ensure_corpus, ensure_small_clip
    from dialclip_ray.pretrain.reading import eot_positions, reading_test, token_coverage

    t0 = time.time()
    corpus = ensure_corpus(Path(args.cache), args.dialogs, caption_images=args.caption_images)
    result = ensure_small_clip(corpus, Path(args.cache), args.model, args.epochs)
    pretrain_s = time.time() - t0
    backbone = load_backbone(args.model, str(result.path))
    tok = backbone.tokenizer
    report = {
        "what": "the stand-in CLIP against design 3.5: does it know the dialogs' words and read past them",
        "command": "python bench/" + Path(__file__).name + " " + " ".join(argv if argv is not None else sys.argv[1:]),
        "caption_style": "alttext (dialclip_ray/data/synthetic/alttext.py)",
        "corpus": rel(corpus.raw),
        "checkpoint": rel(result.path),
        "pretrain": {"config": result.meta["config"], "steps": result.meta.get("steps"),
                     "train_s": result.meta.get("train_s"), "cached": result.cached},
        "heldout": result.meta.get("metrics"),
        "token_coverage": {"photochat_test_image": token_coverage(corpus.photochat, corpus.raw, tok),
                           "mmdialog_test_image": token_coverage(corpus.mmdialog, corpus.raw, tok),
                           "mmdialog_test_text": token_coverage(corpus.mmdialog, corpus.raw, tok,
                                                                target_type="text")},
        "eot_positions": eot_positions(corpus.raw, tok),
        "reading_test": reading_test(backbone.model, corpus.raw, backbone.preprocess_val, tok),
        "wall_s": round(time.time() - t0, 1), "corpus_and_pretrain_s": round(pretrain_s, 1),
    }
    import ray

    if ray.is_initialized():
        ray.shutdown()
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    rt = report["reading_test"]
    print(json.dumps({"coverage": {k: round(v["tokens"], 1) for k, v in report["token_coverage"].items()},
                      "eot": report["eot_positions"]["p99"], "alone": rt["alone"],
                      "followed_kept": round(rt["followed_kept"], 2), "preceded_kept": round(rt["preceded_kept"], 2)}))
    print(f"wrote {rel(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
