"""SPECTRA and AuON (dist_spectral/neighbours): their math against float64 SVD and the formulas,
their symmetries, AuON's statistics over rows split across ranks, routing, recipes and errors."""
from __future__ import annotations

import math
import threading

import pytest
import torch

import dist_spectral
from dist_spectral import functional as F
from dist_spectral import reference
from dist_spectral.build import resolve_groups
from dist_spectral.engines import Collectives
from dist_spectral.engines.rows import row_view
from dist_spectral.layout import Layout
from dist_spectral.route import runs_on_rows
from dist_spectral.recipes import list_recipes
from dist_spectral.roles import ParamInfo
from dist_spectral.rules import LOCAL, get_rule
from tests.tiny import MODELS, synthetic_grad


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread (a busy 2-core machine otherwise spins in the pool)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def with_top_singular_value(x: torch.Tensor, top: float) -> torch.Tensor:
    return x * (top / torch.linalg.matrix_norm(x, ord=2, keepdim=True))


def exact_soft_clip(x: torch.Tensor, c: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u * (s / torch.sqrt(1 + s**2 / c**2)).unsqueeze(-2)) @ vh


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def orthogonal(k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(gaussian(k, k, seed=seed))[0]


# ----- SPECTRA: the soft clip -----

@pytest.mark.parametrize("shape,top", [(s, t) for s in [(48, 96), (96, 48)] for t in (0.2, 1.0, 5.0, 30.0)]
                         + [((40, 40), t) for t in (0.2, 1.0, 5.0)])
def test_soft_clip_maps_singular_values_like_the_svd(shape, top):
    """σ ↦ σ/√(1 + σ²/c²), vectors kept. Measured (fp32, 10 steps): ≤ 1.1e-6 relative on the singular
    values, ≤ 5e-7 relative Frobenius error of the matrix. (A square Gaussian's near-zero singular
    values need more steps once σ_max ≳ 10c: see the next test.)"""
    c = 1.0
    x = with_top_singular_value(gaussian(*shape, seed=1), top * c)
    got = F.soft_clip(x.float(), c, steps=10).double()
    want = exact_soft_clip(x, c)
    sv_got, sv_want = torch.linalg.svdvals(got), torch.linalg.svdvals(want)
    assert ((sv_got - sv_want).abs() / sv_want).max() < 2e-6
    assert torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want) < 2e-6
    assert sv_got.max() < c


def test_soft_clip_small_singular_values_lag_behind_a_large_spike():
    """A rank-one spike 100c over a floor at 0.01c: 10 steps leave the floor under-converged (too
    small, never too large), 18 steps fix it; the spike itself is right either way."""
    c = 1.0
    a, b = gaussian(64, 1, seed=2), gaussian(1, 128, seed=3)
    x = 0.01 * gaussian(64, 128, seed=4) + 100 * (a / a.norm()) @ (b / b.norm())
    want = torch.linalg.svdvals(exact_soft_clip(x, c))
    short = torch.linalg.svdvals(F.soft_clip(x.float(), c, steps=10).double())
    long = torch.linalg.svdvals(F.soft_clip(x.float(), c, steps=18).double())
    assert abs(short[0] / want[0] - 1) < 1e-5
    assert (short[1:] <= want[1:] * (1 + 1e-5)).all() and (short[1:] / want[1:]).min() < 0.7
    assert ((long - want).abs() / want).max() < 1e-3


def test_soft_clip_is_orthogonally_equivariant():
    x = gaussian(24, 40, seed=5) * 3
    q1, q2 = orthogonal(24, 6), orthogonal(40, 7)
    # measured 1.6e-15 and 0 (over this seed and two other seed sets)
    torch.testing.assert_close(F.soft_clip(q1 @ x @ q2.T, 2.0), q1 @ F.soft_clip(x, 2.0) @ q2.T, rtol=0, atol=5e-15)
    torch.testing.assert_close(F.soft_clip(x.T, 2.0), F.soft_clip(x, 2.0).T, rtol=0, atol=1e-15)


def test_soft_clip_with_infinite_c_is_the_identity_and_huge_c_nearly():
    x = gaussian(16, 24, seed=8)
    assert torch.equal(F.soft_clip(x, math.inf), x)
    assert rel(F.soft_clip(x, 1e6), x) < 1e-10  # σ ≈ 10: H_c(X) = X (1 − O(σ²/c²))


