"""A resumed run's lr schedule: ``apply_schedule`` after a checkpoint load, and the line that says
how a resume changed the schedule (``dist_spectral/training/loop.py``)."""
from __future__ import annotations

import torch

from dist_spectral.schedules import apply_schedule, paper_schedule
from dist_spectral.training.loop import schedule_change


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.zeros(2)], "lr": 0.02, "schedule": "matrix", "name": "mlp"},
                            {"params": [torch.zeros(2)], "lr": 0.004, "schedule": "vector", "name": "vector"},
                            {"params": [torch.zeros(2)], "lr": 0.1, "schedule": "constant", "name": "other"}])


def run(total: int, steps: int, warmup: int = 2):
    opt = optimizer()
    sched = paper_schedule(opt, total, warmup=warmup)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt, sched


def resumed(saved_total: int, at: int, total: int):
    """A fresh optimizer and schedule for ``total`` steps, loaded from a run of ``saved_total`` at step ``at``."""
    old_opt, old_sched = run(saved_total, at)
    opt, sched = run(total, 0)
    opt.load_state_dict(old_opt.state_dict())
    sched.load_state_dict(old_sched.state_dict())
    return opt, sched


def test_loading_restores_the_old_totals_lr_until_applied():
    opt, sched = resumed(6, 6, 10)
    assert [g["lr"] for g in opt.param_groups[:2]] == [0.0, 0.0]  # what the first resumed step used to run at
    changes = apply_schedule(sched)
    fresh_opt, _ = run(10, 6)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in fresh_opt.param_groups]
    assert [after for _, after in changes] == [g["lr"] for g in fresh_opt.param_groups]
    assert changes[0] == (0.0, 0.02) and changes[2] == (0.1, 0.1)
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_the_extended_run_continues_as_one_planned_that_long():
    opt, sched = resumed(6, 6, 10)
    apply_schedule(sched)
    fresh_opt, fresh_sched = run(10, 6)
    for _ in range(4):
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in fresh_opt.param_groups]
        for o, s in ((opt, sched), (fresh_opt, fresh_sched)):
            o.step()
            s.step()


def test_an_unchanged_schedule_keeps_every_lr_bit_for_bit():
    opt, sched = resumed(10, 7, 10)
    saved = [g["lr"] for g in opt.param_groups]
    changes = apply_schedule(sched)
    assert [g["lr"] for g in opt.param_groups] == saved
    assert all(before == after for before, after in changes)


def test_schedule_change_is_silent_when_nothing_changed():
    settings = {"train.steps": 10, "optim.warmup": 2, "optim.constant_fraction": 0.6}
    opt, sched = resumed(10, 7, 10)
    assert schedule_change(settings, settings, 7, opt.param_groups, sched.base_lrs, apply_schedule(sched)) is None


def test_schedule_change_names_the_settings_and_the_lr_jump():
    opt, sched = resumed(6, 6, 10)
    saved = {"train.steps": 6, "optim.warmup": 2, "optim.constant_fraction": 0.6}
    now = {**saved, "train.steps": 10}
    line = schedule_change(saved, now, 6, opt.param_groups, sched.base_lrs, apply_schedule(sched))
    assert "\n" not in line
    assert "train.steps 6 -> 10" in line and "over 10 steps from step 6 on" in line
    assert "matrix groups x0.000 -> x1.000" in line and "vector groups x0.000 -> x0." in line
    assert "constant groups x1.000 -> x1.000" in line


def test_schedule_change_of_a_checkpoint_without_settings_still_speaks():
    opt, sched = resumed(6, 6, 10)
    now = {"train.steps": 10, "optim.warmup": 2, "optim.constant_fraction": 0.6}
    line = schedule_change(None, now, 6, opt.param_groups, sched.base_lrs, apply_schedule(sched))
    assert "the checkpoint's lrs are not this run's schedule's" in line
