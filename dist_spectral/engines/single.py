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


#: ``process_group`` value for an optimizer that talks to no other rank (see :func:`check_process_group`).
LOCAL = "local"


def check_process_group(process_group):
    """``process_group`` as given to the optimizer: ``None`` (the default group when
    ``torch.distributed`` is initialised, else none), ``"local"`` (this process only: no collective,
    for a model that lives on one rank) or a ``ProcessGroup`` this rank belongs to."""
    if process_group is None or process_group == LOCAL:
        return process_group
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group={process_group!r}: give None (the default process group), 'local' (no "
                        "collectives: a model on this rank only) or a torch.distributed.ProcessGroup")
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"process_group: rank {dist.get_rank()} is not a member of the group it was given; build the "
                         "optimizer only on the group's ranks, or pass process_group='local'")
    return process_group


class ReplicatedTopology(Topology):
    def __init__(self, process_group=None):
        process_group = check_process_group(process_group)
        if process_group != LOCAL and dist.is_available() and dist.is_initialized():
            self.group = dist.group.WORLD if process_group is None else process_group
            self.world_size = dist.get_world_size(self.group)
            self.rank = dist.get_rank(self.group)
        else:
            self.world_size, self.rank, self.group = 1, 0, None

    def group_rank(self, global_rank: int) -> int:
        """A global rank's rank in this topology's group (``-1``: not in it)."""
        if self.group is None:
            return 0 if global_rank == (dist.get_rank() if dist.is_initialized() else 0) else -1
        if self.group is dist.group.WORLD:
            return global_rank
        try:
            return dist.get_group_rank(self.group, global_rank)
        except (ValueError, RuntimeError):
            return -1

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
