"""Joining or starting a Ray cluster the same way from every job entry point."""

from __future__ import annotations

import os


def ensure_ray(num_cpus: int = 2, num_gpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit``), else start a small local one.

    Local clusters get a fixed, small CPU count: on a 2-core machine Ray would otherwise
    size itself from the host and over-subscribe it.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = ray.LoggingConfig(encoding="TEXT", log_level="ERROR")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", logging_config=quiet)
    else:
        # The dashboard hosts the State API that Ray Train V2 uses to clean up placement groups.
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, logging_config=quiet,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
