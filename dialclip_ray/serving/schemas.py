"""Request/response models of the retrieval API and the typed arguments of the app builder.

Every limit that protects a replica (turns, text length, images, image bytes) is a
field constraint here, so a bad request is rejected by pydantic in the ingress with a
message naming the field, before any model or index work.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TURNS = 64
MAX_TEXT_CHARS = 4_000
MAX_IMAGES_PER_TURN = 8
MAX_IMAGES = 16
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_B64_CHARS = (MAX_IMAGE_BYTES + 2) // 3 * 4 + 16  # a few bytes of slack for padding/newlines


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageIn(_Strict):
    """A context image: a corpus image id, or an inline image as base64 (PNG/JPEG/WebP)."""

    id: str | None = Field(None, min_length=1, max_length=512, description="image id of the indexed corpus")
    base64: str | None = Field(None, min_length=1, max_length=MAX_B64_CHARS,
                               description=f"base64 image bytes (at most {MAX_IMAGE_BYTES} bytes decoded)")

    @model_validator(mode="after")
    def _one_source(self) -> "ImageIn":
        if (self.id is None) == (self.base64 is None):
            raise ValueError("an image needs exactly one of 'id' or 'base64'")
        return self

    @field_validator("base64")
    @classmethod
    def _decodable(cls, v: str | None) -> str | None:
        if v is not None:
            decode_base64(v)
        return v

    def data(self) -> bytes | None:
        return None if self.base64 is None else decode_base64(self.base64)


def decode_base64(value: str) -> bytes:
    text = value.split(",", 1)[1] if value.startswith("data:") else value  # accept data: URLs
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not valid base64 ({err})") from None
    if not raw:
        raise ValueError("base64 image is empty")
    if len(raw) > MAX_IMAGE_BYTES:
        raise ValueError(f"image is {len(raw)} bytes, more than the limit of {MAX_IMAGE_BYTES}")
    return raw


class TurnIn(_Strict):
    speaker: int = Field(ge=0, le=1_000)
    text: str = Field("", max_length=MAX_TEXT_CHARS)
    images: list[ImageIn] = Field(default_factory=list, max_length=MAX_IMAGES_PER_TURN)


class RetrieveRequest(_Strict):
    context: list[TurnIn] = Field(default_factory=list, max_length=MAX_TURNS,
                                  description="dialog turns, oldest first")
    current: str = Field("", max_length=MAX_TEXT_CHARS, description="the current input (may be empty)")
    k: int | None = Field(None, ge=1, le=100, description="hits to return (default: the app's top_k)")
    target: Literal["image", "text"] = "image"
    allow_partial: bool = Field(False, description="answer with the shards that replied when some time out")
    timeout_ms: int | None = Field(None, ge=1, le=60_000,
                                   description="per-shard deadline, capped by the app's shard_timeout_s")

    @model_validator(mode="after")
    def _not_empty(self) -> "RetrieveRequest":
        if not self.current.strip() and not any(t.text.strip() or t.images for t in self.context):
            raise ValueError("empty dialog: give at least one context turn with text or images, or 'current' text")
        n = sum(len(t.images) for t in self.context)
        if n > MAX_IMAGES:
            raise ValueError(f"{n} context images, more than the limit of {MAX_IMAGES}")
        return self


class Hit(BaseModel):
    id: str
    score: float
    rank: int
    metadata: dict[str, Any]


class RetrieveResponse(BaseModel):
    hits: list[Hit]
    partial: bool
    missing_shards: list[str]
    took_ms: float


class ErrorResponse(BaseModel):
    error: str
    missing_shards: list[str] | None = None


class AutoscalingArgs(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2, gt=0)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingArgs":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} < min_replicas={self.min_replicas}")
        return self


class AppArgs(_Strict):
    """Arguments of ``build_app`` (the ``args`` of a Serve config). Resource defaults fit a 2-core machine;
    a Serve config's ``deployments`` section overrides them per deployment name."""

    checkpoint: str
    index_dir: str
    use_gpu: bool = False
    top_k: int = Field(10, ge=1, le=100, description="k when a request gives none")
    corpus_dirs: list[str] | None = Field(None, description="where corpus image ids resolve (default: index.json)")
    shard_timeout_s: float = Field(5.0, gt=0)
    encoder_timeout_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(16_000_000, ge=1)
    ingress_cpus: float = Field(0.1, gt=0)
    encoder_cpus: float = Field(0.25, gt=0)
    shard_cpus: float = Field(0.1, gt=0)
    encoder_gpus: float = Field(0.5, ge=0, description="used only with use_gpu")
    shard_gpus: float = Field(0.125, ge=0, description="used only with use_gpu (GPU FAISS)")
    encoder_threads: int = Field(1, ge=1)
    shard_threads: int = Field(1, ge=1)
    shard_autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    shard_delay_s: dict[int, float] = Field(default_factory=dict,
                                            description="artificial latency per shard (tests, straggler benchmarks)")
