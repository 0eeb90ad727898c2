"""Errors for bad input data, and the ``--on-error fail|skip`` policy.

Every problem in an input file is reported as a :class:`DataError` that names the file,
the record and the field, so a user can open the file and fix the record. In ``skip``
mode the same errors are counted by kind instead of raised, and the counts land in
``meta.json`` so a silently shrunken dataset is visible.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

OnError = Literal["fail", "skip"]


class DataError(ValueError):
    """A problem with one input record (or a whole file when ``record`` is None)."""

    def __init__(self, file: object, record: object, field: str | None, message: str,
                 kind: str = "invalid") -> None:
        self.file = str(file)
        self.record = None if record is None else str(record)
        self.field = field
        self.message = message
        self.kind = kind
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [self.file]
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}"

    def __reduce__(self):  # keep file/record/field when crossing process boundaries
        return (DataError, (self.file, self.record, self.field, self.message, self.kind))


@dataclass
class ErrorPolicy:
    """``fail`` raises the first error; ``skip`` counts errors by kind and keeps a few examples."""

    mode: OnError = "fail"
    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.mode!r}")

    def handle(self, error: DataError) -> None:
        """Raise ``error`` (fail) or record it as skipped (skip)."""
        if self.mode == "fail":
            raise error
        self.counts[error.kind] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict:
        """JSON-ready summary for meta.json and the CLI."""
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())), "examples": list(self.examples)}

    def summary(self) -> str:
        if not self.total:
            return "no records skipped"
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"skipped {self.total} ({parts})"
