"""Learning-rate schedules of the paper, per group, as ready ``LambdaLR`` factories.

- ``matrix`` groups: no warmup, constant for the first ``constant_fraction`` of steps, then linear
  decay to 0: ``f(t) = 1`` for ``t < c·T``, else ``(T − t) / (T − c·T)``.
- ``vector`` groups: linear warmup over ``warmup`` steps, then cosine to 0:
  ``f(t) = t/w`` for ``t < w``, else ``½(1 + cos(π (t − w)/(T − w)))``.
- ``constant`` groups: ``f(t) = 1``.
"""
from __future__ import annotations

import math

import torch


def constant_then_linear(total_steps: int, constant_fraction: float = 0.6):
    hold = int(constant_fraction * total_steps)

    def f(t: int) -> float:
        if t < hold:
            return 1.0
        return max(0.0, (total_steps - t) / max(1, total_steps - hold))

    return f


def warmup_cosine(total_steps: int, warmup: int = 100):
    warmup = min(warmup, max(total_steps - 1, 0))

    def f(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = (t - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def paper_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int = 100,
                   constant_fraction: float = 0.6) -> torch.optim.lr_scheduler.LambdaLR:
    """One ``LambdaLR`` with each group's shape chosen by its ``schedule`` key (default ``matrix``).

    Args:
        optimizer: the optimizer (its groups carry ``schedule``).
        total_steps (int): steps of the run.
        warmup (int): warmup steps of vector groups (default: 100).
        constant_fraction (float): fraction of steps at constant lr for matrix groups (default: 0.6).
    """
    shapes = {"matrix": constant_then_linear(total_steps, constant_fraction),
              "vector": warmup_cosine(total_steps, warmup),
              "constant": lambda t: 1.0}
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [shapes[g.get("schedule", "matrix")] for g in optimizer.param_groups])