def test_soft_clip_scale_behaviour():
    """Homogeneous, ``H_c(aX) = a H_{c/a}(X)``; below c nearly linear, far above it nearly c."""
    x = gaussian(20, 30, seed=9)
    # measured 6e-4 of (rtol 1e-10, atol 1e-12), over three seed sets
    torch.testing.assert_close(F.soft_clip(10 * x, 4.0), 10 * F.soft_clip(x, 0.4), rtol=2e-13, atol=2e-15)
    tiny = with_top_singular_value(x, 1e-3)
    assert rel(F.soft_clip(tiny, 1.0), tiny) < 1e-6  # σ ≤ 1e-3 c: shrunk by at most σ²/2c² = 5e-7
    huge = with_top_singular_value(x, 1e3)
    top = torch.linalg.matrix_norm(F.soft_clip(huge, 1.0, steps=30), ord=2)
    assert 0.999 < top < 1.0


def test_soft_clip_of_each_matrix_ignores_its_batch():
    """The λ_max bound is per matrix: a small matrix batched with a huge one clips as it does alone."""
    small = gaussian(16, 32, seed=10)
    huge = with_top_singular_value(gaussian(16, 32, seed=11), 1e4)
    alone = F.soft_clip(small.float(), 1.0)
    batched = F.soft_clip(torch.stack([small, huge]).float(), 1.0)[0]
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-7)  # measured 0


def test_soft_clip_zero_and_degenerate_shapes_are_finite():
    assert torch.equal(F.soft_clip(torch.zeros(5, 7), 1.0), torch.zeros(5, 7))
    for shape in [(1, 9), (9, 1), (1, 1)]:
        x = gaussian(*shape, seed=12) * 10
        # measured 1.2e-6 of (rtol 1e-9, atol 1e-12), over three seed sets
        torch.testing.assert_close(F.soft_clip(x, 1.0), exact_soft_clip(x, 1.0), rtol=4e-15, atol=4e-18)
    rank1 = gaussian(8, 1, seed=13) @ gaussian(1, 12, seed=14)
    assert torch.isfinite(F.soft_clip(rank1, 0.5)).all()


def test_gram_bound_is_the_smaller_of_gershgorin_and_frobenius():
    diag = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))  # Gershgorin exact: 3
    v = gaussian(5, 1, seed=15)
    rank1 = v @ v.T  # Frobenius exact: ‖v‖²
    assert F.gram_bound(diag).item() == 3.0
    torch.testing.assert_close(F.gram_bound(rank1).squeeze(), (v.T @ v).squeeze())
    g = gaussian(10, 30, seed=16)
    g = g @ g.T
    assert F.gram_bound(g).item() >= torch.linalg.eigvalsh(g).max().item()


def test_reference_soft_clip_agrees_with_the_batched_one():
    """Two independent implementations of the same NS iteration (the oracle and the fast path)."""
    for shape, seed in [((24, 40), 17), ((40, 24), 18)]:
        x = with_top_singular_value(gaussian(*shape, seed=seed), 7.0).float()
        # measured 0; an fp32 ulp or two at |x| = 2 of slack
        torch.testing.assert_close(reference.soft_clip(x, 2.0, 10), F.soft_clip(x, 2.0, 10), rtol=0, atol=5e-7)


# ----- SPECTRA: the rule -----

def test_spectra_adamw_base_is_the_bias_corrected_adam_direction():
    rule = get_rule("spectra")
    group = {**rule.defaults, "lr": 1.0, "weight_decay": 0.0}
    g = gaussian(6, 8, seed=19).float()
    state = rule.init_state(torch.zeros(6, 8), group)
    assert set(state) == {"exp_avg", "exp_avg_sq"}
    first = rule.direction_input(state, g, group, step=1)
    torch.testing.assert_close(first, g / (g.abs() + group["eps"]))  # m̂ = g, v̂ = g² on step 1
    second = rule.direction_input(state, 2 * g, group, step=2)
    b1, b2 = group["betas"]
    m = (b1 * (1 - b1) * g + (1 - b1) * 2 * g) / (1 - b1**2)
    v = (b2 * (1 - b2) * g**2 + (1 - b2) * 4 * g**2) / (1 - b2**2)
    torch.testing.assert_close(second, m / (v.sqrt() + group["eps"]))


@pytest.mark.parametrize("base", ["sign", "muon"])
def test_spectra_momentum_bases(base):
    rule = get_rule("spectra")
    group = {**rule.defaults, "base": base, "lr": 1.0, "weight_decay": 0.0}
    state = rule.init_state(torch.zeros(4, 6), group)
    assert set(state) == {"momentum_buffer"}
    g1, g2 = gaussian(4, 6, seed=20).float(), gaussian(4, 6, seed=21).float()
    rule.direction_input(state, g1, group, step=1)
    x = rule.direction_input(state, g2, group, step=2)
    nesterov = g2 + 0.95 * (0.95 * g1 + g2)
    torch.testing.assert_close(x, nesterov.sign() if base == "sign" else nesterov)


