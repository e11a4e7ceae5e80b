"""Rules with whole-matrix state (Conda, ARO with its base rules and with the Adam base, SPECTRA with
pre-clipping) under FSDP2, HSDP and DDP equal the single-process reference at W = 1, 2, 3, 4:
weights *and* optimizer state, over steps that include basis refreshes (Conda with T = 2 refreshes
at steps 1, 3 and 5), and DCP checkpoints reshard them. SPECTRA's pre-clip carries the base
optimizer's state (Adam's moments, or the momentum buffer of its sign and Muon bases) to the owner
with the raw gradient.

One process group per world size runs every scenario (tiny Qwen3 and OLMoE: head blocks cut by
row shards at W = 3, an empty expert shard at W = 4; one parameter without a gradient at step 0, so
its step counter lags the others': the owner batches blocks by step, for Adam's bias correction).
Each W also resumes from checkpoints saved mid-run at W = 2.

The runs are in float64. Conda divides the rotated momentum by the root of the rotated second
moment, and in directions where the momentum has a zero singular value (the synthetic gradients
have an exactly zero row) both are rounding noise, so their ratio is noise too: in fp32 a batched
and a looped SVD then disagree by O(1) in those entries (Adam has the same sensitivity, tamed by
ε). In float64 the noise is below ε and the only possible disagreement is the engine's own.
"""
from __future__ import annotations

import pytest
import torch

from dist_spectral import build_optimizer, checkpoint
from dist_spectral.blocks import group_unit_specs
from dist_spectral.build import resolve_groups
from dist_spectral.neighbours.aro import ARO, AROAdam
from dist_spectral.neighbours.conda import Conda
from dist_spectral.neighbours.spectra import SpectraPreclip
from dist_spectral.planner import Parallel, simulate_step
from dist_spectral.reference import ReferenceOptimizer
from dist_spectral.rules import get_rule
from tests.distributed.scenarios import full, wrap
from tests.distributed.harness import run_world, single_thread
from tests.tiny import MODELS, synthetic_grad

WORLD_SIZES = (1, 2, 3, 4)
STEPS, SAVE_AT = 5, 2
CONFIGS = {  # name -> (recipe, overrides)
    "conda": ("conda", {"update_proj_gap": 2}),
    "aro": ("aro", {}),  # SinkGD base
    "aro-sign": ("aro", {"base_rule": "sign"}),
    "aro-row": ("aro", {"base_rule": "row"}),
    "aro-adam": ("aro", {"attention": {"rule": "aro_adam"}, "mlp": {"rule": "aro_adam", "betas": (0.9, 0.95)}}),
    # Synthetic gradients have σ_max ≈ 8–15 per block, so c_pre = 3–4 clips them.
    "spectra-preclip": ("spectra", {"attention": {"rule": "spectra_preclip", "pre_clip_c": 4.0, "per_head": True},
                                    "mlp": {"rule": "spectra_preclip", "pre_clip_c": 3.0, "clip_c": 3.0}}),
    "spectra-preclip-momentum": ("spectra", {
        "attention": {"rule": "spectra_preclip_momentum", "base": "muon", "clip_c": 0.5, "lr": 5e-3, "pre_clip_c": 4.0,
                      "per_head": True, "polar_dtype": "float64"},  # polar iterates in fp32 by default
        "mlp": {"rule": "spectra_preclip_momentum", "base": "sign", "pre_clip_c": 3.0, "lr": 1e-3}}),
}
NO_GRAD_AT_0 = {"qwen3": "model.layers.0.self_attn.q_proj.weight", "olmoe": "model.layers.1.mlp.experts.down_proj"}
RESUMED = (("olmoe", "conda"), ("qwen3", "spectra-preclip"))  # saved at W = 2 (FSDP2) after SAVE_AT steps,
# resumed at W = 3 and 4
# Measured (float64), the same at every W and engine (the distributed runs equal the single-process
# one bit for bit): at most 2.8e-8 of a parameter's displacement for Conda (its null directions,
# see above), 6.2e-15 for ARO, 7.0e-13 for ARO's Adam base (Adam's null-direction noise, as Conda's),
# 4.4e-15 for SPECTRA's pre-clip (both bases, resumed runs included); the state within 2.0e-13 of its
# largest entry (pre-clip: 1.5e-15; ARO's Adam base: 4.0e-13).
DISPLACEMENT_RTOL = 1e-6
STATE_RTOL, STATE_ATOL = 1e-9, 1e-12


