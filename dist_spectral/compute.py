"""Run a whole-matrix rule on the units an owner holds: split into blocks, batch by shape, apply.

Blocks with the same rule key, orientation and shape are stacked into one ``[B, m, n]`` batch, so
a rank that owns 12 experts of one shape runs one batched polar, not 12. Rules with carried state
(:attr:`~dist_spectral.rules.Rule.carried`) get their inputs and state as channels of the same
blocks, ``[B, C, m, n]``, and also batch by step (their math may depend on it: bias corrections,
a basis refreshed every T steps). No communication here.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import UnitSpec, read_block, write_block
from .rules import Rule


@dataclass
class MatrixJob:
    """One unit, whole: its ``[rows, n]`` matrix and how to treat it.

    Attributes:
        matrix (Tensor): the unit's rows of the direction input, shape ``[rows, n]``; for a rule
            with carried state ``[C, rows, n]``: its inputs, then its carried state in the rule's
            ``carried`` order.
        spec (UnitSpec): its blocks.
        rule (Rule): the rule to apply.
        group (dict): the param group (hyperparameters).
        axis (str): the permuted axis (``"rows"`` or ``"cols"``).
        transposed (bool): the weight is stored in × out.
        step (int): the parameter's step counter, this step included (default: 0).
        out (Tensor, optional): where to write the result (shape as returned, see
            :func:`run_jobs`), e.g. a view of the caller's output buffer, saving a copy
            (default: None, a new tensor).
    """

    matrix: Tensor
    spec: UnitSpec
    rule: Rule
    group: dict
    axis: str
    transposed: bool
    step: int = 0
    out: Tensor | None = None


def _new_result(job: MatrixJob) -> Tensor:
    if job.rule.stateful:
        return job.matrix.new_empty((1 + len(job.rule.carried),) + job.matrix.shape[-2:])
    return torch.empty_like(job.matrix)


def run_jobs(jobs: list[MatrixJob]) -> tuple[list[Tensor], int]:
    """Directions for every job (same shapes as their matrices; ``[1 + len(carried), rows, n]``
    for rules with carried state: the direction, then the new state) and the polar flops spent."""
    batches: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for j, job in enumerate(jobs):
        stateful = job.rule.stateful
        for k, b in enumerate(job.spec.blocks):
            key = (job.rule.key(job.group), job.axis, job.transposed, b.shape, job.matrix.dtype)
            batches[key + ((job.step,) if stateful else ())].append((j, k))
    results = [job.out if job.out is not None else _new_result(job) for job in jobs]
    flops = 0
    for key, members in batches.items():
        first = jobs[members[0][0]]
        rule = first.rule
        stack = torch.stack([read_block(jobs[j].matrix, jobs[j].spec.blocks[k]) for j, k in members])
        if rule.stateful:
            inputs = [stack[:, c] for c in range(rule.inputs)]
            state = {name: stack[:, rule.inputs + c] for c, name in enumerate(rule.carried)}
            out, new_state = rule.direction_with_state(inputs, state, step=first.step, axis=first.axis,
                                                       transposed=first.transposed, group=first.group)
            channels = torch.stack([out] + [new_state[name] for name in rule.carried], dim=1)
        else:
            channels = rule.direction(stack, axis=first.axis, transposed=first.transposed, group=first.group)
        flops += len(members) * int(rule.polar_flops(*key[3], first.group))
        for (j, k), u in zip(members, channels):
            write_block(results[j], jobs[j].spec.blocks[k], u)
    return results, flops
