"""Shared fixtures: one Ray cluster per test session (each init costs seconds on 2 cores)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import torch  # noqa: E402

torch.set_num_threads(2)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with a small fixed CPU count, shut down at the end."""
    import ray

    from dialclip_ray.serving.loopback import free_port

    if not ray.is_initialized():
        # The dashboard hosts the State API, which Ray Train V2 needs to clean up placement groups of
        # trainers stopped early (ASHA); without it their CPUs leak. Metrics: Prometheus text on a free
        # loopback port (``ray.metrics_port``), exported every second so a test sees them quickly.
        port = free_port()
        ray.init(num_cpus=4, include_dashboard=True, dashboard_port=0, log_to_driver=False,
                 _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000},
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_metrics_url(ray_cluster) -> str:
    """Where this node's metrics agent serves Ray's Prometheus export (the port ray.init was given)."""
    port = ray_cluster._private.worker._global_node.metrics_export_port
    return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="session")
def photochat_sample_dir() -> str:
    path = os.path.abspath(os.path.join(SHARED, "data", "photochat-sample"))
    if not os.path.isdir(path):
        pytest.skip("../shared/data/photochat-sample is not present")
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A tiny synthetic corpus in the real file formats, prepared through the real loaders (32 px images)."""
    from types import SimpleNamespace

    from dialclip_ray.data.prepare import prepare
    from dialclip_ray.data.synthetic import generate

    root = tmp_path_factory.mktemp("corpus")
    raw = root / "raw"
    generate(raw, dialogs=60, seed=1, image_size=32, progress=False)
    prepare("photochat", raw / "photochat", raw / "photochat_images", root / "photochat", progress=False)
    prepare("mmdialog", raw / "mmdialog", None, root / "mmdialog", progress=False)
    return SimpleNamespace(raw=raw, photochat=root / "photochat", mmdialog=root / "mmdialog")
