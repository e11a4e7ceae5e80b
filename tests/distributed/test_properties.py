"""Property-based: for generated parameter sets, layouts, world sizes 1-4 and gradients, the distributed
update equals the single-process reference, is finite whenever the input is, and no rank is left
waiting.

Hypothesis generates the cases here, in the parent, derandomised (the same cases on every run); each
world size gets one forked process group that runs all of its cases, every collective under a 30 s
optimizer timeout (a rank left waiting would raise CollectiveError and fail the run). Each case is a
few parameters of random small shapes (so shards are uneven, and often empty at W = 3, 4), each with
a role and a rule that applies to it, stored under one layout, stepped twice with gradients of one
kind (Gaussian, zero, 1e-30, 1e15, rank one, constant rows, half the rows zero).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dist_spectral import SpectralOptimizer
from dist_spectral.reference import ReferenceOptimizer
from dist_spectral.roles import ParamInfo
from dist_spectral.rules import get_rule
from tests.distributed.harness import run_world, single_thread

EXAMPLES = int(os.environ.get("DIST_SPECTRAL_PROPERTY_EXAMPLES", "160"))  # raise it for a longer search
STEPS = 2
TIMEOUT_S = 30.0

# role -> (number of dims, rules that apply)
KINDS = {
    "embedding": (2, ("row_norm", "centered_row_norm", "adamw")),
    "lm_head": (2, ("centered_row_norm", "row_norm")),
    "router": (2, ("left_spectral", "centered_row_norm", "adamw")),
    "attention.q": (2, ("muon", "hybrid")),
    "attention.o": (2, ("muon",)),
    "mlp.gate": (2, ("muon", "row_norm", "hybrid")),
    "mlp.down": (2, ("muon", "hybrid", "right_spectral", "left_spectral", "row_norm", "centered_row_norm")),
    "expert.gate_up": (3, ("muon", "row_norm")),
    "expert.down": (3, ("muon", "hybrid", "row_norm")),
    "vector": (1, ("adamw",)),
}
PAIRS = tuple((role, rule) for role, (_, rules) in KINDS.items() for rule in rules)  # drawn uniformly
LAYOUTS = {1: ("replicated", "fsdp"), 2: ("replicated", "fsdp", "fsdp_dim1", "hsdp", "ep_fsdp"),
           3: ("replicated", "fsdp", "fsdp_dim1"), 4: ("replicated", "fsdp", "fsdp_dim1", "hsdp", "ep_fsdp")}
GRADS = ("gaussian", "zero", "tiny", "huge", "rank_one", "constant_rows", "zero_rows")


@dataclass(frozen=True)
class Param:
    role: str
    shape: tuple[int, ...]
    rule: str
    options: tuple = ()  # (key, value) hyperparameters beyond the rule's defaults
    heads: tuple | None = None  # (num_heads, head_dim) of attention projections


@dataclass(frozen=True)
class Case:
    world_size: int
    layout: str
    params: tuple[Param, ...]
    grad: str
    weight_decay: float
    seed: int

    def __str__(self) -> str:
        ps = ",".join(f"{p.role}{list(p.shape)}:{p.rule}" for p in self.params)
        return f"W{self.world_size}-{self.layout}-{self.grad}-{ps}"


def make_param(role: str, rule: str, dims: tuple, opts: tuple) -> Param:
    """A parameter of ``role`` from generic drawn numbers: small shapes, often not a multiple of W, so
    shards are uneven and, at W = 3, 4, sometimes empty."""
    heads, head_dim, cols, rows, experts = dims
    per_head, nesterov, scale, center, alpha = opts
    head_info = None
    if role in ("attention.q", "attention.o"):
        head_info = (heads, head_dim)
        shape = (heads * head_dim, cols) if role == "attention.q" else (cols, heads * head_dim)
    elif role == "expert.gate_up":
        shape = (experts, 2 * heads, cols)  # fused gate/up halves need an even number of rows
    elif role == "expert.down":
        shape = (experts, min(rows, 9), cols)
    elif role == "vector":
        shape = (rows,)
    else:
        shape = (rows, cols)
    width = ("scale", "rms" if scale == "rms" else "none")  # the row and spectral rules' width-aware scale
    options = {"muon": (("per_head", per_head), ("nesterov", nesterov), ("scale", scale)),
               "hybrid": (("center", center), width), "left_spectral": (("alpha", alpha), width),
               "right_spectral": (("alpha", alpha), width), "row_norm": (width,),
               "centered_row_norm": (width,)}.get(rule, ())
    return Param(role, shape, rule, options, head_info)


DIMS = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 9), st.integers(1, 13), st.integers(1, 5))
OPTIONS = st.tuples(st.booleans(), st.booleans(), st.sampled_from(("spectral", "rms")), st.booleans(),
                    st.sampled_from((0.0, 0.5, 1.0)))
PARAM = st.builds(lambda pair, dims, opts: make_param(*pair, dims, opts), st.sampled_from(PAIRS), DIMS, OPTIONS)
# What Hypothesis draws for a case: the first parameter's dimensions and options, 0-3 more parameters,
# weight decay and seed. Where the case runs, the first parameter's (role, rule) and the gradient kind
# are dealt round-robin in ``generate``.
BODY = st.tuples(DIMS, OPTIONS, st.lists(PARAM, max_size=3).map(tuple), st.sampled_from((0.0, 0.1)),
                 st.integers(0, 2 ** 16))


def generate(n: int) -> list[Case]:
    """``n`` derandomised Hypothesis examples (the same on every run). Each is dealt a (world size, layout),
    a (role, rule) for its first parameter and a gradient kind round-robin, so every one gets its share:
    drawing those too left some (the left-spectral router, HSDP, rank-one gradients) with almost none."""
    found: list[tuple] = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(BODY)
    def collect(body):
        if body not in found:
            found.append(body)

    collect()
    where = [(w, layout) for w in sorted(LAYOUTS) for layout in LAYOUTS[w]]
    out = []
    for i, (dims, opts, more, wd, seed) in enumerate(found):
        first = make_param(*PAIRS[i % len(PAIRS)], dims, opts)
        out.append(Case(*where[i % len(where)], (first, *more), GRADS[i % len(GRADS)], wd, seed))
    return out


CASES = generate(EXAMPLES)


# ----- building a case (the same on every rank and in the reference) -----
def name_of(i: int, p: Param) -> str:
    return f"p{i}.{p.role}"


def info_of(i: int, p: Param) -> ParamInfo:
    extra = {}
    if p.heads:
        extra = dict(num_heads=p.heads[0], head_dim=p.heads[1])
    if p.role.startswith("expert."):
        extra["num_experts"] = p.shape[0]
    if p.role == "expert.gate_up":
        extra["fused"] = "halves"
    return ParamInfo(name_of(i, p), p.shape, p.role, module_type="Case", **extra)


def group_of(i: int, p: Param, case: Case, tensor) -> dict:
    return {"params": [(name_of(i, p), tensor)], "rule": p.rule, **get_rule(p.rule).defaults, **dict(p.options),
            "lr": 0.02, "weight_decay": case.weight_decay}


def initial(case: Case, i: int, p: Param) -> torch.Tensor:
    return torch.randn(p.shape, generator=torch.Generator().manual_seed(case.seed * 31 + i))


def gradient(case: Case, i: int, p: Param, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(case.seed * 977 + i * 7 + step + 1)
    g = torch.randn(p.shape, generator=gen)
    kind = case.grad
    if kind == "zero":
        return torch.zeros(p.shape)
    if kind == "tiny":
        return g * 1e-30
    if kind == "huge":
        return g * 1e15
    if kind == "rank_one" and len(p.shape) >= 2:
        u = torch.randn(*p.shape[:-1], 1, generator=gen)
        return u * torch.randn(1, p.shape[-1], generator=gen)
    if kind == "constant_rows":
        return torch.randn(*p.shape[:-1], 1, generator=gen).expand(p.shape).contiguous()
    if kind == "zero_rows" and len(p.shape) >= 2:
        g.view(-1, p.shape[-1])[::2] = 0
    return g


def placements(case: Case, p: Param, meshes: dict):
    from torch.distributed.tensor import Replicate, Shard

    if case.layout == "fsdp" or (case.layout == "fsdp_dim1" and len(p.shape) == 1):
        return meshes["1d"], [Shard(0)]
    if case.layout == "fsdp_dim1":
        return meshes["1d"], [Shard(1)]
    if case.layout == "ep_fsdp" and len(p.shape) == 3:  # experts over the first mesh dim, their rows over the second
        return meshes["2d"], [Shard(0), Shard(1)]
    return meshes["2d"], [Replicate(), Shard(0)]  # hsdp, and ep_fsdp's dense parameters


def run_case(case: Case, meshes: dict) -> dict:
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensors = []
    for i, p in enumerate(case.params):
        full = initial(case, i, p)
        if case.layout != "replicated":
            mesh, place = placements(case, p, meshes)
            full = distribute_tensor(full, mesh, place, src_data_rank=None)
        tensors.append(torch.nn.Parameter(full))
    opt = SpectralOptimizer([group_of(i, p, case, t) for i, (p, t) in enumerate(zip(case.params, tensors))],
                            {name_of(i, p): info_of(i, p) for i, p in enumerate(case.params)}, timeout=TIMEOUT_S)
    for step in range(STEPS):
        for i, (p, t) in enumerate(zip(case.params, tensors)):
            g = gradient(case, i, p, step)
            t.grad = distribute_tensor(g, t.device_mesh, t.placements, src_data_rank=None) if isinstance(t, DTensor) else g
        opt.step()

    def full_of(t):
        return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    return {"params": [full_of(t) for t in tensors],
            "state": [{k: full_of(v) for k, v in opt.state[t].items() if k != "step"} for t in tensors],
            "steps": [int(opt.state[t]["step"]) for t in tensors]}


def worker(rank: int, world_size: int, cases: list[Case]) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {"1d": init_device_mesh("cpu", (world_size,))}
    if world_size % 2 == 0:
        meshes["2d"] = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    for case in cases:
        res = run_case(case, meshes)
        out[case] = res if rank == 0 else {"steps": res["steps"]}
    dist.barrier()
    return out


def reference(case: Case, wobble: bool = False) -> dict:
    """The reference run, and the largest single-step move of each parameter (the scale errors are
    measured on: the net displacement can cancel, e.g. sign-flipping rows under Muon). ``wobble``
    perturbs every gradient element by one fp32 rounding (relative 2^-24, random sign), to measure how
    much the rule itself amplifies rounding at this input."""
    tensors = [initial(case, i, p) for i, p in enumerate(case.params)]
    init = [t.clone() for t in tensors]
    ref = ReferenceOptimizer([group_of(i, p, case, t) for i, (p, t) in enumerate(zip(case.params, tensors))],
                             {name_of(i, p): info_of(i, p) for i, p in enumerate(case.params)})
    step_move = [torch.tensor(0.0)] * len(tensors)
    noise = torch.Generator().manual_seed(case.seed)
    for step in range(STEPS):
        grads = [gradient(case, i, p, step) for i, p in enumerate(case.params)]
        if wobble:
            grads = [g * (1 + 2.0 ** -24 * (2 * torch.randint(0, 2, g.shape, generator=noise) - 1)) for g in grads]
        before = [t.clone() for t in tensors]
        ref.step({name_of(i, p): g for i, (p, g) in enumerate(zip(case.params, grads))})
        step_move = [torch.maximum(m, (t - b).abs().max()) for m, t, b in zip(step_move, tensors, before)]
    return {"init": init, "params": tensors, "step_move": step_move,
            "state": [ref.state[name_of(i, p)] for i, p in enumerate(case.params)]}


@pytest.fixture(scope="module")
def results():
    out = {}
    with single_thread():
        for world_size in (1, 2, 3, 4):
            mine = [c for c in CASES if c.world_size == world_size]
            ranks = run_world(world_size, worker, mine, start="fork", timeout_s=120.0)
            assert all(list(r) == mine for r in ranks), "every rank ran every case"
            for case in mine:
                out[case] = {"got": ranks[0][case], "steps": [r[case]["steps"] for r in ranks],
                             "want": reference(case), "wobble": reference(case, wobble=True)}
    return out


# Errors are measured on the largest single-step move of a parameter, against the reference, and
# compared with the reference's own sensitivity: how far it moves when every gradient element is
# perturbed by one fp32 rounding ("wobble"). Measured over 709 cases (DIST_SPECTRAL_PROPERTY_EXAMPLES
# =800): where the reference is insensitive (wobble < 1e-5) the error is at most 2.5e-5; the large
# errors (up to 0.13, right_spectral on rank-one and constant-row gradients, whose Gram is singular)
# come with a wobble of the same size (error / wobble <= 1.8): the rule amplifies rounding there, the
# distribution adds nothing. The state differs by at most 2.4e-7 (relative).
ERROR_FLOOR, WOBBLE_FACTOR, STATE_RTOL = 5e-5, 4.0, 1e-6


def test_generated_enough_cases():
    per_place = {(w, layout): sum((c.world_size, c.layout) == (w, layout) for c in CASES)
                 for w in LAYOUTS for layout in LAYOUTS[w]}
    assert len(CASES) >= 0.8 * EXAMPLES and min(per_place.values()) >= 8, per_place
    assert {(p.role, p.rule) for c in CASES for p in c.params} == set(PAIRS)


# These tests found that functional.right_spectral (fp32 Newton–Schulz) overflowed to NaN for
# entries near 1e9 (the Gram's Frobenius norm); it now forms U_0 on X / max|X|. The "huge" cases
# keep it covered.
@pytest.mark.parametrize("case", CASES, ids=str)
def test_distributed_update_equals_reference(results, case):
    res = results[case]
    got, want = res["got"], res["want"]
    assert all(s == [STEPS] * len(case.params) for s in res["steps"]), "every rank stepped every parameter"
    for i, p in enumerate(case.params):
        new, ref = got["params"][i], want["params"][i]
        assert torch.isfinite(new).all() and all(torch.isfinite(v).all() for v in got["state"][i].values()), \
            f"{name_of(i, p)}: non-finite result from finite input"
        scale = want["step_move"][i]
        err, wobble = (new - ref).abs().max(), (res["wobble"]["params"][i] - ref).abs().max()
        if scale > 0:
            err, wobble = err / scale, wobble / scale
        assert err <= ERROR_FLOOR + WOBBLE_FACTOR * wobble, \
            f"{name_of(i, p)} {p}: error {err:.2e} of the largest step; the reference's own wobble {wobble:.2e}"
        for key, value in want["state"][i].items():
            if key != "step":
                scale = value.abs().max().clamp_min(1e-30)
                assert ((got["state"][i][key] - value).abs().max() / scale) <= STATE_RTOL, f"{name_of(i, p)} {key}"
