"""Render many images to files, in parallel, with a guarantee that no two files are byte-equal.

Each job carries its own jitter seed, so the bytes do not depend on the number
of workers or the chunking: reruns with a different ``workers`` give the same files.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from dialclip_ray.data.synthetic.scenes import encode_jpeg, render
from dialclip_ray.data.synthetic.vocab import Scene

_CHUNK = 256


@dataclass(frozen=True)
class ImageJob:
    rel_path: str  # relative to the corpus root
    scene: Scene
    seed: str  # jitter seed
    image_id: str = ""
    split: str = ""  # captions.parquet split: train | val | test


def _render_one(root: str, job: ImageJob, size: int, salt: int) -> str:
    data = encode_jpeg(render(job.scene, size, f"{job.seed}#{salt}" if salt else job.seed))
    path = os.path.join(root, job.rel_path)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha1(data).hexdigest()


def _render_chunk(args: tuple[str, list[ImageJob], int]) -> list[str]:
    root, jobs, size = args
    return [_render_one(root, job, size, 0) for job in jobs]


def render_all(root: Path, jobs: list[ImageJob], size: int, workers: int, progress: bool = True,
               meanwhile: Callable[[], None] | None = None) -> list[str]:
    """Write every job's JPEG under ``root``; returns the SHA-1 of each file (re-rendered until all differ).

    ``meanwhile`` runs in this process while the workers render (e.g. writing the JSON files).
    """
    for d in sorted({os.path.dirname(j.rel_path) for j in jobs}):
        (root / d).mkdir(parents=True, exist_ok=True)
    chunks = [(str(root), jobs[i:i + _CHUNK], size) for i in range(0, len(jobs), _CHUNK)]
    bar = tqdm(total=len(jobs), desc="render images", unit="img", disable=not progress, leave=False)
    hashes: list[str] = []
    if workers <= 1 or len(chunks) <= 1:
        if meanwhile is not None:
            meanwhile()
        for chunk in chunks:
            hashes += _render_chunk(chunk)
            bar.update(len(chunk[1]))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            parts = pool.imap(_render_chunk, chunks)  # ordered results: the hashes line up with the jobs
            if meanwhile is not None:
                meanwhile()
            for part, chunk in zip(parts, chunks):
                hashes += part
                bar.update(len(chunk[1]))
    bar.close()
    seen: dict[str, int] = {}
    for i, h in enumerate(hashes):  # jitter makes collisions vanishingly rare; make them impossible
        salt = 0
        while h in seen:
            salt += 1
            h = _render_one(str(root), jobs[i], size, salt)
        hashes[i] = h
        seen[h] = i
    return hashes