def test_spectra_direction_shape_scale_and_base():
    rule = get_rule("spectra")
    group = {**rule.defaults, "clip_c": 2.0}
    tall = gaussian(3, 24, 8, seed=22).float()
    u = rule.direction(tall, axis="rows", transposed=False, group=group)
    torch.testing.assert_close(u, F.soft_clip(tall, 2.0) * math.sqrt(3))
    u_t = rule.direction(tall, axis="rows", transposed=True, group=group)  # stored in × out: fan_out = 8
    torch.testing.assert_close(u_t, F.soft_clip(tall, 2.0))
    muon = rule.direction(tall, axis="rows", transposed=True, group={**group, "base": "muon"})
    torch.testing.assert_close(muon, F.soft_clip(F.polar(tall), 2.0))
    assert rule.polar_flops(24, 8, {**group, "base": "muon"}) == F.polar_flops(24, 8, 5) + F.soft_clip_flops(24, 8, 10)


# ----- SPECTRA with pre-clipping of the gradient -----

PRECLIP = {"adamw": "spectra_preclip", "sign": "spectra_preclip_momentum", "muon": "spectra_preclip_momentum"}


def batch_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative Frobenius error over a batch of matrices."""
    return float((torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).max())


def preclip_group(base: str, **kw) -> dict:
    rule = get_rule(PRECLIP[base])
    return {**rule.defaults, "base": base, "lr": 1.0, "weight_decay": 0.0, **kw}


def preclip_steps(rule, grads, group, *, transposed=False):
    """Run ``rule`` (a pre-clipping rule) on a sequence of gradients; the directions and the state."""
    state = rule.init_state(torch.zeros_like(grads[0]), group)
    directions = []
    for step, g in enumerate(grads, 1):
        x = rule.direction_input({}, g, group, step=step)
        assert x is g  # the raw gradient is what travels: nothing element-wise happens on the shard
        d, state = rule.direction_with_state([x], state, step=step, axis="rows", transposed=transposed, group=group)
        directions.append(d)
    return directions, state


@pytest.mark.parametrize("base", ["adamw", "sign", "muon"])
def test_preclip_with_infinite_c_is_spectra_step_for_step(base):
    """c_pre = ∞: the base optimizer's step, moved to the owner, is plain SPECTRA's bit for bit (the
    same element-wise arithmetic on blocks instead of shards): directions and state, over 4 steps
    with gradients of varying scale."""
    plain, pre = get_rule("spectra"), get_rule(PRECLIP[base])
    group = preclip_group(base, clip_c=2.0, pre_clip_c=math.inf)
    grads = [gaussian(3, 16, 24, seed=30 + t).float() * 10.0 ** (t - 2) for t in range(4)]
    state = plain.init_state(torch.zeros(3, 16, 24), group)
    want = [plain.direction(plain.direction_input(state, g, group, step=t), axis="rows", transposed=True, group=group)
            for t, g in enumerate(grads, 1)]
    got, got_state = preclip_steps(pre, grads, group, transposed=True)
    assert set(got_state) == set(state) == set(pre.carried)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for key in state:
        assert torch.equal(got_state[key], state[key])


def test_preclip_with_infinite_c_is_spectra_in_the_optimizer():
    """The same through the engine (OLMoE: experts, head blocks with per_head, a fused gate/up),
    Adam base on attention and MLP: weights and state bit for bit after 3 steps."""
    base = {"attention": {"clip_c": 2.0, "per_head": True}}
    # A new rule starts from its own defaults: restate the recipe's betas.
    pre = {"attention": {**base["attention"], "rule": "spectra_preclip", "pre_clip_c": math.inf, "betas": (0.9, 0.999)},
           "mlp": {"rule": "spectra_preclip", "pre_clip_c": math.inf, "betas": (0.9, 0.999)}}
    models = [MODELS["olmoe"](seed=2) for _ in range(2)]
    opts = [dist_spectral.build_optimizer(models[0], "spectra", **base),
            dist_spectral.build_optimizer(models[1], "spectra", **pre)]
    assert {g["rule"] for g in opts[1].param_groups} == {"adamw", "spectra_preclip"}
    for step in range(3):
        for model, opt in zip(models, opts):
            for n, p in model.named_parameters():
                p.grad = synthetic_grad(n, tuple(p.shape), step)
            opt.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), n
        assert opts[0].state[a].keys() == opts[1].state[b].keys()
        for key, value in opts[0].state[a].items():
            assert torch.equal(value, opts[1].state[b][key]), (n, key)


def spiked(dtype, seed=40, spike=1000.0):
    """Three 48×64 blocks: a rank-one spike of σ = ``spike`` over a Gaussian floor of σ ≈ 0.14."""
    a, b = gaussian(3, 48, 1, seed=seed), gaussian(3, 1, 64, seed=seed + 1)
    top = (a / a.norm(dim=-2, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True))
    return (0.01 * gaussian(3, 48, 64, seed=seed + 2) + spike * top).to(dtype)


def test_preclip_tames_a_gradient_spike_before_the_moments():
    """A gradient with one singular value 1000·c_pre: the moments see it at just below c_pre
    (without the pre-clip, ‖m‖₂ = (1−β₁)·1000 and v up to 687). Measured (fp32, 10 steps): top
    singular value of m/(1−β₁) within 2.5e-6 of c_pre, max v/(1−β₂) = 0.014 c_pre². At 10 steps the
    floor lags (comes out ~17× too small, never too large; see soft_clip)."""
    c, b1, b2 = 1.0, *get_rule("spectra_preclip").defaults["betas"]
    g = spiked(torch.float32)
    rule = get_rule("spectra_preclip")
    _, clipped = preclip_steps(rule, [g], preclip_group("adamw", pre_clip_c=c))
    _, raw = preclip_steps(rule, [g], preclip_group("adamw", pre_clip_c=math.inf))
    top = torch.linalg.matrix_norm(clipped["exp_avg"].double(), ord=2)
    assert (top <= (1 - b1) * c * (1 + 1e-5)).all() and (top >= (1 - b1) * c * (1 - 1e-5)).all()
    assert (torch.linalg.matrix_norm(raw["exp_avg"].double(), ord=2) > (1 - b1) * 999).all()
    assert clipped["exp_avg_sq"].max() <= (1 - b2) * c * c  # |G̃_ij| ≤ ‖G̃‖₂ < c
    assert raw["exp_avg_sq"].max() > (1 - b2) * 1e4
    got = torch.linalg.svdvals(clipped["exp_avg"].double() / (1 - b1))
    want = torch.linalg.svdvals(exact_soft_clip(g.double(), c))
    assert (got <= want * (1 + 1e-5)).all()


def test_preclip_spike_leaves_the_rest_of_the_spectrum():
    """With the Newton–Schulz steps the spike needs (log(σ²/c²)/log 2.25 + 4 ≈ 21; 24 here, float64),
    the clipped gradient in the moments is H_c(G) of the SVD: the floor (σ ≤ 0.14 c) passes,
    shrunk by at most the 1% the formula asks for. Measured: 1.2e-11 relative Frobenius error (at
    20 steps the floor's singular values are within 6e-5; in fp32 they stall at 1% error: a Gram
    with eigenvalues 10⁶ and 0.02)."""
    c, b1 = 1.0, get_rule("spectra_preclip").defaults["betas"][0]
    g = spiked(torch.float64)
    _, state = preclip_steps(get_rule("spectra_preclip"), [g], preclip_group("adamw", pre_clip_c=c,
                                                                              pre_clip_steps=24))
    want = exact_soft_clip(g, c)
    assert batch_rel(state["exp_avg"] / (1 - b1), want) < 1e-10
    floor = torch.linalg.svdvals(want)[:, 1:] / torch.linalg.svdvals(g)[:, 1:]
    assert (floor > 0.98).all() and (floor < 1).all()


@pytest.mark.parametrize("base", ["adamw", "sign", "muon"])
@pytest.mark.parametrize("transposed", [False, True])
def test_preclip_state_is_the_base_step_of_the_clipped_gradient(base, transposed):
    """Three steps on tall blocks (σ_max = 1.4–4.5 c_pre: the pre-clip moves each gradient by ≥ 29%),
    float64: the state is the base optimizer's update of H_{c_pre}(G) (SVD), the direction
    s·H_c(base update); the bias correction uses the step given. Measured: state ≤ 1.9e-15,
    direction ≤ 1.2e-14 relative to the formula."""
    rule = get_rule(PRECLIP[base])
    c_pre, c = 4.0, 2.0
    group = preclip_group(base, clip_c=c, pre_clip_c=c_pre)
    grads = [gaussian(3, 40, 24, seed=50 + t) * (1 + t) / 2 for t in range(3)]
    got, state = preclip_steps(rule, grads, group, transposed=transposed)
    b1, b2 = group["betas"]
    m = v = buf = torch.zeros(3, 40, 24, dtype=torch.float64)
    fan_out, fan_in = (24, 40) if transposed else (40, 24)
    for t, (g, d) in enumerate(zip(grads, got), 1):
        gc = exact_soft_clip(g, c_pre)
        assert (torch.linalg.matrix_norm(gc - g) > 0.2 * torch.linalg.matrix_norm(g)).all()  # it acts
        if base == "adamw":
            m, v = b1 * m + (1 - b1) * gc, b2 * v + (1 - b2) * gc * gc
            x = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
        else:
            buf = group["beta"] * buf + gc
            x = gc + group["beta"] * buf
            x = x.sign() if base == "sign" else F.polar(x)
        want = exact_soft_clip(x, c) * math.sqrt(max(1.0, fan_out / fan_in))
        assert batch_rel(d, want) < 1.5e-14, t  # measured 5.5e-15
    if base == "adamw":
        # measured 2e-15 for each
        assert batch_rel(state["exp_avg"], m) < 6e-15 and batch_rel(state["exp_avg_sq"], v) < 6e-15
    else:
        assert batch_rel(state["momentum_buffer"], buf) < 6e-15  # measured 2e-15


def test_preclip_defaults_flops_and_state():
    """c_pre defaults to clip_c; the flops add the pre-clip's (none at c_pre = ∞); the state is the
    base optimizer's and every key is carried."""
    for base in PRECLIP:
        rule = get_rule(PRECLIP[base])
        assert rule.stateful and rule.inputs == 1 and rule.locality == "matrix"
        assert set(rule.init_state(torch.zeros(4, 6), preclip_group(base))) == set(rule.carried)
    assert get_rule("spectra_preclip").defaults["pre_clip_c"] is None
    assert get_rule("spectra_preclip_momentum").defaults["base"] == "sign"
    rule, g = get_rule("spectra_preclip"), gaussian(2, 24, 32, seed=60).float() * 3
    default = preclip_steps(rule, [g], preclip_group("adamw", clip_c=2.0))[1]
    explicit = preclip_steps(rule, [g], preclip_group("adamw", clip_c=2.0, pre_clip_c=2.0))[1]
    assert torch.equal(default["exp_avg"], explicit["exp_avg"])
    group = preclip_group("muon", pre_clip_steps=12)
    assert get_rule("spectra_preclip_momentum").polar_flops(24, 8, group) == (
        F.polar_flops(24, 8, 5) + F.soft_clip_flops(24, 8, 10) + F.soft_clip_flops(24, 8, 12))
    assert get_rule("spectra_preclip_momentum").polar_flops(24, 8, {**group, "pre_clip_c": math.inf}) == (
        get_rule("spectra").polar_flops(24, 8, group))


