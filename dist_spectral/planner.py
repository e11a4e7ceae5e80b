"""Plans for simulated clusters: layouts of FSDP2 / HSDP / expert / tensor / pipeline parallel at any W, on ``meta``.

No processes and no memory: a model built on the ``meta`` device gives names and shapes, the
parallel layout gives each rank's element ranges exactly as DTensor would, and the plan is the one
every rank would build. Used by ``dist-spectral plan`` and by tests that check the planner's bytes
and flops against counters of real runs.

:func:`simulate` returns the :class:`~dist_spectral.plan.Plan`; :func:`simulate_step` adds what a
step does outside the exchange (local sizes, optimizer state, column-statistics all-reduces), which
:mod:`dist_spectral.predict` turns into time and memory. Layouts and unit lists are computed once
per distinct (shape, role) — a 94-layer model has a handful — so W = 1024 plans take seconds.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .blocks import permuted_axis, view_2d_shape
from .build import resolve_groups
from .layout import Layout, chunk_range
from .plan import Plan, build_plan
from .route import REPLICATE_BELOW, plan_param, runs_on_rows
from .rules import get_rule


@dataclass(frozen=True)
class Parallel:
    """A simulated parallel layout.

    Ranks are ``(pipeline, replicas, dp, tensor_parallel)`` row-major: a pipeline stage is a
    block of ``world_size / pipeline`` consecutive ranks, and tensor-parallel ranks are adjacent.

    Attributes:
        world_size (int): ranks.
        replicas (int): HSDP replica groups (1 = plain FSDP2); parameters are sharded on dim 0
            inside a group of ``world_size / replicas`` ranks.
        expert_parallel (int): ranks sharing out the experts of 3-D expert tensors (dim 0); the
            remaining ``world_size / expert_parallel`` ranks shard each expert on dim 1.
        tensor_parallel (int): ranks of a ``tp`` mesh dim, parallelised as torchtitan does
            (:func:`tp_dim`), FSDP2 on the rest (``_StridedShard`` over column-parallel weights).
        pipeline (int): stages; each holds a contiguous run of layers (the embedding with the
            first, the final norm and LM head with the last) and plans on its own ranks.
    """

    world_size: int
    replicas: int = 1
    expert_parallel: int = 1
    tensor_parallel: int = 1
    pipeline: int = 1

    def __post_init__(self):
        for name in ("replicas", "expert_parallel", "tensor_parallel", "pipeline"):
            if getattr(self, name) < 1 or self.world_size % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1 and divide world_size={self.world_size}")
        if (self.stage_world_size % (self.replicas * self.tensor_parallel)
                or self.stage_world_size % self.expert_parallel):
            raise ValueError(f"replicas={self.replicas} × tensor_parallel={self.tensor_parallel} and expert_parallel="
                             f"{self.expert_parallel} must divide the {self.stage_world_size} ranks of a pipeline "
                             f"stage (world_size={self.world_size} / pipeline={self.pipeline})")
        if self.tensor_parallel > 1 and self.expert_parallel > 1:
            raise ValueError("expert_parallel with tensor_parallel is not simulated: give one of them")

    @property
    def stage_world_size(self) -> int:
        """Ranks of one pipeline stage: those its optimizer plans over."""
        return self.world_size // self.pipeline

    def layout(self, shape: tuple[int, ...], expert: bool, tp: int | None = None) -> Layout:
        """The layout DTensor would give a parameter of ``shape`` on the ranks of a stage, with
        tensor dim ``tp`` cut over the ``tp`` mesh dim (``None``: replicated over it) (cached: the
        same object for equal arguments, so plans share the work per layout)."""
        if self.tensor_parallel > 1:
            return _tp_layout(self, tuple(shape), tp)
        return _layout(self, tuple(shape), bool(expert))


def tp_dim(info) -> int | None:
    """The tensor dim a ``tp`` mesh dim cuts, by role, as torchtitan and the tests parallelise
    Llama-style models: the embedding row-parallel (``Shard(0)``), the LM head and q/k/v, gate and
    up column-parallel (their output rows), ``o`` and ``down`` row-parallel (their input columns),
    3-D experts likewise per expert; routers, norms and the rest replicated (``None``)."""
    ndim = len(info.shape)
    if info.role in ("embedding", "lm_head"):
        return 0
    out_dim, in_dim = (ndim - 1, ndim - 2) if info.transposed else (ndim - 2, ndim - 1)
    part = info.role.split(".", 1)[-1]
    if info.role.startswith(("attention.", "mlp.", "expert.")) and part in ("q", "k", "v", "qkv", "gate", "up", "gate_up"):
        return out_dim
    if info.role in ("attention.o", "mlp.down", "expert.down"):
        return in_dim
    return None


@functools.lru_cache(maxsize=1024)
def _tp_layout(parallel: Parallel, shape: tuple[int, ...], tp: int | None) -> Layout:
    """FSDP2 (over replicas × dp) on a tensor-parallel parameter, through the optimizer's own
    DTensor layout: ``(Replicate(), Shard(0) | _StridedShard(0, sf=tp), Shard(tp) | Replicate())``."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from .engines.dtensor import placement_layout

    tps, reps = parallel.tensor_parallel, parallel.replicas
    dp = parallel.stage_world_size // (reps * tps)
    ranks = np.arange(parallel.stage_world_size).reshape(reps, dp, tps).tolist()
    if not shape:
        return placement_layout(shape, _freeze(ranks), (Replicate(),) * 3, parallel.stage_world_size)
    fsdp = _StridedShard(0, split_factor=tps) if tp == 0 else Shard(0)
    placements = (Replicate(), fsdp, Replicate() if tp is None else Shard(tp))
    return placement_layout(shape, _freeze(ranks), placements, parallel.stage_world_size)


