"""Request/response models of the retrieval API and the typed arguments of the app builder.

Every limit that protects a replica (turns, text length, images, image bytes) is a
field constraint here, so a bad request is rejected by pydantic in the ingress with a
message naming the field, before any model or index work.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

MAX_TURNS = 64
MAX_TEXT_CHARS = 4_000
MAX_IMAGES_PER_TURN = 8
MAX_IMAGES = 16
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_B64_CHARS = (MAX_IMAGE_BYTES + 2) // 3 * 4 + len("data:image/jpeg;base64,")  # the image-size limit
MAX_ID_CHARS = 512
MAX_BATCH = 16  # dialogs per /v1/retrieve/batch body (the body's byte cap applies too)
# The smallest per-request deadline, meant to be one an idle service always meets. NOT YET MEASURED:
# 100 ms is a chosen floor (issue 21 suggests 50-100 ms); confirm it with the idle shard round-trip p99.9.
MIN_TIMEOUT_MS = 100
MAX_NPROBE = 65_536
MAX_EF_SEARCH = 4_096
# Standard base64 (RFC 4648, padded, no whitespace), optionally as a data: URL of an accepted format.
# The rust regex engine pydantic uses anchors ``$`` at the very end (no trailing newline).
B64_PATTERN = (r"^(?:data:image/(?:png|jpeg|webp);base64,)?"
               r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$")
NONBLANK = r"\S"  # "has text": the same rule for the server (re.search) and the schema (pattern)
_NONBLANK = re.compile(NONBLANK)


def has_text(value: str) -> bool:
    return _NONBLANK.search(value) is not None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: any number without a fractional part (``3``, ``3.0``, ``3e2``), never a bool or
    a string; what is left (``3.5``, ``"3"``, ``true``) fails the strict int check with pydantic's message."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(**bounds: int) -> Any:
    """An ``int`` field type with bounds (ge/le) that accepts integral JSON numbers (see ``_json_integer``)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_integer)]


class _StrictRequest(BaseModel):
    """Request models: no extra keys and no type coercion, so the server accepts exactly what the schema says."""

    model_config = ConfigDict(extra="forbid", strict=True)


# Exactly one of ``id`` / ``base64``: a oneOf in the schema; neither field is nullable, and
# the model validator enforces the same rule with a message naming both fields.
_IMAGE_SCHEMA = {"oneOf": [{"required": ["id"], "title": "corpus image"},
                           {"required": ["base64"], "title": "inline image"}]}


def _no_default(schema: dict) -> None:
    schema.pop("default", None)  # absent, never null: the field's schema shows only strings


class ImageIn(_StrictRequest):
    """A context image: exactly one of ``id`` (an image of the index's corpora) or ``base64`` (inline bytes)."""

    model_config = ConfigDict(json_schema_extra=_IMAGE_SCHEMA)

    id: str = Field(None, min_length=1, max_length=MAX_ID_CHARS, json_schema_extra=_no_default,
                    description="image id of the corpora the index was built from; the id must exist in the "
                                "index's corpora (an unknown id is answered 422)")
    base64: str = Field(None, min_length=4, max_length=MAX_B64_CHARS, pattern=B64_PATTERN,
                        json_schema_extra=_no_default,
                        description=f"standard padded base64 (or a data:image/png|jpeg|webp;base64, URL) of a "
                                    f"PNG, JPEG or WebP image of at most {MAX_IMAGE_BYTES} bytes (the maxLength); "
                                    f"its pixels count against the per-image and per-request pixel budgets (422 "
                                    f"when over, or when the bytes are not a decodable image)")

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
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not valid base64 ({err})") from None
    if not raw:
        raise ValueError("base64 image is empty")
    return raw  # its size is bounded by the field's max_length


class TurnIn(_StrictRequest):
    speaker: json_int(ge=0, le=1_000)
    text: str = Field("", max_length=MAX_TEXT_CHARS)
    images: list[ImageIn] = Field(default_factory=list, max_length=MAX_IMAGES_PER_TURN,
                                  description=f"at most {MAX_IMAGES_PER_TURN} per turn and {MAX_IMAGES} in the "
                                              f"whole request")


