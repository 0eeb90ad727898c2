"""Loader for MMDialog (design 3.3).

Layout: ``ROOT/<split>/conversations.json`` (a JSON array or JSON Lines, detected
from the first character) with images ``ROOT/<split>/<media_key>.jpg``. Turn items
are one-key objects dispatched on their key (``__TEXT__`` / ``__MEDIA__``), never
on their position. Media keys are strings and may look like numbers ("-123abc"):
a JSON *number* in a media-key position is an error, never converted.
Each image or text item of a turn after the first is one retrieval example.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Literal

from tqdm import tqdm

from dialclip_ray.data.errors import DataError, ErrorPolicy
from dialclip_ray.data.jsonio import first_char, iter_json_lines, load_json_file
from dialclip_ray.data.schema import ImageRef, LoadedSource

TEXT_KEY = "__TEXT__"
MEDIA_KEY = "__MEDIA__"
SPLIT_ALIASES = {"train": "train", "valid": "dev", "validation": "dev", "dev": "dev", "val": "dev", "test": "test"}
CONVERSATIONS = "conversations.json"
DEFAULT_PATTERNS = ("{split}/{id}.jpg",)
NEG_MEDIA = "negative_candidate_media_keys"
NEG_TEXTS = "negative_candidate_texts"

ItemKind = Literal["text", "media"]


def text_id(text: str) -> str:
    """Id of a text candidate/target: ``t:`` + sha1(text)[:16] (same text -> same id everywhere)."""
    return "t:" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def parse_item(item: Any, *, file: object, record: object, field: str) -> tuple[ItemKind, str]:
    """One turn item -> ("text", text) or ("media", media_key); anything else -> DataError."""
    if not isinstance(item, dict):
        raise DataError(file, record, field, f"expected a one-key object, got {_type_name(item)}", kind="wrong_type")
    if len(item) != 1:
        raise DataError(file, record, field, f"expected exactly one key ({TEXT_KEY} or {MEDIA_KEY}), got "
                        f"{sorted(item)!r:.80}", kind="unknown_item")
    (key, value), = item.items()
    if key == TEXT_KEY:
        if not isinstance(value, str):
            raise DataError(file, record, f"{field}.{key}", f"text must be a string, got {_type_name(value)}",
                            kind="wrong_type")
        return "text", value
    if key == MEDIA_KEY:
        return "media", media_key(value, file=file, record=record, field=f"{field}.{key}")
    raise DataError(file, record, field, f"unknown item key {key!r} (expected {TEXT_KEY} or {MEDIA_KEY})",
                    kind="unknown_item")


def media_key(value: Any, *, file: object, record: object, field: str) -> str:
    """A media key as given; a JSON number is rejected rather than guessed back into a string."""
    if not isinstance(value, str):
        hint = " (media keys are strings; a number would lose leading '-'/zeros)" if _type_name(value) == "number" \
            else ""
        raise DataError(file, record, field, f"media key must be a string, got {_type_name(value)} {value!r:.40}"
                        f"{hint}", kind="media_key_type")
    if not value:
        raise DataError(file, record, field, "media key is empty", kind="media_key_type")
    return value


def split_dirs(path: str | Path) -> list[tuple[Path, str, str]]:
    """(conversations file, canonical split, split dir name) for ROOT, ROOT/<split>, or one conversations file."""
    path = Path(path)
    if path.is_file():
        split = SPLIT_ALIASES.get(path.parent.name.lower())
        if split is None:
            raise DataError(path, None, None, "cannot tell the split: the file must sit in a "
                            "train/valid/test directory")
        return [(path, split, path.parent.name)]
    if not path.is_dir():
        raise FileNotFoundError(f"MMDialog input {path} does not exist")
    if (path / CONVERSATIONS).is_file():
        return split_dirs(path / CONVERSATIONS)
    found = [(d / CONVERSATIONS, SPLIT_ALIASES[d.name.lower()], d.name) for d in sorted(path.iterdir())
             if d.is_dir() and d.name.lower() in SPLIT_ALIASES and (d / CONVERSATIONS).is_file()]
    if not found:
        raise DataError(path, None, None, f"no <split>/{CONVERSATIONS} (train, valid, test) found")
    return found


def iter_records(file: Path) -> Iterator[tuple[str, Any | DataError]]:
    """(record label, record or DataError): a JSON array or JSON Lines, detected from the first character."""
    head = first_char(file)
    if head == "[":
        data = load_json_file(file)
        for i, rec in enumerate(data):
            yield f"#{i}", rec
    elif head == "{":
        for lineno, rec in iter_json_lines(file):
            yield f"line {lineno}", rec
    elif head == "":
        return
    else:
        raise DataError(file, None, None, f"expected a JSON array or JSON Lines of objects, file starts with "
                        f"{head!r}", kind="malformed_json")


def _string_list(rec: dict, key: str, file: Path, record: str, media: bool) -> list[str]:
    value = rec[key]
    if not isinstance(value, list):
        raise DataError(file, record, key, f"expected an array, got {_type_name(value)}", kind="wrong_type")
    out = []
    for i, v in enumerate(value):
        if media:
            out.append(media_key(v, file=file, record=record, field=f"{key}[{i}]"))
        elif not isinstance(v, str):
            raise DataError(file, record, f"{key}[{i}]", f"expected a string, got {_type_name(v)}", kind="wrong_type")
        else:
            out.append(v)
    return out


def parse_conversation(rec: Any, file: Path, label: str, split: str, split_dir: str
                       ) -> tuple[list[dict], list[ImageRef], dict[str, str]]:
    """One MMDialog record -> (example rows, image refs, texts). Raises DataError."""
    record = label
    if not isinstance(rec, dict):
        raise DataError(file, record, None, f"expected a conversation object, got {_type_name(rec)}",
                        kind="wrong_type")
    if "conversation_id" not in rec:
        raise DataError(file, record, "conversation_id", "missing required field", kind="missing_field")
    cid = rec["conversation_id"]
    if isinstance(cid, bool) or not isinstance(cid, (str, int)) or str(cid) == "":
        raise DataError(file, record, "conversation_id", f"expected a non-empty string, got {_type_name(cid)}",
                        kind="wrong_type")
    cid = str(cid)
    record = f"{label} (conversation_id {cid})"
    if "conversation" not in rec:
        raise DataError(file, record, "conversation", "missing required field", kind="missing_field")
    conv = rec["conversation"]
    if not isinstance(conv, list):
        raise DataError(file, record, "conversation", f"expected an array, got {_type_name(conv)}", kind="wrong_type")

    turns: list[list[tuple[ItemKind, str, str]]] = []
    for t, turn in enumerate(conv):
        where = f"conversation[{t}]"
        if not isinstance(turn, dict) or "turn" not in turn:
            raise DataError(file, record, f"{where}.turn", "expected an object with a 'turn' array",
                            kind="missing_field" if isinstance(turn, dict) else "wrong_type")
        items = turn["turn"]
        if not isinstance(items, list):
            raise DataError(file, record, f"{where}.turn", f"expected an array, got {_type_name(items)}",
                            kind="wrong_type")
        parsed = []
        for j, item in enumerate(items):
            field = f"{where}.turn[{j}]"
            parsed.append((*parse_item(item, file=file, record=record, field=field), field))
        turns.append(parsed)

    has_negatives = split != "train"
    neg_media: list[str] = []
    neg_texts: list[str] = []
    if has_negatives:
        for key in (NEG_MEDIA, NEG_TEXTS):
            if key not in rec:
                raise DataError(file, record, key, f"missing: {split} records need negative candidates",
                                kind="missing_field")
        neg_media = _string_list(rec, NEG_MEDIA, file, record, media=True)
        neg_texts = _string_list(rec, NEG_TEXTS, file, record, media=False)

    rows: list[dict] = []
    refs: list[ImageRef] = []
    texts: dict[str, str] = {}
    hints = {"split": split_dir}
    context: list[dict] = []
    for t, items in enumerate(turns):
        turn_texts = [v for kind, v, _ in items if kind == "text"]
        joined = " ".join(turn_texts)
        for kind, value, field in items:
            if kind == "media":
                refs.append(ImageRef(value, str(file), record, f"{field}.{MEDIA_KEY}", hints))
        if t > 0:
            for j, (kind, value, field) in enumerate(items):
                if kind == "media":
                    target, current, ttype = value, joined, "image"
                    pool = [value, *neg_media] if has_negatives else None
                else:
                    target, current, ttype = text_id(value), "", "text"
                    texts[target] = value
                    pool = [target, *(text_id(x) for x in neg_texts)] if has_negatives else None
                rows.append({"id": f"mmdialog/{split}/{cid}/{t}/{j}", "source": "mmdialog", "split": split,
                             "dialog_id": cid, "context": [dict(c) for c in context], "current_text": current,
                             "target_type": ttype, "target_id": target,
                             "candidates": list(dict.fromkeys(pool)) if pool is not None else None})
        context.append({"speaker": t % 2, "text": joined,
                        "image_ids": [v for kind, v, _ in items if kind == "media"]})
    if rows and has_negatives:
        if any(r["target_type"] == "image" for r in rows):
            refs.extend(ImageRef(k, str(file), record, f"{NEG_MEDIA}[{i}]", hints) for i, k in enumerate(neg_media))
        if any(r["target_type"] == "text" for r in rows):
            texts.update({text_id(x): x for x in neg_texts})
    return rows, refs, texts


def load_mmdialog(path: str | Path, policy: ErrorPolicy | None = None, progress: bool = True) -> LoadedSource:
    """Parse every conversation under ``path`` (root, split dir or conversations file)."""
    policy = policy or ErrorPolicy("fail")
    out = LoadedSource("mmdialog")
    seen: dict[str, str] = {}
    for file, split, split_dir in split_dirs(path):
        out.files.append(str(file))
        for label, rec in tqdm(iter_records(file), desc=f"mmdialog {split_dir}", unit="dialog",
                               disable=not progress):
            try:
                if isinstance(rec, DataError):
                    raise rec
                rows, refs, texts = parse_conversation(rec, file, label, split, split_dir)
                cid = str(rec["conversation_id"])
                key = f"{split}/{cid}"
                if key in seen:
                    raise DataError(file, label, "conversation_id", f"duplicate conversation_id {cid} in split "
                                    f"{split} (first at {seen[key]})", kind="duplicate_id")
            except DataError as err:
                policy.handle(err)
                continue
            seen[key] = label
            out.examples.extend(rows)
            for ref in refs:
                out.add_image(ref)
            out.texts.update(texts)
    return out
