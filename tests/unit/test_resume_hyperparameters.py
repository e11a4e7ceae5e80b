"""A resume's hyperparameters are the resumed run's: ``restore_configured`` puts them back after a
checkpoint load restored the saved ones, moves the scheduler's base lrs, and names each change."""
from __future__ import annotations

import warnings

import torch

from dist_spectral import build_optimizer, paper_schedule
from dist_spectral.training.loop import hyperparameters, restore_configured
from tests.tiny import synthetic_grad, tiny_olmoe

STEPS = 3


def _run(**overrides):
    model = tiny_olmoe(experts=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(model, "symmetric", **overrides)
    return model, opt, paper_schedule(opt, 10, warmup=2)


def _trained():
    model, opt, sched = _run()
    for step in range(STEPS):
        for n, p in model.named_parameters():
            p.grad = synthetic_grad(n, p.shape, step)
        opt.step()
        sched.step()
    return opt.state_dict(), sched.state_dict()


def _resume(saved, **overrides):
    _, opt, sched = _run(**overrides)
    configured = [hyperparameters(g) for g in opt.param_groups], list(sched.base_lrs)
    opt.load_state_dict(saved[0])
    sched.load_state_dict(saved[1])
    return opt, sched, configured


def test_changed_values_apply_and_are_named():
    saved = _trained()
    opt, sched, configured = _resume(saved, embedding={"lr": 0.01}, mlp={"weight_decay": 0.0, "steps": 6})
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["mlp"]["weight_decay"] == 0.001 and groups["mlp"]["steps"] == 5  # the load restored the saved
    note = restore_configured(opt.param_groups, sched, *configured)
    assert note.startswith("hyperparameters differ from the checkpoint's, this run's apply from here on: ")
    for part in ("embedding lr 0.02 -> 0.01", "mlp steps 5 -> 6", "mlp weight_decay 0.001 -> 0.0"):
        assert part in note, note
    assert groups["mlp"]["weight_decay"] == 0.0 and groups["mlp"]["steps"] == 6
    names = [g["name"] for g in opt.param_groups]
    base = dict(zip(names, sched.base_lrs))
    assert base["embedding"] == 0.01 and groups["embedding"]["initial_lr"] == 0.01
    f = dict(zip(names, sched.lr_lambdas))["embedding"]
    assert groups["embedding"]["lr"] == 0.01 * f(STEPS)  # this run's base on the restored step
    assert groups["attention"]["lr"] == base["attention"] * dict(zip(names, sched.lr_lambdas))["attention"](STEPS)


def test_the_same_config_changes_nothing():
    saved = _trained()
    opt, sched, configured = _resume(saved)
    before = [dict(g) for g in opt.param_groups]
    assert restore_configured(opt.param_groups, sched, *configured) is None
    assert [dict(g) for g in opt.param_groups] == before
