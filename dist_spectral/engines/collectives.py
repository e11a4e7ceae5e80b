"""The small collectives an optimizer step needs outside the exchange, over one process group.

Every engine adapter holds one :class:`Collectives`; rules and the optimizer never call
``torch.distributed`` for these themselves.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..exchange import wait


def collective_device(group) -> torch.device:
    """Where a small tensor for a collective on ``group`` must live: NCCL takes only CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


class Collectives:
    """All-reduce, any-true, all_gather_object and barrier over one process group.

    Args:
        process_group (ProcessGroup | str | None): the ranks of the plan (see
            :func:`check_process_group`): ``None`` the default group once ``torch.distributed``
            is initialised (without it, one process), ``"local"`` this process alone, or a group.
        timeout (timedelta | None): longest wait of one collective; the optimizer sets it from
            its ``timeout`` option (default: the process group's timeout).

    Attributes:
        world_size (int): ranks in ``group``.
        rank (int): this rank in ``group``.
    """

    def __init__(self, process_group=None, timeout: timedelta | None = None):
        process_group = check_process_group(process_group)
        if process_group != LOCAL and dist.is_available() and dist.is_initialized():
            self.group = dist.group.WORLD if process_group is None else process_group
            self.world_size = dist.get_world_size(self.group)
            self.rank = dist.get_rank(self.group)
        else:
            self.group, self.world_size, self.rank = None, 1, 0
        self.timeout = timeout

    def group_rank(self, global_rank: int) -> int:
        """A global rank's rank in this group (``-1``: not in it)."""
        if self.group is None:
            return 0 if global_rank == (dist.get_rank() if dist.is_initialized() else 0) else -1
        if self.group is dist.group.WORLD:
            return global_rank
        try:
            return dist.get_group_rank(self.group, global_rank)
        except (ValueError, RuntimeError):
            return -1

    def all_reduce_sum(self, tensor: Tensor, what: str) -> Tensor:
        """Sum ``tensor`` over ranks in place and return it; ``what`` names it in errors."""
        if self.world_size > 1:
            wait(dist.all_reduce(tensor, group=self.group, async_op=True), self.timeout)
        return tensor

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (used to skip a step everywhere at once)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=collective_device(self.group))
        wait(dist.all_reduce(t, group=self.group, async_op=True), self.timeout)
        return bool(t.item() > 0)

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def __repr__(self) -> str:
        return f"Collectives(world_size={self.world_size}, rank={self.rank})"


__all__ = ["Collectives", "LOCAL", "check_process_group", "collective_device"]
