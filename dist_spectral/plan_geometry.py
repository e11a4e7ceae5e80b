"""Where each unit of a parameter lives, and the pieces that move it: the vectorised core of
:func:`dist_spectral.plan.build_plan`.

A parameter's *geometry* (which ranks hold which part of each unit, and the unit cut into
segments held by the same set of ranks) depends only on its layout and its units' element
ranges, so the plan computes it once per distinct (layout, units) and shares it across the
layers that have the same. Given the units' owners, :func:`unit_pieces` then turns a geometry
into gather and scatter pieces as numpy columns ``(uid, src, dst, start, stop)``: a plan at
W = 1024 has millions of pieces, so nothing here loops over them in Python.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layout import Layout


@dataclass(frozen=True)
class Geometry:
    """Where a parameter's units live, unit indices local to the parameter.

    parts      (unit, rank, lo, hi): each rank interval ∩ unit, sorted by (unit, rank, lo)
    whole      CSR per unit (whole_ptr) of the ranks holding all of it (whole_rank), ascending
    segments   the unit cut at every part boundary: seg_unit, seg_lo, seg_hi, in element order;
               holders of each in CSR (hold_ptr, hold_rank ascending)
    """

    part_unit: np.ndarray
    part_rank: np.ndarray
    part_lo: np.ndarray
    part_hi: np.ndarray
    whole_ptr: np.ndarray
    whole_rank: np.ndarray
    seg_unit: np.ndarray
    seg_lo: np.ndarray
    seg_hi: np.ndarray
    hold_ptr: np.ndarray
    hold_rank: np.ndarray


def intervals(layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, stop, rank) of every non-empty interval of a layout."""
    counts = [len(h) for h in layout.holdings]
    total = sum(counts)
    flat = np.fromiter((x for h in layout.holdings for iv in h for x in iv), dtype=np.int64, count=2 * total)
    a, b = flat[0::2], flat[1::2]
    r = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    keep = b > a
    return a[keep], b[keep], r[keep]


def csr(groups: np.ndarray, count: int) -> np.ndarray:
    """Row pointers of entries sorted by ``groups`` (values in [0, count))."""
    return np.concatenate(([0], np.cumsum(np.bincount(groups, minlength=count)))).astype(np.int64)


