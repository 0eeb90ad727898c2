"""Reading JSON input files with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from dialclip_ray.data.errors import DataError


def load_json_file(path: str | Path) -> Any:
    """Parse a whole JSON file; malformed JSON -> DataError naming file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"byte {exc.start}", None, f"not UTF-8 text: {exc.reason}", kind="malformed_json") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno}", None, f"malformed JSON at line {exc.lineno} column {exc.colno}: "
                        f"{exc.msg}", kind="malformed_json") from None


def first_char(path: str | Path) -> str:
    """First non-whitespace character of a file ('' when empty), to tell a JSON array from JSON Lines."""
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        while True:
            chunk = fh.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any | DataError]]:
    """(line number, parsed object or DataError) for each non-blank line; a bad line does not stop the rest."""
    with open(path, "r", encoding="utf-8", errors="strict") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as exc:
                raise DataError(path, f"line {lineno + 1}", None, f"not UTF-8 text: {exc.reason}",
                                kind="malformed_json") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, DataError(path, f"line {lineno}", None, f"malformed JSON Lines record at column "
                                        f"{exc.colno}: {exc.msg}", kind="malformed_json")
