"""Run a whole-matrix rule on the units an owner holds: split into blocks, batch by shape, apply.

Blocks with the same rule key, orientation and shape are stacked into one ``[B, m, n]`` batch, so
a rank that owns 12 experts of one shape runs one batched polar, not 12. No communication here.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import UnitSpec
from .rules import Rule


@dataclass
class MatrixJob:
    """One unit, whole: its ``[rows, n]`` matrix and how to treat it.

    Attributes:
        matrix (Tensor): the unit's rows of the direction input, shape ``[rows, n]``.
        spec (UnitSpec): its blocks.
        rule (Rule): the rule to apply.
        group (dict): the param group (hyperparameters).
        axis (str): the permuted axis (``"rows"`` or ``"cols"``).
        transposed (bool): the weight is stored in × out.
    """

    matrix: Tensor
    spec: UnitSpec
    rule: Rule
    group: dict
    axis: str
    transposed: bool


def _block(matrix: Tensor, b) -> Tensor:
    return matrix[b.row_start:b.row_stop, b.col_start:b.col_stop:b.col_step]


def run_jobs(jobs: list[MatrixJob]) -> tuple[list[Tensor], int]:
    """Directions for every job (same shapes as their matrices) and the polar flops spent."""
    batches: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for j, job in enumerate(jobs):
        for k, b in enumerate(job.spec.blocks):
            key = (job.rule.key(job.group), job.axis, job.transposed, b.shape, job.matrix.dtype)
            batches[key].append((j, k))
    results = [torch.empty_like(job.matrix) for job in jobs]
    flops = 0
    for key, members in batches.items():
        first = jobs[members[0][0]]
        stack = torch.stack([_block(jobs[j].matrix, jobs[j].spec.blocks[k]) for j, k in members])
        out = first.rule.direction(stack, axis=first.axis, transposed=first.transposed, group=first.group)
        flops += len(members) * int(first.rule.polar_flops(*key[3], first.group))
        for (j, k), u in zip(members, out):
            _block(results[j], jobs[j].spec.blocks[k]).copy_(u)
    return results, flops
