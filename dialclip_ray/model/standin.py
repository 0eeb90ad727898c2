"""The shipped stand-in CLIP: ``pretrained="synthetic"`` for ``dialclip-small``.

Real CLIP weights cannot be downloaded here, so the demo, the benchmark and the
tests run on a small CLIP pretrained on the synthetic corpus's alt-text captions
(design 3.5). Pretraining it takes a quarter of an hour on two cores, so it ships
as package data, like an open_clip pretrained tag: ``BackboneConfig(model_name=
"dialclip-small", pretrained="synthetic")``.

The packed file is compact (about 4 MB): fp16 tensors, and of the 49,408-row token
embedding only the rows of token types that occur in the pretraining text (the
others never received a gradient, only weight decay, so they are stored as zeros,
a neutral "unknown word"). ``materialize`` expands it once into a full fp32
``.safetensors`` file in the weights cache, which open_clip loads as any local
checkpoint (no pickle anywhere). Every number reported for the stand-in is
measured on this packed-and-expanded form, not on the fp32 training output.

Reproduce it: ``python bench/standin_reading.py --pretrain --pack`` (pretraining
corpus and settings: ``STANDIN_CORPUS`` / ``STANDIN_PRETRAIN``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

STANDIN_TAG = "synthetic"
STANDIN_MODEL = "dialclip-small"
PACKED_FILE = Path(__file__).parent / "standin" / f"{STANDIN_MODEL}-{STANDIN_TAG}.safetensors"
TOKEN_EMBEDDING = "token_embedding.weight"
_ROWS_KEY, _VALUES_KEY = "token_embedding.rows", "token_embedding.values"
# The pretraining corpus: its own seed, so no demo or benchmark test photo (seed 0) was ever seen.
STANDIN_CORPUS = dict(dialogs=1400, seed=1001, photochat_sizes=(300, 100, 1000), mmdialog_sizes=(20, 5, 5),
                      caption_images=40_000)
# Held-out probe: a corpus of another seed, never trained on (1,000 PhotoChat-style test photos).
PROBE_CORPUS = dict(dialogs=1040, seed=2002, photochat_sizes=(20, 20, 1000), mmdialog_sizes=(20, 5, 5),
                    caption_images=0)
STANDIN_PRETRAIN = dict(model_name=STANDIN_MODEL, epochs=2, lr=2e-3, batch_size=128, warmup_steps=60,
                        eval_max_images=1000, cache_images=True)


def is_standin(model_name: str, pretrained: str | None) -> bool:
    return pretrained == STANDIN_TAG and model_name == STANDIN_MODEL


def pack(state_dict: dict[str, torch.Tensor], used_token_ids: Iterable[int], out: str | os.PathLike,
         metadata: dict | None = None) -> Path:
    """Write the compact form of an open_clip state dict (fp16; token rows of ``used_token_ids`` only)."""
    from safetensors.torch import save_file

    from dialclip_ray.fsio import atomic_write

    emb = state_dict[TOKEN_EMBEDDING]
    rows = torch.tensor(sorted(set(int(i) for i in used_token_ids)), dtype=torch.int64)
    if rows.numel() == 0 or int(rows.max()) >= emb.shape[0] or int(rows.min()) < 0:
        raise ValueError(f"used_token_ids must be non-empty ids below {emb.shape[0]}")
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in state_dict.items() if k != TOKEN_EMBEDDING}
    tensors[_ROWS_KEY] = rows
    tensors[_VALUES_KEY] = emb.detach().to("cpu", torch.float16)[rows].contiguous()
    meta = {"format": "dialclip-standin/1", "vocab_rows": str(emb.shape[0]),
            "embed_width": str(emb.shape[1]), "info": json.dumps(metadata or {}, sort_keys=True)}
    return atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def unpack(packed: str | os.PathLike = PACKED_FILE) -> dict[str, torch.Tensor]:
    """The full fp32 open_clip state dict of a packed file (unused token rows zero)."""
    from safetensors import safe_open

    with safe_open(str(packed), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != "dialclip-standin/1":
            raise ValueError(f"{packed}: not a packed stand-in (format {meta.get('format')!r})")
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    rows, values = state.pop(_ROWS_KEY), state.pop(_VALUES_KEY)
    emb = torch.zeros(int(meta["vocab_rows"]), int(meta["embed_width"]), dtype=torch.float32)
    emb[rows] = values.float()
    state[TOKEN_EMBEDDING] = emb
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def packed_info(packed: str | os.PathLike = PACKED_FILE) -> dict:
    """The metadata recorded at packing time (pretraining config, corpus, measurements)."""
    from safetensors import safe_open

    with safe_open(str(packed), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("info", "{}"))


def materialize(cache_dir: str | None = None, packed: str | os.PathLike = PACKED_FILE) -> Path:
    """The expanded fp32 checkpoint of the packed stand-in, written once per packed file's digest under
    ``cache_dir`` (the resolved weights cache, ``backbone.weights_dir``; None: ``~/.cache/dialclip``)."""
    from safetensors.torch import save_file

    from dialclip_ray.fsio import atomic_write

    packed = Path(packed)
    if not packed.is_file():
        raise FileNotFoundError(f"{packed}: the packed stand-in CLIP is missing from the package "
                                f"(rebuild it: python bench/standin_reading.py --pretrain --pack)")
    digest = hashlib.sha256(packed.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "dialclip"
    target = root / "standin" / f"{STANDIN_MODEL}-{STANDIN_TAG}-{digest}.safetensors"
    if not target.is_file():
        state = unpack(packed)
        atomic_write(target, lambda tmp: save_file(state, str(tmp)))
    return target


def packed_token_ids(packed: str | os.PathLike = PACKED_FILE) -> set[int]:
    """The token ids the stand-in learned rows for (those of its pretraining text)."""
    from safetensors import safe_open

    with safe_open(str(packed), framework="pt") as fh:
        return set(fh.get_tensor(_ROWS_KEY).tolist())


def annotate(packed: str | os.PathLike, extra: dict) -> Path:
    """Add ``extra`` (the measurements of the packed form) to a packed file's recorded info; tensors unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dialclip_ray.fsio import atomic_write

    with safe_open(str(packed), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta["info"] = json.dumps({**json.loads(meta.get("info", "{}")), **extra}, sort_keys=True)
    return atomic_write(packed, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
