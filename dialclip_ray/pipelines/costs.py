"""Step time and peak memory of one optimisation step, for the cost benchmarks (CPU and GPU).

Batches are synthetic but shaped like real ones (context turns of real token
length, context images, target images), so prompt tuning and full fine-tuning
are timed on identical inputs. ``feature_dim`` gives DialCLIP's batches the frozen
context features of the feature store (its cost from the first epoch on, once the
store is built); without it the towers run over every context turn and image.
"""

from __future__ import annotations

import statistics
import time

import torch

from dialclip_ray.model.batch import QueryBatch, TrainBatch
from dialclip_ray.model.text import tokenize_dialog, tokenize_texts
from dialclip_ray.runtime import AmpStep

WORDS = "red blue green circle square star beach park night small large two three photo look".split()


def synthetic_batch(tokenizer, batch_size: int, image_size: int, turns: int = 8, images: int = 2,
                    seed: int = 0, feature_dim: int | None = None) -> TrainBatch:
    """A training batch shaped like a real one; with ``feature_dim`` it carries frozen context features
    (what the feature store hands in: no context image tensors, no tower runs over the context)."""
    g = torch.Generator().manual_seed(seed)

    def sentence(i: int) -> str:
        idx = torch.randint(0, len(WORDS), (12,), generator=g).tolist()
        return f"turn {i} " + " ".join(WORDS[j] for j in idx)

    dialogs = [[sentence(t) for t in range(turns)] for _ in range(batch_size)]
    q = QueryBatch(
        query_tokens=torch.stack([tokenize_dialog(tokenizer, d) for d in dialogs]),
        turn_tokens=torch.stack([tokenize_texts(tokenizer, d) for d in dialogs]),
        turn_mask=torch.ones(batch_size, turns, dtype=torch.bool),
        turn_speaker=(torch.arange(turns) % 2).repeat(batch_size, 1),
        images=torch.randn(batch_size, images, 3, image_size, image_size, generator=g),
        image_mask=torch.ones(batch_size, images, dtype=torch.bool),
        image_turn=torch.arange(images).repeat(batch_size, 1),
        retrieval_type=torch.zeros(batch_size, dtype=torch.long))
    if feature_dim is not None:
        q.turn_features = torch.randn(batch_size, turns, feature_dim, generator=g)
        q.image_features = torch.randn(batch_size, images, feature_dim, generator=g)
        q.images = torch.zeros(batch_size, images, 1)
    return TrainBatch(q, "image", target_images=torch.randn(batch_size, 3, image_size, image_size, generator=g))


def time_steps(model, batch: TrainBatch, steps: int = 10, warmup: int = 3, amp: str = "none",
               lr: float = 1e-4) -> dict:
    """Median step time (ms), samples/s and peak memory (MB; CUDA allocator on GPU, else None)."""
    device = next(model.parameters()).device
    model.train()
    batch = batch.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    cuda = device.type == "cuda"
    step = AmpStep(device, amp, params)  # the training loops' own step, so the timings are theirs
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with step.autocast():
            loss = model(batch)["loss"]
        step.backward_and_step(loss, opt)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    return {"step_ms": ms, "samples_per_s": len(batch) / (ms / 1000), "loss": float(loss.detach()),
            "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "trainable_params": sum(p.numel() for p in params)}