def test_preclip_state_dict_round_trip():
    """state_dict → a fresh optimizer on another model (other weights, loaded): the next steps are
    the uninterrupted run's, bit for bit; the carried state is in the state_dict like momentum."""
    overrides = {"attention": {"rule": "spectra_preclip_momentum", "base": "muon", "clip_c": 0.5, "pre_clip_c": 4.0},
                 "mlp": {"rule": "spectra_preclip", "pre_clip_c": 3.0}}

    def step(model, opt, t):
        for n, p in model.named_parameters():
            p.grad = synthetic_grad(n, tuple(p.shape), t)
        opt.step()

    model = MODELS["olmoe"](seed=3)
    opt = dist_spectral.build_optimizer(model, "spectra", **overrides)
    for t in range(2):
        step(model, opt, t)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    keys = {k for s in saved["state"].values() for k in s}
    assert {"exp_avg", "exp_avg_sq", "momentum_buffer", "step"} <= keys
    saved = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()},
             "param_groups": saved["param_groups"]}
    resumed = MODELS["olmoe"](seed=4)
    resumed.load_state_dict(saved_model)
    resumed_opt = dist_spectral.build_optimizer(resumed, "spectra", **overrides)
    resumed_opt.load_state_dict(saved)
    for t in range(2, 4):
        step(model, opt, t)
        step(resumed, resumed_opt, t)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
        for key, value in opt.state[a].items():
            assert torch.equal(value, resumed_opt.state[b][key]), (n, key)


