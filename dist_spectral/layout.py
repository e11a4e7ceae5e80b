"""Where each element of a parameter lives: one description for every engine.

A :class:`Layout` lists, for every rank, the element ranges of the *flattened global* parameter
that the rank's local tensor holds, in local storage order. Every engine reduces to this::

    single process / DDP      rank r: [(0, numel)]                  (replicated)
    FSDP2 Shard(0), W ranks   rank r: [(r·k·n, min((r+1)·k, R)·n)]   k = ceil(dim0 / W), maybe empty
    Shard(1) of [E, m, n]     rank r: E ranges, one slice of rows per expert
    HSDP (Replicate, Shard)   ranks of one replica group split the rows; groups repeat them
    ZeRO flat partitions      any ranges, rows may be cut

Layouts are pure data: built from a mesh description, never from communication, so every rank
builds the same ones for every rank, and a planner can simulate 1024 ranks on ``meta`` tensors.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

Interval = tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """Element ranges of the flattened parameter held by each rank.

    Attributes:
        shape (tuple[int, ...]): global shape.
        holdings (tuple[tuple[Interval, ...], ...]): per rank, ``[start, stop)`` ranges of the
            flattened parameter in local storage order (increasing, disjoint).
        kind (str): human-readable description (``"replicated"``, ``"Shard(0)"``...).
    """

    shape: tuple[int, ...]
    holdings: tuple[tuple[Interval, ...], ...]
    kind: str = ""

    @property
    def world_size(self) -> int:
        return len(self.holdings)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def cols(self) -> int:
        return self.shape[-1] if self.shape else 1

    def local_numel(self, rank: int) -> int:
        return sum(b - a for a, b in self.holdings[rank])

    def is_replicated(self) -> bool:
        """Every rank holds every element."""
        return all(h == ((0, self.numel),) for h in self.holdings) or self.numel == 0

    def whole_rows(self) -> bool:
        """No rank holds part of a row (row rules can run without gathering)."""
        n = self.cols
        return all(a % n == 0 and b % n == 0 for h in self.holdings for a, b in h)

    def each_element_once(self) -> bool:
        """No element is held by two ranks (ZeRO partitions, FSDP2 without replication)."""
        return sum(b - a for h in self.holdings for a, b in h) == self.numel

    def cut_rows(self) -> tuple[int, ...]:
        """Rows of the 2-D view whose elements live on more than one rank (partition boundaries
        inside a row), in increasing order."""
        n = self.cols
        cut = set()
        for h in self.holdings:
            for a, b in h:
                if a % n:
                    cut.add(a // n)
                if b % n:
                    cut.add(b // n)
        return tuple(sorted(cut))

    def local_offset(self, rank: int, start: int) -> int:
        """Offset in ``rank``'s local tensor of global element ``start`` (which it must hold)."""
        offset = 0
        for a, b in self.holdings[rank]:
            if a <= start < b or (a == b == start):
                return offset + start - a
            offset += b - a
        raise KeyError(f"rank {rank} does not hold element {start} of a tensor of shape {self.shape}")

    def canonical_rows(self, rank: int) -> list[Interval]:
        """Row ranges this rank is the lowest-ranked holder of, so a sum over ranks counts each row once."""
        n = self.cols
        mine = []
        for a, b in self.holdings[rank]:
            pieces = [(a, b)]
            for other in range(rank):
                pieces = [p for piece in pieces for p in _subtract(piece, self.holdings[other])]
            mine += [(x // n, y // n) for x, y in pieces if y > x]
        return mine


def _subtract(piece: Interval, holes: tuple[Interval, ...]) -> list[Interval]:
    out = [piece]
    for ha, hb in holes:
        nxt = []
        for a, b in out:
            if hb <= a or ha >= b:
                nxt.append((a, b))
                continue
            if a < ha:
                nxt.append((a, ha))
            if hb < b:
                nxt.append((hb, b))
        out = nxt
    return out


def intersect(a: Interval, b: Interval) -> Interval | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if hi > lo else None


def replicated(shape: tuple[int, ...], world_size: int) -> Layout:
    """Every rank holds the whole tensor (single process, DDP)."""
    numel = math.prod(shape)
    return Layout(tuple(shape), tuple(((0, numel),) for _ in range(world_size)), "replicated")


def chunk_range(length: int, parts: int, index: int) -> Interval:
    """The ``index``-th of ``parts`` ``torch.chunk`` pieces of ``range(length)`` (DTensor ``Shard``):
    pieces of ``ceil(length/parts)``, so trailing pieces may be short or empty."""
    size = -(-length // parts) if length else 0
    lo = min(index * size, length)
    return (lo, min(lo + size, length))


def box_to_intervals(shape: tuple[int, ...], box: tuple[Interval, ...]) -> tuple[Interval, ...]:
    """Flattened element ranges (row-major) of a box ``[(lo, hi) per dim]`` of a tensor."""
    if not shape:
        return ((0, 1),)
    if any(hi <= lo for lo, hi in box):
        return ()
    last_partial = max((d for d in range(len(shape)) if box[d] != (0, shape[d])), default=-1)
    if last_partial < 0:
        return ((0, math.prod(shape)),)
    inner = math.prod(shape[last_partial + 1:])
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    lo, hi = box[last_partial]
    out = []
    for index in itertools.product(*(range(a, b) for a, b in box[:last_partial])):
        base = sum(i * s for i, s in zip(index, strides))
        out.append((base + lo * inner, base + hi * inner))
    return tuple(out)


def runs(indices) -> tuple[Interval, ...]:
    """Increasing indices as maximal ``[start, stop)`` runs: ``[0, 1, 2, 5, 6]`` → ``((0, 3), (5, 7))``."""
    out: list[list[int]] = []
    for i in indices:
        if out and i == out[-1][1]:
            out[-1][1] += 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


def grid_to_intervals(shape: tuple[int, ...], indices: tuple[tuple[int, ...], ...]) -> tuple[Interval, ...]:
    """Flattened element ranges (row-major) of the sub-grid that keeps, along each dim ``d``, the
    increasing indices ``indices[d]`` (a box when each is a run; strided shards leave gaps)."""
    if not shape:
        return ((0, 1),)
    if any(not ix for ix in indices):
        return ()
    for d, ix in enumerate(indices):
        if any(b <= a for a, b in zip(ix, ix[1:])):
            raise ValueError(f"indices along dim {d} of a tensor of shape {shape} are not increasing: {ix[:8]}...")
    dim_runs = [runs(ix) for ix in indices]
    last_partial = max((d for d in range(len(shape)) if dim_runs[d] != ((0, shape[d]),)), default=-1)
    if last_partial < 0:
        return ((0, math.prod(shape)),)
    inner = math.prod(shape[last_partial + 1:])
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    out: list[list[int]] = []
    for index in itertools.product(*indices[:last_partial]):
        base = sum(i * s for i, s in zip(index, strides))
        for lo, hi in dim_runs[last_partial]:
            a, b = base + lo * inner, base + hi * inner
            if out and out[-1][1] == a:  # adjacent pieces merge: intervals stay maximal
                out[-1][1] = b
            else:
                out.append([a, b])
    return tuple((a, b) for a, b in out)


def mesh_layout(shape: tuple[int, ...], mesh_ranks: list[list] | list, placements: tuple[tuple[str, int], ...],
                world_size: int) -> Layout:
    """Layout of a tensor sharded over a device mesh, as DTensor does it.

    Args:
        shape: global shape.
        mesh_ranks: nested list (the mesh's shape) of global ranks.
        placements: per mesh dim, ``("shard", dim)`` or ``("replicate", -1)``, applied in mesh-dim
            order with ``torch.chunk`` semantics (DTensor's ``Shard``).
        world_size: ranks in the default group; ranks outside the mesh hold nothing.
    """
    import numpy as np

    grid = np.asarray(mesh_ranks)
    holdings: list[tuple[Interval, ...]] = [() for _ in range(world_size)]
    for coord in np.ndindex(*grid.shape):
        box = [(0, s) for s in shape]
        for mesh_dim, (kind, dim) in enumerate(placements):
            if kind == "replicate":
                continue
            lo, hi = box[dim]
            a, b = chunk_range(hi - lo, grid.shape[mesh_dim], coord[mesh_dim])
            box[dim] = (lo + a, lo + b)
        holdings[int(grid[coord])] = box_to_intervals(tuple(shape), tuple(box))
    kind = "(" + ", ".join("Replicate()" if k == "replicate" else f"Shard({d})" for k, d in placements) + ")"
    return Layout(tuple(shape), tuple(holdings), kind)
