"""Tensor parallel, alone and under FSDP2, gives the single-process reference's update.

One process group per world size: W = 2 runs TP alone on a ``tp`` mesh, W = 4 FSDP2 × TP on a
``(dp 2, tp 2)`` mesh, where FSDP2 places every column-parallel weight as
``(_StridedShard(0, sf=2), Shard(0))``. Attention and the dense MLP use torch's
``ColwiseParallel`` / ``RowwiseParallel`` (heads split across TP ranks, ``o_proj`` and
``down_proj`` cut on dim 1); the embedding is column-parallel at W = 2 (``Shard(1)``: row rules on
cut rows) and row-parallel at W = 4; OLMoE's fused ``gate_up_proj`` experts are cut on their rows
and ``down_proj`` on their columns over ``tp``. Models have a 97-token vocabulary, so shards are
uneven. At W = 2, transformers' own plans too (its ``base_model_tp_plan``, with its expert
parallel plan for OLMoE), applied on CPU/gloo as ``from_pretrained(distributed_config=...)`` does.

Also at W = 4:

- ``fsdp_tp_rowhead``: dp 2 × tp 2 with the embedding and the untied LM head cut on dim 1 over
  ``tp`` and dim 0 over ``dp``: the row rules' statistics (the centred rule's column means, the
  row norms) must sum over all four ranks, with the zero-filled columns masked out.
- ``hsdp_tp``: HSDP × TP as ``(dp_replicate 2, dp_shard 1, tp 2)``. Four processes leave no room
  for a shard dim of 2 beside replicate 2 and tp 2 (that takes 8); what HSDP adds to TP is the
  replicate dim, so the shard dim is kept at size 1: every element is held by two replicas, and the
  embedding and LM head rows are cut by ``tp`` (each element counted once in column sums).
- ``ep_tp``: token-routed expert parallel (``training.expert_parallel.shard_experts``) over ``ep``
  beside TP attention on ``tp``, FSDP2 over ``ep`` for the rest (mesh ``(ep 2, tp 2)``).
- ``pp_tp``: a 3-D ``(pp 2, dp 1, tp 2)`` mesh: each pipeline stage TP over its two ranks with
  FSDP2 on its (size 1) ``dp`` dim, its own optimizer on its own ranks; the planner's
  ``--pp 2 --tp 2`` bytes equal the measured ones.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_spectral import build_optimizer
from tests.distributed.harness import run_world
from tests.distributed.scenarios import STEPS, full, set_grads, stage_model
from tests.tiny import MODELS, synthetic_grad, tiny_olmoe

# Measured (3 steps): the largest relative difference of the parameter displacement from the
# reference is 4.19e-6 (OLMoE's k_norm, AdamW) and 2.38e-6 among polar units (v_proj), the same at
# TP = 2, dp 2 × tp 2 (row-cut head too), HSDP × TP, EP × TP, pp 2 × tp 2, pp 2 × dp 2 and
# transformers' plans: fp32 rounding of the rules, not the layout.
DISPLACEMENT_RTOL = 5e-6

#: transformers' expert parallel shards experts evenly only: OLMoE with 4 experts for it.
MODELS = {**MODELS, "olmoe4": lambda seed=0: tiny_olmoe(seed, experts=4)}

SCENARIOS = {
    2: [("qwen3", "muon", "tp"), ("qwen3", "symmetric", "tp"), ("olmoe", "symmetric", "tp"),
        ("qwen3", "symmetric", "hf_tp"), ("olmoe4", "muon", "hf_tp")],
    4: [("qwen3", "muon", "fsdp_tp"), ("qwen3", "symmetric", "fsdp_tp"), ("olmoe", "muon", "fsdp_tp"),
        ("olmoe", "symmetric", "fsdp_tp"),
        ("qwen3", "symmetric", "fsdp_tp_rowhead"), ("olmoe", "symmetric", "fsdp_tp_rowhead"),
        ("qwen3", "muon", "hsdp_tp"), ("qwen3", "symmetric", "hsdp_tp"), ("olmoe", "muon", "hsdp_tp"),
        ("olmoe", "symmetric", "hsdp_tp"),
        ("olmoe4", "muon", "ep_tp"), ("olmoe4", "symmetric", "ep_tp"),
        ("qwen3", "muon", "pp_tp"), ("olmoe", "symmetric", "pp_tp")],
}

#: Scenarios the planner simulates (``Parallel`` arguments at W = 4): its tensor-parallel layouts cut
#: the embedding and LM head on dim 0, so those with row-cut heads only under rules that gather.
PLANNED = {("qwen3", "muon", "fsdp_tp"): {"tensor_parallel": 2}, ("qwen3", "symmetric", "fsdp_tp"): {"tensor_parallel": 2},
           ("olmoe", "muon", "fsdp_tp"): {"tensor_parallel": 2}, ("olmoe", "symmetric", "fsdp_tp"): {"tensor_parallel": 2},
           ("qwen3", "muon", "hsdp_tp"): {"tensor_parallel": 2, "replicas": 2},
           ("olmoe", "muon", "hsdp_tp"): {"tensor_parallel": 2, "replicas": 2},
           ("qwen3", "muon", "pp_tp"): {"tensor_parallel": 2, "pipeline": 2},
           ("olmoe", "symmetric", "pp_tp"): {"tensor_parallel": 2, "pipeline": 2}}


def tensor_parallel(model: nn.Module, tp_mesh, embedding: str, tp_experts: bool = True) -> None:
    """Attention and MLP as torchtitan parallelises them; 3-D experts cut on dim 1 (gate_up rows)
    and 2 (down_proj columns) over ``tp`` (unless ``tp_experts`` is false: expert parallel holds them);
    ``embedding`` "colwise" (``Shard(1)``) or "rowwise". What a pipeline stage lacks is skipped."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {}
    if model.model.embed_tokens is not None:
        plan["model.embed_tokens"] = ColwiseParallel() if embedding == "colwise" else RowwiseParallel()
    if model.lm_head is not None:
        plan["lm_head"] = RowwiseParallel() if embedding == "colwise" else ColwiseParallel()
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer, nn.Identity):
            continue
        for proj in ("q_proj", "k_proj", "v_proj"):
            plan[f"model.layers.{i}.self_attn.{proj}"] = ColwiseParallel()
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            plan[f"model.layers.{i}.mlp.gate_proj"] = ColwiseParallel()
            plan[f"model.layers.{i}.mlp.up_proj"] = ColwiseParallel()
            plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
        elif tp_experts:
            for name, dim in (("gate_up_proj", 1), ("down_proj", 2)):
                p = getattr(experts, name)
                setattr(experts, name, nn.Parameter(distribute_tensor(p.detach(), tp_mesh, [Shard(dim)],
                                                                      src_data_rank=None)))
    parallelize_module(model, tp_mesh, plan)


