"""Loader for real PhotoChat files (design 3.2).

Input is one shard (``dev_01.json``) or a directory of shards, possibly nested in
split directories. The split comes from the file name prefix (``train_``,
``dev_``, ``test_``), falling back to the parent directory name. ``dialogue_id``
restarts per split, so example ids are ``photochat/<split>/<dialogue_id>``.
The context is every turn *before* the single share: the turns after it react to
the photo and would leak the answer. Real files sometimes record one share as two
or three consecutive ``share_photo: true`` turns; such a run is one share (context
= the turns before its first turn). Share turns that are not consecutive are an error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from dialclip_ray.data.errors import DataError, ErrorPolicy
from dialclip_ray.data.images import stable_id
from dialclip_ray.data.jsonio import load_json_file
from dialclip_ray.data.schema import ImageRef, LoadedSource

SPLIT_ALIASES = {"train": "train", "dev": "dev", "valid": "dev", "validation": "dev", "val": "dev", "test": "test"}
_PREFIX = re.compile(r"^(train|dev|valid|validation|val|test)_", re.IGNORECASE)
# Default image file names: Open Images style "<basename of photo_id>.<ext>", then other layouts.
DEFAULT_PATTERNS = ("{id_basename}.{ext}", "{id}.{ext}", "{id_safe}.{ext}", "{url_basename}")


def split_of(path: Path) -> str | None:
    """PhotoChat split of a shard file from its name prefix, else its parent directory's name."""
    m = _PREFIX.match(path.name)
    if m:
        return SPLIT_ALIASES[m.group(1).lower()]
    return SPLIT_ALIASES.get(path.parent.name.lower())


def shard_files(path: str | Path) -> list[tuple[Path, str]]:
    """(file, split) for a shard file or every shard under a directory, sorted by path."""
    path = Path(path)
    if path.is_file():
        split = split_of(path)
        if split is None:
            raise DataError(path, None, None, "cannot tell the split: the file name must start with "
                            "train_, dev_ or test_ (or the file must sit in a train/dev/test directory)")
        return [(path, split)]
    if not path.is_dir():
        raise FileNotFoundError(f"PhotoChat input {path} does not exist")
    found = [(p, split_of(p)) for p in sorted(path.rglob("*.json")) if p.is_file()]
    found = [(p, s) for p, s in found if s is not None]
    if not found:
        raise DataError(path, None, None, "no PhotoChat shards (train_*.json, dev_*.json, test_*.json) found")
    return found


def _req(obj: dict, key: str, types: tuple[type, ...], file: Path, record: str, field: str | None = None) -> Any:
    field = field or key
    if key not in obj:
        raise DataError(file, record, field, "missing required field", kind="missing_field")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        want = " or ".join(t.__name__ for t in types)
        raise DataError(file, record, field, f"expected {want}, got {type(value).__name__} {value!r:.60}",
                        kind="wrong_type")
    return value


def parse_dialogue(obj: Any, file: Path, index: int, split: str) -> tuple[dict, ImageRef]:
    """One PhotoChat dialogue object -> (example row, image reference). Raises DataError."""
    record = f"#{index}"
    if not isinstance(obj, dict):
        raise DataError(file, record, None, f"expected a dialogue object, got {type(obj).__name__}",
                        kind="wrong_type")
    if "dialogue_id" in obj:
        record = f"#{index} (dialogue_id {obj['dialogue_id']!r:.40})"
    did = _req(obj, "dialogue_id", (int, str), file, record)
    if isinstance(did, str) and not did.strip():
        raise DataError(file, record, "dialogue_id", "must not be empty", kind="wrong_type")
    turns = _req(obj, "dialogue", (list,), file, record)
    if not turns:
        raise DataError(file, record, "dialogue", "dialogue has no turns", kind="share_turn")
    parsed = []
    for i, turn in enumerate(turns):
        where = f"dialogue[{i}]"
        if not isinstance(turn, dict):
            raise DataError(file, record, where, f"expected a turn object, got {type(turn).__name__}",
                            kind="wrong_type")
        message = _req(turn, "message", (str,), file, record, f"{where}.message")
        share = _req(turn, "share_photo", (bool,), file, record, f"{where}.share_photo")
        user = _req(turn, "user_id", (int,), file, record, f"{where}.user_id")
        if user < 0:
            raise DataError(file, record, f"{where}.user_id", f"must be >= 0, got {user}", kind="wrong_type")
        parsed.append((message, share, user))
    shares = [i for i, (_, share, _) in enumerate(parsed) if share]
    if not shares:
        raise DataError(file, record, "dialogue[*].share_photo", "no turn has share_photo: true",
                        kind="share_turn")
    if shares[-1] - shares[0] + 1 != len(shares):
        # real files record one share as 2-3 consecutive share turns; separate shares are two photos
        raise DataError(file, record, "dialogue[*].share_photo",
                        f"{len(shares)} turns have share_photo: true (turns {shares}) and they are not "
                        f"consecutive: exactly one share (one turn or one run of consecutive turns) is required",
                        kind="share_turn")

    photo_id = obj.get("photo_id")
    if photo_id is not None and (not isinstance(photo_id, str) or not photo_id.strip()):
        raise DataError(file, record, "photo_id", f"expected a non-empty string, got {photo_id!r:.60}",
                        kind="wrong_type")
    if photo_id is None or "photo_url" in obj:
        url = _req(obj, "photo_url", (str,), file, record)
        if photo_id is None and not url.strip():
            raise DataError(file, record, "photo_url", "empty, and there is no photo_id", kind="missing_field")
    else:
        url = ""
    if "photo_description" in obj:
        _req(obj, "photo_description", (str,), file, record)

    image_id = photo_id if photo_id is not None else stable_id(url)
    url_base = Path(urlparse(url).path).name if url else ""
    hints = {"url_basename": url_base or image_id, "url_stem": Path(url_base).stem or image_id}
    context = [{"speaker": user, "text": message, "image_ids": []} for message, _, user in parsed[: shares[0]]]
    row = {"id": f"photochat/{split}/{did}", "source": "photochat", "split": split, "dialog_id": str(did),
           "context": context, "current_text": "", "target_type": "image", "target_id": image_id,
           "candidates": None}
    ref = ImageRef(image_id, str(file), record, "photo_id" if photo_id is not None else "photo_url", hints)
    return row, ref


def load_photochat(path: str | Path, policy: ErrorPolicy | None = None, progress: bool = True) -> LoadedSource:
    """Parse every dialogue of a shard or a directory of shards. Malformed JSON fails in both modes."""
    policy = policy or ErrorPolicy("fail")
    out = LoadedSource("photochat")
    seen: dict[str, str] = {}
    for file, split in tqdm(shard_files(path), desc="photochat shards", unit="file", disable=not progress):
        out.files.append(str(file))
        data = load_json_file(file)
        if not isinstance(data, list):
            raise DataError(file, None, None, f"expected a JSON array of dialogues, got {type(data).__name__}",
                            kind="wrong_type")
        for index, obj in enumerate(data):
            try:
                row, ref = parse_dialogue(obj, file, index, split)
                if row["id"] in seen:
                    raise DataError(file, ref.record, "dialogue_id", f"duplicate dialogue_id {row['dialog_id']} "
                                    f"in split {split} (first seen in {seen[row['id']]})", kind="duplicate_id")
            except DataError as err:
                policy.handle(err)
                continue
            seen[row["id"]] = str(file)
            out.examples.append(row)
            out.add_image(ref)
    return out
