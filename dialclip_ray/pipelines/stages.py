"""Numbered stage headers for long pipelines (demo, benchmark): what runs now, how long each stage took."""

from __future__ import annotations

import time


class Stages:
    """``stages("what")`` closes the previous stage (printing its duration) and announces the next:
    ``[k/n] what  (elapsed s)``. ``seconds`` keeps each finished stage's duration."""

    def __init__(self, total: int):
        self.total, self.k, self.t0 = total, 0, time.time()
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._start = self.t0

    def __call__(self, name: str) -> None:
        self.finish()
        self.k += 1
        self._name, self._start = name, time.time()
        print(f"\n[{self.k}/{self.total}] {name}  (elapsed {time.time() - self.t0:.0f}s)", flush=True)

    def finish(self) -> dict[str, float]:
        """Close the running stage (if any); returns every stage's seconds."""
        if self._name is not None:
            self.seconds[self._name] = round(time.time() - self._start, 1)
            print(f"    done in {self.seconds[self._name]:.1f}s", flush=True)
            self._name = None
        return self.seconds
