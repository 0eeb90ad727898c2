"""Helpers for the tests that serve the app over HTTP on 127.0.0.1."""

from __future__ import annotations

from dialclip_ray.serving.loopback import free_port


def serve_port() -> int:
    """The HTTP port of Serve in this Ray session: the running one's if an earlier module started it,
    else a fresh Serve on a free loopback port."""
    from ray import serve
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client().http_config.port
    except Exception:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        return port
