"""Tensor batches exchanged between the data layer and the model.

One retrieval example is a dialog context (turns with speaker, text and images),
a current input, and a target (an image or a text). The data layer turns rows of
the canonical ``examples`` table into these batches; the model consumes them.
Keeping the format here, apart from both, lets either side change without the other.

Shapes (B examples, T context turns, M context images, L = 77 text tokens):

- ``query_tokens``  [B, L]     the query window: newest turns plus the current
                               input, cut from the oldest turn (see ``text.py``)
- ``turn_tokens``   [B, T, L]  each context turn's text, for the context prompt generator
- ``turn_mask``     [B, T]     True where a turn exists (dialogs differ in length)
- ``turn_speaker``  [B, T]     speaker index (0/1/..), clipped to ``MAX_SPEAKERS - 1``
- ``images``        [B, M, 3, H, W]  context images (zeros where absent)
- ``image_mask``    [B, M]     True where an image exists
- ``image_turn``    [B, M]     index of the turn the image belongs to
- ``retrieval_type`` [B]       0 = dialog_to_image, 1 = dialog_to_text
- ``turn_features`` [B, T, E]  optional: frozen CLIP features of the turns (feature store); when
                               present the model never runs the towers over the context, and
- ``image_features`` [B, M, E] the context images need not be loaded (``images`` is then a stub)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

RETRIEVAL_TYPES = ("dialog_to_image", "dialog_to_text")
TARGET_TYPES = ("image", "text")
MAX_SPEAKERS = 4


def retrieval_type_index(target_type: str) -> int:
    """Map a target type (``image``/``text``) to its retrieval type index."""
    if target_type not in TARGET_TYPES:
        raise ValueError(f"target type must be one of {TARGET_TYPES}, got {target_type!r}")
    return TARGET_TYPES.index(target_type)


@dataclass
class QueryBatch:
    query_tokens: torch.Tensor
    turn_tokens: torch.Tensor
    turn_mask: torch.Tensor
    turn_speaker: torch.Tensor
    images: torch.Tensor
    image_mask: torch.Tensor
    image_turn: torch.Tensor
    retrieval_type: torch.Tensor
    turn_features: torch.Tensor | None = None
    image_features: torch.Tensor | None = None

    @property
    def has_features(self) -> bool:
        return self.turn_features is not None and self.image_features is not None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QueryBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def __len__(self) -> int:
        return int(self.query_tokens.shape[0])

    def select(self, idx: torch.Tensor | slice | list[int]) -> "QueryBatch":
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if getattr(self, f.name) is not None})


@dataclass
class TrainBatch:
    """A query batch with its positives, all of one target type (in-batch negatives)."""

    query: QueryBatch
    target_type: str
    target_images: torch.Tensor | None = None  # [B, 3, H, W] when target_type == "image"
    target_tokens: torch.Tensor | None = None  # [B, L] when target_type == "text"
    example_ids: tuple[str, ...] = ()  # which examples this batch holds (audit of the data order)
    # [B, B] bool, True at (i, j != i) where target j is no negative for query i: the same target, or one
    # the query's context already holds (a reply that is one of its turns, a photo it showed).
    false_negatives: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TrainBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TrainBatch(self.query.to(device, non_blocking), self.target_type,
                          move(self.target_images), move(self.target_tokens), self.example_ids,
                          move(self.false_negatives))

    def __len__(self) -> int:
        return len(self.query)


def empty_query_batch(batch_size: int, context_length: int = 77, image_size: int = 64,
                      turns: int = 1, images: int = 1) -> QueryBatch:
    """An all-padding batch; handy for shape checks and tests."""
    return QueryBatch(
        query_tokens=torch.zeros(batch_size, context_length, dtype=torch.long),
        turn_tokens=torch.zeros(batch_size, turns, context_length, dtype=torch.long),
        turn_mask=torch.zeros(batch_size, turns, dtype=torch.bool),
        turn_speaker=torch.zeros(batch_size, turns, dtype=torch.long),
        images=torch.zeros(batch_size, images, 3, image_size, image_size),
        image_mask=torch.zeros(batch_size, images, dtype=torch.bool),
        image_turn=torch.zeros(batch_size, images, dtype=torch.long),
        retrieval_type=torch.zeros(batch_size, dtype=torch.long),
    )
