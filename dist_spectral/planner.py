"""Plans for simulated clusters: layouts of FSDP2 / HSDP / expert parallel at any W, on ``meta``.

No processes and no memory: a model built on the ``meta`` device gives names and shapes, the
parallel layout gives each rank's element ranges exactly as DTensor would, and the plan is the one
every rank would build. Used by ``dist-spectral plan`` and by tests that check the planner's bytes
and flops against counters of real runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .build import resolve_groups
from .layout import Layout, mesh_layout
from .optimizer import SpectralOptimizer, runs_on_rows
from .plan import Plan, build_plan
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
        W = self.world_size
        if expert and self.expert_parallel > 1:
            ep, dp = self.expert_parallel, W // self.expert_parallel
            grid = [[e * dp + d for d in range(dp)] for e in range(ep)]
            return mesh_layout(shape, grid, (("shard", 0), ("shard", 1)), W)
        if self.replicas > 1:
            r, s = self.replicas, W // self.replicas
            grid = [[i * s + j for j in range(s)] for i in range(r)]
            return mesh_layout(shape, grid, (("replicate", -1), ("shard", 0)), W)
        return mesh_layout(shape, list(range(W)), (("shard", 0),), W)


def simulate(model: nn.Module, parallel: Parallel, recipe="symmetric", bucket_mb: float = 256,
             element_bytes: int = 4, **overrides) -> Plan:
    """The plan every rank would build for ``model`` (best on ``meta``) under ``parallel``."""
    groups, _, _ = resolve_groups(model, recipe, **overrides)
    params = []
    for g in groups:
        rule = get_rule(g.rule)
        for info in g.members:
            if rule.locality == "element":
                continue
            layout = parallel.layout(info.shape, expert=len(info.shape) == 3 and info.role.startswith("expert"))
            if runs_on_rows(g.rule, info, layout):
                continue
            params.append(SpectralOptimizer.plan_param(len(params), info.name, info, {**g.hyper, "rule": g.rule}, layout))
    return build_plan(params, parallel.world_size, int(bucket_mb * (1 << 20)), element_bytes)
