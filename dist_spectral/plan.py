"""The communication plan for whole-matrix rules: a frozen value built from parameter metadata.

Every rank builds the same plan from the same layouts, without communicating::

    units      each matrix / expert / head block that must be whole somewhere (see blocks.py)
    owners     longest-processing-time first on estimated flops; a unit already whole on some
               rank (an expert under expert parallel, a head inside a row shard, anything under
               DDP) is owned by one of its holders, so it never moves
    gather     for each piece of a unit not on its owner: (unit, source rank, element range)
    scatter    for each rank holding rows of a unit, except the owner: the rows to send back
    buckets    consecutive units whose total size fits the memory budget; one all_to_all_single
               per bucket and direction

Bytes per rank and step for a Shard(0) matrix: each shard goes to the owner once and comes back
once, ``(W−1)/W`` of the matrix each way in total. Nothing here imports ``torch.distributed``.
"""
from __future__ import annotations

import bisect
import functools
import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

from .blocks import UnitSpec
from .layout import Interval, Layout


@dataclass(frozen=True)
class PlanParam:
    """What the planner needs about one whole-matrix parameter.

    Attributes:
        index (int): position in the optimizer's parameter list.
        name (str): fully qualified name.
        layout (Layout): where its elements live.
        units (tuple[UnitSpec, ...]): its units, in the 2-D view's rows.
        unit_costs (tuple[int, ...]): estimated flops per unit (for balancing).
        unit_polar_flops (tuple[int, ...]): polar flops per unit (for the counters).
        key (tuple): the rule's batching key (for the printed plan).
    """

    index: int
    name: str
    layout: Layout
    units: tuple[UnitSpec, ...]
    unit_costs: tuple[int, ...]
    unit_polar_flops: tuple[int, ...]
    key: tuple = ()


@dataclass(frozen=True)
class Unit:
    uid: int
    param: int  # position in Plan.params
    spec: UnitSpec
    start: int  # element range of the flattened parameter
    stop: int
    owner: int
    cost: int
    polar_flops: int
    bucket: int


@dataclass(frozen=True)
class Piece:
    """``[start, stop)`` of unit ``uid``'s parameter moving from ``src`` to ``dst``."""

    uid: int
    src: int
    dst: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Bucket:
    units: tuple[int, ...]
    gather: tuple[Piece, ...]   # sources -> owners
    scatter: tuple[Piece, ...]  # owners -> holders

    def split_sizes(self, rank: int, world_size: int, phase: str) -> tuple[list[int], list[int]]:
        """(input_split_sizes, output_split_sizes) of ``rank``'s all_to_all_single in ``phase``."""
        pieces = self.gather if phase == "gather" else self.scatter
        send, recv = [0] * world_size, [0] * world_size
        for p in pieces:
            if p.src == rank:
                send[p.dst] += p.numel
            if p.dst == rank:
                recv[p.src] += p.numel
        return send, recv


