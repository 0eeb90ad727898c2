"""Shared by jobs/*.py: run one `dialclip` command as a Ray job entry point.

`ray job submit --working-dir . -- python jobs/<x>.py ...` runs `python` as the head node's PATH finds
it, in the uploaded copy of the repository. The package is imported from that copy (as Ray's workers
do); a Python that lacks the project's dependencies gets a message naming it and the fix.
"""

import os
import sys


def run(command: list[str]) -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        import ray  # noqa: F401
        import torch  # noqa: F401

        from dialclip_ray.cli import main
    except ModuleNotFoundError as exc:
        sys.stderr.write(
            f"error: the job's Python ({sys.executable}) cannot import {exc.name!r}. `ray job submit` runs the "
            "entry point with the PATH of the head node's `ray start`: start the head from the project's venv "
            "(source .venv/bin/activate && ray start --head), or name the venv's python in the entry point "
            "(-- /path/to/.venv/bin/python jobs/...), or pass --runtime-env-json '{\"env_vars\": {\"PATH\": "
            "\"/path/to/.venv/bin:/usr/bin:/bin\"}}'.\n")
        return 3
    if command[0] in ("train", "tune", "pretrain"):
        pin_cluster_address()
    return main([*command, *sys.argv[1:]])


def pin_cluster_address() -> None:
    """Give every worker of this job the cluster's address (Ray sets it for the entry point only).

    Ray Train V2's placement-group cleaner runs inside the job's actors and looks the cluster up by
    address; with no RAY_ADDRESS there and a second Ray instance on the same machine it fails
    ("Found multiple active Ray instances") and trainers stopped early (ASHA) keep their CPUs, so
    later trials wait forever. Connecting here with RAY_ADDRESS in the job's env_vars (merged into
    the submitted runtime env) avoids it; on a cluster with one Ray per node it changes nothing.
    """
    import json

    import ray

    address = os.environ.get("RAY_ADDRESS")
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    given = ((job.get("runtime_env") or {}).get("env_vars") or {}).get("RAY_ADDRESS")
    if not address or not job or given or ray.is_initialized():
        return
    ray.init(address=address, runtime_env={"env_vars": {"RAY_ADDRESS": address}},
             logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"))
