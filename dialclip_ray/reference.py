"""The config reference (``docs/config-reference.md``), generated from the pydantic models.

The models are the one source of truth for every field, type, default, bound and description;
this renders them, and ``tests/test_reference.py`` fails when the committed file is stale.
Regenerate with ``python -m dialclip_ray.reference > docs/config-reference.md``.
"""

from __future__ import annotations

import sys

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = """# Config reference

Generated from the pydantic models by `python -m dialclip_ray.reference` (do not edit by hand;
`tests/test_reference.py` keeps it in sync). Unknown keys are rejected with the file and the key named.
"""


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None").replace("|", "\\|")


def _default(field) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            value = field.default_factory()
            return "(its section's defaults)" if isinstance(value, BaseModel) else f"`{value!r}`"
        return "**required**"
    return f"`{field.default!r}`"


def _bounds(field) -> str:
    parts = []
    for meta in field.metadata:
        for name, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min length"),
                          ("pattern", "pattern")):
            value = getattr(meta, name, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def _nested(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def model_table(model: type[BaseModel], prefix: str) -> list[str]:
    """Markdown rows (dotted key, type, default, bounds, description) of ``model``; nested models expanded."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        sub = _nested(field.annotation)
        if sub is not None:
            nested.append((f"{prefix}{name}", sub))
            continue
        desc = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | {_default(field)} | {_bounds(field)} "
                    f"| {desc} |")
    for dotted, sub in nested:
        rows += model_table(sub, dotted + ".")
    return rows


def _section(title: str, model: type[BaseModel], prefix: str, intro: str = "") -> list[str]:
    doc = " ".join((model.__doc__ or "").split())
    lines = [f"## {title}", ""]
    if intro or doc:
        lines += [intro or doc, ""]
    lines += ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    return lines + model_table(model, prefix) + [""]


def config_reference() -> str:
    """The whole reference: the training config's sections, then the sweep file's."""
    from dialclip_ray.train.config import DataSection, OptimSection, RunSection
    from dialclip_ray.model.config import DialCLIPConfig
    from dialclip_ray.tuning.space import SweepSpec

    lines = [HEADER, "Training config (`dialclip train --config FILE`): four sections.", ""]
    lines += _section("model", DialCLIPConfig, "model.", "The prompted model; `model.preset` names a preset "
                      "whose fields the other keys override.")
    lines += _section("data", DataSection, "data.", "Prepared datasets (`dialclip data prepare`) and how they are read.")
    lines += _section("optim", OptimSection, "optim.", "Optimisation.")
    lines += _section("run", RunSection, "run.", "Where and how the run executes (Ray Train).")
    lines += _section("sweep file", SweepSpec, "", "A search space (`dialclip tune --space FILE`).")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(config_reference())
