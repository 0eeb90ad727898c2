"""Typed settings of the small-CLIP pretraining job.

Every field that changes the trained weights goes into the cache key (see
``run.cache_key``), so two runs share an artifact only when they would train the
same model on the same corpus.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PretrainConfig(BaseModel):
    """One from-scratch open_clip training run on the synthetic captions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = "dialclip-tiny"
    epochs: int = Field(3, ge=1, le=10_000)
    batch_size: int = Field(64, ge=2, description="global batch (split evenly over workers)")
    lr: float = Field(1e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(30, ge=0)
    seed: int = 0
    workers: int = Field(2, ge=1, le=256, description="2x1 thread beat 1x2 threads on the 2-core dev box")
    threads_per_worker: int | None = Field(
        None, ge=1, description="torch threads per worker; None = max(1, cpu cores // workers)")
    use_gpu: bool = False
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    augment: bool = Field(False, description="open_clip's train transform (random resized crop) instead of val")
    cache_images: bool = Field(True, description="keep decoded training images in memory (uint8, ~12 KB per 64 px "
                                                 "image per worker); off: decode each time (speed only)")
    local_loss: bool = Field(True, description="ClipLoss local_loss+gather_with_grad under DDP")
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("test",)
    eval_max_images: int | None = Field(
        1000, ge=1, description="held-out pool: the first N held-out images in file order (the PhotoChat-style "
                                "test photos come first); None = every held-out image")
    eval_batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _batch_divides(self) -> "PretrainConfig":
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by workers={self.workers}")
        if self.batch_size // self.workers < 2:
            raise ValueError("each worker needs at least 2 samples per batch for a contrastive loss")
        if self.train_split in self.eval_splits:
            raise ValueError(f"train_split {self.train_split!r} must not be an eval split {self.eval_splits}")
        return self

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.workers
