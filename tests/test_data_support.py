"""Helpers shared by the tests/test_data_*.py modules (no tests here): tiny images and crafted inputs."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

SAMPLE_DEV = "dev_01.head.json"
SAMPLE_TEST = "test_00.head.json"


def write_image(path: Path, size: int = 8, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, format=fmt)
    return path


def photochat_dialogue(did: int, share_at: int, n_turns: int, photo_id: str | None = "train/00000000000000aa",
                       url: str = "https://example.org/a/b_o.jpg") -> dict:
    turns = [{"message": "" if i == share_at else f"turn {i} of dialog {did}", "share_photo": i == share_at,
              "user_id": i % 2} for i in range(n_turns)]
    obj = {"dialogue": turns, "dialogue_id": did, "photo_description": "a photo", "photo_url": url}
    if photo_id is not None:
        obj["photo_id"] = photo_id
    return obj


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def mm_record(cid: str, turns: list[list[dict]], negatives: int | None = None, prefix: str = "neg") -> dict:
    rec = {"conversation_id": cid, "conversation": [{"turn": t} for t in turns]}
    if negatives is not None:
        rec["negative_candidate_media_keys"] = [f"{prefix}{cid}m{i}" for i in range(negatives)]
        rec["negative_candidate_texts"] = [f"negative text {i} of {cid}" for i in range(negatives)]
    return rec


def mm_images(root: Path, split_dir: str, records: list[dict], size: int = 8) -> None:
    """Write an image for every media key the records use."""
    keys = set()
    for rec in records:
        for turn in rec["conversation"]:
            keys.update(i["__MEDIA__"] for i in turn["turn"] if "__MEDIA__" in i)
        keys.update(rec.get("negative_candidate_media_keys", ()))
    for n, key in enumerate(sorted(keys)):
        write_image(root / split_dir / f"{key}.jpg", size, ((37 * n) % 255, 90, 160), fmt="JPEG")


def write_mm_split(root: Path, split_dir: str, records: list[dict], jsonl: bool = False) -> Path:
    path = root / split_dir / "conversations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return path


def sample_mmdialog(root: Path, jsonl: bool = False) -> dict[str, list[dict]]:
    """A small MMDialog tree: train (no negatives) and valid/test (3 negatives each), images included."""
    T, M = "__TEXT__", "__MEDIA__"
    splits = {
        "train": [
            mm_record("c1", [[{T: "look at my dog"}, {M: "-101abc"}], [{T: "cute!"}], [{M: "m2"}, {T: "another"}]]),
            mm_record("c2", [[{T: "hi"}], [{M: "m3"}]]),
        ],
        "valid": [mm_record("v1", [[{T: "hello"}], [{T: "here"}, {M: "-9"}]], negatives=3)],
        "test": [mm_record("t1", [[{M: "m5"}], [{T: "nice pic"}]], negatives=3)],
    }
    for split, recs in splits.items():
        write_mm_split(root, split, recs, jsonl=jsonl)
        mm_images(root, split, recs)
    return splits


def listing(directory: Path) -> set[str]:
    """Every path under ``directory`` (for checking that a failed run left nothing behind)."""
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}
