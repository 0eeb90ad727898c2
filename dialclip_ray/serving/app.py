"""``build_app``: the Serve application builder named by serve/*.yaml (``import_path``).

Checks before anything starts: the index's identity must match the checkpoint
(backbone weights hash and checkpoint digest) and its dimension the model's
embedding size; a mismatch raises here with a message saying what to rebuild,
instead of a running service that returns meaningless neighbours.
"""

from typing import Any

from ray.serve import Application

from dialclip_ray.serving.schemas import AppArgs


def app_info(args: AppArgs, layout, meta: dict) -> dict[str, Any]:
    """What ``GET /v1/info`` shows."""
    return {"model": meta["config"], "backbone": meta["backbone"], "checkpoint": args.checkpoint,
            "index_dir": args.index_dir, "identity": layout.identity, "shards": layout.num_shards,
            "manifests": {t: m.model_dump(mode="json") for t, m in layout.manifests.items()},
            "corpora": layout.info.get("corpora", [])}


def model_embed_dim(model_name: str) -> int | None:
    import open_clip

    from dialclip_ray.model.backbone import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    return None if cfg is None else int(cfg["embed_dim"])


def build_app(args: AppArgs | dict) -> Application:
    from pathlib import Path

    from dialclip_ray.model.checkpoint import read_checkpoint
    from dialclip_ray.index.layout import IndexLayout, IndexMismatchError, check_identity, checkpoint_identity
    from dialclip_ray.serving.encoder import QueryEncoder
    from dialclip_ray.serving.ingress import RetrievalIngress
    from dialclip_ray.serving.shard import IndexShard

    args = AppArgs.model_validate(args if isinstance(args, dict) else args.model_dump())
    args = args.model_copy(update={"checkpoint": str(Path(args.checkpoint).resolve()),
                                   "index_dir": str(Path(args.index_dir).resolve())})
    layout = IndexLayout.load(args.index_dir)
    meta, _ = read_checkpoint(args.checkpoint)
    check_identity(checkpoint_identity(args.checkpoint), layout.identity,
                   f"checkpoint {args.checkpoint} vs index {args.index_dir}")
    dim = model_embed_dim(meta["backbone"]["model_name"])
    if dim is not None and dim != layout.dim:
        raise IndexMismatchError(f"index {args.index_dir} holds {layout.dim}-dim vectors but "
                                 f"{meta['backbone']['model_name']} embeds into {dim} dims")
    corpus_dirs = [str(Path(d).resolve()) for d in (args.corpus_dirs or
                                                     [c["dir"] for c in layout.info.get("corpora", [])])]

    def resources(cpus: float, gpus: float) -> dict:
        return {"num_cpus": cpus, **({"num_gpus": gpus} if args.use_gpu and gpus else {})}

    encoder = QueryEncoder.options(ray_actor_options=resources(args.encoder_cpus, args.encoder_gpus)).bind(
        args.checkpoint, corpus_dirs, layout.identity, layout.dim, args.use_gpu, args.encoder_threads,
        args.max_image_pixels)
    shards = [IndexShard.options(name=f"Shard{i}", ray_actor_options=resources(args.shard_cpus, args.shard_gpus),
                                 autoscaling_config=args.shard_autoscaling.model_dump()).bind(
        args.index_dir, i, layout.identity, args.use_gpu, args.shard_threads, args.shard_delay_s.get(i, 0.0))
        for i in range(layout.num_shards)]
    settings = {"top_k": args.top_k, "shard_timeout_s": args.shard_timeout_s,
                "encoder_timeout_s": args.encoder_timeout_s, "max_body_bytes": args.max_body_bytes}
    return RetrievalIngress.options(ray_actor_options={"num_cpus": args.ingress_cpus}).bind(
        encoder, shards, settings, app_info(args, layout, meta))
