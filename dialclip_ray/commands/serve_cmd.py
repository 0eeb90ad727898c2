"""``dialclip serve``: run the retrieval app (Ray Serve) for a training run (or checkpoint) and its index."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve top-k dialog retrieval over HTTP (Ray Serve)")
    what = p.add_argument_group("what to serve (a run directory, or an index whose index.json names its checkpoint)")
    what.add_argument("--run", default=None, help="training run directory (serves its best/ checkpoint)")
    what.add_argument("--checkpoint", default=None, help="DialCLIP checkpoint directory (instead of --run)")
    what.add_argument("--index", default=None, help="index directory from `dialclip index build` "
                      "(default with --run: RUN/index)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; the API has no auth)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="dialclip", help="Serve application name")
    p.add_argument("--top-k", type=int, default=10, help="k when a request gives none")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray started when none is running")
    p.add_argument("--blocking", action="store_true",
                   help="stay in the foreground until Ctrl-C (always so with a local Ray, which dies with us)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from dialclip_ray.rundir import RunDirError, resolve_serving
    from dialclip_ray.runtime import ensure_ray, wait_for_interrupt
    from dialclip_ray.serving.app import build_app

    try:  # before Ray starts: a wrong path should cost nothing
        resolve_serving(args.checkpoint, args.run, args.index)
    except (RunDirError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    owns_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    ensure_ray(num_cpus=args.num_cpus)
    app = build_app({"run_dir": args.run, "checkpoint": args.checkpoint, "index_dir": args.index,
                     "use_gpu": args.use_gpu, "top_k": args.top_k})  # refuses a checkpoint/index mismatch
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=args.name, route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    print(f"DialCLIP retrieval is serving at {url}  (POST {url}/v1/retrieve, docs at {url}/docs)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: bound to {args.host}; the API has no authentication")
    if not (args.blocking or owns_ray):
        print(f"Running on the Ray cluster; stop it with `serve delete {args.name}` or `serve shutdown`.")
        return 0
    print("Press Ctrl-C (or send SIGTERM) to stop.")
    wait_for_interrupt()
    serve.delete(args.name)
    if owns_ray:
        serve.shutdown()
    return 0
