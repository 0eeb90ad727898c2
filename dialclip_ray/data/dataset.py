"""Reading the canonical dataset dir into plain records and tensor batches.

``CanonicalDataset`` is the one reader of ``examples/images/texts.parquet`` (examples may
also be a directory of shards, ``examples/part-*.parquet``: see ``data/layout.py``);
``build_query_batch`` turns records into the ``QueryBatch`` layout of
``dialclip_ray/batch.py``. Dialogs differ in turn and image counts, so turns and
images are padded per batch with masks; a batch always has T >= 1 and M >= 1 so
shapes stay valid when no dialog has a turn or an image (all masks False).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dialclip_ray.model.batch import MAX_SPEAKERS, TARGET_TYPES, QueryBatch, TrainBatch, retrieval_type_index
from dialclip_ray.model.text import tokenize_dialog, tokenize_texts
from dialclip_ray.data.errors import DataError
from dialclip_ray.data.images import DEFAULT_MAX_PIXELS, open_image, resolve_image_path
from dialclip_ray.data.layout import examples_files, read_examples
from dialclip_ray.data.schema import EXAMPLES_SCHEMA, SPLITS, read_meta


class ContextFeatures(Protocol):
    """Frozen features of context turns and images, looked up by text and image id.

    ``features.store.FeatureStore`` implements it; the data layer names only this protocol, so it
    never imports the feature store (which is built on top of the data layer).
    """

    @property
    def dim(self) -> int: ...

    def turns(self, texts: Sequence[str]) -> Any: ...

    def images(self, image_ids: Sequence[str]) -> Any: ...


@dataclass
class ReaderConfig:
    context_length: int = 77
    max_context_turns: int = 16      # newest turns kept for the context prompt generator
    max_context_images: int = 4      # newest context images kept
    query_turns: int = 0             # newest turns in the query text window; 0 = as many as fit
    image_size: int = 224            # image tensor size used when a batch holds no image at all

    def __post_init__(self) -> None:
        if self.context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {self.context_length}")
        if self.max_context_turns < 1:
            raise ValueError(f"max_context_turns must be >= 1, got {self.max_context_turns}")
        for name in ("max_context_images", "query_turns"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")

    @classmethod
    def from_model_config(cls, cfg: Any) -> "ReaderConfig":
        """Reader settings of a DialCLIPConfig; context length and image size from ``backbone_geometry``."""
        from dialclip_ray.model.backbone import backbone_geometry

        geometry = backbone_geometry(cfg.backbone.model_name)
        return cls(context_length=geometry.context_length, max_context_turns=cfg.max_context_turns,
                   max_context_images=cfg.max_context_images, query_turns=cfg.query_turns,
                   image_size=geometry.image_size)


@dataclass
class Turn:
    speaker: int
    text: str
    image_ids: list[str] = field(default_factory=list)


@dataclass
class ExampleRecord:
    id: str
    source: str
    split: str
    context: list[Turn]
    current_text: str
    target_type: str
    target_id: str
    candidates: list[str] | None = None
    target_text: str | None = None  # filled by CanonicalDataset for text targets (collate_train needs it)

    @classmethod
    def from_row(cls, row: dict, target_text: str | None = None) -> "ExampleRecord":
        return cls(id=row["id"], source=row["source"], split=row["split"],
                   context=[Turn(int(t["speaker"]), t["text"], list(t["image_ids"] or ())) for t in row["context"]],
                   current_text=row["current_text"] or "", target_type=row["target_type"],
                   target_id=row["target_id"], candidates=None if row["candidates"] is None else
                   list(row["candidates"]), target_text=target_text)


class CanonicalDataset:
    """A prepared dataset dir: examples by split, the image table (paths under ``image_root``) and texts."""

    def __init__(self, directory: Path, meta: dict, examples: pa.Table, images: pa.Table, texts: pa.Table):
        self.directory = directory
        self.meta = meta
        self.image_root = Path(meta["image_root"])
        self._examples = examples
        self._paths: dict[str, str] = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))
        self._texts: dict[str, str] = dict(zip(texts.column("text_id").to_pylist(), texts.column("text").to_pylist()))
        self._cache: dict[tuple[str, str | None], list[ExampleRecord]] = {}

    @classmethod
    def load(cls, directory: str | Path) -> "CanonicalDataset":
        directory = Path(directory)
        meta = read_meta(directory)
        tables = {name: pq.read_table(directory / f"{name}.parquet") for name in ("images", "texts")}
        return cls(directory, meta, read_examples(directory), tables["images"], tables["texts"])

    @property
    def source(self) -> str:
        return self.meta.get("source", "")

    def splits(self) -> list[str]:
        present = set(self._examples.column("split").to_pylist())
        return [s for s in SPLITS if s in present]

    def _rows(self, split: str, target_type: str | None) -> pa.Table:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if target_type is not None and target_type not in TARGET_TYPES:
            raise ValueError(f"target_type must be one of {TARGET_TYPES} or None, got {target_type!r}")
        mask = pc.equal(self._examples.column("split"), split)
        if target_type is not None:
            mask = pc.and_(mask, pc.equal(self._examples.column("target_type"), target_type))
        return self._examples.filter(mask)

    def examples(self, split: str, target_type: str | None = None) -> list[ExampleRecord]:
        key = (split, target_type)
        if key not in self._cache:
            self._cache[key] = [ExampleRecord.from_row(r, self._texts.get(r["target_id"]) if r["target_type"] == "text"
                                                       else None) for r in self._rows(split, target_type).to_pylist()]
        return self._cache[key]

    def _target_ids(self, split: str, target_type: str) -> list[str]:
        return list(dict.fromkeys(self._rows(split, target_type).column("target_id").to_pylist()))

    def image_ids(self, split: str) -> list[str]:
        """Candidate pool of a split (PhotoChat protocol): every image that is a target in the split."""
        return self._target_ids(split, "image")

    def text_ids(self, split: str) -> list[str]:
        return self._target_ids(split, "text")

    def has_image(self, image_id: str) -> bool:
        return image_id in self._paths

    def image_path(self, image_id: str) -> Path:
        if image_id not in self._paths:
            raise KeyError(f"image {image_id!r} is not in {self.directory / 'images.parquet'}")
        return resolve_image_path(self.image_root, self._paths[image_id], record=image_id, field="path")

    def text(self, text_id: str) -> str:
        if text_id not in self._texts:
            raise KeyError(f"text {text_id!r} is not in {self.directory / 'texts.parquet'}")
        return self._texts[text_id]

    def __repr__(self) -> str:
        return f"CanonicalDataset({str(self.directory)!r}, {self._examples.num_rows} examples)"


class ImageLoader:
    """``image_id -> tensor``: safe open (root confinement, pixel bound), LRU cache of decoded images, transform.

    The decoded RGB image is cached, not the tensor, so random training augmentations stay random.
    Picklable (DataLoader workers): holds only paths, the transform and settings.
    """

    def __init__(self, image_root: Path, paths: dict[str, str], transform: Callable, max_pixels: int,
                 cache_size: int = 256):
        self.image_root, self.paths, self.transform = Path(image_root), paths, transform
        self.max_pixels, self.cache_size = max_pixels, cache_size
        self._cache: OrderedDict = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}

    def __call__(self, image_id: str) -> torch.Tensor:
        img = self._cache.get(image_id)
        if img is None:
            if image_id not in self.paths:
                raise DataError("images.parquet", image_id, "image_id", "unknown image id", kind="image_missing")
            path = resolve_image_path(self.image_root, self.paths[image_id], record=image_id, field="path")
            img = open_image(path, self.max_pixels, record=image_id, field="path")
            if self.cache_size:
                self._cache[image_id] = img
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(image_id)
        return self.transform(img)


def image_loader(dataset: CanonicalDataset, transform: Callable, max_pixels: int | None = None,
                 cache_size: int = 256) -> ImageLoader:
    """A safe, cached ``load_image(image_id) -> Tensor`` for ``dataset``."""
    return ImageLoader(dataset.image_root, dataset._paths, transform,
                       max_pixels or int(dataset.meta.get("max_pixels", DEFAULT_MAX_PIXELS)), cache_size)


def build_query_batch(records: Sequence[ExampleRecord], tokenizer: Any, load_image: Callable[[str], torch.Tensor],
                      cfg: ReaderConfig, features: ContextFeatures | None = None) -> QueryBatch:
    """Tensors for the query side of ``records`` (see ``dialclip_ray/model/batch.py`` for the layout).

    With a feature store the context turns and images come as frozen features and no context
    image is decoded (``images`` is a [B, M, 1] stub): the cost of the CPG's inputs is paid once.
    """
    if not records:
        raise ValueError("build_query_batch needs at least one record")
    L = cfg.context_length
    kept = [r.context[-cfg.max_context_turns:] for r in records]
    imgs = []
    for turns in kept:
        pairs = [(t, i) for t, turn in enumerate(turns) for i in turn.image_ids]
        imgs.append(pairs[len(pairs) - cfg.max_context_images:] if cfg.max_context_images else [])
    B, T, M = len(records), max(1, *(len(k) for k in kept)), max(1, *(len(p) for p in imgs))

    query = torch.stack([
        tokenize_dialog(tokenizer, [t.text for t in (r.context[-cfg.query_turns:] if cfg.query_turns else r.context)]
                        + [r.current_text], L) for r in records])
    turn_tokens = torch.zeros(B, T, L, dtype=torch.long)
    turn_mask = torch.zeros(B, T, dtype=torch.bool)
    turn_speaker = torch.zeros(B, T, dtype=torch.long)
    flat = [t.text for turns in kept for t in turns]
    tokens = tokenize_texts(tokenizer, flat, L) if flat else None
    n = 0
    for b, turns in enumerate(kept):
        for t, turn in enumerate(turns):
            turn_tokens[b, t] = tokens[n]
            n += 1
            turn_mask[b, t] = True
            turn_speaker[b, t] = min(max(int(turn.speaker), 0), MAX_SPEAKERS - 1)

    rtype = torch.tensor([retrieval_type_index(r.target_type) for r in records], dtype=torch.long)
    if features is not None:
        return _with_features(features, kept, imgs, (query, turn_tokens, turn_mask, turn_speaker), rtype, M)
    loaded = [[load_image(i) for _, i in pairs] for pairs in imgs]
    first = next((x for row in loaded for x in row), None)
    shape = tuple(first.shape) if first is not None else (3, cfg.image_size, cfg.image_size)
    images = torch.zeros(B, M, *shape)
    image_mask = torch.zeros(B, M, dtype=torch.bool)
    image_turn = torch.zeros(B, M, dtype=torch.long)
    for b, (pairs, row) in enumerate(zip(imgs, loaded)):
        for m, ((t, image_id), x) in enumerate(zip(pairs, row)):
            if tuple(x.shape) != shape:
                raise ValueError(f"image {image_id!r} has tensor shape {tuple(x.shape)}, expected {shape}: "
                                 f"the transform must give one size")
            images[b, m], image_mask[b, m], image_turn[b, m] = x, True, t
    return QueryBatch(query, turn_tokens, turn_mask, turn_speaker, images, image_mask, image_turn, rtype)


def _with_features(store: ContextFeatures, kept: list, imgs: list, text_part: tuple, rtype: torch.Tensor,
                   M: int) -> QueryBatch:
    """The query batch with frozen features from the store in place of context images."""
    query, turn_tokens, turn_mask, turn_speaker = text_part
    B, T = turn_mask.shape
    turn_features = torch.zeros(B, T, store.dim)
    flat = [t.text for turns in kept for t in turns]
    if flat:
        turn_features[turn_mask] = torch.from_numpy(store.turns(flat))
    image_features = torch.zeros(B, M, store.dim)
    image_mask = torch.zeros(B, M, dtype=torch.bool)
    image_turn = torch.zeros(B, M, dtype=torch.long)
    for b, pairs in enumerate(imgs):
        if pairs:
            image_features[b, :len(pairs)] = torch.from_numpy(store.images([i for _, i in pairs]))
        for m, (t, _) in enumerate(pairs):
            image_mask[b, m], image_turn[b, m] = True, t
    return QueryBatch(query, turn_tokens, turn_mask, turn_speaker, torch.zeros(B, M, 1), image_mask, image_turn,
                      rtype, turn_features, image_features)


def false_negatives(records: Sequence[ExampleRecord]) -> torch.Tensor:
    """[B, B] mask of in-batch pairs (query i, target j != i) that are not negatives: j's target is i's own,
    or i's context already holds it (MMDialog-style: a later turn's context contains an earlier turn's
    reply or photo). Left in, InfoNCE pushes a query away from what it literally contains."""
    held = [({t.text for t in r.context} | {r.current_text}) if r.target_type == "text"
            else {i for t in r.context for i in t.image_ids} for r in records]
    mask = torch.zeros(len(records), len(records), dtype=torch.bool)
    for i, q in enumerate(records):
        for j, n in enumerate(records):
            if i != j and (n.target_id == q.target_id
                           or (n.target_text if n.target_type == "text" else n.target_id) in held[i]):
                mask[i, j] = True
    return mask


def collate_train(records: Sequence[ExampleRecord], tokenizer: Any, load_image: Callable[[str], torch.Tensor],
                  cfg: ReaderConfig, features: ContextFeatures | None = None) -> TrainBatch:
    """Query batch plus positives; all records share one target type (the rest of the batch are negatives)."""
    types = {r.target_type for r in records}
    if len(types) != 1:
        raise ValueError(f"a training batch needs one target type, got {sorted(types)}")
    ttype = types.pop()
    query = build_query_batch(records, tokenizer, load_image, cfg, features)
    ids = tuple(r.id for r in records)
    if ttype == "image":
        return TrainBatch(query, ttype, target_images=torch.stack([load_image(r.target_id) for r in records]),
                          example_ids=ids, false_negatives=false_negatives(records))
    missing = [r.id for r in records if r.target_text is None]
    if missing:
        raise ValueError(f"text targets without target_text (load records via CanonicalDataset): {missing[:3]}")
    return TrainBatch(query, ttype, target_tokens=tokenize_texts(tokenizer, [r.target_text for r in records],
                                                                 cfg.context_length), example_ids=ids,
                      false_negatives=false_negatives(records))


class DialogTorchDataset(torch.utils.data.Dataset):
    """The examples of one split (and optionally one target type) as a map-style torch dataset."""

    def __init__(self, dataset: CanonicalDataset, split: str, target_type: str | None = None):
        self.split, self.target_type = split, target_type
        self.records = dataset.examples(split, target_type)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ExampleRecord:
        return self.records[index]


class EpochSampler(torch.utils.data.DistributedSampler):
    """A rank's share of a per-epoch seeded shuffle that can start part-way through an epoch.

    The order of epoch ``e`` depends only on ``(seed, e)``, never on how many epochs ran before in
    this process, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run
    would. ``set_position(epoch, skip)`` drops the first ``skip`` samples of this rank's share: the
    examples of the batches already trained on before a mid-epoch checkpoint.
    """

    def __init__(self, dataset, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def make_train_loader(dataset: CanonicalDataset, split: str, target_type: str, tokenizer: Any,
                      image_transform: Callable, cfg: ReaderConfig, batch_size: int, shuffle: bool = True,
                      seed: int = 0, sampler: torch.utils.data.Sampler | None = None, num_workers: int = 0,
                      drop_last: bool = False, max_examples: int | None = None,
                      features: ContextFeatures | None = None, rank: int = 0, world: int = 1
                      ) -> torch.utils.data.DataLoader:
    """DataLoader of TrainBatch for one split and target type; the default sampler is one ``EpochSampler``
    (call its ``set_position`` each epoch), sharded by ``rank`` of ``world`` for DDP."""
    if target_type not in TARGET_TYPES:
        raise ValueError(f"target_type must be one of {TARGET_TYPES}, got {target_type!r}")
    data = DialogTorchDataset(dataset, split, target_type)
    if max_examples is not None:
        data.records = data.records[:max_examples]
    if not len(data):
        raise ValueError(f"{dataset.directory}: split {split!r} has no {target_type} examples")
    collate = partial(collate_train, tokenizer=tokenizer, load_image=image_loader(dataset, image_transform), cfg=cfg,
                      features=features)
    sampler = sampler if sampler is not None else EpochSampler(data, rank, world, seed=seed, shuffle=shuffle)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, drop_last=drop_last)


def ray_examples(directory: str | Path, split: str):
    """The example rows of one split as a ``ray.data.Dataset`` (for distributed embedding jobs)."""
    import ray.data
    from ray.data.expressions import col

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    read_meta(directory)  # clear error for a non-dataset dir
    paths = [str(p.resolve()) for p in examples_files(directory)]
    if not paths:
        return ray.data.from_arrow(EXAMPLES_SCHEMA.empty_table())
    return ray.data.read_parquet(paths).filter(expr=col("split") == split)
