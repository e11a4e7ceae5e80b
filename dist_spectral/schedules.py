"""Learning-rate schedules of the paper, per group, as ready ``LambdaLR`` factories.

- ``matrix`` groups: no warmup, constant for the first ``constant_fraction`` of steps, then linear
  decay to 0: ``f(t) = 1`` for ``t < c·T``, else ``(T − t) / (T − c·T)``.
- ``vector`` groups: linear warmup over ``warmup`` steps, then cosine to 0:
  ``f(t) = (t + 1)/w`` for ``t < w``, else ``½(1 + cos(π (t − w)/(T − w)))``.
- ``constant`` groups: ``f(t) = 1``.

Each shape is a function of the step and the run's total ``T``. A run resumed with another total
(more ``train.steps``) therefore follows the new total's schedule from the restored step on, as
if it had been planned that long from the start: matrix groups hold their lr up to ``c·T_new``
and decay to 0 at ``T_new`` (an lr already decayed under the old total goes back up), vector
groups continue their cosine over ``T_new``. A checkpoint restores each group's ``lr`` as saved,
which ``LambdaLR`` replaces only at its next ``step()``; :func:`apply_schedule` sets it from the
schedule at once, so the first resumed step does not run at the old total's lr (0 at its end).
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


def apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list[tuple[float, float]]:
    """Set every group's ``lr`` to the schedule's value at the scheduler's current step.

    Call after loading a checkpoint: the optimizer's groups then hold the lrs of the schedule the
    checkpoint was saved under, which ``LambdaLR`` (whose lambdas are the new run's functions and
    are not saved) would replace only after the next step. The value is ``LambdaLR``'s own,
    ``base_lr * f(last_epoch)``, so an unchanged schedule keeps every lr bit for bit.

    Args:
        scheduler (LambdaLR): the scheduler, with its state loaded (``last_epoch``, ``base_lrs``).

    Returns:
        list of (float, float): each group's ``lr`` before and after, in group order.
    """
    groups = scheduler.optimizer.param_groups
    changes = []
    for group, base, f in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        before, group["lr"] = group["lr"], base * f(scheduler.last_epoch)
        changes.append((float(before), float(group["lr"])))
    scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports
    return changes
