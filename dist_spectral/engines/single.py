"""One process, or DDP: every rank holds every parameter whole.

Under DDP the gradients are already all-reduced, so ranks split the whole-matrix units among
themselves (the plan balances them) and the scatter phase sends each result to every other rank:
the same bytes as one all-gather, and no rank repeats another's work. Replicated units (small
routers, see plan.py) are the exception: every rank computes them, and nothing moves.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..exchange import wait
from ..layout import Layout, replicated
from .base import Topology


class ReplicatedTopology(Topology):
    def __init__(self):
        if dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size()
            self.rank = dist.get_rank()
            self.group = dist.group.WORLD
        else:
            self.world_size, self.rank, self.group = 1, 0, None

    def layout(self, param: Tensor) -> Layout:
        return replicated(tuple(param.shape), self.world_size)

    def all_reduce_sum(self, tensor, what: str):
        if self.world_size > 1:
            wait(dist.all_reduce(tensor, group=self.group, async_op=True), self.timeout)
        return tensor

    def any_true(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=collective_device(self.group))
        wait(dist.all_reduce(t, group=self.group, async_op=True), self.timeout)
        return bool(t.item() > 0)

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


def collective_device(group) -> torch.device:
    """Where a small tensor for a collective on ``group`` must live: NCCL takes only CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
