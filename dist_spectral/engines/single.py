"""One process, or DDP: every rank holds every parameter whole.

Under DDP the gradients are already all-reduced, so ranks split the whole-matrix units among
themselves (the plan balances them) and the scatter phase sends each result to every other rank:
the same bytes as one all-gather, and no rank repeats another's work. Replicated units (small
routers, see plan.py) are the exception: every rank computes them, and nothing moves.
"""
from __future__ import annotations

from torch import Tensor

from ..layout import Layout, replicated
from .base import EngineAdapter, init_parameter_state, parameter_items
from .collectives import Collectives
from .rows import row_view


class ReplicatedEngine(EngineAdapter):
    """Parameters held whole on every rank of ``collectives`` (default: the world, or one process)."""

    def __init__(self, collectives: Collectives | None = None):
        self.collectives = collectives or Collectives()

    def layout(self, param: Tensor) -> Layout:
        return replicated(tuple(param.shape), self.world_size)

    def local(self, tensor: Tensor) -> Tensor:
        return tensor

    def bind_groups(self, param_groups):
        pass  # steps read the groups they are given

    def init_state(self, param_groups, infos, state):
        init_parameter_state(param_groups, state)

    def step_items(self, param_groups, infos, state):
        return parameter_items(self, param_groups, infos, state)

    def row_view(self, layout, flat):
        return row_view(layout, flat, self.collectives)


__all__ = ["ReplicatedEngine"]
