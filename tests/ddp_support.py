"""A DDP worker for tests/test_model_state.py, in its own light module (spawned children import only this)."""

from __future__ import annotations

import os

import torch

from dialclip_ray.model.experts import ProjectionExperts


def hard_routing_worker(rank: int, out: str) -> None:
    """Two gloo ranks, hard routing over 2 experts: step 1 each rank uses another expert, then only expert 0.

    The ranks meet through a file in ``out``, not a TCP port: a port picked free by the parent can be
    taken by another process before rank 0 binds it (a rare EADDRINUSE in CI's spawn).
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)
    experts = ProjectionExperts(torch.nn.Linear(8, 4), 8, 4, num_experts=2, rank=2, num_types=2)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    ddp = torch.nn.parallel.DistributedDataParallel(experts, find_unused_parameters=True)
    opt = torch.optim.AdamW(experts.parameters(), lr=0.1, weight_decay=0.1)
    grads = []
    for types in ([rank] * 3, [0] * 3, [0] * 3):
        opt.zero_grad(set_to_none=True)
        ddp(torch.randn(3, 8), torch.tensor(types)).sum().backward()
        grads.append([p.grad is None for p in experts.experts[1].parameters()])
        opt.step()
    torch.save({"grads_none": grads, "state": experts.state_dict()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
