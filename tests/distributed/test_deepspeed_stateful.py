"""Conda and ARO under DeepSpeed ZeRO: carried state needs nothing engine-specific.

Under ZeRO the optimizer state lives in DeepSpeed's flat partitions, a matrix may be cut anywhere,
and ZeRO-3 with sub-groups calls ``step()`` once per sub-group. The carried state (Conda's basis and
second moment, ARO's rotation) is state like any other: its pieces ride the owner exchange with
the momentum. One process group of W = 2 runs ZeRO-1 with Conda and ZeRO-3 (sub-groups) with ARO
on a tiny OLMoE; the gradients DeepSpeed hands the optimizer are recorded and replayed into a
single-process optimizer, which must end with the same weights and the same state.

(The comparison is with the single-process fast path, not reference.py: on real gradients of a
small batch the expert momenta are rank-deficient and, in fp32, the rules' normalisations turn
the rounding noise of their null directions into O(1) entries, which a looped and a batched
computation round differently. Against the fast path DeepSpeed is bit-identical; the fast path
itself is checked against reference.py in float64 in test_stateful_parity.py.)
"""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

from tests.distributed.ds_harness import leave_worker

pytest.importorskip("deepspeed")

STEPS = 4
CASES = {"zero1-conda": ({"stage": 1}, "conda", {"update_proj_gap": 2}),
         "zero3_subgroups-aro": ({"stage": 3, "zero": {"sub_group_size": 3000}}, "aro", {"base_rule": "sinkhorn"})}
# Measured: 0 (bit-identical weights and state) in every case.
RTOL = 1e-6


def run_case(name: str, rank: int) -> dict:
    import deepspeed

    import dist_spectral
    from dist_spectral.deepspeed import initialize
    from dist_spectral.rules import get_rule
    from tests.distributed.ds_scenarios import batch, ds_config
    from tests.tiny import tiny_olmoe

    case, recipe, overrides = CASES[name]
    model = tiny_olmoe(seed=0)
    opt = dist_spectral.build_optimizer(model, recipe, **overrides)
    engine, _, _, _ = initialize(model=model, optimizer=opt, config=ds_config(case))
    shapes = dict(zip(opt.topology.zero_map.names, opt.topology.zero_map.shapes))
    grads, state = {}, {}
    original_step = opt.step

    def recording_step(closure=None):
        for it in opt._items():  # this rank's pieces of each gradient
            full = grads.setdefault(it.name, torch.zeros(shapes[it.name]).reshape(-1))
            for a, b in it.layout.holdings[rank]:
                full[a:b] = it.grad
        loss = original_step(closure)
        for it in opt._items():  # ... and of each state tensor, after the step
            if get_rule(it.group["rule"]).stateful:
                for key, value in it.state.items():
                    full = state.setdefault((it.name, key), torch.zeros(shapes[it.name]).reshape(-1))
                    for a, b in it.layout.holdings[rank]:
                        full[a:b] = value
        return loss

    opt.step = recording_step
    history = []
    for step in range(STEPS):
        ids = batch(step)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        for g in grads.values():  # every element is on exactly one rank: the sum reassembles it
            torch.distributed.all_reduce(g)
        history.append({n: g.reshape(shapes[n]) for n, g in grads.items()})
        grads = {}
    for value in state.values():
        torch.distributed.all_reduce(value)
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=case["stage"] == 3):
        weights = {n: p.detach().clone().float() for n, p in params}
    return {"params": weights, "grads": history, "state": {k: v.reshape(shapes[k[0]]) for k, v in state.items()}}


def worker(rank: int, world: int, out_dir: str) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=300))
    results = {name: run_case(name, rank) for name in CASES}
    if rank == 0:
        torch.save(results, Path(out_dir) / "result0.pt")
    leave_worker()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.distributed.ds_harness import launch

    d = tmp_path_factory.mktemp("ds_stateful")
    launch(2, "tests.distributed.test_deepspeed_stateful:worker", d)
    return torch.load(d / "result0.pt", weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_zero_equals_single_process(results, name):
    import dist_spectral
    from dist_spectral.rules import get_rule
    from tests.tiny import tiny_olmoe

    got = results[name]
    _, recipe, overrides = CASES[name]
    model = tiny_olmoe(seed=0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = dist_spectral.build_optimizer(model, recipe, **overrides)
    named = dict(model.named_parameters())
    for step_grads in got["grads"]:
        for n, p in named.items():
            p.grad = step_grads.get(n)
        opt.step()
    for n, p in named.items():
        moved = (p.detach() - init[n]).abs().max().clamp_min(1e-30)
        err = float((got["params"][n] - p.detach()).abs().max() / moved)
        assert err <= RTOL, f"{name} {n}: relative error {err:.2e}"
    expected = {(n, k) for g in opt.param_groups if get_rule(g["rule"]).stateful
                for n, p in zip(g["param_names"], g["params"]) for k in opt.state[p] if k != "step"}
    assert set(got["state"]) == expected
    carried = 0
    for (n, key), value in got["state"].items():
        torch.testing.assert_close(value, opt.state[named[n]][key], rtol=RTOL, atol=1e-12, msg=f"{name} {n} {key}")
        carried += key in ("basis", "rotation") and bool(value.abs().sum() > 0)
    assert carried > 0
