"""Which path a parameter takes in a step, and its entry in the plan: pure functions of metadata.

Element-wise rules run on the local shard; row rules on the shard when :func:`runs_on_rows`;
everything else goes per unit through the owner exchange, described to the planner by
:func:`plan_param`. Shared by the optimizer and the simulator (``planner.py``), which must not
need the optimizer class.
"""
from __future__ import annotations

from .blocks import group_unit_specs, permuted_axis, unit_specs
from .layout import Layout
from .plan import PlanParam
from .roles import ParamInfo
from .rules import get_rule

#: Default ``replicate_below``, in elements (see :class:`~dist_spectral.SpectralOptimizer`): where
#: replicating stopped being faster in ``benchmarks/results/router_path.md``.
REPLICATE_BELOW = 8192


def runs_on_rows(rule_name: str, info: ParamInfo, layout: Layout) -> bool:
    """Whether a row rule runs on the shard, with only small all-reduces for statistics: its
    parameter is one matrix (statistics span exactly that matrix), or its rows are whole and it
    needs no statistics over rows (:meth:`~dist_spectral.rules.Rule.needs_matrix_statistics`).
    Rows cut by partition boundaries (ZeRO, a row-parallel weight's ``Shard(1)`` under tensor
    parallel, replicated or not over HSDP replicas) are fine for a 2-D parameter. Everything else (per-expert statistics of a 3-D tensor, a 2-D tensor holding several
    blocks) goes per matrix through the owner exchange."""
    rule = get_rule(rule_name)
    if rule.locality != "rows":
        return False
    if rule.needs_matrix_statistics(permuted_axis(info)):
        specs = unit_specs(info, per_head=False)
        if len(info.shape) != 2 or len(specs) != 1 or len(specs[0].blocks) != 1:
            return False
    if len(info.shape) == 2:
        return True
    return layout.whole_rows()


def plan_param(pos: int, name: str, info: ParamInfo, group: dict, layout: Layout | None) -> PlanParam:
    """The planner's view of one whole-matrix parameter at position ``pos`` of a plan."""
    rule = get_rule(group["rule"])
    specs = group_unit_specs(info, group)
    costs = tuple(sum(rule.cost(*b.shape, group) for b in s.blocks) for s in specs)
    polar = tuple(sum(rule.polar_flops(*b.shape, group) for b in s.blocks) for s in specs)
    channels = (rule.inputs + len(rule.carried), 1 + len(rule.carried)) if rule.stateful else (1, 1)
    return PlanParam(pos, name, layout, specs, costs, polar, rule.key(group), channels)


__all__ = ["REPLICATE_BELOW", "runs_on_rows", "plan_param"]