def geometry(intervals, ustart: np.ndarray, ustop: np.ndarray) -> Geometry:
    a, b, r = intervals
    U = len(ustart)
    # Every (interval, unit) pair that overlaps: units are disjoint and in element order, so each
    # interval meets a contiguous run of units.
    ordered = U <= 1 or bool(np.all(ustart[1:] >= ustop[:-1]))
    if ordered:
        u_lo = np.searchsorted(ustop, a, side="right")
        u_hi = np.searchsorted(ustart, b, side="left")
        counts = np.maximum(u_hi - u_lo, 0)
        iv = np.repeat(np.arange(len(a)), counts)
        first = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(counts) else np.zeros(0, np.int64)
        unit = u_lo[iv] + (np.arange(len(iv)) - first[iv]) if len(iv) else np.zeros(0, np.int64)
    else:  # arbitrary unit ranges (not produced by unit_specs): test every pair
        iv, unit = np.nonzero((a[:, None] < ustop[None, :]) & (b[:, None] > ustart[None, :]))
    lo = np.maximum(a[iv], ustart[unit])
    hi = np.minimum(b[iv], ustop[unit])
    rank = r[iv]
    keep = (hi > lo) | (ustart[unit] == ustop[unit])
    unit, rank, lo, hi = unit[keep], rank[keep], lo[keep], hi[keep]
    order = np.lexsort((hi, lo, rank, unit))
    unit, rank, lo, hi = unit[order], rank[order], lo[order], hi[order]

    # Ranks holding a whole unit: their parts add up to the unit's length.
    if len(unit):
        new = np.concatenate(([True], (unit[1:] != unit[:-1]) | (rank[1:] != rank[:-1])))
        starts = np.flatnonzero(new)
        held = np.add.reduceat(hi - lo, starts)
        g_unit, g_rank = unit[starts], rank[starts]
        is_whole = held == (ustop - ustart)[g_unit]
        w_unit, w_rank = g_unit[is_whole], g_rank[is_whole]
    else:
        w_unit = w_rank = np.zeros(0, np.int64)
    whole_ptr = csr(w_unit, U)

    # Segments: each unit cut at every part boundary (and its own ends).
    cu = np.concatenate((unit, unit, np.arange(U), np.arange(U)))
    cx = np.concatenate((lo, hi, ustart, ustop))
    order = np.lexsort((cx, cu))
    cu, cx = cu[order], cx[order]
    distinct = np.concatenate(([True], (cu[1:] != cu[:-1]) | (cx[1:] != cx[:-1]))) if len(cu) else np.zeros(0, bool)
    cu, cx = cu[distinct], cx[distinct]
    seg = np.flatnonzero(cu[1:] == cu[:-1]) if len(cu) else np.zeros(0, np.int64)  # cut j .. j+1, same unit
    seg_unit, seg_lo, seg_hi = cu[seg], cx[seg], cx[seg + 1]
    # Holders of each segment: every part covers the cuts from its lo to its hi.
    # A strictly increasing key of the cuts, to find each part's first and last cut: with units in
    # element order, x + unit separates a unit's stop from the next one's equal start.
    if ordered:
        key, key_lo, key_hi = cx + cu, lo + unit, hi + unit
    else:
        span = (ustop - ustart).max(initial=0) + 1
        key, key_lo, key_hi = (cu * span + (cx - ustart[cu]), unit * span + (lo - ustart[unit]),
                               unit * span + (hi - ustart[unit]))
    pos_lo = np.searchsorted(key, key_lo)
    pos_hi = np.searchsorted(key, key_hi)
    n = pos_hi - pos_lo
    part = np.repeat(np.arange(len(unit)), n)
    first = np.concatenate(([0], np.cumsum(n)[:-1])) if len(n) else np.zeros(0, np.int64)
    cut = pos_lo[part] + (np.arange(len(part)) - first[part])
    seg_of_cut = np.full(len(cu), -1, dtype=np.int64)
    seg_of_cut[seg] = np.arange(len(seg))
    h_seg, h_rank = seg_of_cut[cut], rank[part]
    order = np.lexsort((h_rank, h_seg))
    h_seg, h_rank = h_seg[order], h_rank[order]
    hold_ptr = csr(h_seg, len(seg))
    empty = np.flatnonzero(hold_ptr[1:] == hold_ptr[:-1])
    if len(empty):
        s = empty[0]
        raise ValueError(f"elements [{seg_lo[s]}, {seg_hi[s]}) of a unit are held by no rank: the layout does not "
                         "cover the tensor")
    return Geometry(unit, rank, lo, hi, whole_ptr, w_rank, seg_unit, seg_lo, seg_hi, hold_ptr, h_rank)


def unit_pieces(geo: Geometry, uid: np.ndarray, owner: np.ndarray, replicated: np.ndarray,
            world_size: int) -> tuple[tuple, tuple, tuple]:
    """Gather and scatter columns of one parameter, given its units' ids, owners and which are
    replicated, and the (unit, rank) pairs of the replicated units' holders.

    Gather: each segment comes from the owner where it holds it, else from one holder chosen by
    unit id (so replicas share the sending); consecutive segments from the same rank merge.
    Replicated units: see :func:`replica_pieces`.
    """
    seg_owner = owner[geo.seg_unit]
    count = np.diff(geo.hold_ptr)
    h_seg = np.repeat(np.arange(len(count)), count)
    has_owner = np.zeros(len(count), dtype=bool)
    has_owner[h_seg[geo.hold_rank == seg_owner[h_seg]]] = True
    pick = geo.hold_ptr[:-1] + uid[geo.seg_unit] % np.maximum(count, 1)
    src = np.where(has_owner, seg_owner, geo.hold_rank[pick] if len(pick) else seg_owner)
    if len(src):
        run = np.concatenate(([True], (geo.seg_unit[1:] != geo.seg_unit[:-1]) | (src[1:] != src[:-1])))
        starts = np.flatnonzero(run)
        stops = np.concatenate((starts[1:], [len(src)])) - 1
        r_unit, r_src, r_lo, r_hi = geo.seg_unit[starts], src[starts], geo.seg_lo[starts], geo.seg_hi[stops]
        move = (r_src != owner[r_unit]) & ~replicated[r_unit]
        gather = (uid[r_unit[move]], r_src[move], owner[r_unit[move]], r_lo[move], r_hi[move])
    else:
        gather = tuple(np.zeros(0, np.int64) for _ in range(5))
    back = (geo.part_rank != owner[geo.part_unit]) & ~replicated[geo.part_unit]
    u = geo.part_unit[back]
    scatter = (uid[u], owner[u], geo.part_rank[back], geo.part_lo[back], geo.part_hi[back])
    if not replicated.any():
        return gather, scatter, (np.zeros(0, np.int64), np.zeros(0, np.int64))
    extra, holders = replica_pieces(geo, uid, replicated, world_size)
    cols = [np.concatenate((a, b)) for a, b in zip(gather, extra)]
    order = np.argsort(cols[0], kind="stable")  # unit order; each unit's pieces keep theirs
    return tuple(c[order] for c in cols), scatter, holders


