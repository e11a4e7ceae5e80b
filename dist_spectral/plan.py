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

Replicated units. A small unit of a rule that runs no polar iterations and carries no state (a
router ``e×d`` under left-spectral, a per-matrix row rule) may instead be *replicated*: every rank
holding part of it receives every piece it lacks, in the same gather all_to_all_single (no extra
collective), computes the whole direction and keeps its own rows, so the unit has no scatter
pieces and no owner (``Unit.owner == REPLICATED``; ``Unit.replicas`` lists the ranks computing
it). Under DDP it is whole everywhere: nothing moves. Chosen per unit from its size alone
(``replicate_below`` elements), so every rank and every W decide alike. Its pieces are counted as
their own phase, ``replicate``, and its duplicated work as ``replicated_flops``. Polar units never
qualify: duplicating them is what the exchange exists to avoid, and a threshold sized for
routers would catch per-head blocks of the same size.

Bytes per rank and step for a Shard(0) matrix: each shard goes to the owner once and comes back
once, ``(W−1)/W`` of the matrix each way in total. A rule with carried state (Conda, ARO) moves
several parameter-shaped tensors per piece, its :attr:`PlanParam.channels`, and every byte count
and split size is multiplied by them; the pieces themselves stay element ranges of the parameter.
Nothing here imports ``torch.distributed``.

How it is built (a plan at W = 1024 has millions of pieces, so nothing below loops over them in
Python; the numpy core is :mod:`dist_spectral.plan_geometry`). For each parameter, the
*geometry* — which ranks hold which part of each unit, cut into segments held by the same set
of ranks — depends only on the layout and the unit row ranges, so
it is computed once with numpy and shared by every parameter with the same layout and units (the
94 layers of a model share a handful). Owners are chosen one unit at a time (LPT is sequential;
tens of thousands of units), then every parameter's pieces are vectorised from its geometry and
owners. Pieces are stored as columns (:class:`Pieces`) and read as a tuple of :class:`Piece`,
built on first access.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import plan_geometry
from .blocks import UnitSpec
from .layout import Layout


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
        channels (tuple[int, int]): tensors moved per element of a unit, (to the owner, back): 1 and
            1 for a stateless rule (its direction input out, its direction back); a rule with
            carried state also moves its inputs and state out and its new state back (see
            :class:`~dist_spectral.rules.Rule`), so every byte count scales by these.
    """

    index: int
    name: str
    layout: Layout
    units: tuple[UnitSpec, ...]
    unit_costs: tuple[int, ...]
    unit_polar_flops: tuple[int, ...]
    key: tuple = ()
    channels: tuple[int, int] = (1, 1)


REPLICATED = -1  #: the owner of a replicated unit: every rank holding part of it computes it


@dataclass(frozen=True)
class Unit:
    uid: int
    param: int  # position in Plan.params
    spec: UnitSpec
    start: int  # element range of the flattened parameter
    stop: int
    owner: int  # REPLICATED for a replicated unit
    cost: int
    polar_flops: int
    bucket: int
    replicas: tuple[int, ...] = ()  # replicated unit: the ranks holding part of it, which compute it

    @property
    def replicated(self) -> bool:
        return self.owner == REPLICATED

    def computed_on(self) -> tuple[int, ...]:
        """The ranks that run this unit's rule."""
        return self.replicas if self.replicated else (self.owner,)


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


_COLUMNS = ("uid", "src", "dst", "start", "stop")