def _freeze(x):
    return tuple(_freeze(i) for i in x) if isinstance(x, list) else int(x)


def pipeline_stage(info, layers: int, stages: int) -> int:
    """The stage holding a parameter: layer ``i`` of ``layers`` on stage ``i · stages // layers``;
    outside the layers the embedding on the first stage, everything else (final norm, LM head) on the last."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", info.name)
    if match:
        return int(match.group(1)) * stages // max(layers, 1)
    return 0 if info.role == "embedding" else stages - 1


def _num_layers(infos) -> int:
    found = [int(m.group(1)) for i in infos if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", i.name))]
    return max(found, default=-1) + 1


@functools.lru_cache(maxsize=1024)
def _layout(parallel: Parallel, shape: tuple[int, ...], expert: bool) -> Layout:
    """``mesh_layout`` of the parallel's mesh and placements, built directly (equal to it: tested);
    the generic version walks every rank's box, too slow for W = 1024."""
    W = parallel.stage_world_size
    numel = math.prod(shape)
    if expert and parallel.expert_parallel > 1:
        ep, dp = parallel.expert_parallel, W // parallel.expert_parallel
        E, m = shape[0], shape[1]
        inner = math.prod(shape[2:])
        holdings = []
        for e in range(ep):
            e0, e1 = chunk_range(E, ep, e)
            for d in range(dp):
                r0, r1 = chunk_range(m, dp, d)
                if numel == 0 or e1 <= e0 or r1 <= r0:
                    holdings.append(())
                elif (r0, r1) != (0, m):
                    holdings.append(tuple((x * m * inner + r0 * inner, x * m * inner + r1 * inner) for x in range(e0, e1)))
                elif (e0, e1) != (0, E):
                    holdings.append(((e0 * m * inner, e1 * m * inner),))
                else:
                    holdings.append(((0, numel),))
        return Layout(shape, tuple(holdings), "(Shard(0), Shard(1))")
    replicas = parallel.replicas
    group = W // replicas
    inner = math.prod(shape[1:])
    chunks = []
    for j in range(group):
        lo, hi = chunk_range(shape[0], group, j)
        if numel == 0 or hi <= lo:
            chunks.append(())
        else:
            chunks.append(((lo * inner, hi * inner),))
    kind = "(Replicate(), Shard(0))" if replicas > 1 else "(Shard(0))"
    return Layout(shape, tuple(chunks) * replicas, kind)


@dataclass(frozen=True, eq=False)
class Simulation:
    """One simulated optimizer step: the plan, and per rank what happens outside it.

    Attributes:
        plan (Plan): the exchange plan of the whole-matrix parameters.
        parallel (Parallel): the simulated layout.
        local_numel (tuple[int, ...]): per rank, elements of every optimized parameter it holds
            (what element-wise work and AdamW touch).
        matrix_numel (tuple[int, ...]): per rank, elements of the parameters in the plan.
        state_numel (tuple[int, ...]): per rank, optimizer-state elements (each rule's
            parameter-shaped buffers: two for AdamW, one momentum for most rules, more with
            carried state).
        colsum_sizes (tuple[int, ...]): length of every column-statistics all-reduce of a step
            (row rules on sharded rows); each moves ``4 · length`` bytes each way per rank.
        local_params (tuple[int, ...]): per rank, optimized parameters it holds a piece of (what
            the step's Python visits; empty by default, when a caller builds one by hand).
    """

    plan: Plan
    parallel: Parallel
    local_numel: tuple[int, ...]
    matrix_numel: tuple[int, ...]
    state_numel: tuple[int, ...]
    colsum_sizes: tuple[int, ...]
    local_params: tuple[int, ...] = ()

    @property
    def colsum_bytes(self) -> int:
        """Bytes each rank sends (and receives) in column-statistics all-reduces per step, as the
        optimizer counts them (fp32, whatever the algorithm inside the all-reduce)."""
        return 4 * sum(self.colsum_sizes)

    def bytes_sent(self, rank: int, phase: str) -> int:
        """Per collective (``gather``, ``replicate``, ``scatter``, ``colsum``), as ``StepStats.bytes_sent``."""
        return self.colsum_bytes if phase == "colsum" else self.plan.bytes_sent(rank, phase)

    def bytes_received(self, rank: int, phase: str) -> int:
        return self.colsum_bytes if phase == "colsum" else self.plan.bytes_received(rank, phase)