def replica_pieces(geo: Geometry, uid: np.ndarray, replicated: np.ndarray, world_size: int):
    """Gather columns of the replicated units: every rank holding part of one (a *holder*)
    receives each segment it lacks from one of that segment's holders; the ranks lacking a
    segment are dealt to its holders in turn (starting from one picked by unit id), so replicas
    share the sending; consecutive segments from the same rank merge.
    Pieces are in unit order, then receiving rank, then element order. Also returns the
    (unit, holder) pairs, by unit then rank."""
    keep = replicated[geo.part_unit] & (geo.part_hi > geo.part_lo)
    pu, pr = geo.part_unit[keep], geo.part_rank[keep]  # sorted by (unit, rank)
    first = np.concatenate(([True], (pu[1:] != pu[:-1]) | (pr[1:] != pr[:-1]))) if len(pu) else np.zeros(0, bool)
    ru, rd = pu[first], pr[first]
    seg_ptr = csr(geo.seg_unit, len(replicated))  # segments are sorted by unit
    nseg = seg_ptr[ru + 1] - seg_ptr[ru]
    pair = np.repeat(np.arange(len(ru)), nseg)
    offsets = np.concatenate(([0], np.cumsum(nseg)[:-1])) if len(nseg) else np.zeros(0, np.int64)
    seg = seg_ptr[ru][pair] + (np.arange(len(pair)) - offsets[pair])
    dst = rd[pair]
    # Does the receiver hold the segment? Holders are sorted by (segment, rank): search the key.
    count = np.diff(geo.hold_ptr)
    held_key = np.repeat(np.arange(len(count)), count) * world_size + geo.hold_rank
    want = seg * world_size + dst
    at = np.minimum(np.searchsorted(held_key, want), max(len(held_key) - 1, 0))
    held = held_key[at] == want if len(held_key) else np.zeros(len(want), bool)
    # Deal the receivers lacking a segment round-robin over its holders (from one picked by unit
    # id): entries are in receiver order, so a stable sort by segment numbers them.
    lacking = np.flatnonzero(~held)
    lacking = lacking[np.argsort(seg[lacking], kind="stable")]
    turn = np.zeros(len(seg), dtype=np.int64)
    turn[lacking] = np.arange(len(lacking)) - np.searchsorted(seg[lacking], seg[lacking], side="left")
    pick = geo.hold_ptr[seg] + (uid[geo.seg_unit[seg]] + turn) % np.maximum(count[seg], 1)
    src = np.where(held, dst, geo.hold_rank[pick] if len(pick) else dst)
    if not len(src):
        return tuple(np.zeros(0, np.int64) for _ in range(5)), (ru, rd)
    run = np.concatenate(([True], (pair[1:] != pair[:-1]) | (src[1:] != src[:-1])))
    starts = np.flatnonzero(run)
    stops = np.concatenate((starts[1:], [len(src)])) - 1
    r_pair, r_src = pair[starts], src[starts]
    lo, hi = geo.seg_lo[seg[starts]], geo.seg_hi[seg[stops]]
    move = r_src != rd[r_pair]
    r_pair = r_pair[move]
    return (uid[ru[r_pair]], r_src[move], rd[r_pair], lo[move], hi[move]), (ru, rd)


__all__ = ["Geometry", "csr", "geometry", "intervals", "replica_pieces", "unit_pieces"]
