"""Retrieval evaluation: ``metrics`` (protocols, R@k in percent), ``local`` (one process,
the reference and what training validates with) and ``distributed`` (Ray Data actor pool,
equal to ``local`` by test)."""
