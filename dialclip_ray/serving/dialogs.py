"""Validated dialogs -> query embeddings, without Serve (the encoder replica and the benchmark baseline).

A request's context images are corpus image ids (opened through the corpus's safe
loader: root confinement, pixel bound) or inline bytes (opened with a format
whitelist and the same pixel bound). Each request is prepared on its own in three
steps -- ``plan`` (headers only: ids exist, bytes are an image, pixel budgets hold),
``load`` (decode + transform one image; thread-safe), ``assemble`` -- so one bad image
fails its request with a 4xx message naming the field, never the whole batch, and the
encoder replica can run the decoding in threads under a pixel budget.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from dialclip_ray.data.dataset import ExampleRecord, ImageLoader, ReaderConfig, Turn, build_query_batch
from dialclip_ray.data.errors import DataError
from dialclip_ray.data.images import image_size, resolve_image_path
from dialclip_ray.data.schema import read_meta
from dialclip_ray.serving.schemas import RetrieveRequest

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
logger = logging.getLogger("ray.serve")


class RequestError(ValueError):
    """A problem with the request itself: becomes an HTTP 4xx with this message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.message, self.status = message, status

    def __reduce__(self):
        return (RequestError, (self.message, self.status))


def _open_header(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """Open untrusted bytes lazily (header only): whitelisted formats, pixel count within ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(f"{where}: image too large, more than the limit of {max_pixels} pixels ({err})") from None
    except UnidentifiedImageError:
        raise RequestError(f"{where}: not a decodable {'/'.join(IMAGE_FORMATS)} image (unrecognised data)") from None
    except Exception as err:  # Pillow raises many types (struct.error, EOFError, ...) on hostile headers
        raise RequestError(f"{where}: not a decodable {'/'.join(IMAGE_FORMATS)} image "
                           f"({type(err).__name__}: {err})") from None
    w, h = img.size
    if w <= 0 or h <= 0 or w * h > max_pixels:
        raise RequestError(f"{where}: image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    return img


def image_bytes_pixels(data: bytes, max_pixels: int, where: str) -> int:
    """Pixels the image will decode to, read from its header (nothing is decoded)."""
    w, h = _open_header(data, max_pixels, where).size
    return w * h


def open_image_bytes(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """Decode untrusted image bytes as RGB: whitelisted formats, pixel count checked from the header."""
    img = _open_header(data, max_pixels, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(f"{where}: image too large ({err})") from None
    except Exception as err:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError, ...
        raise RequestError(f"{where}: not a decodable {'/'.join(IMAGE_FORMATS)} image "
                           f"({type(err).__name__}: {err})") from None


class CorpusImages:
    """``image_id -> tensor`` over the corpora an index was built from (first corpus holding the id wins)."""

    def __init__(self, corpus_dirs: Sequence[str | Path], transform, max_pixels: int):
        self.loaders: dict[str, ImageLoader] = {}
        for d in corpus_dirs:
            meta = read_meta(d)
            table = pq.read_table(Path(d) / "images.parquet", columns=["image_id", "path"])
            paths = dict(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist()))
            loader = ImageLoader(Path(meta["image_root"]), paths, transform, max_pixels)
            for image_id in paths:
                self.loaders.setdefault(image_id, loader)

        self._lock = threading.Lock()  # the loaders' LRU caches are not thread-safe; decoding runs in threads

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.loaders

    def pixels(self, image_id: str) -> int:
        """Pixels of a corpus image, from its header (path confined to the image root)."""
        loader = self.loaders[image_id]
        path = resolve_image_path(loader.image_root, loader.paths[image_id], record=image_id, field="path")
        w, h = image_size(path, loader.max_pixels, record=image_id, verify=False)
        return w * h

    def __call__(self, image_id: str) -> torch.Tensor:
        with self._lock:
            return self.loaders[image_id](image_id)


@dataclass
class ImageJob:
    """One context image to decode: where it is in the request, its pixel count, its id or its bytes."""

    where: str
    pixels: int
    image_id: str | None = None
    data: bytes | None = None


class DialogEncoder:
    """A checkpoint's query encoder over validated ``RetrieveRequest`` dialogs."""

    def __init__(self, checkpoint: str, corpus_dirs: Sequence[str], device: str = "cpu",
                 max_image_pixels: int = 16_000_000, feature_cache_entries: int = 50_000):
        from dialclip_ray.model.checkpoint import load_checkpoint
        from dialclip_ray.model.feature_cache import FeatureCache

        self.model, self.backbone, self.meta = load_checkpoint(checkpoint, device=device)
        self.model.eval()
        self.device = device
        self.reader = ReaderConfig.from_model_config(self.model.cfg)
        self.transform = self.backbone.preprocess_val
        self.max_image_pixels = max_image_pixels
        self.images = CorpusImages(corpus_dirs, self.transform, max_image_pixels)
        # Frozen turn/image features by content hash: a conversation that grows by one turn costs one
        # new turn encoding. Bounded (entries), so memory stays flat under a stream of distinct dialogs.
        self.feature_cache = FeatureCache(feature_cache_entries)

    @property
    def embed_dim(self) -> int:
        return int(self.model.clip.text_projection.shape[-1])

    def plan(self, req: RetrieveRequest, max_request_pixels: int | None = None) -> list[ImageJob]:
        """The request's images, checked from their headers only (nothing decoded): unknown ids, bytes that
        are no image, and images over the per-image or per-request pixel budget fail here with a
        RequestError naming the field."""
        jobs, total = [], 0
        for t, turn in enumerate(req.context):
            for j, image in enumerate(turn.images):
                where = f"context[{t}].images[{j}]"
                if image.id is not None:
                    where += ".id"
                    if image.id not in self.images:
                        raise RequestError(f"{where}: unknown corpus image id {image.id!r} (the id must exist in "
                                           f"the index's corpora)")
                    try:
                        pixels = self.images.pixels(image.id)
                    except DataError as err:  # the corpus file itself is bad: a server-side problem
                        raise _corpus_error(where, image.id, err) from None
                    jobs.append(ImageJob(where, pixels, image_id=image.id))
                else:
                    where += ".base64"
                    data = image.data()
                    pixels = image_bytes_pixels(data, self.max_image_pixels, where)
                    jobs.append(ImageJob(where, pixels, data=data))
                total += pixels
                if max_request_pixels is not None and total > max_request_pixels:
                    raise RequestError(f"{where}: the request's images decode to more than {max_request_pixels} "
                                       f"pixels (the per-request budget), {total} up to this one")
        return jobs

    def load(self, job: ImageJob) -> torch.Tensor:
        """Decode and transform one planned image (thread-safe)."""
        if job.image_id is not None:
            try:
                return self.images(job.image_id)
            except DataError as err:
                raise _corpus_error(job.where, job.image_id, err) from None
        return self.transform(open_image_bytes(job.data, self.max_image_pixels, job.where))

    def assemble(self, req: RetrieveRequest, tag: str, tensors: Sequence[torch.Tensor]
                 ) -> tuple[ExampleRecord, dict[str, torch.Tensor]]:
        """The request as an ExampleRecord whose image ids are keys (prefixed ``tag``) of the returned tensors,
        ``tensors`` being the loaded images in request order."""
        it = iter(tensors)
        images: dict[str, torch.Tensor] = {}
        turns = []
        for turn in req.context:
            keys = []
            for _ in turn.images:
                key = f"{tag}#{len(images)}"
                images[key] = next(it)
                keys.append(key)
            turns.append(Turn(turn.speaker, turn.text, keys))
        record = ExampleRecord(id=tag, source="request", split="test", context=turns, current_text=req.current,
                               target_type=req.target, target_id="")
        return record, images

    def prepare(self, req: RetrieveRequest, tag: str) -> tuple[ExampleRecord, dict[str, torch.Tensor]]:
        """``plan`` + ``load`` + ``assemble`` in this thread."""
        return self.assemble(req, tag, [self.load(job) for job in self.plan(req)])

    @torch.no_grad()
    def forward(self, prepared: Sequence[tuple[ExampleRecord, dict[str, torch.Tensor]]]) -> list[dict[str, Any]]:
        """One ``encode_query`` over prepared requests: ``{"embedding"}`` each, or ``{"error", "status"}``.

        Should the batch fail, each request is encoded alone, so one request cannot fail the others."""
        try:
            return [{"embedding": v} for v in self._forward(prepared)]
        except Exception as err:
            if len(prepared) == 1:
                logger.exception("query encoding failed")
                return [{"error": f"query encoding failed ({type(err).__name__})", "status": 500}]
        return [self.forward([p])[0] for p in prepared]

    def _forward(self, prepared) -> list[np.ndarray]:
        tensors = {key: x for _, images in prepared for key, x in images.items()}
        batch = build_query_batch([r for r, _ in prepared], self.backbone.tokenizer, tensors.__getitem__, self.reader)
        emb = self.model.encode_query(batch.to(self.device), feature_cache=self.feature_cache)
        return list(emb.float().cpu().numpy().astype(np.float32))

    def encode(self, requests: Sequence[RetrieveRequest]) -> list[dict[str, Any]]:
        """One result per request: ``{"embedding": float32 [D]}`` or ``{"error": msg, "status": 4xx}``."""
        results: list[dict[str, Any]] = [{} for _ in requests]
        prepared, rows = [], []
        for i, req in enumerate(requests):
            try:
                prepared.append(self.prepare(req, f"r{i}"))
            except RequestError as err:
                results[i] = {"error": err.message, "status": err.status}
                continue
            rows.append(i)
        if prepared:
            for i, out in zip(rows, self.forward(prepared)):
                results[i] = out
        return results


def _corpus_error(where: str, image_id: str, err: Exception) -> RequestError:
    logger.error("%s: corpus image %r cannot be read: %s", where, image_id, err)
    return RequestError(f"{where}: corpus image {image_id!r} cannot be read (a server-side data problem)", 500)