@dataclass(frozen=True, eq=False)
class Plan:
    world_size: int
    params: tuple[PlanParam, ...]
    units: tuple[Unit, ...]
    buckets: tuple[Bucket, ...]
    bucket_bytes: int
    element_bytes: int = 4
    fingerprint: str = field(default="", compare=False)

    # ----- what the counters must equal -----
    @functools.cached_property
    def _totals(self) -> dict[str, list[int]]:
        """Per-rank sums, computed once: flops, cost, and elements sent/received per phase."""
        W = self.world_size
        t = {k: [0] * W for k in ("polar", "cost", "gather_sent", "gather_received", "scatter_sent", "scatter_received")}
        for u in self.units:
            t["polar"][u.owner] += u.polar_flops
            t["cost"][u.owner] += u.cost
        for b in self.buckets:
            for phase, pieces in (("gather", b.gather), ("scatter", b.scatter)):
                for p in pieces:
                    t[f"{phase}_sent"][p.src] += p.numel
                    t[f"{phase}_received"][p.dst] += p.numel
        return t

    def polar_flops(self, rank: int) -> int:
        return self._totals["polar"][rank]

    def cost(self, rank: int) -> int:
        return self._totals["cost"][rank]

    def bytes_sent(self, rank: int, phase: str) -> int:
        return self.element_bytes * self._totals[f"{phase}_sent"][rank]

    def bytes_received(self, rank: int, phase: str) -> int:
        return self.element_bytes * self._totals[f"{phase}_received"][rank]

    def balance(self) -> float:
        """max / mean estimated flops over ranks (1.0 is perfect)."""
        loads = [self.cost(r) for r in range(self.world_size)]
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0

    def describe(self, names: bool = True) -> str:
        """A printable schedule: per bucket, units with owner; per rank, flops and bytes."""
        lines = [f"plan: {len(self.units)} units of {len(self.params)} parameters, {len(self.buckets)} buckets, "
                 f"W={self.world_size}, balance max/mean flops = {self.balance():.3f}"]
        for bi, b in enumerate(self.buckets):
            lines.append(f"bucket {bi}: {len(b.units)} units, gather {len(b.gather)} pieces, "
                         f"scatter {len(b.scatter)} pieces")
            if names:
                for uid in b.units:
                    u = self.units[uid]
                    p = self.params[u.param]
                    lines.append(f"  unit {uid:5d} {p.name}[rows {u.spec.row_start}:{u.spec.row_stop}] "
                                 f"blocks={len(u.spec.blocks)} owner={u.owner} cost={u.cost:.3g}")
        lines.append(f"{'rank':>5} {'polar GFLOP':>12} {'gather sent MB':>15} {'gather recv MB':>15} "
                     f"{'scatter sent MB':>16} {'scatter recv MB':>16}")
        for r in range(self.world_size):
            lines.append(f"{r:5d} {self.polar_flops(r) / 1e9:12.3f} {self.bytes_sent(r, 'gather') / 1e6:15.3f} "
                         f"{self.bytes_received(r, 'gather') / 1e6:15.3f} {self.bytes_sent(r, 'scatter') / 1e6:16.3f} "
                         f"{self.bytes_received(r, 'scatter') / 1e6:16.3f}")
        return "\n".join(lines)


class _IntervalIndex:
    """Every rank's intervals of one layout, sorted by start, for fast "who holds [a, b)" queries
    (a plan at W = 1024 asks this for tens of thousands of units)."""

    def __init__(self, layout: Layout):
        items = sorted((a, b, r) for r, ivs in enumerate(layout.holdings) for a, b in ivs if b > a)
        self.starts = [a for a, _, _ in items]
        self.items = items
        self.reach = list(itertools.accumulate((b for _, b, _ in items), max))  # max stop so far

    def overlapping(self, start: int, stop: int):
        i = bisect.bisect_left(self.starts, stop) - 1
        while i >= 0 and self.reach[i] > start:
            a, b, r = self.items[i]
            if b > start:
                yield r, (max(a, start), min(b, stop))
            i -= 1


def _holders(index: _IntervalIndex, start: int, stop: int) -> tuple[list[int], dict[int, list[Interval]]]:
    """Ranks holding all of ``[start, stop)``, and each rank's intersections with it (in order)."""
    parts: dict[int, list[Interval]] = {}
    for rank, iv in index.overlapping(start, stop):
        parts.setdefault(rank, []).append(iv)
    whole = []
    for rank in sorted(parts):
        parts[rank].sort()
        if sum(b - a for a, b in parts[rank]) == stop - start:
            whole.append(rank)
    return whole, dict(sorted(parts.items()))