class Pieces(Sequence):
    """The pieces of one bucket and direction, as columns; reads like a tuple of :class:`Piece`.

    ``uid``, ``src``, ``dst``, ``start`` and ``stop`` are read-only int64 numpy arrays. Indexing and iteration build :class:`Piece` objects (once, then cached); per-rank
    questions are better asked of the columns, e.g. ``pieces.select(src=rank)``.
    """

    __slots__ = _COLUMNS + ("_tuple",)

    def __init__(self, uid, src, dst, start, stop):
        for name, col in zip(_COLUMNS, (uid, src, dst, start, stop)):
            view = np.asarray(col, dtype=np.int64).view()
            view.flags.writeable = False  # plans are shared values
            object.__setattr__(self, name, view)
        object.__setattr__(self, "_tuple", None)

    def __setattr__(self, name, value):
        raise AttributeError("Pieces is immutable")

    @classmethod
    def of(cls, pieces: Iterable[Piece]) -> Pieces:
        """Columns of a sequence of :class:`Piece` (the inverse of ``tuple(pieces)``)."""
        if isinstance(pieces, Pieces):
            return pieces
        rows = [(p.uid, p.src, p.dst, p.start, p.stop) for p in pieces]
        cols = np.array(rows, dtype=np.int64).reshape(len(rows), 5).T
        return cls(*cols)

    @property
    def numel(self) -> np.ndarray:
        """Elements of each piece."""
        return self.stop - self.start

    def as_tuple(self) -> tuple[Piece, ...]:
        if self._tuple is None:
            cols = [c.tolist() for c in (self.uid, self.src, self.dst, self.start, self.stop)]
            object.__setattr__(self, "_tuple", tuple(map(Piece, *cols)))
        return self._tuple

    def select(self, mask=None, *, src: int | None = None, dst: int | None = None) -> Pieces:
        """The pieces where ``mask`` (a boolean array) holds, and from ``src`` / to ``dst`` if given, in order."""
        keep = np.ones(len(self), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if src is not None:
            keep = keep & (self.src == src)
        if dst is not None:
            keep = keep & (self.dst == dst)
        return Pieces(*(getattr(self, c)[keep] for c in _COLUMNS))

    def sorted_by(self, column: str) -> Pieces:
        """The pieces stably sorted by a column (``"src"`` or ``"dst"``: wire order for one rank)."""
        order = np.argsort(getattr(self, column), kind="stable")
        return Pieces(*(getattr(self, c)[order] for c in _COLUMNS))

    def sizes(self, by: str, world_size: int) -> list[int]:
        """Elements per rank of column ``by`` (``"src"`` or ``"dst"``)."""
        return _sum_by(getattr(self, by), self.numel, world_size).tolist()

    def __len__(self) -> int:
        return len(self.uid)

    def __getitem__(self, index):
        return self.as_tuple()[index]

    def __iter__(self):
        return iter(self.as_tuple())

    def __eq__(self, other) -> bool:
        if isinstance(other, Pieces):
            return len(self) == len(other) and all(np.array_equal(getattr(self, c), getattr(other, c)) for c in _COLUMNS)
        if isinstance(other, (tuple, list)):
            return self.as_tuple() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, c).tobytes() for c in _COLUMNS))

    def __repr__(self) -> str:
        if len(self) <= 4:
            return f"Pieces({self.as_tuple()!r})"
        return f"Pieces(<{len(self)} pieces, {int(self.numel.sum())} elements>)"


