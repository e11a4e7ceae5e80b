"""Row rules on a rank's piece of a 2-D parameter: dense local rows and the statistics that complete them.

Shared by every adapter (composition, not inheritance). Whole rows (one process, DDP, DTensor
``Shard(0)``, ZeRO partitions that cut no row): the local rows as they are; column sums count each
row at one holder only, so HSDP replicas do not double count, and all-reduce a length-n vector.
Rows cut between ranks (a ZeRO partition boundary, a 2-D DTensor ``Shard(1)``: a row-parallel
weight under tensor parallel, also replicated over HSDP's ``replicate`` dim): the touched rows
zero-filled with a mask; column sums are one all-reduce of a length-n vector, row sums of the cut
rows one all-reduce with one entry per cut row of the matrix. Either way a sum over the whole
matrix (``total``) is one all-reduce of one number. Every sum is over the optimizer's whole group,
each element counted at its lowest-ranked holder only::

    (dp, tp) = (Shard(0), Shard(1)), 4 ranks     (replicate, tp) = (Replicate(), Shard(1))
            cols 0..n/2   n/2..n                        cols 0..n/2   n/2..n
    rows 0..m/2   r0        r1                   rows   r0 (r2)       r1 (r3)   <- r2, r3 count 0
    rows m/2..m   r2        r3
    colsum: all_reduce([1, n]) over r0..r3: r0 + r2 fill columns 0..n/2, r1 + r3 the rest
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
    return _cut_row_view(layout, flat, collectives)


def _cut_row_view(layout: Layout, flat: Tensor, collectives: Collectives):
    n, reduce = layout.cols, collectives.all_reduce_sum
    index = _fragment_index(layout, collectives.rank)
    dense = flat.new_zeros(len(index.rows), n)
    dense[index.row_pos, index.col] = flat
    mask = torch.zeros_like(dense)
    mask[index.row_pos, index.col] = 1
    # the elements this rank counts in a sum over the group: all it holds unless a lower rank
    # holds them too (replicas)
    counted = mask if index.counted is None else torch.zeros_like(dense)
    if index.counted is not None:
        counted[index.row_pos[index.counted], index.col[index.counted]] = 1

    def colsum(x: Tensor) -> Tensor:
        return reduce((x * counted).sum(-2, keepdim=True).contiguous(), "column sums")

    def rowsum(x: Tensor) -> Tensor:
        partial = (x * mask).sum(-1, keepdim=True)  # rows not cut are whole here, replica or not
        if index.cut:
            shared = partial.new_zeros(len(index.cut))
            shared[index.cut_slots] = (x * counted).sum(-1)[index.cut_local]
            shared = reduce(shared, "row sums of cut rows")
            partial = partial.clone()
            partial[index.cut_local, 0] = shared[index.cut_slots]
        return partial

    def total(x: Tensor) -> Tensor:
        return reduce((x * counted).sum((-2, -1), keepdim=True).contiguous(), "matrix sums")

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
    counted: Tensor | None  # local elements no lower rank holds (``None``: all of them)


@lru_cache(maxsize=1024)
def _fragment_index(layout: Layout, rank: int) -> _Fragments:
    n = layout.cols
    elems = torch.cat([torch.arange(a, b) for a, b in layout.holdings[rank]] or [torch.zeros(0, dtype=torch.long)])
    rows, row_pos = torch.unique(elems // n, sorted=True, return_inverse=True)
    cut = layout.cut_rows()
    slot = {r: i for i, r in enumerate(cut)}
    touched = [(slot[int(r)], i) for i, r in enumerate(rows.tolist()) if int(r) in slot]
    counted = None
    lower = sorted(iv for other in range(rank) for iv in layout.holdings[other])
    if lower and not layout.each_element_once():
        starts = torch.tensor([a for a, _ in lower], dtype=torch.long)
        ends = torch.tensor([b for _, b in lower], dtype=torch.long).cummax(0).values
        at = torch.searchsorted(starts, elems, right=True) - 1  # the last lower interval starting at or before
        held_below = (at >= 0) & (elems < ends[at.clamp_min(0)])
        if held_below.any():
            counted = (~held_below).nonzero().reshape(-1)
    return _Fragments(rows, row_pos, elems % n, cut, torch.tensor([s for s, _ in touched], dtype=torch.long),
                      torch.tensor([i for _, i in touched], dtype=torch.long), counted)


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