# The dialog is not empty: 'current' has non-blank text, or some context turn has text or images.
_NOT_EMPTY_SCHEMA = {"anyOf": [
    {"required": ["current"], "properties": {"current": {"pattern": NONBLANK}}},
    {"required": ["context"], "properties": {"context": {"contains": {"anyOf": [
        {"required": ["text"], "properties": {"text": {"pattern": NONBLANK}}},
        {"required": ["images"], "properties": {"images": {"minItems": 1}}}]}}}}]}


class RetrieveRequest(_StrictRequest):
    """A dialog: at least one context turn with text or images, or non-blank ``current`` text."""

    model_config = ConfigDict(json_schema_extra=_NOT_EMPTY_SCHEMA)

    context: list[TurnIn] = Field(default_factory=list, max_length=MAX_TURNS,
                                  description=f"dialog turns, oldest first (at most {MAX_TURNS} turns and "
                                              f"{MAX_IMAGES} images in all)")
    current: str = Field("", max_length=MAX_TEXT_CHARS, description="the current input (may be empty)")
    k: json_int(ge=1, le=100) | None = Field(None, description="hits to return (default: the app's top_k)")
    target: Literal["image", "text"] = "image"
    allow_partial: bool = Field(False, description="answer with the shards that replied when some time out "
                                                   "or are down")
    timeout_ms: json_int(ge=MIN_TIMEOUT_MS, le=60_000) | None = Field(
        None, description=f"per-shard deadline in ms (at least {MIN_TIMEOUT_MS}: an idle service always meets "
                          f"it), capped by the app's shard_timeout_s; a shard that misses it is a 504 naming it "
                          f"(or partial results with allow_partial)")
    nprobe: json_int(ge=1, le=MAX_NPROBE) | None = Field(
        None, description="IVF lists visited per shard for this request (more: higher recall, slower); must lie "
                          "within the bounds the index records (GET /v1/info: manifests.<target>.search), else 422")
    ef_search: json_int(ge=1, le=MAX_EF_SEARCH) | None = Field(
        None, description="HNSW efSearch for this request; within the index's recorded bounds, else 422")

    @model_validator(mode="after")
    def _not_empty(self) -> "RetrieveRequest":
        if not has_text(self.current) and not any(has_text(t.text) or t.images for t in self.context):
            raise ValueError("empty dialog: give at least one context turn with text or images, or 'current' text")
        n = sum(len(t.images) for t in self.context)
        if n > MAX_IMAGES:
            raise ValueError(f"context: {n} images in all, more than the limit of {MAX_IMAGES} per request")
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
    index_version: str = Field(description="index_id of the index version every hit came from")


class ErrorResponse(BaseModel):
    error: str
    missing_shards: list[str] | None = None


class BatchRequest(_StrictRequest):
    """Several dialogs in one body: each is validated as a ``RetrieveRequest`` and answered on its own."""

    requests: list[RetrieveRequest] = Field(min_length=1, max_length=MAX_BATCH,
                                            description=f"1..{MAX_BATCH} dialogs (the body's byte cap applies)")


class BatchItem(BaseModel):
    """One dialog's answer: ``status`` as /v1/retrieve would give it, with its response or its error."""

    status: int
    response: RetrieveResponse | None = None
    error: ErrorResponse | None = None


class BatchResponse(BaseModel):
    responses: list[BatchItem]
    took_ms: float
    index_version: str


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    index_version: str