def transformers_parallel(model: nn.Module, world_size: int) -> nn.Module:
    """transformers' own plans (the model's ``base_model_tp_plan``, and ``base_model_ep_plan`` for
    experts), applied as ``from_pretrained(distributed_config=...)`` applies them, to a model built
    from its config: ``tp_size`` ranks, expert parallel over the same ranks for an MoE."""
    from transformers.distributed import DistributedConfig

    moe = hasattr(model.config, "num_experts")
    config = DistributedConfig(tp_size=world_size, ep_size=world_size if moe else None)
    config, _, meshes = type(model).prepare_distribute_model(config, device_map=None)
    return type(model).maybe_distribute_model(model, config, meshes)


def build(model_name: str, engine: str, world_size: int, indices: bool = False) -> tuple[nn.Module, int]:
    """The model parallelised by ``engine``, and its pipeline stage (0 without pipeline parallel);
    with ``indices``, every parameter set to its flat global indices before it is parallelised."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def fresh(stage=None):
        if stage is None:
            model = MODELS[model_name](seed=0)
        else:
            model = stage_model(model_name, stage)
        if indices:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape))
        return model

    if engine == "hf_tp":
        return transformers_parallel(fresh(), world_size), 0
    if engine == "tp":
        model = fresh()
        tensor_parallel(model, init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",)), "colwise")
        return model, 0
    stage, ignored = 0, ()
    if engine == "pp_tp":
        mesh = init_device_mesh("cpu", (2, 1, world_size // 2), mesh_dim_names=("pp", "dp", "tp"))
        stage = mesh.get_coordinate()[0]
        model, dp = fresh(stage), mesh["dp"]
        tensor_parallel(model, mesh["tp"], "rowwise")
    elif engine == "hsdp_tp":
        mesh = init_device_mesh("cpu", (2, 1, world_size // 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
        model, dp = fresh(), mesh["dp_replicate", "dp_shard"]
        tensor_parallel(model, mesh["tp"], "colwise")
    elif engine == "ep_tp":
        from dist_spectral.training.expert_parallel import shard_experts

        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("ep", "tp"))
        model, dp = fresh(), mesh["ep"]
        tensor_parallel(model, mesh["tp"], "rowwise", tp_experts=False)
        ignored = set(shard_experts(model, mesh["ep"]))
    else:  # fsdp_tp, fsdp_tp_rowhead
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
        model, dp = fresh(), mesh["dp"]
        tensor_parallel(model, mesh["tp"], "colwise" if engine == "fsdp_tp_rowhead" else "rowwise")
    for layer in model.model.layers:
        if not isinstance(layer, nn.Identity):
            fully_shard(layer, mesh=dp, ignored_params=set(ignored) & set(layer.parameters()) or None)
    fully_shard(model, mesh=dp, ignored_params=ignored or None)
    return model, stage


def layout_mismatches(model_name: str, engine: str, world_size: int) -> list[str]:
    """Parameters whose local shard does not hold the global elements their layout says: every
    parameter starts as its flat global index, so a local tensor lists the indices it holds."""
    model, _ = build(model_name, engine, world_size, indices=True)
    topo = build_optimizer(model, "adamw").topology
    bad = []
    for name, p in model.named_parameters():
        layout = topo.layout(p)
        want = torch.cat([torch.arange(a, b) for a, b in layout.holdings[topo.rank]] or [torch.zeros(0)])
        if not torch.equal(topo.local(p).detach().reshape(-1), want.to(p.dtype)):
            bad.append(f"{name} {layout.kind}")
    return bad


def run_scenario(model_name: str, recipe: str, engine: str, world_size: int, rank: int) -> dict:
    model, stage = build(model_name, engine, world_size)
    opt = build_optimizer(model, recipe)
    for step in range(STEPS):
        set_grads(model, step)
        opt.step()
    plan, me = opt.plan(), opt.topology.rank  # rank in the optimizer's group (a pipeline stage's)
    out = {"stats": opt.last_stats, "stage": stage, "group_size": opt.topology.world_size,
           "plan_bytes": {phase: (plan.bytes_sent(me, phase), plan.bytes_received(me, phase))
                          for phase in ("gather", "replicate", "scatter")},
           "plan_polar_flops": plan.polar_flops(me),
           "planned": {p.name for p in plan.params},
           "placements": {n: str(getattr(p, "placements", "")) for n, p in model.named_parameters()}}
    params = {n: full(p) for n, p in model.named_parameters()}
    state = {n: {k: full(v) for k, v in opt.state[p].items()}
             for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
    if me == 0:  # one rank of each stage
        out["params"], out["state"] = params, state
    return out


def bad_placement_errors(world_size: int) -> dict:
    """What building the optimizer says of a ``Partial`` parameter and of an unknown ``Shard`` subclass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    class Custom(Shard):
        pass

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    errors = {}
    for label, placement in (("partial", Partial()), ("custom", Custom(0))):
        model = nn.Sequential(nn.Linear(8, 8, bias=False))
        local = torch.ones(8 // world_size if label == "custom" else 8, 8)
        model[0].weight = nn.Parameter(DTensor.from_local(local, mesh, [placement], run_check=False,
                                                          shape=(8, 8), stride=(8, 1)))
        try:
            build_optimizer(model, "muon")
            errors[label] = None
        except ValueError as err:
            errors[label] = str(err)
    return errors


def worker(rank: int, world_size: int) -> dict:
    results = {sc: run_scenario(*sc, world_size=world_size, rank=rank) for sc in SCENARIOS[world_size]}
    engine = SCENARIOS[world_size][0][2]
    results["layouts"] = {m: layout_mismatches(m, engine, world_size) for m in ("qwen3", "olmoe")}
    if world_size == 2:
        results["layouts"]["hf_tp"] = [bad for m in ("qwen3", "olmoe4") for bad in layout_mismatches(m, "hf_tp", 2)]
    else:
        for m, e in (("qwen3", "fsdp_tp_rowhead"), ("olmoe", "hsdp_tp"), ("olmoe4", "ep_tp"), ("olmoe", "pp_tp")):
            results["layouts"][e] = layout_mismatches(m, e, world_size)
    results["errors"] = bad_placement_errors(world_size)
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def worlds():
    return {w: run_world(w, worker) for w in SCENARIOS}


_REFERENCE: dict = {}


def reference(model_name: str, recipe: str):
    """The single-process reference (scenarios.run_reference, on this module's models):
    (initial parameters, parameters after STEPS steps, state)."""
    from dist_spectral.build import resolve_groups
    from dist_spectral.reference import ReferenceOptimizer

    if (model_name, recipe) not in _REFERENCE:
        model = MODELS[model_name](seed=0)
        groups, _, infos = resolve_groups(model, recipe)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        ref = ReferenceOptimizer([{"params": [(i.name, params[i.name]) for i in g.members], "rule": g.rule, **g.hyper}
                                  for g in groups], {i.name: i for i in infos})
        for step in range(STEPS):
            ref.step({n: synthetic_grad(n, tuple(p.shape), step) for n, p in params.items()})
        _REFERENCE[(model_name, recipe)] = init, params, ref.state
    return _REFERENCE[(model_name, recipe)]


CASES = [(w, sc) for w, scs in SCENARIOS.items() for sc in scs]


@pytest.mark.parametrize("world_size,scenario", CASES, ids=lambda v: "-".join(v) if isinstance(v, tuple) else f"W{v}")
def test_matches_reference(worlds, world_size, scenario):
    model_name, recipe, engine = scenario
    got = {"params": {}, "state": {}}
    for results in worlds[world_size]:  # rank 0, and under pipeline parallel the other stage's first rank
        got["params"].update(results[scenario].get("params", {}))
        got["state"].update(results[scenario].get("state", {}))
    init, want, want_state = reference(model_name, recipe)
    assert set(got["params"]) == set(want)
    for name in want:
        moved = want[name] - init[name]
        err = (got["params"][name] - want[name]).abs().max() / moved.abs().max().clamp_min(1e-30)
        assert err <= DISPLACEMENT_RTOL, f"{name}: relative error {err:.2e} of the update ({engine}, W={world_size})"
        for key, value in want_state[name].items():
            if key == "step":
                assert int(got["state"][name]["step"]) == value == STEPS
                continue
            torch.testing.assert_close(got["state"][name][key], value, rtol=1e-6, atol=1e-7, msg=f"{name} {key}")


def test_fsdp_over_tp_uses_strided_shards(worlds):
    """The W = 4 runs do exercise FSDP2's strided placement (and TP's dim-1 cuts)."""
    placements = worlds[4][0][("qwen3", "muon", "fsdp_tp")]["placements"]
    assert placements["model.layers.0.self_attn.q_proj.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert placements["model.layers.0.mlp.down_proj.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert worlds[2][0][("qwen3", "symmetric", "tp")]["placements"]["model.embed_tokens.weight"] == "(Shard(dim=1),)"


def test_new_layouts_are_what_they_say(worlds):
    """The W = 4 layouts beyond FSDP2 × TP place what they are meant to: row-cut heads and
    embeddings (stepped by the row rules on the shards, not gathered), HSDP's replicate dim beside
    TP, experts on ``ep`` beside TP attention, stages on two ranks each."""
    w = worlds[4][0]
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    rowhead = w[("qwen3", "symmetric", "fsdp_tp_rowhead")]
    assert rowhead["placements"][head] == rowhead["placements"][embedding] == "(Shard(dim=0), Shard(dim=1))"
    assert head not in rowhead["planned"] and embedding not in rowhead["planned"]
    assert rowhead["stats"].bytes_sent["colsum"] > 0
    hsdp = w[("qwen3", "symmetric", "hsdp_tp")]
    assert hsdp["placements"][head] == "(Replicate(), Shard(dim=0), Shard(dim=1))"
    assert hsdp["placements"]["model.layers.0.self_attn.q_proj.weight"].startswith("(Replicate(), ")
    assert head not in hsdp["planned"]
    ep = w[("olmoe4", "symmetric", "ep_tp")]
    assert ep["placements"]["model.layers.0.mlp.experts.gate_up_proj"] == "(Shard(dim=0),)"
    assert ep["placements"]["model.layers.0.self_attn.o_proj.weight"] == "(Shard(dim=0), Shard(dim=1))"
    for rank, results in enumerate(worlds[4]):
        res = results[("qwen3", "muon", "pp_tp")]
        assert (res["stage"], res["group_size"]) == (rank // 2, 2)


@pytest.mark.parametrize("world_size", sorted(SCENARIOS))
def test_layouts_are_the_local_shards(worlds, world_size):
    for rank, results in enumerate(worlds[world_size]):
        assert all(bad == [] for bad in results["layouts"].values()), f"rank {rank}: {results['layouts']}"
        assert len(results["layouts"]) == (3 if world_size == 2 else 6)


@pytest.mark.parametrize("world_size", sorted(SCENARIOS))
def test_counters_equal_plan(worlds, world_size):
    for rank, results in enumerate(worlds[world_size]):
        for scenario in SCENARIOS[world_size]:
            res = results[scenario]
            for phase, (sent, received) in res["plan_bytes"].items():
                assert res["stats"].bytes_sent[phase] == sent, (scenario, rank, phase)
                assert res["stats"].bytes_received[phase] == received, (scenario, rank, phase)
            assert res["stats"].polar_flops == res["plan_polar_flops"], (scenario, rank)


def test_unsupported_placements_are_named(worlds):
    errors = worlds[2][0]["errors"]
    assert "0.weight" in errors["partial"] and "Partial" in errors["partial"] and "redistribute" in errors["partial"]
    assert "0.weight" in errors["custom"] and "Custom" in errors["custom"] and "(8, 8)" in errors["custom"]


@pytest.mark.parametrize("scenario", PLANNED, ids="-".join)
def test_planner_predicts_measured_bytes(worlds, scenario):
    """``dist-spectral plan --tp 2`` (with ``--hsdp 2``, ``--pp 2``) simulates the W = 4 layouts
    on shapes alone: its bytes per rank and collective are the ones measured (per pipeline stage,
    on the stage's ranks)."""
    from dist_spectral.planner import Parallel, simulate_step

    model_name, recipe, _ = scenario
    parallel = Parallel(4, **PLANNED[scenario])
    for rank, results in enumerate(worlds[4]):
        res = results[scenario]
        sim = simulate_step(MODELS[model_name](seed=0), parallel, recipe, stage=res["stage"])
        me = rank % parallel.stage_world_size
        for phase in ("gather", "replicate", "scatter", "colsum"):
            assert (res["stats"].bytes_sent[phase], res["stats"].bytes_received[phase]) == \
                (sim.bytes_sent(me, phase), sim.bytes_received(me, phase)), (rank, phase)
        assert res["stats"].polar_flops == sim.plan.polar_flops(me)
