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
        raise json_error(path, exc) from None


def ends_early(exc: json.JSONDecodeError) -> bool:
    """True when the decoder failed because the text stopped, not because of a bad character.

    The C scanner reports an unterminated string at the string's start, every other
    cut-off at the end of the (whitespace-stripped) text.
    """
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(exc.doc.rstrip())


def json_error(path: str | Path, exc: json.JSONDecodeError) -> DataError:
    """DataError for a decoder error on a whole file; a cut-off file is called that ("ends early")."""
    if not exc.doc.strip():
        return DataError(path, None, None, "the file is empty (expected JSON)", kind="malformed_json")
    if ends_early(exc):
        end = exc.doc.rstrip()
        line = exc.doc.count("\n", 0, len(end)) + 1
        return ends_early_error(path, line, len(end) - end.rfind("\n"), f"{len(exc.doc)} characters",
                                f"{exc.msg} at line {exc.lineno} column {exc.colno}")
    return malformed_error(path, exc.lineno, exc.colno, exc.msg)


def ends_early_error(path: object, line: int, column: int, size: str, detail: str) -> DataError:
    """The file stops inside a value: a truncated download or copy. ``line``/``column``: where it stops."""
    return DataError(path, f"line {line}", None, f"the file ends early (truncated?): the JSON text stops at line "
                     f"{line} column {column} (end of file, {size}) while a value is still open ({detail})",
                     kind="malformed_json")


def malformed_error(path: object, line: int, column: int, msg: str) -> DataError:
    return DataError(path, f"line {line}", None, f"malformed JSON at line {line} column {column}: {msg}",
                     kind="malformed_json")


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
                yield lineno, json_line_error(path, lineno, line, exc)


def json_line_error(path: object, lineno: int, line: str, exc: json.JSONDecodeError) -> DataError:
    """Error for one bad JSON Lines record; a last line cut off mid-record says the file ends early."""
    if not line.endswith("\n") and ends_early(exc):
        end = len(line.rstrip())
        return ends_early_error(path, lineno, end + 1, "on its last line",
                                f"{exc.msg} at column {exc.colno}")
    return DataError(path, f"line {lineno}", None, f"malformed JSON Lines record at column {exc.colno}: {exc.msg}",
                     kind="malformed_json")
