"""The training config file: model, data, optimisation and run settings, validated.

A YAML/JSON file with four sections. ``model`` takes a ``preset`` name plus any
DialCLIPConfig field as an override, so a Tune sweep's best trial, a baseline
and a hand-written config all have the same shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dialclip_ray import storage
from dialclip_ray.errors import ConfigError, format_validation_error
from dialclip_ray.model.config import DialCLIPConfig, merge_preset


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: list[str] = Field(min_length=1, description="prepared dataset directories (dialclip data prepare)")
    train_split: str = "train"
    val_split: str = "dev"
    test_split: str = "test"
    max_train_examples: int | None = Field(None, ge=1, description="cap per dataset and target type")
    max_val_examples: int | None = Field(None, ge=1)
    loader_workers: int = Field(0, ge=0)
    target_transform: Literal["eval", "train"] = Field(
        "eval", description="image transform of training targets: eval = the backbone's preprocess_val, the one "
        "evaluation and serving use (and our small CLIP was pretrained with); train = open_clip's random resized "
        "crop, which clips shapes and changes apparent size, the cues retrieval depends on")
    features: Literal["auto", "require", "off"] = Field(
        "auto", description="frozen context features: auto = build the feature store when missing or stale "
        "and read it; require = an existing store or an error; off = run the frozen towers every step")
    feature_actors: int = Field(2, ge=1, description="encoder actors that build the feature store (Ray Data pool)")
    feature_gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs each feature-store actor requests (e.g. 1, or 0.5 to share a card); "
        "requested, so an autoscaler adds GPU nodes for them; 0 = CPU actors")


class OptimSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(5, ge=0)
    batch_size: int = Field(32, ge=2, description="per worker; in-batch negatives")
    lr: float = Field(1e-3, gt=0)
    backbone_lr: float = Field(1e-5, gt=0, description="for the finetune variant's CLIP weights")
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    eval_batch_size: int = Field(64, ge=1)
    patience: int | None = Field(
        None, ge=1, description="early stopping: end the run after this many epochs without a better "
        "validation Sum (None = run every epoch); the best epoch's checkpoint is kept either way")
    validate_at_start: bool = Field(
        False, description="validate the model as built before the first epoch and keep that as epoch 0: "
        "when no epoch beats it, the run's best checkpoint is the starting point (for a model that starts "
        "at CLIP, such as prompt_gate or finetune, training then cannot end below zero-shot on validation)")


class RunSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("dialclip", pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: str = Field("runs/train", description="where runs live: a local directory (on a cluster: "
                              "shared by every node), or object storage s3://bucket/prefix, gs://bucket/prefix")
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    amp: Literal["bf16", "fp16", "none"] = "bf16"  # used on GPU only
    seed: int = 0
    max_failures: int = Field(1, ge=0)
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="also checkpoint every N optimizer steps inside an epoch, so a failure "
        "costs at most N steps; a resumed run continues at the next batch of that epoch")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="where the workers go: PACK fills a node first, SPREAD puts them on different nodes")
    example_log: bool = Field(False, description="append each step's example ids to "
                              "<storage>/<name>/example_log/rank<R>.jsonl (audit the data order across resumes)")
    num_to_keep: int | None = Field(None, ge=1, description="checkpoints kept (None = all; they are small)")
    threads_per_worker: int | None = Field(None, ge=1)
    tensorboard: bool = Field(True, description="write TensorBoard event files to <storage>/<name>/tensorboard "
                              "(needs the tensorboard package; per-step metrics go to steps.csv either way)")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: DialCLIPConfig = Field(default_factory=DialCLIPConfig)
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    run: RunSection = Field(default_factory=RunSection)

    @field_validator("model", mode="before")
    @classmethod
    def _apply_preset(cls, value: Any) -> Any:
        return merge_preset(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.model.variant == "zeroshot" and self.optim.epochs:
            # Rejected, not rewritten: the saved config must say what ran (a zero-shot run trains nothing).
            raise ValueError(f"variant 'zeroshot' has nothing to train: set optim.epochs: 0 "
                             f"(got {self.optim.epochs})")
        return self


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Absolute data, storage and local-backbone paths: Ray workers do not share the driver's working directory."""
    cfg.data.train = [str(Path(p).expanduser().resolve()) for p in cfg.data.train]
    if "://" not in cfg.run.storage_path:  # object storage (s3://, gs://) stays as given
        cfg.run.storage_path = str(Path(cfg.run.storage_path).expanduser().resolve())
    pretrained = cfg.model.backbone.pretrained
    if pretrained and Path(pretrained).expanduser().exists():
        cfg.model.backbone.pretrained = str(Path(pretrained).expanduser().resolve())
    return cfg


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML/JSON training config; errors name the file and the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a training config is a mapping with model/data/optim/run sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{path}: invalid training config")) from None


def dump_train_config(cfg: TrainConfig, path: str | Path) -> Path | str:
    """Write ``cfg`` as YAML to a local path (atomically) or an object-store URI."""
    return storage.write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
