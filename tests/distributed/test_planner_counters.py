"""The planner's predictions equal what real runs count, per rank and collective, at W = 2, 3, 4.

Each world size spawns one gloo process group; every rank runs one optimizer step per scenario
(tiny FSDP2-wrapped `transformers` models with uneven and, at W = 4, empty shards) and reports
``last_stats``. The main process builds the same models on ``meta`` and asks
``planner.simulate_step`` for the same step under the matching ``Parallel`` layout: bytes sent
and received per collective (gather, the replicated routers' share of it, scatter, column
all-reduces) and polar flops must be equal, rank by rank.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_spectral import build_optimizer
from dist_spectral.planner import Parallel, simulate_step
from tests.distributed.harness import run_world
from tests.distributed.scenarios import set_grads, wrap
from tests.tiny import MODELS

WORLD_SIZES = (2, 3, 4)
PHASES = ("gather", "replicate", "scatter", "colsum")


def scenarios(world_size: int) -> list[tuple]:
    """(model, recipe, engine, comm dtype); the engine names a layout Parallel can simulate."""
    runs = [("qwen3", "symmetric", "fsdp", None), ("olmoe", "symmetric", "fsdp", None), ("olmoe", "muon", "fsdp", None)]
    if world_size == 3:
        runs.append(("olmoe", "symmetric", "fsdp", "bfloat16"))
    if world_size == 4:
        runs += [("olmoe", "symmetric", "hsdp", None), ("olmoe", "symmetric", "ep2", None)]
    return runs


def parallel_for(engine: str, world_size: int) -> Parallel:
    if engine == "hsdp":
        return Parallel(world_size, replicas=2)
    if engine == "ep2":
        return Parallel(world_size, expert_parallel=2)
    return Parallel(world_size)


def _expert_parallel(model: nn.Module, world_size: int) -> nn.Module:
    """Expert weights on a 2 × (W/2) mesh, ``(Shard(0), Shard(1))``; everything else ``Shard(0)`` over
    all ranks: the layout ``Parallel(W, expert_parallel=2)`` simulates."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    flat = init_device_mesh("cpu", (world_size,))
    grid = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("ep", "dp"))
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            mesh, placements = (grid, [Shard(0), Shard(1)]) if p.ndim == 3 else (flat, [Shard(0)])
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, placements, src_data_rank=None)))
    return model


def worker(rank: int, world_size: int) -> dict:
    out = {}
    for model_name, recipe, engine, comm in scenarios(world_size):
        model = MODELS[model_name](seed=0)
        model = _expert_parallel(model, world_size) if engine == "ep2" else wrap(model, engine, world_size)
        opt = build_optimizer(model, recipe, comm_dtype=comm)
        set_grads(model, 0)
        opt.step()
        s = opt.last_stats
        out[(model_name, recipe, engine, comm)] = {
            "sent": {ph: s.bytes_sent.get(ph, 0) for ph in PHASES},
            "received": {ph: s.bytes_received.get(ph, 0) for ph in PHASES},
            "polar_flops": s.polar_flops,
            "replicated_flops": s.replicated_flops,
        }
    return out


@pytest.fixture(scope="module")
def worlds():
    return {w: run_world(w, worker) for w in WORLD_SIZES}


def _simulated(model_name: str, recipe: str, engine: str, comm, world_size: int):
    with torch.device("meta"):
        model = MODELS[model_name](seed=0)
    return simulate_step(model, parallel_for(engine, world_size), recipe, element_bytes=2 if comm else 4)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_planner_predicts_the_counters(worlds, world_size):
    for scenario in scenarios(world_size):
        sim = _simulated(*scenario, world_size)
        moved = 0
        for rank, results in enumerate(worlds[world_size]):
            got = results[scenario]
            for phase in PHASES:
                assert got["sent"][phase] == sim.bytes_sent(rank, phase), (scenario, rank, phase)
                assert got["received"][phase] == sim.bytes_received(rank, phase), (scenario, rank, phase)
                moved += got["sent"][phase]
            assert got["polar_flops"] == sim.plan.polar_flops(rank), (scenario, rank)
            assert got["replicated_flops"] == sim.plan.replicated_flops(rank), (scenario, rank)
        assert moved > 0, scenario  # every scenario exchanges something: the comparison is not vacuous
