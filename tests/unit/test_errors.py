"""Bad configuration and bad input on one process: every error is raised before any state changes,
names what is wrong and says what to do.

Covered elsewhere: ranks that disagree, unsupported DTensor layouts, dead and stalled ranks
(tests/distributed/test_faults.py); mismatched checkpoints (tests/distributed/test_checkpoint.py).
"""
from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import torch

from dist_spectral import NonFiniteGradientError, build_optimizer
from dist_spectral.exchange import CollectiveError
from tests.tiny import synthetic_grad, tiny_olmoe, tiny_qwen3


@pytest.fixture(scope="module")
def olmoe():
    return tiny_olmoe(seed=0)


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(model, before: dict) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and all(
        p.grad is None for p in model.parameters())


def recipe(*groups) -> dict:
    return {"name": "test", "groups": [{"name": "vector", "match": {"role": "vector"}, "rule": "adamw", "lr": 1e-3},
                                       *groups]}


@pytest.mark.parametrize("kwargs,message", [
    (dict(recipe=recipe({"name": "m", "match": {"role": "attention"}, "rule": "muonn", "lr": 1e-3})),
     "unknown rule 'muonn'; known rules: adamw, "),  # every registered rule, sorted
    (dict(recipe="symmetric", router={"rule": "left_spectrall"}), "unknown rule 'left_spectrall'"),
    (dict(recipe="symmetric", routr={"rule": "left_spectral"}),
     "override 'routr' is neither a group of recipe 'symmetric'"),
    (dict(recipe=recipe({"name": "m", "match": {"role": "atention"}, "rule": "muon", "lr": 1e-3})),
     "group 'm' selects unknown role(s) ['atention']; roles are attention, attention.k"),
    (dict(recipe="symmetric", groups=[{"name": "x", "match": {"role": ["router", "experts"]}, "rule": "muon",
                                       "lr": 1e-3}]),
     "group 'x' selects unknown role(s) ['experts']"),
    (dict(recipe="symmetric", groups=[{"name": "x", "match": {"name": r"\.q_projection\."}, "rule": "muon",
                                       "lr": 1e-3}]),
     "group 'x' pattern {'name': '\\\\.q_projection\\\\.'} matches no parameter"),
    (dict(recipe="symmetric", vector={"rule": "left_spectral"}),
     "model.layers.0.self_attn.q_norm.weight: rule 'left_spectral' needs a matrix but the parameter has shape (32,); "
     "give 1-D parameters an element-wise rule such as adamw"),
    (dict(recipe="symmetric", vector={"rule": "muon"}), "rule 'muon' needs a matrix but the parameter has shape (32,)"),
    (dict(recipe="symmetric", mlp={"momentum": 0.9}), "group 'mlp' sets 'momentum', which rule 'muon' does not take"),
    (dict(recipe="symmetric", nonfinite="ignore"), "nonfinite='ignore': use 'skip', 'raise' or 'off'"),
    (dict(recipe="no-such-recipe"), "unknown recipe 'no-such-recipe'"),
    (dict(recipe="symmetric", vector={"betas": 0.9}), "group 'vector' (rule 'adamw'): betas=0.9; give two numbers [beta1, beta2]"),
], ids=["unknown-rule", "override-unknown-rule", "override-unknown-group", "unknown-role", "override-unknown-role",
        "pattern-matches-nothing", "spectral-on-1d", "muon-on-1d", "unknown-hyperparameter", "unknown-policy",
        "unknown-recipe", "scalar-betas"])
def test_bad_configuration_raises_before_anything_changes(olmoe, kwargs, message):
    before = snapshot(olmoe)
    with pytest.raises(ValueError) as err:
        build_optimizer(olmoe, **kwargs)
    assert message in str(err.value)
    assert unchanged(olmoe, before)


def test_role_prefixes_are_valid_selectors(olmoe):
    """``expert``/``attention``/``mlp`` select every role under them (the check must not reject them)."""
    opt = build_optimizer(olmoe, recipe({"name": "m", "match": {"role": ["attention", "expert", "mlp.down", "router"]},
                                         "rule": "muon", "lr": 1e-3}))
    assert {g["name"] for g in opt.param_groups} == {"vector", "m", "fallback"}


def test_per_head_rule_on_a_matrix_without_heads_is_rejected():
    from dist_spectral import SpectralOptimizer
    from dist_spectral.roles import ParamInfo

    p = torch.nn.Parameter(torch.randn(30, 16))
    info = ParamInfo("w", (30, 16), "attention.q", num_heads=4, head_dim=8)  # 4 heads of 8 rows do not make 30
    with pytest.raises(ValueError, match="w: 30 rows are not a multiple of head_dim=8 for per-head polar"):
        SpectralOptimizer([{"params": [("w", p)], "rule": "muon", "lr": 0.1, "per_head": True,
                            **{"beta": 0.95, "nesterov": True, "scale": "spectral", "steps": 5,
                               "coefficients": "polar_express", "safety": 1.01, "polar_dtype": "auto"}}],
                          {"w": info})


def set_grads(model, step: int, poison: dict | None = None) -> None:
    for name, p in model.named_parameters():
        p.grad = synthetic_grad(name, tuple(p.shape), step)
        if poison and name in poison:
            p.grad.view(-1)[0] = poison[name]


def state_copy(opt) -> list:
    return [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_skip_changes_nothing_and_is_counted(value, caplog):
    model = tiny_qwen3(seed=0)
    opt = build_optimizer(model, "symmetric")
    set_grads(model, 0)
    opt.step()
    set_grads(model, 1, {"lm_head.weight": value})
    weights, state = snapshot(model), state_copy(opt)
    with caplog.at_level(logging.WARNING, logger="dist_spectral.optimizer"):
        opt.step()
    assert opt.last_stats.skipped and opt.skipped_steps == 1 and opt.num_steps == 2
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(state, state_copy(opt)) for k in a)  # step counters included
    assert "non-finite gradient in lm_head.weight (skipped so far: 1)" in caplog.text
    set_grads(model, 1)
    opt.step()
    assert not opt.last_stats.skipped and opt.skipped_steps == 1


def test_nonfinite_raise_names_the_first_parameter():
    model = tiny_qwen3(seed=0)
    opt = build_optimizer(model, "symmetric", nonfinite="raise")
    set_grads(model, 0, {"lm_head.weight": float("nan"), "model.layers.1.mlp.down_proj.weight": float("inf")})
    weights, state = snapshot(model), state_copy(opt)
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient in model\.layers\.1\.mlp\.down_proj\.weight "
                                                     r"\(the first parameter with one, on any rank; step 1\)"):
        opt.step()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(state, state_copy(opt)) for k in a)


def test_collective_error_names_step_collective_and_timeout():
    err = CollectiveError(7, "all_to_all_single (gather) of exchange bucket 2/3", RuntimeError("Operation timed out!"),
                          timedelta(seconds=10))
    assert str(err).startswith("optimizer step 7: all_to_all_single (gather) of exchange bucket 2/3 failed "
                               "(timeout 10 s): Operation timed out!")
    assert err.step == 7 and isinstance(err, RuntimeError)


def test_timeout_option_reaches_topology_and_exchanges():
    model = tiny_qwen3(seed=0)
    opt = build_optimizer(model, "symmetric")
    assert opt.timeout is None and opt.topology.timeout is None
    opt.timeout = 12
    assert opt.timeout == timedelta(seconds=12) and opt.topology.timeout == timedelta(seconds=12)
    set_grads(model, 0)
    opt.step()
    assert all(exchange.timeout == timedelta(seconds=12) for _, exchange in opt._plans.values())
