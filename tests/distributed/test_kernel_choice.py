"""The Triton/torch choice per polar shape is rank 0's on every rank, however each rank's timings go.

Two gloo ranks whose local timings prefer different kernels (the timer is replaced: rank 0 finds
torch fastest, rank 1 the second kernel configuration) build the optimizer on a tiny OLMoE and
step once. The CUDA gate is opened on CPU so the decision runs; since rank 0's choice (torch) is
installed everywhere, rank 1 never runs the kernel, which on CPU tensors would raise.
"""
from __future__ import annotations

import torch

from tests.distributed.harness import run_world

PREFERS = {0: "torch", 1: "triton:1"}


def _worker(rank: int, world_size: int) -> dict:
    from dist_spectral import build_optimizer
    from dist_spectral.kernels import choice, triton_gram
    from tests.distributed.scenarios import set_grads, wrap
    from tests.tiny import tiny_olmoe

    times = {name: (0.5 if name == PREFERS[rank] else 1.0) for name in ("torch", "triton:0", "triton:1")}
    triton_gram._time_candidate = lambda name, fn, device: times[name]
    choice._wanted = lambda device: True
    choice.clear()
    model = wrap(tiny_olmoe(), "fsdp", world_size)
    opt = build_optimizer(model, "muon")
    set_grads(model, 1)
    opt.step()
    plan_keys = choice.polar_keys(opt.plan(), _groups(opt), torch.device("cpu"))
    return {"agreed": dict(opt.kernel_choices), "installed": choice.installed(),
            "local": choice.measure(plan_keys, torch.device("cpu")), "keys": sorted(plan_keys)}


def _groups(opt) -> list[dict]:
    """The group of each whole-matrix parameter of ``opt.plan()``, in plan order."""
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    return [by_name[p.name] for p in opt.plan().params]


def test_ranks_install_rank_zeros_choice():
    results = run_world(2, _worker)
    assert results[0]["local"] != results[1]["local"]  # left alone, the ranks would differ
    assert set(results[1]["local"].values()) == {"triton:1"}
    for r in results:
        assert r["agreed"] == r["installed"] == results[0]["local"]
        assert sorted(r["agreed"]) == r["keys"] and r["keys"]
