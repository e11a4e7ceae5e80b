"""Row rules on a rank's piece of a 2-D parameter: dense local rows and the statistics that complete them.

Shared by every adapter (composition, not inheritance). Whole rows (one process, DDP, DTensor
``Shard(0)``, ZeRO partitions that cut no row): the local rows as they are; column sums count each
row at one holder only, so HSDP replicas do not double count, and all-reduce a length-n vector.
Rows cut between ranks (a ZeRO partition boundary, a 2-D DTensor ``Shard(1)``): the touched rows
zero-filled with a mask; column sums are one all-reduce of a length-n vector, row sums of the cut
rows one all-reduce with one entry per cut row of the matrix. Either way a sum over the whole
matrix (``total``) is one all-reduce of one number.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

from ..layout import Layout
from ..rules import RowStats
from .collectives import Collectives


def column_sums(layout: Layout, collectives: Collectives) -> Callable[[Tensor], Tensor]:
    """Sum of a per-row tensor ``[local_rows, n]`` over every row of the matrix → ``[1, n]``."""
    if layout.is_replicated() or collectives.world_size == 1:
        return lambda x: x.sum(-2, keepdim=True)
    rank = collectives.rank

    def colsum(x: Tensor) -> Tensor:
        mask = masked_rows(layout, rank, x.shape[-2])
        partial = (x if mask is None else x * mask.to(x)).sum(-2, keepdim=True).contiguous()
        return collectives.all_reduce_sum(partial, "column sums")

    return colsum


def row_view(layout: Layout, flat: Tensor, collectives: Collectives):
    """This rank's part of a 2-D parameter as dense rows, the :class:`RowStats` that complete it,
    and the map from a dense result back to the flat local layout (see the module docstring)."""
    if layout.whole_rows():
        colsum = column_sums(layout, collectives)
        return flat.reshape(-1, layout.cols), RowStats(colsum=colsum, total_rows=layout.shape[0],
                                                       total=lambda x: colsum(x.sum(-1, keepdim=True))), \
            lambda u: u.reshape(-1)
    if not layout.each_element_once():
        raise ValueError(f"a {layout.kind or 'sharded'} layout of shape {layout.shape} both cuts rows and repeats "
                         "elements across ranks; row rules cannot run on it")
    return _cut_row_view(layout, flat, collectives)


def _cut_row_view(layout: Layout, flat: Tensor, collectives: Collectives):
    n, reduce = layout.cols, collectives.all_reduce_sum
    index = _fragment_index(layout, collectives.rank)
    dense = flat.new_zeros(len(index.rows), n)
    dense[index.row_pos, index.col] = flat
    mask = torch.zeros_like(dense)
    mask[index.row_pos, index.col] = 1

    def colsum(x: Tensor) -> Tensor:
        return reduce((x * mask).sum(-2, keepdim=True).contiguous(), "column sums")

    def rowsum(x: Tensor) -> Tensor:
        partial = (x * mask).sum(-1, keepdim=True)
        if index.cut:
            shared = partial.new_zeros(len(index.cut))
            shared[index.cut_slots] = partial[index.cut_local, 0]
            shared = reduce(shared, "row sums of cut rows")
            partial = partial.clone()
            partial[index.cut_local, 0] = shared[index.cut_slots]
        return partial

    def total(x: Tensor) -> Tensor:
        return reduce((x * mask).sum((-2, -1), keepdim=True).contiguous(), "matrix sums")

    return dense, RowStats(colsum=colsum, rowsum=rowsum, total_rows=layout.shape[0], mask=mask, total=total), \
        lambda u: u[index.row_pos, index.col]


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


__all__ = ["column_sums", "row_view", "masked_rows"]
