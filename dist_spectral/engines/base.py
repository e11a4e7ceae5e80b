"""The interface every engine adapter implements."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from ..layout import Layout
from ..rules import RowStats


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

    def all_reduce_sum(self, tensor: Tensor, what: str) -> Tensor:
        """Sum ``tensor`` over ranks in place (identity on one process)."""
        return tensor

    def row_view(self, layout: Layout, flat: Tensor) -> tuple[Tensor, RowStats, Callable[[Tensor], Tensor]]:
        """This rank's part of a 2-D parameter as dense rows, the :class:`RowStats` that complete
        it, and the map from a dense result back to the flat local layout.

        Whole rows: a view, column sums all-reduced (:meth:`colsum`). Rows cut by partition
        boundaries (DeepSpeed ZeRO): the touched rows zero-filled with a mask; column sums are one
        all-reduce of a length-n vector, row sums of the cut rows one all-reduce of a vector with one
        entry per cut row of the matrix. Either way a sum over the whole matrix (``total``) is one
        all-reduce of one number.
        """
        rows, n = layout.shape[0], layout.cols
        if layout.whole_rows():
            colsum = self.colsum(layout)
            return flat.reshape(-1, n), RowStats(colsum=colsum, total_rows=rows,
                                                 total=lambda x: colsum(x.sum(-1, keepdim=True))), \
                lambda u: u.reshape(-1)
        if not layout.each_element_once():
            raise ValueError(f"a {layout.kind or 'sharded'} layout of shape {layout.shape} both cuts rows and repeats "
                             "elements across ranks; row rules cannot run on it")
        index = _fragment_index(layout, self.rank)
        dense = flat.new_zeros(len(index.rows), n)
        dense[index.row_pos, index.col] = flat
        mask = torch.zeros_like(dense)
        mask[index.row_pos, index.col] = 1

        def colsum(x: Tensor) -> Tensor:
            return self.all_reduce_sum((x * mask).sum(-2, keepdim=True).contiguous(), "column sums")

        def rowsum(x: Tensor) -> Tensor:
            partial = (x * mask).sum(-1, keepdim=True)
            if index.cut:
                shared = partial.new_zeros(len(index.cut))
                shared[index.cut_slots] = partial[index.cut_local, 0]
                shared = self.all_reduce_sum(shared, "row sums of cut rows")
                partial = partial.clone()
                partial[index.cut_local, 0] = shared[index.cut_slots]
            return partial

        def total(x: Tensor) -> Tensor:
            return self.all_reduce_sum((x * mask).sum((-2, -1), keepdim=True).contiguous(), "matrix sums")

        return dense, RowStats(colsum=colsum, rowsum=rowsum, total_rows=rows, mask=mask, total=total), \
            lambda u: u[index.row_pos, index.col]

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (used to skip a step everywhere at once)."""
        return flag

    def all_gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def describe(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size}, rank={self.rank})"


@dataclass(frozen=True)
class _Fragments:
    rows: Tensor        # global rows this rank touches, increasing
    row_pos: Tensor     # per local element: its row's position in ``rows``
    col: Tensor         # per local element: its column
    cut: tuple          # every cut row of the matrix (all ranks agree)
    cut_slots: Tensor   # for the touched cut rows: slot in ``cut``
    cut_local: Tensor   # ... and position in ``rows``


@lru_cache(maxsize=1024)
def _fragment_index(layout: Layout, rank: int) -> _Fragments:
    n = layout.cols
    elems = torch.cat([torch.arange(a, b) for a, b in layout.holdings[rank]] or [torch.zeros(0, dtype=torch.long)])
    rows, row_pos = torch.unique(elems // n, sorted=True, return_inverse=True)
    cut = layout.cut_rows()
    slot = {r: i for i, r in enumerate(cut)}
    touched = [(slot[int(r)], i) for i, r in enumerate(rows.tolist()) if int(r) in slot]
    return _Fragments(rows, row_pos, elems % n, cut, torch.tensor([s for s, _ in touched], dtype=torch.long),
                      torch.tensor([i for _, i in touched], dtype=torch.long))


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
