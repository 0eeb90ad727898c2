"""A bounded LRU of frozen features keyed by content hash, for the online query encoder.

A conversation grows one turn at a time, and every request re-sends its whole
history: with the turn and image features cached by content, a request costs one
new turn encoding, not all of them. The bound is a setting (entries, not bytes:
each entry is one float32 vector of the embedding width), so memory stays flat
under a stream of distinct dialogs.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch


def tensor_key(t: torch.Tensor) -> bytes:
    """Content hash of a tensor (token row or preprocessed image): same content, same frozen feature."""
    data = t.detach().to("cpu").contiguous()
    return hashlib.sha256(str(data.dtype).encode() + str(tuple(data.shape)).encode()
                          + data.view(torch.uint8).numpy().tobytes()).digest()[:16]


class FeatureCache:
    """LRU map ``content key -> float32 feature``; ``lookup`` computes only the misses."""

    def __init__(self, max_entries: int = 50_000):
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._data: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def lookup(self, keys: Sequence[bytes], compute: Callable[[list[int]], torch.Tensor],
               device: torch.device | str) -> torch.Tensor:
        """[N, E] features for ``keys``; ``compute(indices)`` embeds the rows not cached (each distinct once)."""
        todo: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self._data and k not in todo:
                todo[k] = i
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            for k, f in zip(todo, compute(list(todo.values()))):
                fresh[k] = f.detach().float()
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        out = []
        for k in keys:
            f = fresh.get(k)
            if f is None:
                f = self._data[k]
                self._data.move_to_end(k)
            out.append(f.to(device))
        if self.max_entries:
            for k, f in fresh.items():
                self._data[k] = f.to("cpu")
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
        return torch.stack(out)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._data), "max_entries": self.max_entries, "hits": self.hits,
                "misses": self.misses}
