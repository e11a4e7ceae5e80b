"""Optimizer runs on real tiny `transformers` models under each engine, for the parity tests.

Gradients are synthetic and identical on every rank and in the reference (tests/tiny.py), so the
comparison isolates the optimizer: any difference is the engine's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dist_spectral import build_optimizer
from tests.tiny import MODELS, synthetic_grad

STEPS = 3

#: Recipes with overrides, under a test name: Muon as DeepSpeed's and Moonlight's (each expert's
#: fused gate/up one matrix) with Gram Newton–Schulz where it saves flops (the per-head blocks).
VARIANTS = {"muon-fused-gram": ("muon", {"attention": {"polar_form": "gram"},
                                         "mlp": {"split_gate_up": False, "polar_form": "gram"}})}


def recipe_args(name: str) -> tuple[str, dict]:
    """(recipe, overrides) of a scenario's recipe name."""
    return VARIANTS.get(name, (name, {}))


def wrap(model: nn.Module, engine: str, world_size: int) -> nn.Module:
    """Wrap a model the way each engine would."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    if engine == "none":
        return model
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if engine in ("fsdp", "hsdp"):
        mesh = (init_device_mesh("cpu", (world_size,)) if engine == "fsdp"
                else init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard")))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if engine in ("ep", "ep_fsdp"):
        # Expert parallel as torchtitan does it: 3-D expert weights are DTensors sharded on the expert
        # dim over an EP mesh (with ep_fsdp, also on dim 1 over a data-parallel mesh dim).
        if engine == "ep":
            mesh, placements = init_device_mesh("cpu", (world_size,)), [Shard(0)]
        else:
            mesh, placements = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("ep", "dp")), [Shard(0), Shard(1)]
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.ndim == 3:
                    setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, placements, src_data_rank=None)))
        return model
    raise ValueError(engine)


def run_reference(model_name: str, recipe: str, overrides: dict | None = None) -> tuple[dict, dict, dict]:
    """The single-process reference on the same model and gradients: (initial parameters,
    parameters after STEPS steps, its state), keyed by parameter name."""
    from dist_spectral.build import resolve_groups
    from dist_spectral.reference import ReferenceOptimizer

    model = MODELS[model_name](seed=0)
    groups, _, infos = resolve_groups(model, recipe, **(overrides or {}))
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = ReferenceOptimizer([{"params": [(i.name, params[i.name]) for i in g.members], "rule": g.rule, **g.hyper}
                              for g in groups], {i.name: i for i in infos})
    for step in range(STEPS):
        ref.step({n: synthetic_grad(n, tuple(p.shape), step) for n, p in params.items()})
    return init, params, ref.state


def set_grads(model: nn.Module, step: int) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        full = synthetic_grad(name.removeprefix("module."), tuple(p.shape), step)
        p.grad = (distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
                  if isinstance(p, DTensor) else full)


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def run_scenario(model_name: str, recipe: str, engine: str, world_size: int, rank: int, **overrides) -> dict:
    model = wrap(MODELS[model_name](seed=0), engine, world_size)
    base, variant = recipe_args(recipe)
    opt = build_optimizer(model, base, **{**variant, **overrides})
    flops = 0
    for step in range(STEPS):
        set_grads(model, step)
        opt.step()
        flops += opt.last_stats.polar_flops
    plan = opt.plan()
    out = {
        "polar_flops": flops,
        "stats": opt.last_stats,
        "plan_bytes": {phase: (plan.bytes_sent(rank, phase), plan.bytes_received(rank, phase))
                       for phase in ("gather", "replicate", "scatter")},
        "plan_polar_flops": plan.polar_flops(rank),
        "local_numel": sum(opt.topology.local(p).numel() for p in model.parameters()),
    }
    params = {n.removeprefix("module."): full(p) for n, p in model.named_parameters()}
    state = {}
    for g in opt.param_groups:
        for n, p in zip(g["param_names"], g["params"]):
            state[n.removeprefix("module.")] = {k: full(v) for k, v in opt.state[p].items()}
    if rank == 0:
        out["params"], out["state"] = params, state
    return out


def scenarios_for(world_size: int) -> list[tuple]:
    if world_size == 1:
        return [("qwen3", "symmetric", "none"), ("qwen3", "muon", "none"), ("olmoe", "symmetric", "none"),
                ("olmoe", "muon", "none"), ("olmoe", "muon-fused-gram", "none")]
    runs = [(m, r, "fsdp") for m in ("qwen3", "olmoe") for r in ("symmetric", "muon")]
    runs += [("olmoe", "muon-fused-gram", "fsdp")]
    runs += [("olmoe", "symmetric", "ddp"), ("olmoe", "symmetric", "ep")]
    if world_size == 4:
        runs += [("olmoe", "symmetric", "hsdp"), ("qwen3", "muon", "hsdp"), ("olmoe", "symmetric", "ep_fsdp")]
    return runs


def worker(rank: int, world_size: int) -> dict:
    results = {sc: run_scenario(*sc, world_size=world_size, rank=rank) for sc in scenarios_for(world_size)}
    # Determinism: the same run again must be bit-identical.
    again = run_scenario(*scenarios_for(world_size)[0], world_size=world_size, rank=rank)
    if rank == 0:
        first = results[scenarios_for(world_size)[0]]["params"]
        results["deterministic"] = all(torch.equal(first[n], again["params"][n]) for n in first)
    dist.barrier()
    return results


def stage_model(model_name: str, stage: int) -> nn.Module:
    """The full model less what the other stage holds (names keep their global indices)."""
    model = MODELS[model_name](seed=0)
    if stage == 0:
        model.model.layers[1] = nn.Identity()
        model.model.norm, model.lm_head = nn.Identity(), None
    else:
        model.model.layers[0] = nn.Identity()
        model.model.embed_tokens = None
    return model