# ----- AuON -----

def test_cosh_brake_matches_the_formula_per_matrix():
    x = gaussian(3, 20, 30, seed=23).float()
    x[1] *= 50  # per-matrix statistics: scaling one matrix changes nothing in the others
    x[2, :, :3] *= 40  # a heavy column: the brake engages
    got = F.cosh_brake(x, 1.5)
    for b in range(3):
        want = reference.cosh_brake(x[b], 1.5, True)
        torch.testing.assert_close(got[b], want, rtol=1e-6, atol=1e-9)
        n = x[b].double() / x[b].double().norm()
        r = torch.cosh(1.5 * n).pow(2).mean().sqrt()
        torch.testing.assert_close(got[b].double(), n / r, rtol=6e-7, atol=3e-10)  # 0.093 of 2e-6
    assert torch.linalg.matrix_norm(got.double(), ord=2).max() < 1


def test_auon_is_invariant_to_the_gradient_scale():
    rule = get_rule("auon")
    group = dict(rule.defaults)
    x = gaussian(12, 20, seed=24).float()
    u = rule.direction(x, axis="rows", transposed=False, group=group)
    for a in (1e-3, 1e3):
        torch.testing.assert_close(rule.direction(a * x, axis="rows", transposed=False, group=group), u,
                                   rtol=1e-5, atol=1e-9)
    raw = rule.direction(1e3 * x, axis="rows", transposed=False, group={**group, "normalize": False})
    r = torch.cosh(1.5 * x / x.norm()).pow(2).mean().sqrt()
    # the released code's form scales; measured 0.023 of (1e-5, 1e-6)
    torch.testing.assert_close(raw, 1e3 * x / r, rtol=7e-7, atol=7e-8)


