"""The one owner of how a validation error reads, and the shared configuration error.

Every place that validates user input with pydantic (training configs, sweep
files, index manifests and params, serving requests) reports it the same way:
``<where>: <dotted.loc>: <msg>; <dotted.loc>: <msg>`` -- the file or request
first, then each offending key as a dotted path (list positions as numbers), so
the message names what to fix.
"""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration file (training config, sweep space...) that cannot be read or is invalid."""


def format_validation_error(exc: ValidationError, where: str, root: str = "<root>") -> str:
    """``"<where>: <dotted.loc>: <msg>; ..."`` for every error in ``exc``.

    ``root`` names the location of an error about the whole object (an empty ``loc``),
    e.g. ``"body"`` for a request body.
    """
    parts = []
    for e in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or root
        parts.append(f"{loc}: {e['msg']}")
    return f"{where}: " + "; ".join(parts) if where else "; ".join(parts)
