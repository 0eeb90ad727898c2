"""The sweep file: which training config to start from, what to vary, how to search.

Every swept parameter is a DialCLIPConfig field (``context_prompt_length``,
``insertion_layer``, ``num_experts``, ``domain_prompt_length``,
``domain_prompt_depth``, ...) or an ``optim`` field (``lr``, ``batch_size``).
Layer indices are checked against the backbone's depth before any trial runs,
and every error names the key that is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dialclip_ray.errors import ConfigError, format_validation_error
from dialclip_ray.model.config import DialCLIPConfig
from dialclip_ray.train.config import TrainConfig, load_train_config

MODEL_KEYS = set(DialCLIPConfig.model_fields) - {"backbone", "variant", "task_words"}
OPTIM_KEYS = {"lr", "batch_size", "weight_decay", "warmup_steps"}


class Dist(BaseModel):
    """One parameter's distribution: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Dist":
        given = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice/grid/uniform/loguniform/randint, got {given or 'none'}")
        return self

    def values(self) -> list[Any] | None:
        """The discrete values, if any (for bounds checks)."""
        return self.choice or self.grid or (list(range(self.randint[0], self.randint[1])) if self.randint else None)

    def to_tune(self):
        from ray import tune

        if self.choice is not None:
            return tune.choice(self.choice)
        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(*self.randint)


class Scheduler(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_config: str = Field(description="training config file the trials start from (relative to this file)")
    search: Literal["random", "grid", "optuna"] = "random"
    samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    epochs: int = Field(3, ge=1, description="max epochs per trial (ASHA's max_t)")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    params: dict[str, Dist] = Field(min_length=1)

    @model_validator(mode="after")
    def _keys(self) -> "SweepSpec":
        for key in self.params:
            if key not in MODEL_KEYS | OPTIM_KEYS:
                raise ValueError(f"params.{key}: not a sweepable parameter; known: "
                                 f"{', '.join(sorted(MODEL_KEYS | OPTIM_KEYS))}")
        if self.search == "grid" and any(d.grid is None and d.choice is None for d in self.params.values()):
            raise ValueError("search: grid needs `grid:` or `choice:` lists for every parameter")
        return self


class SpaceError(ConfigError):
    """An unreadable or invalid sweep file (a ``ConfigError``)."""


def load_space(path: str | Path) -> tuple[SweepSpec, TrainConfig]:
    """Read and validate a sweep file and its base training config; errors name the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
        spec = SweepSpec.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise SpaceError(f"{path}: cannot read search space: {exc}") from None
    except ValidationError as exc:
        raise SpaceError(format_validation_error(exc, f"{path}: invalid search space")) from None
    base_path = (path.parent / spec.base_config) if not Path(spec.base_config).is_absolute() else Path(spec.base_config)
    try:
        base = load_train_config(base_path)
    except ConfigError as exc:
        raise SpaceError(f"{path}: base_config: {exc}") from None
    _check_bounds(path, spec, base)
    return spec, base


def _check_bounds(path: Path, spec: SweepSpec, base: TrainConfig) -> None:
    """Every discrete value must make a valid config on this backbone (e.g. an existing insertion layer)."""
    from dialclip_ray.model.backbone import UnsupportedBackboneError, backbone_geometry

    try:
        geometry = backbone_geometry(base.model.backbone.model_name)
    except UnsupportedBackboneError as exc:
        raise SpaceError(f"{path}: base_config: model.backbone.model_name: {exc}") from None
    for key, dist in spec.params.items():
        for value in dist.values() or []:
            where = f"{path}: params.{key}: value {value!r} is invalid"
            try:
                trial = apply_params(base, {key: value})
                trial.model.check_backbone_depth(geometry.text_layers, geometry.vision_layers)
            except ValidationError as exc:
                raise SpaceError(format_validation_error(exc, where)) from None
            except ValueError as exc:
                raise SpaceError(f"{where}: {exc}") from None


def apply_params(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The base training config with a trial's parameters applied (validated)."""
    raw = base.model_dump(mode="json")
    for key, value in params.items():
        section = "optim" if key in OPTIM_KEYS and key not in MODEL_KEYS else "model"
        raw[section][key] = value
    return TrainConfig.model_validate(raw)


