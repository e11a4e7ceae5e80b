"""The interface every engine adapter implements."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..layout import Layout


class Topology:
    """How parameters are stored across ranks, and the few collectives rules outside the exchange need.

    Attributes:
        world_size (int): ranks taking part in the plan.
        rank (int): this rank.
        group: process group for collectives (``None`` on one process).
        timeout (timedelta | None): longest wait for one collective (``None``: the process
            group's own timeout); the optimizer sets it from its ``timeout`` option.
    """

    world_size: int = 1
    rank: int = 0
    group = None
    timeout = None

    def layout(self, param: Tensor) -> Layout:
        raise NotImplementedError

    def local(self, tensor: Tensor) -> Tensor:
        """The tensor this rank stores (a DTensor's local shard, or the tensor itself)."""
        return tensor

    def colsum(self, layout: Layout) -> Callable[[Tensor], Tensor]:
        """Sum of a per-row tensor ``[local_rows, n]`` over every row of the matrix → ``[1, n]``."""
        return lambda x: x.sum(-2, keepdim=True)

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (used to skip a step everywhere at once)."""
        return flag

    def all_gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def describe(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size}, rank={self.rank})"


def masked_rows(layout: Layout, rank: int, local_rows: int) -> Tensor | None:
    """A ``[local_rows, 1]`` 0/1 mask of the local rows this rank counts in a sum over ranks
    (``None`` when it counts all of them)."""
    canonical = layout.canonical_rows(rank)
    n = layout.cols
    held = [(a // n, b // n) for a, b in layout.holdings[rank]]
    if canonical == held:
        return None
    mask = torch.zeros(local_rows, 1)
    offset = 0
    for a, b in held:
        for ca, cb in canonical:
            lo, hi = max(a, ca), min(b, cb)
            if hi > lo:
                mask[offset + lo - a:offset + hi - a] = 1
        offset += b - a
    return mask