def test_auon_zero_and_degenerate_inputs_are_finite():
    rule = get_rule("auon")
    group = dict(rule.defaults)
    assert torch.equal(rule.direction(torch.zeros(4, 5), axis="rows", transposed=False, group=group),
                       torch.zeros(4, 5))
    for shape in [(1, 7), (7, 1)]:
        assert torch.isfinite(rule.direction(gaussian(*shape, seed=25).float(), axis="rows", transposed=False,
                                             group=group)).all()


class _ThreadRanks(Collectives):
    """W ranks as threads of one process; all-reduce through a barrier. Exercises the adapters'
    shared ``row_view`` (whole rows and rows cut by a DeepSpeed-style partition, zero-filled and masked)."""

    def __init__(self, rank: int, world_size: int, barrier: threading.Barrier, slots: list):
        self.rank, self.world_size, self._barrier, self._slots = rank, world_size, barrier, slots
        self.group, self.timeout = None, None

    def all_reduce_sum(self, tensor, what):
        self._slots[self.rank] = tensor.clone()
        self._barrier.wait()
        total = sum(self._slots)
        self._barrier.wait()
        return tensor.copy_(total)


def _row_path(layout: Layout, full: torch.Tensor, group: dict, transposed: bool) -> torch.Tensor:
    """AuON's direction run on each rank's part of ``full`` (as the optimizer's row path does), reassembled."""
    W = layout.world_size
    barrier, slots, out = threading.Barrier(W), [None] * W, torch.zeros(full.numel())
    errors = []

    def rank_main(r):
        try:
            local = torch.cat([full.reshape(-1)[a:b] for a, b in layout.holdings[r]] or [torch.zeros(0)])
            x, stats, back = row_view(layout, local, _ThreadRanks(r, W, barrier, slots))
            u = back(get_rule("auon").direction(x, axis="rows", transposed=transposed, group=group, stats=stats))
            offset = 0
            for a, b in layout.holdings[r]:
                out[a:b] = u[offset:offset + b - a]
                offset += b - a
        except Exception as e:  # surfaced below; a dead thread would otherwise hang the barrier
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out.reshape(full.shape)


@pytest.mark.parametrize("holdings", [
    ((0, 40), (40, 96), (96, 135)),               # DeepSpeed partitions cutting rows 2 and 6 (n = 15)
    ((0, 67), (67, 67), (67, 135)),               # an empty partition, a cut row
    ((0, 45), (45, 90), (90, 135)),               # whole rows (FSDP2-like)
    ((0, 135), (135, 135), (135, 135)),           # everything on one rank
], ids=["cut-rows", "empty-and-cut", "whole-rows", "one-holder"])
@pytest.mark.parametrize("transposed", [False, True])
def test_auon_rows_split_across_ranks_equal_the_whole_matrix(holdings, transposed):
    """The brake r and ‖ĝ‖_F span the whole matrix wherever its rows live; zero-filled elements of
    cut rows do not count (cosh 0 = 1 would bias the mean if they did)."""
    full = gaussian(9, 15, seed=26).float()
    full[2, :4] *= 30  # heavy entries inside a cut row
    full[4] = 0
    group = dict(get_rule("auon").defaults)
    layout = Layout((9, 15), tuple(((a, b),) if b > a else () for a, b in holdings))
    got = _row_path(layout, full, group, transposed)
    want = get_rule("auon").direction(full, axis="rows", transposed=transposed, group=group)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    scale = math.sqrt(15 / 9) if transposed else 1.0  # max(1, fan_out/fan_in)^½
    torch.testing.assert_close(got.double(), reference.cosh_brake(full, 1.5, True).double() * scale,
                               rtol=6e-7, atol=3e-9)  # measured 0.092 of (2e-6, 1e-8)


