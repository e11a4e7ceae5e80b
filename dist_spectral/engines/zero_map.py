"""Map DeepSpeed ZeRO flat partitions back to the parameters they hold.

Under DeepSpeed ZeRO a client ``torch.optim.Optimizer`` never sees the model's parameters. At
``step()`` its param groups hold flat 1-D fp32 tensors ("flat partitions"): the group's parameters
flattened, concatenated, padded and cut between ranks. :func:`build_zero_map` computes, from
DeepSpeed's partition metadata and without communication, which element range of which parameter
sits at which offset of *every* rank's flat partition (:class:`ZeroMap`), so an optimizer can run
element-wise, row-wise and whole-matrix rules on them. :func:`flat_tensors` returns this rank's
flat tensors (the objects the client optimizer receives and keys its ``state`` by).

Facts this relies on (verified with DeepSpeed 0.19.8, and 0.17.6 where noted, on CPU/gloo, W = 2
and 3, fp32 and bf16, by ``tests/distributed/test_zero_map.py``):

ZeRO-1 / ZeRO-2 (``DeepSpeedZeroOptimizer``)
    * One flat tensor per client param group per rank: ``single_partition_of_fp32_groups[g]`` (fp32,
      ``requires_grad=True``, the same object for the whole run, also after ``load_checkpoint``).
      Outside ``step()`` ``param_groups[g]["params"] == [flat]``.
    * Flat order: ``round_robin_bit16_groups[g]`` = the group's trainable params in the client's
      order, or, with ``round_robin_gradients``, param ``i`` put in bucket ``i % W`` and the buckets
      concatenated (e.g. 4 params, W = 2: order 0, 2, 1, 3).
    * Param j starts at ``round_robin_bit16_offsets[g][j]`` in the group buffer
      ``bit16_groups_flat[g]``: the running sum of numels, plus a zero gap after each param up to a
      16-byte boundary when ``zero_optimization.parameter_alignment`` is set (0.19 only; 0.17/0.18
      have neither the option nor ``round_robin_bit16_offsets``: offsets are the running sum).
    * The buffer is zero-padded at its end to a multiple of ``2·W`` elements (``"group_end"``
      padding, < 2W elements, possibly spanning several trailing ranks) and cut into W equal pieces
      of ``partition_size[g] = len(bit16_groups_flat[g]) // W``; rank r holds ``[r·P, (r+1)·P)``.
      Params and matrix rows straddle ranks (``first_offset[g]`` is where the first straddling
      param starts on this rank).
    * The client's ``step()`` runs once per param group per optimizer step, groups in order, and
      during the call ``self.param_groups`` is a one-element list with only that group (custom
      keys such as ``"rule"``/``"names"`` survive: the dicts are the client's own).

ZeRO-1 with bf16 params and ``data_types.grad_accum_dtype = "fp32"`` (``BF16_Optimizer``)
    * Same cut without round-robin or per-param gaps: buffer ``bf16_groups_flat[g]`` in
      ``bf16_groups[g]`` order; the client sees ``fp32_groups_flat_partition[g]``; ``step()`` is
      called once with every group present. DeepSpeed <= 0.18.4 instead wraps the client in the
      unpartitioned ``FP16_UnfusedOptimizer`` for this config (constant clash ``BFLOAT16 ==
      DDP_BFLOAT16``), which this module rejects with a clear error. bf16 with the default (bf16)
      accumulation, and stage 2 with fp32 accumulation, use ``DeepSpeedZeroOptimizer``.

ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``)
    * Every parameter is partitioned on its own (``p.ds_tensor``): ``P_p = ceil(numel/W)`` =
      ``p.partition_numel()``; rank r holds ``[r·P_p, min((r+1)·P_p, numel))`` then padding up to
      ``P_p`` (``"param_tail"``; only trailing ranks, but a small param leaves several ranks with
      nothing else). DeepSpeed never initialises this padding in the parameter (values seen: 0,
      1e-41, -2.8e15, NaN); its gradient padding is 0. Frozen params are partitioned too but absent.
    * Client groups are split into sub-groups of whole params (``sub_group_size``, default 1e9,
      counted in per-rank elements; the param that crosses the size closes the sub-group):
      ``fp16_groups[k]``, client group ``sub_group_to_group_id[k]``. Membership depends only on
      ``P_p``, so it is identical on all ranks. Sub-group k's flat tensor
      ``fp32_partitioned_groups_flat[k]`` is the per-param partitions concatenated in
      ``fp16_groups[k]`` order (``fp16_partitioned_groups_flat_numel[k]`` elements on every rank).
    * The client's ``step()`` runs once per sub-group, in order. During it every client group is
      present; the stepping one has ``params == [flat_k]``, the others ``[]``. Outside ``step()``
      all groups have ``params == []``; ``state_dict()``/``load_state_dict()`` are called with all
      sub-group tensors put back (several per group when there are several sub-groups).
    * So the every-rank view is complete (it needs only each param's numel and W). What a client
      cannot do is see two sub-groups (ZeRO-3) or two groups (ZeRO-1/2) in one call: right after
      each call DeepSpeed copies that flat into the low-precision params, so updates cannot be
      deferred to a later call. Each call does cover whole params on the union of ranks, so an
      owner-based exchange per call is exact; batching across calls is what is lost.

All stages
    * At ``step()`` each flat has ``.grad``: fp32, same numel, already averaged over ranks and
      ``gradient_accumulation_steps`` micro-batches (the client is called only at the boundary) and
      already clipped by DeepSpeed's global norm (``gradient_clipping``, factor
      ``clip / (norm + 1e-6)`` when ``norm > clip``). ``.grad`` is None outside ``step()`` (except
      ``BF16_Optimizer``, which keeps a view of its fp32 gradient buffer).
    * Checkpoints (``engine.save_checkpoint``): every rank saves its own file
      (``zero_pp_rank_{r}_mp_rank_00_optim_states.pt``, ``bf16_`` prefix for ``BF16_Optimizer``)
      holding the client's ``state_dict()`` as-is (key ``base_optimizer_state`` at stages 1/2,
      ``optimizer_state_dict`` at stage 3): state keyed 0..n-1 by flat, tensors of flat-partition
      size including padding, custom group keys included. ``load_checkpoint`` calls the client's
      ``load_state_dict`` with the same rank's dict: exact resume at the same W and layout only.
    * DeepSpeed's own local mapping ``param._hp_mapping`` (stages 1/2) is wrong under
      ``round_robin_gradients`` without ``parameter_alignment`` in 0.19.8 (it assumes the
      unpermuted order); do not use it or tools built on it (``safe_get_full_fp32_param``,
      ``param_slice_mappings``) in that configuration.

Ranks in this module are ranks inside the partitioning process group (the data-parallel group),
which equal global ranks for plain data parallelism. Expert (MoE) groups partitioned over other
groups are not supported (a clear error).

Only ``dist_spectral/engines/`` may import ``deepspeed``/``torch.distributed``; this module imports
neither at module level (it reads attributes of the objects it is given).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

__all__ = [
    "ZeroSegment",
    "ZeroPadding",
    "ZeroFlatPartition",
    "ZeroFlat",
    "ZeroMap",
    "build_zero_map",
    "flat_tensors",
    "flat_buffer_partitions",
    "per_param_partitions",
]


@dataclass(frozen=True)
class ZeroSegment:
    """A contiguous run of one parameter's elements inside one rank's flat partition.

    Attributes:
        name (str): parameter name.
        param_index (int): position in the ``named_params`` list given to :func:`build_zero_map`.
        local_offset (int): element offset of the run inside the rank's flat fp32 partition
            (the tensor the client optimizer sees).
        global_start (int): first element of the run in the flattened (row-major) parameter.
        global_stop (int): one past the last element.
        flat_index (int): which flat tensor: the param group index for ZeRO-1/2, the sub-group
            index ``k`` (into ``fp32_partitioned_groups_flat``) for ZeRO-3.
    """

    name: str
    param_index: int
    local_offset: int
    global_start: int
    global_stop: int
    flat_index: int = 0

    @property
    def numel(self) -> int:
        return self.global_stop - self.global_start

    @property
    def local_stop(self) -> int:
        return self.local_offset + self.numel

    def row_span(self, row_numel: int) -> tuple[int, int, bool, bool]:
        """Rows touched when the parameter is viewed as ``[-1, row_numel]``.

        Returns ``(first_row, stop_row, starts_mid_row, ends_mid_row)``: the run covers rows
        ``[first_row, stop_row)``, the first of which is cut (shared with the previous rank) if
        ``starts_mid_row``, the last if ``ends_mid_row``.
        """
        if self.numel == 0:
            return (self.global_start // row_numel,) * 2 + (False, False)
        first = self.global_start // row_numel
        stop = -(-self.global_stop // row_numel)
        return first, stop, self.global_start % row_numel != 0, self.global_stop % row_numel != 0


@dataclass(frozen=True)
class ZeroPadding:
    """Elements of a flat partition that belong to no parameter.

    ``kind`` is ``"group_end"`` (ZeRO-1/2 alignment of the group buffer to ``2·W`` elements),
    ``"param_alignment"`` (ZeRO-1/2 ``parameter_alignment`` gap after a param) or
    ``"param_tail"`` (ZeRO-3: a param's partition past its last element). Their values are
    unspecified (ZeRO-3 leaves them uninitialised); optimizers must not read or rely on them.
    """

    local_offset: int
    numel: int
    kind: str


@dataclass(frozen=True)
class ZeroFlatPartition:
    """What one rank holds in one flat tensor."""

    rank: int
    numel: int
    segments: tuple[ZeroSegment, ...]
    padding: tuple[ZeroPadding, ...]

    @property
    def padding_numel(self) -> int:
        return sum(p.numel for p in self.padding)

    def padding_mask(self, device=None) -> torch.Tensor:
        """Boolean ``[numel]`` tensor, True on padding."""
        mask = torch.zeros(self.numel, dtype=torch.bool, device=device)
        for pad in self.padding:
            mask[pad.local_offset:pad.local_offset + pad.numel] = True
        return mask


@dataclass(frozen=True)
class ZeroFlat:
    """One flat tensor slot, seen from every rank.

    ZeRO-1/2: one per client param group (``flat_index == group_index``). ZeRO-3: one per
    sub-group (several may share a ``group_index``).

    Attributes:
        flat_index (int): see :attr:`ZeroSegment.flat_index`.
        group_index (int): index into the client optimizer's ``param_groups``.
        world_size (int): ranks the flat is partitioned over.
        param_indices (tuple[int, ...]): params in flat order.
        partitions (tuple[ZeroFlatPartition, ...]): indexed by rank.
    """

    flat_index: int
    group_index: int
    world_size: int
    param_indices: tuple[int, ...]
    partitions: tuple[ZeroFlatPartition, ...]

    @property
    def partition_numel(self) -> int:
        return self.partitions[0].numel


def flat_buffer_partitions(entries: Sequence[tuple[str, int, int, int]], buffer_numel: int, world_size: int,
                           flat_index: int = 0) -> tuple[ZeroFlatPartition, ...]:
    """ZeRO-1/2 cut: a flat buffer split into ``world_size`` equal, contiguous pieces.

    Args:
        entries: ``(name, param_index, buffer_offset, numel)`` in buffer order.
        buffer_numel: length of the whole (padded) group buffer; must be divisible by W.
        world_size: W.
        flat_index: stored in the segments.
    """
    if buffer_numel % world_size:
        raise ValueError(f"flat buffer of {buffer_numel} elements is not divisible by {world_size} ranks")
    size = buffer_numel // world_size
    last_end = max((off + n for _, _, off, n in entries), default=0)
    if last_end > buffer_numel:
        raise ValueError(f"params end at {last_end}, past the buffer ({buffer_numel})")
    out = []
    for rank in range(world_size):
        lo, hi = rank * size, (rank + 1) * size
        segs, pads, cursor = [], [], lo
        for name, index, off, n in entries:
            a, b = max(off, lo), min(off + n, hi)
            if b <= a:
                continue
            if a > cursor:
                pads.append(ZeroPadding(cursor - lo, a - cursor, "param_alignment"))
            segs.append(ZeroSegment(name, index, a - lo, a - off, b - off, flat_index))
            cursor = b
        if cursor < hi:
            kind = "group_end" if cursor >= last_end else "param_alignment"
            pads.append(ZeroPadding(cursor - lo, hi - cursor, kind))
        out.append(ZeroFlatPartition(rank, size, tuple(segs), tuple(pads)))
    return tuple(out)


def per_param_partitions(entries: Sequence[tuple[str, int, int]], world_size: int,
                         flat_index: int = 0) -> tuple[ZeroFlatPartition, ...]:
    """ZeRO-3 cut: each param split on its own into W pieces of ``ceil(numel / W)``, the pieces of
    one rank concatenated in ``entries`` order.

    Args:
        entries: ``(name, param_index, numel)`` in sub-group order.
        world_size: W.
        flat_index: the sub-group index, stored in the segments.
    """
    out = []
    for rank in range(world_size):
        segs, pads, base = [], [], 0
        for name, index, n in entries:
            size = -(-n // world_size)
            a, b = min(rank * size, n), min((rank + 1) * size, n)
            if b > a:
                segs.append(ZeroSegment(name, index, base, a, b, flat_index))
            if size - (b - a):
                pads.append(ZeroPadding(base + (b - a), size - (b - a), "param_tail"))
            base += size
        out.append(ZeroFlatPartition(rank, base, tuple(segs), tuple(pads)))
    return tuple(out)


@dataclass
class ZeroMap:
    """Every rank's flat partitions, mapped to parameter element ranges.

    Attributes:
        stage (int): ZeRO stage (1, 2 or 3).
        kind (str): ``"zero12"``, ``"bf16_zero1"`` or ``"zero3"``.
        rank (int): this process's rank in the partition group(s).
        names (tuple[str, ...]), shapes (tuple[tuple[int, ...], ...]): per ``param_index``.
        flats (tuple[ZeroFlat, ...]): indexed by ``flat_index``.
    """

    stage: int
    kind: str
    rank: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    flats: tuple[ZeroFlat, ...]
    _tensor_to_flat: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ queries
    @property
    def world_size(self) -> int:
        return self.flats[0].world_size if self.flats else 1

    @property
    def num_groups(self) -> int:
        return 1 + max((f.group_index for f in self.flats), default=-1)

    def flats_of_group(self, group_index: int) -> list[ZeroFlat]:
        return [f for f in self.flats if f.group_index == group_index]

    def segments(self, group_index: int, rank: int) -> list[ZeroSegment]:
        """All segments of a client param group on ``rank``, ordered by (flat_index, local_offset).

        For ZeRO-1/2 there is one flat per group, so ``local_offset`` indexes that one tensor.
        For ZeRO-3 check ``flat_index`` (one flat per sub-group).
        """
        return [s for f in self.flats_of_group(group_index) for s in f.partitions[rank].segments]

    def by_group(self) -> dict[int, dict[int, list[ZeroSegment]]]:
        """``{group_index: {rank: [ZeroSegment, ...]}}``."""
        return {g: {r: self.segments(g, r) for r in range(self.world_size)} for g in range(self.num_groups)}

    def flat_for(self, tensor: torch.Tensor) -> ZeroFlat:
        """The :class:`ZeroFlat` whose local partition is ``tensor`` (a tensor the client optimizer
        finds in its ``param_groups`` during ``step()``); matched by identity."""
        try:
            return self.flats[self._tensor_to_flat[id(tensor)]]
        except KeyError:
            raise KeyError("tensor is not one of this engine's flat fp32 partitions") from None

    def stepping(self, param_groups) -> list[tuple[int, ZeroFlat, torch.Tensor]]:
        """``(group_position, flat, tensor)`` for every flat tensor present in ``param_groups`` now
        (call from the client's ``step()`` with ``self.param_groups``: one entry per call under
        ZeRO-1/2/3, one per group under ``BF16_Optimizer``)."""
        return [(i, self.flat_for(t), t) for i, g in enumerate(param_groups) for t in g["params"]]

    def param_segments(self, param_index: int) -> list[tuple[int, ZeroSegment]]:
        """``(rank, segment)`` for every piece of one parameter, ordered by ``global_start``."""
        out = [(p.rank, s) for f in self.flats for p in f.partitions for s in p.segments
               if s.param_index == param_index]
        return sorted(out, key=lambda rs: rs[1].global_start)

    def local_views(self, flat_index: int, flat_tensor: torch.Tensor, rank: int | None = None):
        """Yield ``(segment, view)`` with ``view`` the 1-D slice of ``flat_tensor`` (this rank's
        flat partition, its ``.grad``, or optimizer state shaped like it) holding the segment."""
        part = self.flats[flat_index].partitions[self.rank if rank is None else rank]
        if flat_tensor.numel() != part.numel:
            raise ValueError(f"flat {flat_index}: tensor has {flat_tensor.numel()} elements, the map {part.numel}")
        for seg in part.segments:
            yield seg, flat_tensor.narrow(0, seg.local_offset, seg.numel)

    def layout(self, param_index: int):
        """The parameter's :class:`dist_spectral.layout.Layout` (one interval per holding rank)."""
        from ..layout import Layout

        holdings = [[] for _ in range(self.world_size)]
        for rank, seg in self.param_segments(param_index):
            holdings[rank].append((seg.global_start, seg.global_stop))
        return Layout(tuple(self.shapes[param_index]), tuple(tuple(h) for h in holdings),
                      f"ZeRO-{self.stage} flat")

    def check(self) -> None:
        """Assert the invariants: in every partition segments and padding tile ``[0, numel)`` without
        overlap, and across ranks every parameter's elements are covered exactly once."""
        covered: dict[int, list[tuple[int, int]]] = {}
        for f in self.flats:
            for part in f.partitions:
                pieces = sorted([(s.local_offset, s.numel) for s in part.segments]
                                + [(p.local_offset, p.numel) for p in part.padding])
                cursor = 0
                for off, n in pieces:
                    assert off == cursor and n > 0, f"flat {f.flat_index} rank {part.rank}: gap/overlap at {off}"
                    cursor = off + n
                assert cursor == part.numel, f"flat {f.flat_index} rank {part.rank}: tiles {cursor} != {part.numel}"
                for s in part.segments:
                    covered.setdefault(s.param_index, []).append((s.global_start, s.global_stop))
        for index, shape in enumerate(self.shapes):
            runs = sorted(covered.get(index, []))
            cursor = 0
            for a, b in runs:
                assert a == cursor, f"param {self.names[index]}: element {cursor} covered {'twice' if a < cursor else 'never'}"
                cursor = b
            if any(index in f.param_indices for f in self.flats):
                assert cursor == math.prod(shape), f"param {self.names[index]}: covered {cursor} of {math.prod(shape)}"

    def describe(self) -> str:
        """Human-readable table of every flat, rank, segment and padding run."""
        lines = [f"ZeRO-{self.stage} ({self.kind}), W={self.world_size}"]
        for f in self.flats:
            lines.append(f"flat {f.flat_index} (group {f.group_index}): {f.partition_numel} elements per rank")
            for part in f.partitions:
                items = [(s.local_offset, f"{s.name}[{s.global_start}:{s.global_stop}]") for s in part.segments]
                items += [(p.local_offset, f"<pad {p.numel} {p.kind}>") for p in part.padding]
                lines.append(f"  rank {part.rank}: " + ", ".join(f"@{o} {t}" for o, t in sorted(items)))
        return "\n".join(lines)


# ---------------------------------------------------------------------- builder
def _names_and_index(named_params, engine_or_optimizer, zero_opt):
    if named_params is None:
        # DeepSpeedEngine.param_names is {param: name}; ZeRO-3 optimizers only carry it from 0.18 on
        names_by_param = getattr(engine_or_optimizer, "param_names", None) or getattr(zero_opt, "param_names", None)
        if not names_by_param:
            raise ValueError("pass named_params: neither the engine nor its optimizer has param_names")
        named_params = [(name, p) for p, name in names_by_param.items()]
    named_params = list(named_params)
    index_of = {id(p): i for i, (_, p) in enumerate(named_params)}
    if len(index_of) != len(named_params):
        raise ValueError("named_params lists a parameter twice")
    return named_params, index_of


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    ds_shape = getattr(p, "ds_shape", None)  # ZeRO-3: p.shape is empty while partitioned
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


def _group_rank_world(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group=group), dist.get_world_size(group=group)


_FLAT_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


def _zero_optimizer(engine_or_optimizer):
    """The ZeRO optimizer itself, given it or the engine (whose ``.optimizer`` it is)."""
    if any(hasattr(engine_or_optimizer, a) for a in _FLAT_ATTRS):
        return engine_or_optimizer
    inner = getattr(engine_or_optimizer, "optimizer", None)
    if inner is not None and any(hasattr(inner, a) for a in _FLAT_ATTRS):
        return inner
    if type(inner).__name__ in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        raise TypeError(f"the engine wraps the client optimizer in {type(inner).__name__}: parameters are not "
                        "partitioned (whole fp32 copies on every rank). DeepSpeed <= 0.18.4 does this for bf16 + "
                        "data_types.grad_accum_dtype=fp32 at ZeRO stage 1 (BFLOAT16 == DDP_BFLOAT16 == 'bf16'); "
                        "use DeepSpeed >= 0.18.5 or ZeRO stage 2")
    raise TypeError(f"{type(engine_or_optimizer).__name__} is neither a DeepSpeed engine with a ZeRO optimizer nor "
                    "a ZeRO optimizer this module knows (DeepSpeedZeroOptimizer, BF16_Optimizer, "
                    "DeepSpeedZeroOptimizer_Stage3)")


def flat_tensors(engine_or_optimizer) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions, indexed by ``flat_index``: the very tensors the client
    optimizer receives in ``param_groups[...]["params"]`` (and keys its ``state`` by)."""
    zero_opt = _zero_optimizer(engine_or_optimizer)
    return list(next(getattr(zero_opt, a) for a in _FLAT_ATTRS if hasattr(zero_opt, a)))


def build_zero_map(engine_or_optimizer, named_params: Iterable[tuple[str, torch.Tensor]] | None = None) -> ZeroMap:
    """Build the flat-partition map of an initialised DeepSpeed engine.

    Args:
        engine_or_optimizer: the engine returned by ``deepspeed.initialize`` or its
            ``engine.optimizer`` (``DeepSpeedZeroOptimizer``, ``BF16_Optimizer`` or
            ``DeepSpeedZeroOptimizer_Stage3``).
        named_params: ``(name, parameter)`` pairs, e.g. ``list(model.named_parameters())`` of the
            model given to ``deepspeed.initialize`` (DeepSpeed keeps the same Parameter objects,
            also after casting to bf16). ``param_index`` in the result indexes this list. Defaults
            to DeepSpeed's ``param_names``. Params DeepSpeed does not optimise (frozen) are absent.

    Every rank can call this; no communication happens, and the result describes all ranks
    (``ZeroFlat.partitions[r]``). It reads only partition metadata, not tensor values.
    """
    zero_opt = _zero_optimizer(engine_or_optimizer)
    cls = type(zero_opt).__name__
    named_params, index_of = _names_and_index(named_params, engine_or_optimizer, zero_opt)
    names = tuple(n for n, _ in named_params)
    shapes = tuple(_shape(p) for _, p in named_params)

    def lookup(p):
        try:
            return index_of[id(p)]
        except KeyError:
            raise KeyError(f"a parameter DeepSpeed optimises (shape {_shape(p)}) is not in named_params") from None

    flats, tensor_to_flat, rank = [], {}, 0
    if hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        kind, stage = "zero3", 3
        for k, sub_group in enumerate(zero_opt.fp16_groups):
            group = zero_opt.sub_group_process_groups[k] if hasattr(zero_opt, "sub_group_process_groups") \
                else zero_opt.dp_process_group
            rank, world = _group_rank_world(group)
            entries = []
            for p in sub_group:
                i = lookup(p)
                entries.append((names[i], i, int(p.ds_numel)))
                expect = -(-int(p.ds_numel) // world)
                if int(p.partition_numel()) != expect:
                    raise AssertionError(f"{names[i]}: partition_numel {p.partition_numel()} != ceil({p.ds_numel}/{world})")
            parts = per_param_partitions(entries, world, k)
            if parts[rank].numel != zero_opt.fp16_partitioned_groups_flat_numel[k]:
                raise AssertionError(f"sub-group {k}: map {parts[rank].numel} != DeepSpeed "
                                     f"{zero_opt.fp16_partitioned_groups_flat_numel[k]}")
            group_index = int(zero_opt.sub_group_to_group_id[k])
            flats.append(ZeroFlat(k, group_index, world, tuple(e[1] for e in entries), parts))
            tensor_to_flat[id(zero_opt.fp32_partitioned_groups_flat[k])] = k
    elif hasattr(zero_opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        kind = "zero12"
        stage = 2 if getattr(zero_opt, "partition_gradients", False) else 1
        for g, ordered in enumerate(zero_opt.round_robin_bit16_groups):
            rank, world = _group_rank_world(zero_opt.real_dp_process_group[g])
            metas = getattr(zero_opt, "round_robin_bit16_meta", None)
            numels = [m.numel() for m in metas[g]] if metas else [p.numel() for p in ordered]
            offsets = getattr(zero_opt, "round_robin_bit16_offsets", None)
            offsets = list(offsets[g]) if offsets else [sum(numels[:j]) for j in range(len(numels))]
            entries = [(names[lookup(p)], lookup(p), off, n) for p, off, n in zip(ordered, offsets, numels)]
            buffer_numel = zero_opt.bit16_groups_flat[g].numel()
            parts = flat_buffer_partitions(entries, buffer_numel, world, g)
            if parts[rank].numel != zero_opt.partition_size[g] or \
                    parts[rank].numel != zero_opt.single_partition_of_fp32_groups[g].numel():
                raise AssertionError(f"group {g}: map partition {parts[rank].numel} != DeepSpeed {zero_opt.partition_size[g]}")
            flats.append(ZeroFlat(g, g, world, tuple(e[1] for e in entries), parts))
            tensor_to_flat[id(zero_opt.single_partition_of_fp32_groups[g])] = g
    elif hasattr(zero_opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-1, bf16, fp32 accumulation)
        kind, stage = "bf16_zero1", 1
        for g, params in enumerate(zero_opt.bf16_groups):
            rank, world = _group_rank_world(zero_opt.real_dp_process_group[g])
            entries, off = [], 0
            for p in params:
                i = lookup(p)
                entries.append((names[i], i, off, p.numel()))
                off += p.numel()
            parts = flat_buffer_partitions(entries, zero_opt.bf16_groups_flat[g].numel(), world, g)
            if parts[rank].numel != zero_opt.fp32_groups_flat_partition[g].numel():
                raise AssertionError(f"group {g}: map partition {parts[rank].numel} != DeepSpeed "
                                     f"{zero_opt.fp32_groups_flat_partition[g].numel()}")
            flats.append(ZeroFlat(g, g, world, tuple(e[1] for e in entries), parts))
            tensor_to_flat[id(zero_opt.fp32_groups_flat_partition[g])] = g
    else:
        raise TypeError(f"{cls} is not a DeepSpeed ZeRO optimizer this module knows "
                        "(DeepSpeedZeroOptimizer, BF16_Optimizer, DeepSpeedZeroOptimizer_Stage3)")
    worlds = {f.world_size for f in flats}
    if len(worlds) > 1:
        raise NotImplementedError(f"flats partitioned over different world sizes {sorted(worlds)} (MoE expert groups)")
    return ZeroMap(stage, kind, rank, names, shapes, tuple(flats), tensor_to_flat)
