"""Plans for simulated clusters: layouts of FSDP2 / HSDP / expert parallel at any W, on ``meta``.

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

    Attributes:
        world_size (int): ranks.
        replicas (int): HSDP replica groups (1 = plain FSDP2); parameters are sharded on dim 0
            inside a group of ``world_size / replicas`` ranks.
        expert_parallel (int): ranks sharing out the experts of 3-D expert tensors (dim 0); the
            remaining ``world_size / expert_parallel`` ranks shard each expert on dim 1.
    """

    world_size: int
    replicas: int = 1
    expert_parallel: int = 1

    def __post_init__(self):
        for name in ("replicas", "expert_parallel"):
            if self.world_size % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} must divide world_size={self.world_size}")

    def layout(self, shape: tuple[int, ...], expert: bool) -> Layout:
        """The layout DTensor would give a parameter of ``shape`` (cached: the same object for equal
        arguments, so plans share the work per layout)."""
        return _layout(self, tuple(shape), bool(expert))


@functools.lru_cache(maxsize=1024)
def _layout(parallel: Parallel, shape: tuple[int, ...], expert: bool) -> Layout:
    """``mesh_layout`` of the parallel's mesh and placements, built directly (equal to it: tested);
    the generic version walks every rank's box, too slow for W = 1024."""
    W = parallel.world_size
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
    """

    plan: Plan
    parallel: Parallel
    local_numel: tuple[int, ...]
    matrix_numel: tuple[int, ...]
    state_numel: tuple[int, ...]
    colsum_sizes: tuple[int, ...]

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
                  element_bytes: int = 4, replicate_below: int | None = None, **overrides) -> Simulation:
    """The plan every rank would build for ``model`` (best on ``meta``) under ``parallel``, with the
    per-rank sizes and all-reduces of the rest of the step (``replicate_below`` as the optimizer's,
    default :data:`~dist_spectral.optimizer.REPLICATE_BELOW`)."""
    W = parallel.world_size
    groups, _, _ = resolve_groups(model, recipe, **overrides)
    params = []
    protos: dict[tuple, object] = {}
    sizes: dict[int, list[int]] = {}
    colsum_cache: dict[tuple, list[int]] = {}
    local, matrix, state = (np.zeros(W, dtype=np.int64) for _ in range(3))
    colsum_sizes: list[int] = []
    for g in groups:
        rule = get_rule(g.rule)
        group = {**g.hyper, "rule": g.rule}
        buffers = _state_buffers(rule, group)
        for info in g.members:
            layout = parallel.layout(info.shape, expert=len(info.shape) == 3 and info.role.startswith("expert"))
            if id(layout) not in sizes:
                sizes[id(layout)] = np.array([layout.local_numel(r) for r in range(W)], dtype=np.int64)
            held = sizes[id(layout)]
            local += held
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
                      tuple(colsum_sizes))


def simulate(model: nn.Module, parallel: Parallel, recipe="symmetric", bucket_mb: float = 256,
             element_bytes: int = 4, replicate_below: int | None = None, **overrides) -> Plan:
    """The plan every rank would build for ``model`` (best on ``meta``) under ``parallel``."""
    return simulate_step(model, parallel, recipe, bucket_mb, element_bytes, replicate_below, **overrides).plan