class SwapRequest(_StrictRequest):
    """Admin: serve another version of the app's version root (a directory name under it)."""

    version: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class AutoscalingArgs(_Strict):
    """Serve's autoscaling_config for one deployment (the delays are Serve's defaults)."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0, description="load above target this long before adding a replica")
    downscale_delay_s: float = Field(600.0, ge=0, description="load below target this long before removing one")

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingArgs":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} < min_replicas={self.min_replicas}")
        return self


class AppArgs(_Strict):
    """Arguments of ``build_app`` (the ``args`` of a Serve config). Resource defaults fit a 2-core machine.

    What to serve (``dialclip_ray.rundir``): ``run_dir`` (a training run; its ``best/`` checkpoint) or
    ``checkpoint``, plus ``index_dir``; or ``index_dir`` alone (its ``index.json`` names the checkpoint).
    Relative paths resolve against the working directory. One deployment per index shard
    (``Shard0``..``ShardN-1``, N from the index) gets the ``shard_*`` options; a Serve config's
    ``deployments`` section may still override ``QueryEncoder`` and ``RetrievalIngress`` by name."""

    run_dir: str | None = Field(None, description="training run directory (serves <run_dir>/best)")
    checkpoint: str | None = Field(None, description="DialCLIP checkpoint directory (or a run directory)")
    index_dir: str | None = Field(None, description="index from `dialclip index build` (default: <run_dir>/index)")
    use_gpu: bool = False
    top_k: int = Field(10, ge=1, le=100, description="k when a request gives none")
    corpus_dirs: list[str] | None = Field(None, description="where corpus image ids resolve (default: index.json)")
    shard_timeout_s: float = Field(5.0, gt=0)
    encoder_timeout_s: float = Field(30.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(16_000_000, ge=1, description="pixels of one context image (from its header)")
    max_request_pixels: int = Field(32_000_000, ge=1, description="decoded pixels of all of a request's images")
    encoder_pixel_budget: int = Field(64_000_000, ge=1, description="decoded pixels in flight per QueryEncoder "
                                      "replica; requests over it wait their turn")
    decode_threads: int = Field(2, ge=1, description="image-decoding threads per QueryEncoder replica")
    body_timeout_s: float = Field(30.0, gt=0, description="whole request body must arrive within this (else 408)")
    body_idle_timeout_s: float = Field(5.0, gt=0, description="longest pause between body chunks (else 408)")
    cooloff_s: float = Field(2.0, gt=0, description="a shard or encoder whose call failed is skipped (fast 503 "
                             "or partial results) and probed again every cooloff_s until it answers")
    ready_timeout_s: float = Field(2.0, gt=0, description="/readyz: how long the encoder and each shard have to "
                                   "answer a ping")
    index_poll_s: float = Field(1.0, gt=0, description="with a version root as index_dir: how often each ingress "
                                "replica reads ROOT/CURRENT (a new version is pre-loaded, then served)")
    admin_token: str | None = Field(None, min_length=16, description="bearer token of POST /admin/index (hot "
                                    "swap); default: the DIALCLIP_ADMIN_TOKEN environment variable of the "
                                    "ingress replica; neither set: the route answers 404")
    ingress_cpus: float = Field(0.1, gt=0)
    encoder_cpus: float = Field(0.25, gt=0)
    shard_cpus: float = Field(0.1, gt=0)
    encoder_gpus: float = Field(0.5, ge=0, description="used only with use_gpu")
    shard_gpus: float = Field(0.125, ge=0, description="used only with use_gpu (GPU FAISS)")
    encoder_threads: int = Field(1, ge=1)
    feature_cache_entries: int = Field(50_000, ge=0, description="LRU of frozen context features in the "
                                       "query encoder (entries of one embedding each; 0 = off)")
    shard_threads: int = Field(1, ge=1)
    shard_max_ongoing_requests: int = Field(8, ge=1, description="per shard replica")
    shard_autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    encoder_autoscaling: AutoscalingArgs | None = Field(
        None, description="QueryEncoder autoscaling (None: one replica, or what the Serve config's "
        "deployments section says)")
    ingress_autoscaling: AutoscalingArgs | None = Field(
        None, description="RetrievalIngress autoscaling (None: one replica, or what the Serve config's "
        "deployments section says)")
    shard_resources: dict[int, dict[str, float]] = Field(
        default_factory=dict, description="extra Ray resources per shard index, e.g. {1: {node_b: 0.01}} to "
        "place Shard1 on the node that offers the custom resource node_b")
    shard_delay_s: dict[int, float] = Field(default_factory=dict,
                                            description="artificial latency per shard (tests, straggler benchmarks)")

    @model_validator(mode="after")
    def _shard_load(self) -> "AppArgs":
        if self.shard_autoscaling.target_ongoing_requests >= self.shard_max_ongoing_requests:
            raise ValueError(f"shard_autoscaling.target_ongoing_requests={self.shard_autoscaling.target_ongoing_requests}"
                             f" must be below shard_max_ongoing_requests={self.shard_max_ongoing_requests}")
        return self
