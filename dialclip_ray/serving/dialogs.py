"""Validated dialogs -> query embeddings, without Serve (the encoder replica and the benchmark baseline).

A request's context images are corpus image ids (opened through the corpus's safe
loader: root confinement, pixel bound) or inline bytes (opened with a format
whitelist and the same pixel bound). Each request of a batch is prepared on its own,
so one bad image fails its request with a 4xx message and not the whole batch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from dialclip_ray.data.dataset import ExampleRecord, ImageLoader, ReaderConfig, Turn, build_query_batch
from dialclip_ray.data.errors import DataError
from dialclip_ray.data.schema import read_meta
from dialclip_ray.serving.schemas import RetrieveRequest

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class RequestError(ValueError):
    """A problem with the request itself: becomes an HTTP 4xx with this message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.message, self.status = message, status

    def __reduce__(self):
        return (RequestError, (self.message, self.status))


def open_image_bytes(data: bytes, max_pixels: int, where: str) -> Image.Image:
    """Decode untrusted image bytes as RGB: whitelisted formats, pixel count checked from the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            w, h = img.size
            if w <= 0 or h <= 0 or w * h > max_pixels:
                raise RequestError(f"{where}: image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
            img.load()
            return img.convert("RGB")
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(f"{where}: image too large ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise RequestError(f"{where}: not a decodable {'/'.join(IMAGE_FORMATS)} image ({err})") from None


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

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.loaders

    def __call__(self, image_id: str) -> torch.Tensor:
        return self.loaders[image_id](image_id)


class DialogEncoder:
    """A checkpoint's query encoder over validated ``RetrieveRequest`` dialogs."""

    def __init__(self, checkpoint: str, corpus_dirs: Sequence[str], device: str = "cpu",
                 max_image_pixels: int = 16_000_000):
        from dialclip_ray.model.checkpoint import load_checkpoint

        self.model, self.backbone, self.meta = load_checkpoint(checkpoint, device=device)
        self.model.eval()
        self.device = device
        self.reader = ReaderConfig.from_model_config(self.model.cfg)
        self.transform = self.backbone.preprocess_val
        self.max_image_pixels = max_image_pixels
        self.images = CorpusImages(corpus_dirs, self.transform, max_image_pixels)

    @property
    def embed_dim(self) -> int:
        return int(self.model.clip.text_projection.shape[-1])

    def prepare(self, req: RetrieveRequest, tag: str) -> tuple[ExampleRecord, dict[str, torch.Tensor]]:
        """The request as an ExampleRecord whose image ids are keys (prefixed ``tag``) of the returned tensors."""
        tensors: dict[str, torch.Tensor] = {}
        turns = []
        for t, turn in enumerate(req.context):
            keys = []
            for j, image in enumerate(turn.images):
                where = f"context[{t}].images[{j}]"
                if image.id is not None:
                    if image.id not in self.images:
                        raise RequestError(f"{where}.id: unknown corpus image id {image.id!r}")
                    try:
                        x = self.images(image.id)
                    except DataError as err:  # the corpus file itself is bad: a server-side problem
                        raise RequestError(f"{where}.id: corpus image {image.id!r} cannot be read ({err})", 500)
                else:
                    x = self.transform(open_image_bytes(image.data(), self.max_image_pixels, f"{where}.base64"))
                key = f"{tag}#{len(tensors)}"
                tensors[key] = x
                keys.append(key)
            turns.append(Turn(turn.speaker, turn.text, keys))
        record = ExampleRecord(id=tag, source="request", split="test", context=turns, current_text=req.current,
                               target_type=req.target, target_id="")
        return record, tensors

    @torch.no_grad()
    def encode(self, requests: Sequence[RetrieveRequest]) -> list[dict[str, Any]]:
        """One result per request: ``{"embedding": float32 [D]}`` or ``{"error": msg, "status": 4xx}``."""
        results: list[dict[str, Any]] = [{} for _ in requests]
        records, tensors, rows = [], {}, []
        for i, req in enumerate(requests):
            try:
                record, images = self.prepare(req, f"r{i}")
            except RequestError as err:
                results[i] = {"error": err.message, "status": err.status}
                continue
            records.append(record)
            tensors.update(images)
            rows.append(i)
        if records:
            batch = build_query_batch(records, self.backbone.tokenizer, tensors.__getitem__, self.reader)
            emb = self.model.encode_query(batch.to(self.device)).float().cpu().numpy()
            for i, vec in zip(rows, emb):
                results[i] = {"embedding": vec.astype(np.float32)}
        return results