def test_auon_statistics_are_per_matrix_not_per_shard():
    """With only local statistics each rank would normalise its own rows: the test above would fail."""
    full = gaussian(9, 15, seed=27).float()
    group = dict(get_rule("auon").defaults)
    whole = get_rule("auon").direction(full, axis="rows", transposed=False, group=group)
    half = get_rule("auon").direction(full[:4], axis="rows", transposed=False, group=group, stats=LOCAL)
    assert (half - whole[:4]).abs().max() > 0.1 * whole.abs().max()


def _info(name, role, shape, **kw):
    return ParamInfo(name=name, shape=shape, role=role, module_type="Linear", **kw)


def test_auon_routing_rows_or_owner():
    whole = Layout((8, 6), (((0, 24),), ((24, 48),)))
    cut = Layout((8, 6), (((0, 25),), ((25, 48),)))
    dense = _info("mlp.up_proj.weight", "mlp.up", (8, 6))
    assert runs_on_rows("auon", dense, whole) and runs_on_rows("auon", dense, cut)
    experts = _info("experts.gate_up_proj", "expert.gate_up", (3, 8, 6), fused="halves")
    assert not runs_on_rows("auon", experts, Layout((3, 8, 6), (((0, 72),), ((72, 144),))))
    fused = _info("mlp.gate_up_proj.weight", "mlp.gate_up", (8, 6), fused="halves")
    assert not runs_on_rows("auon", fused, whole)  # two matrices: statistics per half, at an owner
    assert not runs_on_rows("auon_hybrid", dense, whole)
    # Unchanged for the existing row rules: row norms need no statistics over rows.
    assert runs_on_rows("row_norm", experts, Layout((3, 8, 6), (((0, 72),), ((72, 144),))))


def test_auon_hybrid_is_one_muon_step_then_the_brake():
    rule = get_rule("auon_hybrid")
    group = dict(rule.defaults)
    x = gaussian(2, 10, 16, seed=28).float()
    u = rule.direction(x, axis="rows", transposed=False, group=group)
    torch.testing.assert_close(u, F.cosh_brake(F.polar(x, steps=1, coefficients="muon"), 1.5))
    assert rule.polar_flops(10, 16, group) == F.polar_flops(10, 16, 1) > 0


# ----- the optimizer, recipes and errors (single process) -----

@pytest.mark.parametrize("recipe,overrides", [
    ("spectra", {}),
    ("spectra", {"attention": {"base": "muon", "clip_c": 0.5, "lr": 5e-3}, "mlp": {"base": "sign", "lr": 1e-3}}),
    ("auon", {}),
    ("auon", {"mlp": {"rule": "auon_hybrid"}, "attention": {"normalize": False, "scale": "none"}}),
    ("spectra", {"attention": {"rule": "spectra_preclip", "pre_clip_c": 4.0, "per_head": True},
                 "mlp": {"rule": "spectra_preclip", "clip_c": 3.0}}),
    ("spectra", {"attention": {"rule": "spectra_preclip_momentum", "base": "muon", "clip_c": 0.5, "lr": 5e-3,
                               "pre_clip_c": 4.0},
                 "mlp": {"rule": "spectra_preclip_momentum", "base": "sign", "pre_clip_c": 3.0, "lr": 1e-3}}),
], ids=["spectra-adamw", "spectra-muon-sign", "auon", "auon-hybrid-raw", "spectra-preclip",
        "spectra-preclip-muon-sign"])