def _sources(uid: int, owner: int, start: int, stop: int, parts: dict[int, list[Interval]]) -> list[Piece]:
    """Cover ``[start, stop)`` with pieces: from the owner where it holds them, else from one holder,
    chosen by unit id so replicas share the sending."""
    cuts = sorted({start, stop} | {x for ivs in parts.values() for iv in ivs for x in iv})
    holders: list[list[int]] = [[] for _ in range(len(cuts) - 1)]
    for rank, ivs in parts.items():
        for x, y in ivs:
            for k in range(bisect.bisect_left(cuts, x), bisect.bisect_left(cuts, y)):
                holders[k].append(rank)
    pieces: list[Piece] = []
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        if not holders[k]:
            raise ValueError(f"elements [{a}, {b}) of a unit are held by no rank: the layout does not cover the tensor")
        src = owner if owner in holders[k] else holders[k][uid % len(holders[k])]
        if pieces and pieces[-1].src == src and pieces[-1].stop == a:
            pieces[-1] = Piece(uid, src, owner, pieces[-1].start, b)
        else:
            pieces.append(Piece(uid, src, owner, a, b))
    return [p for p in pieces if p.src != owner]


def build_plan(params: list[PlanParam], world_size: int, bucket_bytes: int = 256 << 20,
               element_bytes: int = 4) -> Plan:
    """Assign owners, cut buckets and list every piece that moves (deterministic in its inputs).

    Args:
        params: whole-matrix parameters in optimizer order.
        world_size: ranks taking part.
        bucket_bytes: the most unit bytes gathered at once (default: 256 MiB).
        element_bytes: bytes per element on the wire (4 for fp32, 2 for bf16).
    """
    raw = []  # (param position, spec, start, stop, cost, polar, whole holders, parts)
    for pi, p in enumerate(params):
        n = p.layout.cols
        index = _IntervalIndex(p.layout)
        for spec, cost, pf in zip(p.units, p.unit_costs, p.unit_polar_flops):
            start, stop = spec.row_start * n, spec.row_stop * n
            whole, parts = _holders(index, start, stop)
            raw.append((pi, spec, start, stop, cost, pf, whole, parts))

    # Longest processing time first: forced units (already whole somewhere) go first, on their holders.
    load = [0] * world_size
    owners = [0] * len(raw)
    forced = [i for i, r in enumerate(raw) if r[6] and len(r[6]) < world_size]
    free = [i for i, r in enumerate(raw) if not (r[6] and len(r[6]) < world_size)]
    for i in sorted(forced, key=lambda i: (-raw[i][4], i)):
        owner = min(raw[i][6], key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += max(raw[i][4], 1)
    heap = [(load[r], r) for r in range(world_size)]  # least-loaded rank first, ties to the lower rank
    heapq.heapify(heap)
    for i in sorted(free, key=lambda i: (-raw[i][4], i)):
        current, owner = heapq.heappop(heap)
        owners[i] = owner
        load[owner] = current + max(raw[i][4], 1)
        heapq.heappush(heap, (load[owner], owner))

    units: list[Unit] = []
    buckets: list[Bucket] = []
    members, gathers, scatters, size = [], [], [], 0
    for i, (pi, spec, start, stop, cost, pf, whole, parts) in enumerate(raw):
        nbytes = (stop - start) * element_bytes
        if members and size + nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(members), tuple(gathers), tuple(scatters)))
            members, gathers, scatters, size = [], [], [], 0
        owner = owners[i]
        units.append(Unit(i, pi, spec, start, stop, owner, cost, pf, len(buckets)))
        members.append(i)
        size += nbytes
        gathers += _sources(i, owner, start, stop, parts)
        for rank, ivs in parts.items():
            if rank != owner:
                scatters += [Piece(i, owner, rank, a, b) for a, b in ivs]
    if members:
        buckets.append(Bucket(tuple(members), tuple(gathers), tuple(scatters)))
    plan = Plan(world_size, tuple(params), tuple(units), tuple(buckets), bucket_bytes, element_bytes)
    object.__setattr__(plan, "fingerprint", fingerprint(params))
    return plan


def fingerprint(params: list[PlanParam]) -> str:
    """A short digest of what every rank must agree on (names, shapes, layouts, rules)."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(repr((p.name, p.layout.shape, p.layout.holdings, p.key, len(p.units))).encode())
    return h.hexdigest()[:16]


def group_by_owner(plan: Plan, bucket: Bucket) -> dict[int, list[Unit]]:
    out: dict[int, list[Unit]] = defaultdict(list)
    for uid in bucket.units:
        out[plan.units[uid].owner].append(plan.units[uid])
    return out
