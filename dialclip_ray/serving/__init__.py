"""Online retrieval with Ray Serve: ingress (FastAPI) -> QueryEncoder (batched) -> Shard{i} (one per shard).

``app.build_app`` is the builder the Serve configs in ``serve/`` name; ``dialogs``
holds the Serve-free encoding logic the replicas and the benchmark baseline share.
"""