ARO_ADAM = [("olmoe", "aro-adam", "fsdp"), ("qwen3", "aro-adam", "ddp")]  # every W, W = 1 included
PRECLIP = [("olmoe", "spectra-preclip", "fsdp"), ("qwen3", "spectra-preclip-momentum", "fsdp"),
           ("qwen3", "spectra-preclip", "ddp"), ("olmoe", "spectra-preclip-momentum", "ddp")]


def scenarios_for(world_size: int) -> list[tuple[str, str, str]]:
    """(model, config, engine)."""
    if world_size == 1:
        return [("qwen3", "conda", "none"), ("olmoe", "aro", "none"), ("olmoe", "conda", "none"),
                ("qwen3", "aro-row", "none")] + PRECLIP + ARO_ADAM
    fsdp = (("qwen3", "conda"), ("olmoe", "conda"), ("olmoe", "aro"), ("qwen3", "aro-sign"))
    runs = [(m, c, "fsdp") for m, c in fsdp]
    runs.append({2: ("qwen3", "aro-row", "ddp"), 3: ("olmoe", "conda", "ddp"),
                 4: ("qwen3", "conda", "ddp")}[world_size])
    runs += PRECLIP + ARO_ADAM
    if world_size == 4:
        runs += [("olmoe", "aro", "hsdp"), ("qwen3", "spectra-preclip", "hsdp")]
    return runs


def canonical(name: str) -> str:
    return name.removeprefix("module.")


def make(model_name: str, config: str, engine: str, world_size: int, seed: int = 0):
    recipe, overrides = CONFIGS[config]
    model = wrap(MODELS[model_name](seed=seed).double(), engine, world_size)
    return model, build_optimizer(model, recipe, **overrides)


def grads_at(model_name: str, names_shapes, step: int) -> dict:
    return {n: synthetic_grad(n, shape, step).double() for n, shape in names_shapes
            if not (step == 0 and n == NO_GRAD_AT_0[model_name])}