@pytest.mark.parametrize("model_name", ["qwen3", "olmoe"])
def test_optimizer_equals_reference(model_name, recipe, overrides):
    model = MODELS[model_name](seed=1)
    opt = dist_spectral.build_optimizer(model, recipe, **overrides)
    groups, _, infos = resolve_groups(MODELS[model_name](seed=1), recipe, **overrides)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = reference.ReferenceOptimizer([{"params": [(i.name, params[i.name]) for i in g.members], "rule": g.rule,
                                         **g.hyper} for g in groups], {i.name: i for i in infos})
    for step in range(3):
        grads = {n: synthetic_grad(n, tuple(p.shape), step) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        ref.step(grads)
    for n, p in model.named_parameters():
        # Measured: at most 1.2e-7 of the largest |W|, one and two threads (fp32 rounding of batched vs
        # looped iterations).
        assert (params[n] - p.detach()).abs().max() <= 3e-7 * max(float(params[n].abs().max()), 1.0), n
        for key, value in ref.state[n].items():
            if key != "step":
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recipe", ["spectra", "auon"])
def test_recipe_trains(recipe):
    torch.manual_seed(0)
    model = MODELS["qwen3"](seed=0)
    opt = dist_spectral.build_optimizer(model, recipe)
    ids = [torch.randint(0, 97, (4, 1), generator=torch.Generator().manual_seed(0))]
    for _ in range(23):  # a learnable sequence: token t+1 = (3 * token t + 1) mod 97
        ids.append((3 * ids[-1] + 1) % 97)
    ids = torch.cat(ids, 1)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("recipe", list_recipes())
@pytest.mark.parametrize("model_name", ["qwen3", "olmoe"])
def test_every_recipe_builds(recipe, model_name):
    opt = dist_spectral.build_optimizer(MODELS[model_name](seed=0), recipe)
    assert opt.param_groups


def test_recipe_rules():
    opt = dist_spectral.build_optimizer(MODELS["olmoe"](seed=0), "spectra")
    rules = {g["name"]: (g["rule"], g.get("base")) for g in opt.param_groups}
    assert rules["attention"] == rules["mlp"] == ("spectra", "adamw")
    opt = dist_spectral.build_optimizer(MODELS["olmoe"](seed=0), "auon")
    assert {g["name"]: g["rule"] for g in opt.param_groups}["mlp"] == "auon"


@pytest.mark.parametrize("recipe,overrides,message", [
    ("spectra", {"mlp": {"base": "adam"}}, "group 'mlp' (rule 'spectra'"),
    ("spectra", {"mlp": {"base": "adam"}}, "base='adam'; use one of 'adamw', 'sign', 'muon'"),
    ("spectra", {"attention": {"clip_c": 0}}, "clip_c=0; it must be a number > 0"),
    ("spectra", {"attention": {"clip_c": "big"}}, "clip_c='big'"),
    ("spectra", {"attention": {"clip_steps": 0}}, "clip_steps=0; it must be an integer >= 1"),
    ("spectra", {"attention": {"betas": [0.9, 1.0]}}, "betas=(0.9, 1.0); it must be two numbers in [0, 1)"),
    ("spectra", {"attention": {"scale": "none"}}, "scale='none'; use 'spectral' or 'rms'"),
    ("spectra", {"attention": {"pre_clip_c": 1.0}},
     "group 'attention' sets 'pre_clip_c', which rule 'spectra' does not take"),
    ("spectra", {"attention": {"rule": "spectra_preclip", "pre_clip_c": 0}},
     "spectra_preclip: pre_clip_c=0; it must be a number > 0 (.inf turns the clip off) or None (the same as clip_c)"),
    ("spectra", {"attention": {"rule": "spectra_preclip", "pre_clip_c": "big"}}, "pre_clip_c='big'"),
    ("spectra", {"attention": {"rule": "spectra_preclip", "pre_clip_steps": 0}},
     "pre_clip_steps=0; it must be an integer >= 1"),
    ("spectra", {"attention": {"rule": "spectra_preclip", "base": "sign"}},
     "spectra_preclip: base='sign'; use one of 'adamw' (the 'sign' base keeps momentum_buffer, not exp_avg, "
     "exp_avg_sq: use rule 'spectra_preclip_momentum')"),
    ("spectra", {"mlp": {"rule": "spectra_preclip_momentum", "base": "adamw"}},
     "base='adamw'; use one of 'sign', 'muon' (the 'adamw' base keeps exp_avg, exp_avg_sq, not momentum_buffer: "
     "use rule 'spectra_preclip')"),
    ("spectra", {"mlp": {"rule": "spectra_preclip_momentum", "base": "adam"}},
     "base='adam'; use one of 'sign', 'muon'"),
    ("auon", {"mlp": {"gamma": -1.5}}, "gamma=-1.5; it must be a finite number > 0"),
    ("auon", {"mlp": {"beta": 1.0}}, "beta=1.0; it must be in [0, 1)"),
    ("auon", {"attention": {"scale": "muon"}}, "scale='muon'; use one of 'spectral', 'rms', 'none'"),
    ("auon", {"attention": {"clip_c": 1.0}}, "group 'attention' sets 'clip_c', which rule 'auon' does not take"),
])
def test_bad_hyperparameters_name_the_parameter(recipe, overrides, message):
    model = MODELS["qwen3"](seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        dist_spectral.build_optimizer(model, recipe, **overrides)
    assert message in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
