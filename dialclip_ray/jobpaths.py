"""Paths given to a command that runs as a Ray job (``ray job submit --working-dir . -- python jobs/...``).

Ray runs the entrypoint in a copy of the working directory it uploaded to the cluster (under the
head node's session dir), and the copy leaves out git-ignored paths: ``runs/`` (the demo's corpus,
small CLIP, training runs and indexes) and any local data. A relative input path that is not in
the copy would fail later with a confusing error ("is not a dataset directory"), and a relative
output path would be written into that temporary copy, which other nodes do not see. Inside a job,
the CLI therefore refuses both, with the reason, before any work starts; relative paths that are
in the upload (``configs/``, ``tune/``) are fine. Outside a job nothing changes.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

# argparse destinations that name files or directories the command reads / writes
INPUTS = ("config", "data", "checkpoint", "corpus", "index", "run", "space", "input", "images", "dialog",
          "pretrained")
OUTPUTS = ("out", "storage", "cache", "cache_dir")
_WORKING_DIR_MARK = os.sep + os.path.join("runtime_resources", "working_dir_files") + os.sep
_SHARED = "pass an absolute path on storage every node sees"


def ray_job_id() -> str | None:
    """The submission id when this process is the entrypoint of a submitted Ray job, else None."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the entrypoint
    if raw:
        try:
            return json.loads(raw).get("metadata", {}).get("job_submission_id") or "unknown"
        except (ValueError, AttributeError):
            return "unknown"
    if _WORKING_DIR_MARK in os.getcwd() + os.sep:  # the uploaded working directory
        return "unknown"
    return None


def is_local_path(value: str, dest: str) -> bool:
    """Whether an option's value names a local file (not a URI, an hf-hub: name or an open_clip tag)."""
    if "://" in value or value.startswith("hf-hub:"):
        return False
    if dest == "pretrained":  # an open_clip tag ("openai") or a weights file
        return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))
    return True


def _missing(value: str, what: str) -> str:
    return (f"{what}: relative path '{value}' does not exist in the job's working directory "
            f"(ray job submit uploads the repo minus git-ignored paths like runs/); {_SHARED}")


def _transient(value: str, what: str) -> str:
    return (f"{what}: relative output path '{value}' would be written into the job's temporary copy of the "
            f"working directory, which Ray deletes with the job's files and other nodes do not see; {_SHARED}")


def path_problems(items: Iterable[tuple[str, str | None, bool]], cwd: str | os.PathLike | None = None) -> list[str]:
    """Problems of ``(what, path, is_output)`` items inside a job (relative inputs that are not in the
    upload, relative outputs); an empty list outside a job."""
    if ray_job_id() is None:
        return []
    cwd = Path(cwd or os.getcwd())
    problems = []
    for what, value, is_output in items:
        if not value or "://" in str(value) or Path(value).expanduser().is_absolute():
            continue
        if is_output:
            problems.append(_transient(value, what))
        elif not (cwd / value).exists():
            problems.append(_missing(value, what))
    return problems


def arg_problems(args: argparse.Namespace) -> list[str]:
    """``path_problems`` of the command-line options that name paths."""
    items = []
    for dest, value in vars(args).items():
        if dest not in INPUTS and dest not in OUTPUTS:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(v, str) or not is_local_path(v, dest):
                continue
            if dest == "checkpoint" and "=" in v and not os.path.exists(v):
                v = v.partition("=")[2]  # evaluate's NAME=PATH
            items.append((f"--{dest.replace('_', '-')}", v, dest in OUTPUTS))
    return path_problems(items)


def config_problems(cfg, where: str, check_storage: bool = True) -> list[str]:
    """``path_problems`` of the paths inside a training config (data, local backbone weights, storage)."""
    items = [(f"{where}: data.train", p, False) for p in cfg.data.train]
    pretrained = cfg.model.backbone.pretrained
    if pretrained and is_local_path(pretrained, "pretrained"):
        items.append((f"{where}: model.backbone.pretrained", pretrained, False))
    if check_storage:
        items.append((f"{where}: run.storage_path (or --storage)", cfg.run.storage_path, True))
    return path_problems(items)