def train(model, opt, model_name: str, start: int, stop: int) -> dict:
    """Steps ``start..stop-1``; returns the stats and plan of the last one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for step in range(start, stop):
        grads = grads_at(model_name, [(canonical(n), tuple(p.shape)) for n, p in model.named_parameters()], step)
        for name, p in model.named_parameters():
            g = grads.get(canonical(name))
            p.grad = None if g is None else (distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                                             if isinstance(p, DTensor) else g)
        opt.step()
    return {"stats": opt.last_stats, "plan": opt.plan()}


def snapshot(model, opt) -> dict:
    state = {}
    for g in opt.param_groups:
        for n, p in zip(g["param_names"], g["params"]):
            state[canonical(n)] = {k: full(v) for k, v in opt.state[p].items()}
    return {"params": {canonical(n): full(p) for n, p in model.named_parameters()}, "state": state}


class _BlockCounter:
    """Counts the blocks each rank runs the stateful rules on (to check no block runs twice)."""

    CLASSES = (Conda, ARO, AROAdam, SpectraPreclip)

    def __init__(self):
        self.blocks = 0
        self.originals = {}

    def __enter__(self):
        for cls in self.CLASSES:
            original = cls.direction_with_state
            self.originals[cls] = original

            def counted(rule, inputs, state, _original=original, **kwargs):
                self.blocks += inputs[0].shape[0]
                return _original(rule, inputs, state, **kwargs)

            cls.direction_with_state = counted
        return self

    def __exit__(self, *exc):
        for cls, original in self.originals.items():
            cls.direction_with_state = original


def worker(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist

    out = {}
    for scenario in scenarios_for(world_size):
        model_name, config, engine = scenario
        model, opt = make(model_name, config, engine, world_size)
        with _BlockCounter() as counter:
            last = train(model, opt, model_name, 0, STEPS)
        plan = last["plan"]
        res = {"blocks": counter.blocks, "stats": last["stats"],
               "plan_elements": {ph: (plan.bytes_sent(rank, ph) // plan.element_bytes,
                                      plan.bytes_received(rank, ph) // plan.element_bytes)
                                 for ph in ("gather", "scatter")}}
        full_state = snapshot(model, opt)  # collective (DTensor.full_tensor): every rank takes part
        if rank == 0:
            res.update(full_state)
        out[scenario] = res
    for model_name, config in RESUMED:
        saved = f"{root}/saved-{model_name}-{config}"
        if world_size == 2:
            model, opt = make(model_name, config, "fsdp", world_size)
            train(model, opt, model_name, 0, SAVE_AT)
            checkpoint.save(saved, model, opt)
        elif world_size > 2:
            model, opt = make(model_name, config, "fsdp", world_size, seed=1)  # the load must overwrite these weights
            checkpoint.load(saved, model, opt)
            train(model, opt, model_name, SAVE_AT, STEPS)
            full_state = snapshot(model, opt)
            if rank == 0:
                out[("resumed", model_name, config)] = full_state
    dist.barrier()
    return out


# ----- the parent: the reference, the four process groups -----
_REFERENCE: dict = {}


def reference(model_name: str, config: str) -> dict:
    key = (model_name, config)
    if key not in _REFERENCE:
        recipe, overrides = CONFIGS[config]
        model = MODELS[model_name](seed=0).double()
        groups, _, infos = resolve_groups(model, recipe, **overrides)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        ref = ReferenceOptimizer([{"params": [(i.name, params[i.name]) for i in g.members], "rule": g.rule, **g.hyper}
                                  for g in groups], {i.name: i for i in infos})
        blocks = {i.name: sum(len(u.blocks) for u in group_unit_specs(i, g.hyper))
                  for g in groups if get_rule(g.rule).stateful for i in g.members}
        for step in range(STEPS):
            ref.step(grads_at(model_name, [(n, tuple(p.shape)) for n, p in params.items()], step))
        _REFERENCE[key] = {"init": init, "params": params, "state": ref.state,
                           "blocks": STEPS * sum(blocks.values()) - blocks[NO_GRAD_AT_0[model_name]]}
    return _REFERENCE[key]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stateful"))
    with single_thread():
        for w in WORLD_SIZES:  # before forking: the parent's own torch work stays out of the children
            for model_name, config, _ in scenarios_for(w):
                reference(model_name, config)
        return {w: run_world(w, worker, root, start="fork", timeout_s=120.0) for w in WORLD_SIZES}


def assert_matches_reference(got: dict, want: dict, what: str) -> float:
    """Weights within DISPLACEMENT_RTOL of the reference's displacement, state to STATE_RTOL; returns
    the largest relative displacement error."""
    worst = 0.0
    assert set(got["params"]) == set(want["params"])
    for name, value in want["params"].items():
        moved = (value - want["init"][name]).abs().max().clamp_min(1e-30)
        err = float((got["params"][name].detach() - value).abs().max() / moved)
        worst = max(worst, err)
        assert err <= DISPLACEMENT_RTOL, f"{name}: relative error {err:.2e} of the update ({what})"
        for key, ref_value in want["state"][name].items():
            if key == "step":
                assert int(got["state"][name]["step"]) == ref_value, (name, what)
                continue
            torch.testing.assert_close(got["state"][name][key], ref_value, rtol=STATE_RTOL, atol=STATE_ATOL,
                                       msg=lambda m, _n=name, _k=key: f"{_n} {_k} ({what}): {m}")
    return worst


def cases():
    return [(w, sc) for w in WORLD_SIZES for sc in scenarios_for(w)]


@pytest.mark.parametrize("world_size,scenario", cases(), ids=lambda v: "-".join(v) if isinstance(v, tuple) else f"W{v}")
def test_matches_reference(worlds, world_size, scenario):
    model_name, config, engine = scenario
    assert_matches_reference(worlds[world_size][0][scenario], reference(model_name, config),
                             f"{config} {engine} W={world_size}")


def test_state_is_whole_matrix_state(worlds):
    """The carried state is really there: Conda's basis holds an orthogonal U per block, refreshed at
    step 5 (T = 2) from that block's momentum: U's columns are its left singular vectors."""
    state = worlds[2][0][("olmoe", "conda", "fsdp")]["state"]["model.layers.0.mlp.experts.gate_up_proj"]
    basis, momentum = state["basis"], state["exp_avg"]
    for e in range(momentum.shape[0]):
        for half in (slice(0, 24), slice(24, 48)):  # gate rows, up rows: separate [24, 32] blocks
            m = momentum[e, half]
            k = min(m.shape)
            u = basis[e, half].reshape(-1)[:k * k].reshape(k, k)
            torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=u.dtype), atol=1e-12, rtol=0)
            # Columns of U are m's left singular vectors: Uᵀ m has orthogonal rows.
            gram = (u.T @ m) @ (u.T @ m).T
            torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-12, rtol=0)
            assert torch.count_nonzero(basis[e, half].reshape(-1)[k * k:]) == 0


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_no_block_runs_twice(worlds, world_size):
    """Every block of a Conda/ARO parameter is computed on exactly one rank per step."""
    for scenario in scenarios_for(world_size):
        total = sum(rank[scenario]["blocks"] for rank in worlds[world_size])
        assert total == reference(*scenario[:2])["blocks"] > 0, scenario


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_counters_equal_plan(worlds, world_size):
    """Elements moved per rank and collective (inputs and state out, direction and state back) are the
    plan's, and under FSDP2 the planner's simulation on ``meta`` predicts them too."""
    for scenario in scenarios_for(world_size):
        model_name, config, engine = scenario
        sim = None
        if engine == "fsdp":
            with torch.device("meta"):
                model = MODELS[model_name](seed=0)
            recipe, overrides = CONFIGS[config]
            sim = simulate_step(model, Parallel(world_size), recipe, **overrides).plan
        moved = 0
        for rank, results in enumerate(worlds[world_size]):
            res = results[scenario]
            stats = res["stats"]
            for phase, (sent, received) in res["plan_elements"].items():
                assert stats.bytes_sent[phase] == 8 * sent, (scenario, rank, phase)  # float64 on the wire
                assert stats.bytes_received[phase] == 8 * received, (scenario, rank, phase)
                if sim is not None:
                    assert sim.bytes_sent(rank, phase) == sim.element_bytes * sent, (scenario, rank, phase)
                    assert sim.bytes_received(rank, phase) == sim.element_bytes * received, (scenario, rank, phase)
                moved += sent
        assert (moved > 0) == (world_size > 1), scenario


CHANNELS = (("olmoe", "conda", (4, 3)), ("olmoe", "aro", (2, 2)), ("olmoe", "aro-adam", (4, 3)),
            ("olmoe", "spectra-preclip", (3, 3)), ("qwen3", "spectra-preclip-momentum", (2, 2)))


def test_carried_state_multiplies_the_bytes(worlds):
    """Conda sends four tensors per element to the owner (momentum, gradient, v, basis) and gets three
    back, ARO two and two (four and three with the Adam base: momentum, gradient, v, rotation),
    SPECTRA's pre-clip three and three (G, m, v; direction, m, v) on Adam and two and two on a
    momentum base: the plan's byte counts are its pieces' elements times those
    channels, and on the wire (FSDP2: every moved element goes out once and comes back once) so
    are the ratios."""
    for model_name, config, channels in CHANNELS:
        recipe, overrides = CONFIGS[config]
        with torch.device("meta"):
            model = MODELS[model_name](seed=0)
        plan = simulate_step(model, Parallel(3), recipe, **overrides).plan
        for phase, c in zip(("gather", "scatter"), channels):
            elements = sum(int(getattr(b, phase).numel.sum()) for b in plan.buckets)
            assert sum(plan.bytes_sent(r, phase) for r in range(3)) == c * plan.element_bytes * elements > 0, config
    for model_name, config, (out, back) in CHANNELS:
        stats = [rank[(model_name, config, "fsdp")]["stats"] for rank in worlds[3]]
        gather, scatter = (sum(s.bytes_sent[ph] for s in stats) for ph in ("gather", "scatter"))
        assert gather * back == scatter * out > 0, config


@pytest.mark.parametrize("resumed", RESUMED, ids="-".join)
@pytest.mark.parametrize("world_size", [3, 4])
def test_checkpoint_reshards(worlds, world_size, resumed):
    """Saved by FSDP2 at W = 2 after two steps, loaded at W = 3 and 4 into other initial weights, three
    more steps: the uninterrupted reference, weights and whole-matrix state (Conda's basis and
    second moment; Adam's moments carried by SPECTRA's pre-clip)."""
    assert_matches_reference(worlds[world_size][0][("resumed", *resumed)], reference(*resumed),
                             f"{resumed[1]} resumed 2 -> {world_size}")