def _sum_by(index: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Exact int64 sums of ``values`` grouped by ``index`` (0 ≤ index < size)."""
    out = np.zeros(size, dtype=np.int64)
    np.add.at(out, index, values)
    return out


@dataclass(frozen=True)
class Bucket:
    """Consecutive units exchanged together: one ``all_to_all_single`` per direction.

    ``gather`` and ``scatter`` read as tuples of :class:`Piece` (tuples given to the constructor
    are stored as :class:`Pieces` columns).
    """

    units: tuple[int, ...]
    gather: Pieces   # sources -> owners, and to every holder of a replicated unit
    scatter: Pieces  # owners -> holders

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(self.units))
        for name in ("gather", "scatter"):
            object.__setattr__(self, name, Pieces.of(getattr(self, name)))

    def split_sizes(self, rank: int, world_size: int, phase: str,
                    channels: np.ndarray | None = None) -> tuple[list[int], list[int]]:
        """(input_split_sizes, output_split_sizes) of ``rank``'s all_to_all_single in ``phase``, in
        elements; ``channels`` (per unit id) multiplies each piece by the tensors it carries."""
        pieces = self.gather if phase == "gather" else self.scatter
        out = []
        for mine, by in ((pieces.select(src=rank), "dst"), (pieces.select(dst=rank), "src")):
            size = mine.numel if channels is None else mine.numel * channels[mine.uid]
            out.append(_sum_by(getattr(mine, by), size, world_size).tolist())
        return out[0], out[1]


@dataclass(frozen=True, eq=False)
class Plan:
    world_size: int
    params: tuple[PlanParam, ...]
    units: tuple[Unit, ...]
    buckets: tuple[Bucket, ...]
    bucket_bytes: int
    element_bytes: int = 4
    fingerprint: str = field(default="", compare=False)
    replicate_below: int = 0

    @functools.cached_property
    def replicated(self) -> np.ndarray:
        """Per unit id, whether the unit is replicated (read-only bool array)."""
        out = np.fromiter((u.replicated for u in self.units), dtype=bool, count=len(self.units))
        out.flags.writeable = False
        return out

    # ----- what the counters must equal -----
    @functools.cached_property
    def channels(self) -> dict[str, np.ndarray]:
        """Per phase, tensors each unit's pieces carry (indexed by unit id; see :attr:`PlanParam.channels`)."""
        per_param = np.array([p.channels for p in self.params], dtype=np.int64).reshape(-1, 2)
        unit_param = np.array([u.param for u in self.units], dtype=np.int64)
        return {"gather": per_param[unit_param, 0], "scatter": per_param[unit_param, 1]}

    def split_sizes(self, bucket: Bucket, rank: int, phase: str) -> tuple[list[int], list[int]]:
        """Elements of ``rank``'s all_to_all_single in ``phase`` of ``bucket``, every channel included."""
        return bucket.split_sizes(rank, self.world_size, phase, self.channels[phase])

    @functools.cached_property
    def _totals(self) -> dict[str, list[int]]:
        """Per-rank sums, computed once: flops, cost, and elements sent/received per phase."""
        W = self.world_size
        t = {"polar": [0] * W, "cost": [0] * W, "replicated": [0] * W}
        for u in self.units:  # Python ints, exact however large
            if u.replicated:
                for r in u.replicas:
                    t["replicated"][r] += u.cost
            else:
                t["polar"][u.owner] += u.polar_flops
                t["cost"][u.owner] += u.cost
        for phase, source, keep in (("gather", "gather", False), ("replicate", "gather", True),
                                    ("scatter", "scatter", False)):
            sent, received = np.zeros(W, dtype=np.int64), np.zeros(W, dtype=np.int64)
            channels = self.channels[source]
            for b in self.buckets:
                pieces = getattr(b, source)
                pieces = pieces.select(self.replicated[pieces.uid] == keep)
                if len(pieces):
                    wire = pieces.numel * channels[pieces.uid]
                    sent += _sum_by(pieces.src, wire, W)
                    received += _sum_by(pieces.dst, wire, W)
            t[f"{phase}_sent"], t[f"{phase}_received"] = sent.tolist(), received.tolist()
        return t

    def polar_flops(self, rank: int) -> int:
        """Polar flops of the units ``rank`` owns (each unit on one rank: they sum to the model's)."""
        return self._totals["polar"][rank]

    def cost(self, rank: int) -> int:
        """Estimated flops of the units ``rank`` owns (what the owners are balanced on)."""
        return self._totals["cost"][rank]

    def replicated_flops(self, rank: int) -> int:
        """Estimated flops of the replicated units ``rank`` computes (every holder computes them)."""
        return self._totals["replicated"][rank]

    def bytes_sent(self, rank: int, phase: str) -> int:
        """Bytes ``rank`` sends in ``phase``: ``gather`` (to owners), ``replicate`` (pieces of
        replicated units, in the same all_to_all_single as ``gather``) or ``scatter``."""
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
        lines = [f"plan: {len(self.units)} units of {len(self.params)} parameters ({int(self.replicated.sum())} "
                 f"replicated), {len(self.buckets)} buckets, W={self.world_size}, balance max/mean flops = "
                 f"{self.balance():.3f}"]
        for bi, b in enumerate(self.buckets):
            lines.append(f"bucket {bi}: {len(b.units)} units, gather {len(b.gather)} pieces, "
                         f"scatter {len(b.scatter)} pieces")
            if names:
                for uid in b.units:
                    u = self.units[uid]
                    p = self.params[u.param]
                    owner = f"all {len(u.replicas)} holders" if u.replicated else u.owner
                    lines.append(f"  unit {uid:5d} {p.name}[rows {u.spec.row_start}:{u.spec.row_stop}] "
                                 f"blocks={len(u.spec.blocks)} owner={owner} cost={u.cost:.3g}")
        lines.append(f"{'rank':>5} {'polar GFLOP':>12} {'gather sent MB':>15} {'gather recv MB':>15} "
                     f"{'scatter sent MB':>16} {'scatter recv MB':>16} {'replicate recv MB':>18}")
        for r in range(self.world_size):
            lines.append(f"{r:5d} {self.polar_flops(r) / 1e9:12.3f} {self.bytes_sent(r, 'gather') / 1e6:15.3f} "
                         f"{self.bytes_received(r, 'gather') / 1e6:15.3f} {self.bytes_sent(r, 'scatter') / 1e6:16.3f} "
                         f"{self.bytes_received(r, 'scatter') / 1e6:16.3f} "
                         f"{self.bytes_received(r, 'replicate') / 1e6:18.3f}")
        return "\n".join(lines)


def _int_array(values) -> np.ndarray:
    """int64 when every value is an int that fits, else an object array (sorted in Python)."""
    if all(type(v) is int for v in values):
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:  # flops past 2⁶³
            pass
    return np.array(values, dtype=object)


def replicable(param: PlanParam, k: int, replicate_below: int) -> bool:
    """Whether unit ``k`` of ``param`` is replicated: its rule carries no state (one channel each
    way), runs no polar iterations, and the unit has fewer than ``replicate_below`` elements."""
    spec = param.units[k]
    return (param.channels == (1, 1) and param.unit_polar_flops[k] == 0
            and spec.rows * param.layout.cols < replicate_below)


def check_replicate_below(value) -> int:
    """``value`` as an int, or ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"replicate_below={value!r}: give a number of elements >= 0 (units of rules without polar "
                         "iterations smaller than this are computed on every rank holding part of them; 0 = never)")
    return int(value)


def build_plan(params: list[PlanParam], world_size: int, bucket_bytes: int = 256 << 20,
               element_bytes: int = 4, replicate_below: int = 0) -> Plan:
    """Assign owners, cut buckets and list every piece that moves (deterministic in its inputs).

    Args:
        params: whole-matrix parameters in optimizer order.
        world_size: ranks taking part.
        bucket_bytes: the most unit bytes gathered at once (default: 256 MiB).
        element_bytes: bytes per element on the wire (4 for fp32, 2 for bf16).
        replicate_below: units with fewer elements, of rules without polar iterations or carried
            state, are replicated instead of owned (see the module docstring; default: 0, never).
    """
    replicate_below = check_replicate_below(replicate_below)
    W = world_size
    intervals: dict[int, tuple] = {}   # id(layout) -> interval columns (layouts are shared by many params)
    geometries: dict[tuple, plan_geometry.Geometry] = {}
    per_param = []  # (geometry, first uid, unit starts, unit stops)
    first = 0
    for p in params:
        n = p.layout.cols
        rows = np.array([(s.row_start, s.row_stop) for s in p.units], dtype=np.int64).reshape(-1, 2)
        ustart, ustop = rows[:, 0] * n, rows[:, 1] * n
        lid = id(p.layout)
        if lid not in intervals:
            intervals[lid] = plan_geometry.intervals(p.layout)
        key = (lid, rows.tobytes())
        if key not in geometries:
            geometries[key] = plan_geometry.geometry(intervals[lid], ustart, ustop)
        per_param.append((geometries[key], first, ustart, ustop))
        first += len(p.units)
    N = first

    # Longest processing time first: forced units (already whole somewhere) go first, on their holders.
    # Replicated units have no owner and take no part.
    rep = [replicable(p, k, replicate_below) for p in params for k in range(len(p.units))]
    costs = [c for p in params for c in p.unit_costs]
    whole_count = np.concatenate([np.diff(g.whole_ptr) for g, *_ in per_param]) if params else np.zeros(0, np.int64)
    forced_mask = (whole_count > 0) & (whole_count < W)
    cost_arr = _int_array(costs)
    order = sorted(range(N), key=lambda i: (-costs[i], i)) if cost_arr.dtype == object \
        else np.lexsort((np.arange(N), -cost_arr)).tolist()
    load = [0] * W
    owners = [REPLICATED if r else 0 for r in rep]
    whole_of = {}
    for geo, base, _, _ in per_param:
        for k in np.flatnonzero((np.diff(geo.whole_ptr) > 0)).tolist():
            whole_of[base + k] = geo.whole_rank[geo.whole_ptr[k]:geo.whole_ptr[k + 1]].tolist()
    forced = forced_mask.tolist()
    for i in order:
        if forced[i] and not rep[i]:
            owner = min(whole_of[i], key=lambda r: (load[r], r))
            owners[i] = owner
            load[owner] += max(costs[i], 1)
    heap = [(load[r], r) for r in range(W)]  # least-loaded rank first, ties to the lower rank
    heapq.heapify(heap)
    for i in order:
        if not forced[i] and not rep[i]:
            current, owner = heapq.heappop(heap)
            owners[i] = owner
            load[owner] = current + max(costs[i], 1)
            heapq.heappush(heap, (load[owner], owner))

    # Buckets: consecutive units while their bytes fit.
    unit_bucket = [0] * N
    bucket_first = [0]
    size = 0
    uid = 0
    for p, (_, base, ustart, ustop) in zip(params, per_param):
        for nbytes in ((ustop - ustart) * element_bytes * max(p.channels)).tolist():
            if uid > bucket_first[-1] and size + nbytes > bucket_bytes:
                bucket_first.append(uid)
                size = 0
            unit_bucket[uid] = len(bucket_first) - 1
            size += nbytes
            uid += 1

    units: list[Unit] = []
    owner_arr = np.array(owners, dtype=np.int64)
    rep_arr = np.array(rep, dtype=bool)
    gather_cols, scatter_cols = [], []
    polar = [f for p in params for f in p.unit_polar_flops]
    for pi, (p, (geo, base, ustart, ustop)) in enumerate(zip(params, per_param)):
        span = slice(base, base + len(p.units))
        ids = np.arange(base, base + len(p.units), dtype=np.int64)
        g, s, (hu, hr) = plan_geometry.unit_pieces(geo, ids, owner_arr[span], rep_arr[span], W)
        gather_cols.append(g)
        scatter_cols.append(s)
        holders = np.split(hr, np.searchsorted(hu, np.arange(1, len(p.units)))) if len(p.units) else []
        for k, (spec, a, b) in enumerate(zip(p.units, ustart.tolist(), ustop.tolist())):
            i = base + k
            replicas = tuple(holders[k].tolist()) if rep[i] else ()
            units.append(Unit(i, pi, spec, a, b, owners[i], costs[i], polar[i], unit_bucket[i], replicas))

    def columns(parts):
        if not parts:
            return [np.zeros(0, np.int64) for _ in range(5)]
        return [np.concatenate([c[j] for c in parts]) for j in range(5)]

    gather, scatter = columns(gather_cols), columns(scatter_cols)
    buckets: list[Bucket] = []
    if N:
        bounds = bucket_first + [N]
        g_cut = np.searchsorted(gather[0], bounds)
        s_cut = np.searchsorted(scatter[0], bounds)
        for bi in range(len(bucket_first)):
            g = Pieces(*(c[g_cut[bi]:g_cut[bi + 1]] for c in gather))
            s = Pieces(*(c[s_cut[bi]:s_cut[bi + 1]] for c in scatter))
            buckets.append(Bucket(tuple(range(bounds[bi], bounds[bi + 1])), g, s))
    plan = Plan(world_size, tuple(params), tuple(units), tuple(buckets), bucket_bytes, element_bytes,
                replicate_below=replicate_below)
    object.__setattr__(plan, "fingerprint", fingerprint(params, replicate_below))
    return plan


def fingerprint(params: list[PlanParam], replicate_below: int = 0) -> str:
    """A short digest of what every rank must agree on (names, shapes, layouts, rules, which
    units are replicated).

    The bytes hashed are ``repr((name, shape, holdings, key, len(units)))`` per parameter; the
    ``repr`` of a layout's holdings (large at W = 1024) is built once per layout object.
    """
    h = hashlib.sha256()
    if replicate_below:
        h.update(f"replicate_below={replicate_below}".encode())
    holdings: dict[int, str] = {}
    for p in params:
        lid = id(p.layout)
        if lid not in holdings:
            holdings[lid] = repr(p.layout.holdings)
        h.update(f"({p.name!r}, {p.layout.shape!r}, {holdings[lid]}, {p.key!r}, {len(p.units)!r})".encode())
        if p.channels != (1, 1):
            h.update(repr(p.channels).encode())
    return h.hexdigest()[:16]


def group_by_owner(plan: Plan, bucket: Bucket) -> dict[int, list[Unit]]:
    """The bucket's units by the ranks computing them (a replicated unit under each of its holders)."""
    out: dict[int, list[Unit]] = defaultdict(list)
    for uid in bucket.units:
        for rank in plan.units[uid].computed_on():
            out[rank].append(plan.units[uid])
    return out
