"""The predicted step's host term: ``host_fixed + host_per_param × parameters + host_per_unit × units``
per rank, where parameters are those a rank holds a piece of and units the whole-matrix units it
computes or sends or receives pieces of."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_spectral.planner import Parallel, simulate_step
from dist_spectral.predict import HOST_FIXED, HOST_PER_PARAM, HOST_PER_UNIT, Rates, predict, units_per_rank
from tests.tiny import tiny_olmoe


def _sim(parallel: Parallel, recipe: str = "symmetric"):
    with torch.device("meta"):
        model = tiny_olmoe(vocab=97, experts=6)
    return simulate_step(model, parallel, recipe)


def _units_by_loop(plan) -> list[int]:
    """The same count, unit by unit and piece by piece."""
    seen = [set() for _ in range(plan.world_size)]
    for u in plan.units:
        for r in (u.replicas if u.replicated else [u.owner]):
            seen[r].add(u.uid)
    for b in plan.buckets:
        for pieces in (b.gather, b.scatter):
            for p in pieces:
                seen[p.src].add(p.uid)
                seen[p.dst].add(p.uid)
    return [len(s) for s in seen]


@pytest.mark.parametrize("parallel", [Parallel(1), Parallel(3), Parallel(4, replicas=2), Parallel(8, expert_parallel=4)])
def test_units_per_rank_counts_owned_and_exchanged_units(parallel):
    plan = _sim(parallel).plan
    counts = units_per_rank(plan)
    assert counts.tolist() == _units_by_loop(plan)
    if parallel.world_size == 1:
        assert counts.tolist() == [len(plan.units)]
    else:  # FSDP-sharded: every rank holds rows of most units, and computes only its own
        assert (counts > np.bincount([u.owner for u in plan.units if not u.replicated],
                                     minlength=parallel.world_size)).all()


def test_host_term_is_fixed_plus_per_param_plus_per_unit_and_part_of_the_step():
    sim = _sim(Parallel(4))
    none = predict(sim, Rates(host_fixed=0.0, host_per_param=0.0, host_per_unit=0.0))
    some = predict(sim, Rates(host_fixed=2e-3, host_per_param=3e-5, host_per_unit=5e-6))
    with torch.device("meta"):
        shapes = [p.shape for p in tiny_olmoe(vocab=97, experts=6).parameters()]
    # FSDP2 cuts dim 0 in chunks of ceil(n / 4): a rank whose chunk starts past the end holds nothing
    held = [sum(r * -(-s[0] // 4) < s[0] for s in shapes) for r in range(4)]
    assert sim.local_params == tuple(held) and held[0] == len(shapes) > held[3]
    params = np.array(held)
    assert np.array_equal(none.host, np.zeros(4))
    assert np.allclose(some.host, 2e-3 + 3e-5 * params + 5e-6 * units_per_rank(sim.plan))
    assert np.allclose(some.step - none.step, some.host)
    default = predict(sim)
    assert np.allclose(default.host, HOST_FIXED + HOST_PER_PARAM * params + HOST_PER_UNIT * default.units)


def test_host_term_counts_only_the_stage_parameters_under_pipeline_parallel():
    """A pipeline stage's optimizer steps only its stage's parameters."""
    whole = _sim(Parallel(2))
    stages = [simulate_step(_meta_model(), Parallel(4, pipeline=2), "symmetric", stage=k) for k in (0, 1)]
    counts = [s.local_params for s in stages]
    assert all(len(c) == 2 and c[0] < whole.local_params[0] for c in counts)
    assert counts[0][0] + counts[1][0] == whole.local_params[0]


def _meta_model():
    with torch.device("meta"):
        return tiny_olmoe(vocab=97, experts=6)


def test_cli_predict_prints_the_host_term(capsys):
    from dist_spectral.cli import main

    assert main(["predict", "--model", "tiny-olmoe", "--world", "2", "--host-fixed", "0.001",
                 "--host-per-param", "3e-5", "--host-per-unit", "2e-6"]) == 0
    out = capsys.readouterr().out
    assert "host 1.00 ms + 30.00 µs per parameter + 2.00 µs per unit" in out
    assert " + host " in out and "µs ×" in out and " parameters + " in out