def _colsum_sizes(rule_name: str, group: dict, info) -> list[int]:
    """Lengths of the all-reduces a row rule makes on one parameter with whole rows on every rank:
    the rule itself runs on a ``meta`` tensor with counting statistics, so the count follows the
    rule's code (the optimizer counts each all-reduce's output elements)."""
    from . import rules

    rows, n = view_2d_shape(tuple(info.shape))
    sizes = []

    def colsum(x):
        out = x.sum(-2, keepdim=True)
        sizes.append(out.numel())
        return out

    def total(x):
        out = x.sum((-2, -1), keepdim=True)
        sizes.append(out.numel())
        return out

    x = torch.empty((rows, n), device="meta")
    rule = get_rule(rule_name)
    kwargs = dict(axis=permuted_axis(info), transposed=info.transposed, group=group)
    if hasattr(rules, "RowStats"):
        rule.direction(x, stats=rules.RowStats(colsum=colsum, total_rows=rows, total=total), **kwargs)
    else:  # rules before RowStats took the callable directly
        rule.direction(x, colsum=colsum, total_rows=rows, **kwargs)
    return sizes


def _state_buffers(rule, group: dict) -> int:
    """Parameter-shaped state tensors of a rule (two for AdamW, one momentum for most rules, more
    for rules with carried state), read from the rule's own ``init_state``."""
    return len(rule.init_state(torch.empty(0, device="meta"), group))


def simulate_step(model: nn.Module, parallel: Parallel, recipe="symmetric", bucket_mb: float = 256,
                  element_bytes: int = 4, replicate_below: int | None = None, stage: int = 0,
                  **overrides) -> Simulation:
    """The plan every rank would build for ``model`` (best on ``meta``) under ``parallel``, with the
    per-rank sizes and all-reduces of the rest of the step (``replicate_below`` as the optimizer's,
    default :data:`~dist_spectral.optimizer.REPLICATE_BELOW`). Under pipeline parallel, that of
    pipeline ``stage``'s optimizer: its parameters (:func:`pipeline_stage`) on its ranks, numbered
    from 0 as in its process group."""
    W = parallel.stage_world_size
    if not 0 <= stage < parallel.pipeline:
        raise ValueError(f"stage={stage}: give a stage in [0, {parallel.pipeline})")
    groups, _, infos = resolve_groups(model, recipe, **overrides)
    if parallel.pipeline > 1:
        layers = _num_layers(infos)
        groups = [dataclasses.replace(g, members=[i for i in g.members
                                                  if pipeline_stage(i, layers, parallel.pipeline) == stage])
                  for g in groups]
    params = []
    protos: dict[tuple, object] = {}
    sizes: dict[int, list[int]] = {}
    colsum_cache: dict[tuple, list[int]] = {}
    local, matrix, state, held_params = (np.zeros(W, dtype=np.int64) for _ in range(4))
    colsum_sizes: list[int] = []
    for g in groups:
        rule = get_rule(g.rule)
        group = {**g.hyper, "rule": g.rule}
        buffers = _state_buffers(rule, group)
        for info in g.members:
            layout = parallel.layout(info.shape, expert=len(info.shape) == 3 and info.role.startswith("expert"),
                                     tp=tp_dim(info))
            if id(layout) not in sizes:
                sizes[id(layout)] = np.array([layout.local_numel(r) for r in range(W)], dtype=np.int64)
            held = sizes[id(layout)]
            local += held
            held_params += held > 0
            state += buffers * held
            if rule.locality == "element":
                continue
            if runs_on_rows(g.rule, info, layout):
                if W > 1 and not layout.is_replicated():
                    key = (id(g), dataclasses.replace(info, name=""))
                    if key not in colsum_cache:
                        colsum_cache[key] = _colsum_sizes(g.rule, group, info)
                    colsum_sizes += colsum_cache[key]
                continue
            matrix += held
            # Units and costs depend on the rule and the parameter's structure, not its name.
            key = (id(g), dataclasses.replace(info, name=""))
            if key not in protos:
                protos[key] = plan_param(0, info.name, info, group, layout)
            params.append(dataclasses.replace(protos[key], index=len(params), name=info.name, layout=layout))
    plan = build_plan(params, W, int(bucket_mb * (1 << 20)), element_bytes,
                      REPLICATE_BELOW if replicate_below is None else replicate_below)
    return Simulation(plan, parallel, tuple(local.tolist()), tuple(matrix.tolist()), tuple(state.tolist()),
                      tuple(colsum_sizes), tuple(held_params.tolist()))


def simulate(model: nn.Module, parallel: Parallel, recipe="symmetric", bucket_mb: float = 256,
             element_bytes: int = 4, replicate_below: int | None = None, stage: int = 0, **overrides) -> Plan:
    """The plan every rank (of pipeline ``stage``) would build for ``model`` (best on ``meta``) under ``parallel``."""
    return simulate_step(model, parallel, recipe, bucket_mb, element_bytes, replicate_below, stage, **overrides).plan
