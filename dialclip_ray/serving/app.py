"""``build_app``: the Serve application builder named by serve/*.yaml (``import_path``).

What it serves: a training run directory (its ``best/`` checkpoint) or a checkpoint, plus an index
directory; or an index alone, whose ``index.json`` names its checkpoint (``dialclip_ray.rundir``).
Relative paths resolve against the working directory of the process that builds the app. It binds
one ``Shard{i}`` deployment for every shard the index has, all with the ``shard_*`` options.
``index_dir`` may be a version root (``index.layout``): the app serves the version ``CURRENT``
names and follows it (hot swap); a different checkpoint or shard count needs a redeploy.

Checks before anything starts: the index's identity must match the checkpoint
(backbone weights hash and checkpoint digest) and its dimension the model's
embedding size; a mismatch raises here with a message saying what to rebuild,
instead of a running service that returns meaningless neighbours.
"""

import os
from typing import Any

from ray.serve import Application

from dialclip_ray.serving.schemas import AppArgs


def public_path(path: str, bases: dict[str, str]) -> str:
    """An absolute path as a name that reveals nothing about the server's file system: relative to the
    first of ``bases`` (label -> directory) holding it, e.g. ``index:image/shard-00000.faiss`` or
    ``repo:runs/train/ckpt``, else its last component."""
    p = os.path.normpath(path)
    for label, base in bases.items():
        if base and (p == base or p.startswith(base.rstrip(os.sep) + os.sep)):
            rel = os.path.relpath(p, base)
            return f"{label}:{'' if rel == '.' else rel}"
    return os.path.basename(p.rstrip(os.sep)) or "."


def _strip_paths(value: Any, bases: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _strip_paths(v, bases) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strip_paths(v, bases) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return public_path(value, bases)
    return value


def app_info(args: AppArgs, layout, meta: dict) -> dict[str, Any]:
    """What ``GET /v1/info`` shows: no absolute path of the server (index- or repo-relative names only)."""
    index_dir = os.path.abspath(args.index_dir)
    repo = os.getcwd() if os.getcwd() != os.sep else ""
    bases = {"index": index_dir, "repo": repo}
    info = {"model": meta["config"], "backbone": meta["backbone"], "checkpoint": os.path.abspath(args.checkpoint),
            "index_dir": index_dir, "identity": layout.identity, "shards": layout.num_shards,
            "manifests": {t: m.model_dump(mode="json") for t, m in layout.manifests.items()},
            "corpora": layout.info.get("corpora", [])}
    info = _strip_paths(info, bases)
    info["index_dir"] = public_path(index_dir, {"repo": repo})
    return info


def build_app(args: AppArgs | dict) -> Application:
    from pathlib import Path

    from dialclip_ray.model.backbone import backbone_geometry
    from dialclip_ray.model.checkpoint import read_checkpoint
    from dialclip_ray.index.layout import (IndexLayout, IndexMismatchError, check_identity, checkpoint_identity,
                                           is_version_root)
    from dialclip_ray.serving.encoder import QueryEncoder
    from dialclip_ray.rundir import resolve_serving
    from dialclip_ray.serving.ingress import RetrievalIngress
    from dialclip_ray.serving.shard import IndexShard

    args = AppArgs.model_validate(args if isinstance(args, dict) else args.model_dump())
    checkpoint, index_dir = resolve_serving(args.checkpoint, args.run_dir, args.index_dir)  # relative: to the cwd
    run_dir = str(checkpoint.parent) if args.run_dir else None
    args = args.model_copy(update={"checkpoint": str(checkpoint), "index_dir": str(index_dir), "run_dir": run_dir})
    layout = IndexLayout.load(args.index_dir)  # a version root: the version CURRENT names
    index_root = str(Path(args.index_dir).resolve()) if is_version_root(args.index_dir) else None
    meta, _ = read_checkpoint(args.checkpoint)
    check_identity(checkpoint_identity(args.checkpoint), layout.identity,
                   f"checkpoint {args.checkpoint} vs index {args.index_dir}")
    dim = backbone_geometry(meta["backbone"]["model_name"]).embed_dim
    if dim != layout.dim:
        raise IndexMismatchError(f"index {args.index_dir} holds {layout.dim}-dim vectors but "
                                 f"{meta['backbone']['model_name']} embeds into {dim} dims")
    corpus_dirs = [str(Path(d).resolve()) for d in (args.corpus_dirs or
                                                     [c["dir"] for c in layout.info.get("corpora", [])])]

    def resources(cpus: float, gpus: float) -> dict:
        return {"num_cpus": cpus, **({"num_gpus": gpus} if args.use_gpu and gpus else {})}

    scaling = {"autoscaling_config": args.encoder_autoscaling.model_dump()} if args.encoder_autoscaling else {}
    encoder = QueryEncoder.options(ray_actor_options=resources(args.encoder_cpus, args.encoder_gpus), **scaling).bind(
        args.checkpoint, corpus_dirs, layout.identity, layout.dim, args.use_gpu, args.encoder_threads,
        args.max_image_pixels, args.feature_cache_entries, args.max_request_pixels, args.encoder_pixel_budget,
        args.decode_threads)
    # One deployment per shard of *this* index, all with the same options (a replica holds one shard).
    shards = [IndexShard.options(name=f"Shard{i}", ray_actor_options={
                                     **resources(args.shard_cpus, args.shard_gpus),
                                     **({"resources": args.shard_resources[i]} if i in args.shard_resources else {})},
                                 max_ongoing_requests=args.shard_max_ongoing_requests,
                                 autoscaling_config=args.shard_autoscaling.model_dump()).bind(
        str(layout.directory.resolve()), i, layout.identity, args.use_gpu, args.shard_threads, args.shard_delay_s.get(i, 0.0))
        for i in range(layout.num_shards)]
    settings = {"top_k": args.top_k, "shard_timeout_s": args.shard_timeout_s,
                "encoder_timeout_s": args.encoder_timeout_s, "max_body_bytes": args.max_body_bytes,
                "body_timeout_s": args.body_timeout_s, "body_idle_timeout_s": args.body_idle_timeout_s,
                "cooloff_s": args.cooloff_s, "ready_timeout_s": args.ready_timeout_s,
                "index_poll_s": args.index_poll_s, "admin_token": args.admin_token,
                "index_dir": str(layout.directory.resolve()), "index_root": index_root, "identity": layout.identity}
    ingress_scaling = {"autoscaling_config": args.ingress_autoscaling.model_dump()} if args.ingress_autoscaling else {}
    return RetrievalIngress.options(ray_actor_options={"num_cpus": args.ingress_cpus}, **ingress_scaling).bind(
        encoder, shards, settings, app_info(args, layout, meta))
