"""SPECTRA and AuON under FSDP2, DDP, expert parallel and HSDP 2×2 equal the single-process
reference, at W = 1, 2, 3, 4.

One process group per world size runs every scenario (tiny Qwen3 and OLMoE with 97-token
vocabularies and 3 experts: uneven shards, empty ones at W = 4). SPECTRA goes through the owner
exchange with its base update formed on the shards (AdamW's bias correction included); AuON runs
on each rank's rows with two one-number all-reduces per matrix, its 3-D experts per matrix at an
owner; Hybrid-AuON and SPECTRA's Muon base run polar iterations, so the flop counters are tested.
"""
from __future__ import annotations

import functools

import pytest
import torch

from dist_spectral.build import build_optimizer
from tests.distributed.harness import run_world
from tests.distributed.scenarios import STEPS, run_reference, run_scenario
from tests.tiny import MODELS, synthetic_grad

WORLD_SIZES = (1, 2, 3, 4)

VARIANTS = {
    "spectra": ("spectra", {}),
    "spectra-muon-sign": ("spectra", {"attention": {"base": "muon", "clip_c": 0.5, "lr": 5e-3},
                                      "mlp": {"base": "sign", "clip_c": 2.0, "lr": 1e-3}}),
    "auon": ("auon", {}),
    "auon-hybrid": ("auon", {"mlp": {"rule": "auon_hybrid"}, "attention": {"normalize": False}}),
}

# Measured, largest difference from the reference relative to the parameter's displacement, the
# same at every W and engine: matrices 1.6e-6 (SPECTRA-AdamW), 2.9e-6 (SPECTRA-Muon, k_proj: batched
# vs looped fp32 polar), 4e-7 (AuON, Hybrid-AuON); AdamW norm weights up to 1e-5, which is their own
# fp32 rounding (weights near 1 moving by ~1e-3 over 3 steps): the absolute term covers it. The
# largest difference is 0.19 of this bound; a wrong owner, shard or statistic gives errors of order 1.
DISPLACEMENT_RTOL = 5e-6
WEIGHT_ULPS = 4 * torch.finfo(torch.float32).eps


def scenarios_for(world_size: int) -> list[tuple]:
    runs = [("qwen3", "spectra", "fsdp"), ("olmoe", "spectra-muon-sign", "fsdp"), ("olmoe", "auon", "fsdp"),
            ("qwen3", "auon-hybrid", "fsdp")]
    if world_size > 1:
        runs += [("olmoe", "spectra", "ddp"), ("qwen3", "auon", "ddp"), ("olmoe", "auon", "ep")]
    if world_size == 4:
        runs += [("olmoe", "auon", "hsdp"), ("qwen3", "spectra", "hsdp")]
    return runs


def worker(rank: int, world_size: int) -> dict:
    out = {}
    for model_name, variant, engine in scenarios_for(world_size):
        recipe, overrides = VARIANTS[variant]
        out[(model_name, variant, engine)] = run_scenario(model_name, recipe, engine, world_size, rank, **overrides)
    return out


@pytest.fixture(scope="module")
def worlds():
    return {w: run_world(w, worker) for w in WORLD_SIZES}


_REFERENCE: dict = {}


def one_thread(fn):
    """Tiny matrices: one intra-op thread (as the workers run), which also spares a busy 2-core
    machine the thread pool's spinning."""
    @functools.wraps(fn)
    def run(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)
    return run


@one_thread
def reference(model_name: str, variant: str):
    if (model_name, variant) not in _REFERENCE:
        _REFERENCE[(model_name, variant)] = run_reference(model_name, *VARIANTS[variant])
    return _REFERENCE[(model_name, variant)]


def cases():
    return [(w, sc) for w in WORLD_SIZES for sc in scenarios_for(w)]


@pytest.mark.parametrize("world_size,scenario", cases(), ids=lambda v: "-".join(v) if isinstance(v, tuple) else f"W{v}")
def test_matches_reference(worlds, world_size, scenario):
    model_name, variant, engine = scenario
    got = worlds[world_size][0][scenario]
    init, want, want_state = reference(model_name, variant)
    assert set(got["params"]) == set(want)
    for name in want:
        moved = (want[name] - init[name]).abs().max()
        diff = (got["params"][name] - want[name]).abs().max()
        assert moved > 0, name
        assert diff <= DISPLACEMENT_RTOL * moved + WEIGHT_ULPS * want[name].abs().max(), \
            f"{name}: relative error {diff / moved:.2e} of the update ({variant}, {engine}, W={world_size})"
        for key, value in want_state[name].items():
            if key == "step":
                assert int(got["state"][name]["step"]) == value == STEPS
                continue
            torch.testing.assert_close(got["state"][name][key], value, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


@functools.lru_cache(maxsize=None)
@one_thread
def single_process_flops(model_name: str, variant: str) -> int:
    recipe, overrides = VARIANTS[variant]
    model = MODELS[model_name](seed=0)
    opt = build_optimizer(model, recipe, **overrides)
    for step in range(STEPS):
        for n, p in model.named_parameters():
            p.grad = synthetic_grad(n, tuple(p.shape), step)
        opt.step()
    return opt.total_polar_flops


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_no_duplicated_polar_work(worlds, world_size):
    """Summed over ranks, the polar (and soft-clip) flops are those of one plain process."""
    for scenario in scenarios_for(world_size):
        total = sum(rank[scenario]["polar_flops"] for rank in worlds[world_size])
        assert total == single_process_flops(*scenario[:2]), scenario
        assert (total > 0) == (scenario[1] != "auon"), scenario  # plain AuON has no polar step


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_counters_equal_plan(worlds, world_size):
    for rank, results in enumerate(worlds[world_size]):
        for scenario in scenarios_for(world_size):
            res = results[scenario]
            for phase, (sent, received) in res["plan_bytes"].items():
                # A step with no whole-matrix parameter (AuON, DDP) runs no exchange: no entry.
                assert res["stats"].bytes_sent.get(phase, 0) == sent, (scenario, rank, phase)
                assert res["stats"].bytes_received.get(phase, 0) == received, (scenario, rank, phase)
            assert res["stats"].polar_flops == res["plan_polar_flops"], (scenario, rank)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_auon_gathers_only_experts_and_reduces_two_numbers_per_matrix(worlds, world_size):
    """Under FSDP2, AuON's 2-D matrices stay on their shards: each step moves two fp32 numbers per
    matrix through all-reduces (‖ĝ‖² and Σ sinh²), nothing through the exchange; only the 3-D expert
    tensors (per-matrix statistics) go to owners."""
    model = MODELS["olmoe"](seed=0)
    matrices = [n for n, p in model.named_parameters() if p.ndim == 2 and n != "model.embed_tokens.weight"
                and n != "lm_head.weight" and ".gate.weight" not in n]
    for results in worlds[world_size]:
        res = results[("olmoe", "auon", "fsdp")]
        assert res["stats"].bytes_sent["colsum"] == 4 * 2 * len(matrices)
    experts = [n for n, p in model.named_parameters() if p.ndim == 3]
    gathered = sum(r[("olmoe", "auon", "fsdp")]["stats"].bytes_sent["gather"] for r in worlds[world_size])
    assert gathered <= 4 * sum(dict(model.named_parameters())[n].numel() for n in experts)
    qwen = worlds[world_size][0][("qwen3", "auon", "ddp")]["stats"]
    assert qwen.bytes_sent["colsum"] == 0 and "gather" not in qwen.bytes_sent  # replicated: all local
