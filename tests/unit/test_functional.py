"""dist_spectral.functional against float64 SVD / eigh oracles, equivariance, degenerate inputs.

Bounds are measured, then given 2–3× headroom; the comment gives the largest value measured over the
seeds below and three other seed sets (offsets 1000, 2000, 3000). fp32 runs on CPU are deterministic,
so each bound is tight for the seeds used.
"""
from __future__ import annotations

import pytest
import torch

from dist_spectral.functional import (
    MUON_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    center_rows,
    centered_row_norm,
    col_norm,
    hybrid,
    inv_sqrt,
    left_spectral,
    muon_scale,
    nuclear_norm_scale,
    polar,
    polar_flops,
    right_spectral,
    row_norm,
)

f64 = torch.float64

# The table in docs/update-rules.md#coefficient-sets, typed again here so a typo in the module is caught.
SPEC_POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]


# ---------------------------------------------------------------- helpers and oracles


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64).to(dtype)


def orthogonal(n, seed, dtype=torch.float32):
    q, r = torch.linalg.qr(randn(n, n, seed=seed, dtype=f64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def permutation(n, seed, dtype=torch.float32):
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.eye(n, dtype=dtype)[idx]


def with_condition(m, n, cond, seed):
    """m×n, singular values log-spaced from 1 down to 1/cond, random singular vectors."""
    k = min(m, n)
    u = orthogonal(m, seed, f64)[:, :k]
    v = orthogonal(n, seed + 1, f64)[:, :k]
    return (u * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=f64)) @ v.T


def svd_polar(x, rank_tol=None):
    """float64 ``U_r V_rᵀ`` and the nuclear norm, over singular values above ``rank_tol·σ_max``."""
    u, s, vh = torch.linalg.svd(x.to(f64), full_matrices=False)
    keep = s > (rank_tol or 0.0) * s.max()
    return u[:, keep] @ vh[keep], s[keep].sum()


def polynomial_oracle(x, triples, scale):
    """The quintic iteration applied to float64 singular values: ``U p_k(…p_1(Σ/(s‖X‖_F)))Vᵀ``."""
    u, s, vh = torch.linalg.svd(x.to(f64), full_matrices=False)
    s = s / (scale * s.norm() + 1e-7)
    for a, b, c in triples:
        s = a * s + b * s**3 + c * s**5
    return (u * s) @ vh


def safety_table(steps, safety=1.01):
    t = [(a / safety, b / safety**3, c / safety**5) for a, b, c in SPEC_POLAR_EXPRESS[:-1]]
    t.append(SPEC_POLAR_EXPRESS[-1])
    return [t[min(i, 7)] for i in range(steps)]


def svals(x):
    return torch.linalg.svdvals(x.to(f64))


def ones_row(m, dtype=torch.float32):
    return torch.ones(1, m, dtype=dtype)


# ---------------------------------------------------------------- polar: accuracy


def test_coefficient_table_matches_spec():
    assert list(POLAR_EXPRESS_COEFFICIENTS) == SPEC_POLAR_EXPRESS
    assert MUON_COEFFICIENTS == (3.4445, -4.7750, 2.0315)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_polar_express_gaussian_singular_values(seed):
    x = randn(64, 256, seed=seed)
    s5, s8 = svals(polar(x, steps=5)), svals(polar(x, steps=8))
    assert 0.87 <= s5.min() and s5.max() <= 1.13  # measured [0.876, 1.123]
    assert s5.min() < 0.95  # five steps are not converged: the 8-step bound would be wrong here
    assert 0.9999 <= s8.min() and s8.max() <= 1.0001  # measured 1 ± 2e-7
    ref, _ = svd_polar(x)
    assert (polar(x, steps=8).to(f64) - ref).abs().max() < 1e-5  # singular vectors; measured 9e-7


@pytest.mark.parametrize("seed", [21, 22])
def test_polar_express_condition_1e3(seed):
    x = with_condition(64, 128, 1e3, seed).float()
    s5, s8 = svals(polar(x, steps=5)), svals(polar(x, steps=8))
    assert 0.30 <= s5.min() and s5.max() <= 1.13  # measured [0.42, 1.123]
    assert 0.99 <= s8.min() and s8.max() <= 1.0001  # measured [0.9995, 1 + 3e-7]
    ref, _ = svd_polar(x)
    assert (polar(x, steps=8).to(f64) - ref).abs().max() < 4e-4  # measured 4e-5 (σ_min = 0.9995)


def test_muon_quintic_never_converges():
    x = randn(64, 256, seed=31)
    for steps in (5, 20):
        s = svals(polar(x, steps=steps, coefficients="muon"))
        assert 0.6 <= s.min() and s.max() <= 1.2  # measured [0.682, 1.134] at 5 and at 20
        assert s.min() < 0.75 and s.max() > 1.1  # still oscillating after 20 steps


@pytest.mark.parametrize(
    "shape,steps,coefficients",
    [((64, 256), 5, "polar_express"), ((256, 64), 10, "polar_express"), ((32, 32), 3, "muon"),
     ((48, 80), 4, [(3.0, -3.2, 1.2), (1.875, -1.25, 0.375)])],
)
def test_polar_matches_polynomial_on_svd(shape, steps, coefficients):
    """The whole schedule (normalisation, safety, table order, repetition) against float64 SVD."""
    x = randn(*shape, seed=41 + steps)
    if coefficients == "polar_express":
        triples, scale = safety_table(steps), 1.01
    elif coefficients == "muon":
        triples, scale = [MUON_COEFFICIENTS] * steps, 1.0
    else:
        triples, scale = [coefficients[min(i, 1)] for i in range(steps)], 1.0
    ref = polynomial_oracle(x, triples, scale)
    assert (polar(x, steps, coefficients).to(f64) - ref).abs().max() < 1e-5  # measured 1.5e-6
    got64 = polar(x.to(f64), steps, coefficients, dtype=f64)
    assert (got64 - ref).abs().max() < 1e-14  # dtype= really overrides: measured 3.5e-15


def test_polar_safety_parameter_is_used():
    x = randn(40, 90, seed=51)
    ref = polynomial_oracle(x, safety_table(5, 1.05), 1.05)
    assert (polar(x, 5, safety=1.05).to(f64) - ref).abs().max() < 2e-6  # measured 8e-7
    assert (polar(x, 5, safety=1.01).to(f64) - ref).abs().max() > 1e-3


# ---------------------------------------------------------------- polar: symmetry, shapes, dtypes


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24), (16, 16)])
def test_polar_biorthogonal_equivariance(m, n):
    x = randn(m, n, seed=61 + m)
    q1, q2 = orthogonal(m, 62 + n), orthogonal(n, 63 + m)
    lhs = polar(q1 @ x @ q2.T)
    assert (lhs - q1 @ polar(x) @ q2.T).abs().max() < 1e-5  # measured 1.5e-6
    x, q1, q2 = x.to(f64), orthogonal(m, 62 + n, f64), orthogonal(n, 63 + m, f64)
    lhs64 = polar(q1 @ x @ q2.T, dtype=f64)
    assert (lhs64 - q1 @ polar(x, dtype=f64) @ q2.T).abs().max() < 3e-14  # measured 1e-14


def test_polar_tall_is_transpose_of_wide_and_batched_is_loop():
    x = randn(3, 2, 20, 52, seed=71)
    out = polar(x)
    for i in range(3):
        for j in range(2):
            assert (out[i, j] - polar(x[i, j])).abs().max() < 1e-7  # measured 0 (an ulp of slack for other BLAS)
    assert (polar(x.mT) - out.mT).abs().max() < 1e-7  # measured 0: the tall case runs as the wide one transposed
    assert polar(x.mT).is_contiguous()


def test_polar_dtypes():
    x = randn(24, 48, seed=81)
    out = polar(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - polar(x)).abs().max() < 0.05  # bf16 input rounding + bf16 output
    bf16_iter = polar(x, dtype=torch.bfloat16)
    assert bf16_iter.dtype == torch.float32
    diff = (bf16_iter - polar(x)).abs().max()
    assert 1e-4 < diff < 0.05  # bf16 iteration really ran: measured 5e-3


def test_polar_flops_and_muon_scale():
    assert polar_flops(64, 256, 5) == 5 * (4 * 64 * 64 * 256 + 2 * 64**3)
    assert polar_flops(256, 64, 5) == polar_flops(64, 256, 5)
    assert muon_scale(1024, 256) == pytest.approx(2.0)
    assert muon_scale(256, 1024) == 1.0
    assert muon_scale(1024, 256, kind="rms") == pytest.approx(0.2 * 32)
    with pytest.raises(ValueError):
        muon_scale(4, 4, kind="adam")
    with pytest.raises(ValueError):
        polar(randn(4, 4, seed=0), coefficients="newton")


# ---------------------------------------------------------------- row / column / centred rules


@pytest.mark.parametrize("seed", [101, 102])
def test_row_norm_unit_rows_and_equivariance(seed):
    x = randn(12, 20, seed=seed)
    x[3] = 0
    out = row_norm(x)
    norms = out.norm(dim=-1)
    assert torch.all(out[3] == 0)
    assert torch.allclose(norms[torch.arange(12) != 3], torch.ones(11), rtol=0, atol=4e-7)  # measured 1.2e-7
    p, q = permutation(12, seed), orthogonal(20, seed)
    assert (row_norm(p @ x @ q.T) - p @ out @ q.T).abs().max() < 5e-7  # measured 1.8e-7


@pytest.mark.parametrize("seed", [111, 112])
def test_col_norm_unit_columns_and_equivariance(seed):
    x = randn(20, 12, seed=seed)
    out = col_norm(x)
    assert torch.allclose(out.norm(dim=-2), torch.ones(12), rtol=0, atol=4e-7)  # measured 1.2e-7
    assert torch.equal(out, row_norm(x.mT).mT)
    q, p = orthogonal(20, seed), permutation(12, seed)
    assert (col_norm(q @ x @ p.T) - q @ out @ p.T).abs().max() < 5e-7  # measured 2.1e-7


@pytest.mark.parametrize("seed", [121, 122])
def test_centred_rules_are_shift_free(seed):
    x = randn(10, 16, seed=seed)
    shift = ones_row(10).T @ randn(1, 16, seed=seed + 1)  # 1 aᵀ
    assert center_rows(x).sum(dim=0).abs().max() < 1e-5
    assert (center_rows(x + shift) - center_rows(x)).abs().max() < 6e-7  # measured 2.4e-7
    out = centered_row_norm(x)
    assert out.sum(dim=0).abs().max() < 4e-7  # measured 1.2e-7
    assert (centered_row_norm(x + 10 * shift) - out).abs().max() < 1e-6  # measured 3.9e-7
    p, q = permutation(10, seed), orthogonal(16, seed)
    assert (centered_row_norm(p @ x @ q.T) - p @ out @ q.T).abs().max() < 5e-7  # measured 1.8e-7
    # the inner C matters: row_norm without it is not shift-invariant
    assert (center_rows(row_norm(x + shift)) - out).abs().max() > 1e-2


# ---------------------------------------------------------------- ν, inverse square root


def test_nuclear_norm_scale():
    x = randn(2, 9, 14, seed=131, dtype=f64)
    ref = torch.stack([svd_polar(xi)[0] for xi in x])
    nu = nuclear_norm_scale(x, ref, 1.0)
    assert nu.shape == (2, 1, 1)
    assert torch.allclose(nu.flatten(), torch.linalg.svdvals(x).sum(-1), rtol=2e-15, atol=0)  # measured 4.5e-16
    assert torch.allclose(nuclear_norm_scale(x, ref, 0.5), nu.sqrt(), rtol=2e-15, atol=0)  # measured 0
    zero = torch.zeros(3, 4)
    assert torch.equal(nuclear_norm_scale(zero, zero, 0.0), torch.ones(1, 1))
    assert torch.equal(nuclear_norm_scale(x, ref, 0.0), torch.ones(2, 1, 1, dtype=f64))


def regularised_inv_sqrt(a, eps):
    """Independent oracle: float64 eigh, ``(λ + eps‖A‖_F)^{-½}``, no cutoff."""
    lam, v = torch.linalg.eigh(a.to(f64))
    reg = eps * torch.linalg.matrix_norm(a.to(f64))[..., None]
    return (v * (lam.clamp_min(0) + reg).rsqrt().unsqueeze(-2)) @ v.mT


@pytest.mark.parametrize("k", [8, 48])
def test_inv_sqrt_newton_schulz_against_eigh(k):
    x = randn(3, k, 2 * k, seed=141 + k)
    a = x @ x.mT
    ref = regularised_inv_sqrt(a, 1e-7)
    rel = lambda got: ((got.to(f64) - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(inv_sqrt(a)) < 1.5e-6  # fp32 NS: measured 5.4e-7
    assert rel(inv_sqrt(a.to(f64))) < 1e-14  # fp64 NS, default 24 steps: converged, measured 2.6e-15
    assert rel(inv_sqrt(a.to(f64), method="eigh")) < 1e-14  # measured 0
    assert rel(inv_sqrt(a, steps=3)) > 1e-3  # steps is honoured; 3 steps are far from converged
    # An independent check that does not use eigh: Z A Z = I.
    z = inv_sqrt(a.to(f64))
    assert torch.allclose(z @ a.to(f64) @ z, torch.eye(k, dtype=f64).expand(3, k, k), atol=1e-5)


def test_inv_sqrt_ill_conditioned_converges_in_fp64():
    q = orthogonal(32, 151, f64)
    a = (q * torch.logspace(0, -6, 32, dtype=f64)) @ q.T
    ref = regularised_inv_sqrt(a, 1e-7)
    assert ((inv_sqrt(a) - ref).norm() / ref.norm()) < 4e-11  # measured 1.4e-11
    assert ((inv_sqrt(a.float()).to(f64) - ref).norm() / ref.norm()) < 1e-2  # fp32 A: measured 3.7e-3


def test_inv_sqrt_eigh_pseudo_inverse_drops_null_space():
    m = center_rows(randn(6, 20, seed=161, dtype=f64))
    g = m @ m.T  # singular along 1
    z = inv_sqrt(g, eps=0.0, method="eigh")
    assert z.abs().max() < 1.0  # measured 0.34; inverting the null eigenvalue (≈1e-15·λ_max) gives ~1e7
    assert (z @ torch.ones(6, 1, dtype=f64)).abs().max() < 2e-15  # measured 6.7e-16
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    ref = (u[:, :5] / s[:5]) @ u[:, :5].T  # (G⁺)^{½} over the 5 non-zero directions
    assert (z - ref).abs().max() < 2e-15  # measured 5e-16


# ---------------------------------------------------------------- right / left spectral


@pytest.mark.parametrize("m,n", [(48, 16), (16, 48), (24, 24)])
def test_right_spectral_is_nu_scaled_polar(m, n):
    x = randn(m, n, seed=171 + m, dtype=f64)
    ref, nu = svd_polar(x)
    assert (right_spectral(x, alpha=0.0, eps=0.0) - ref).abs().max() < 6e-13  # measured 2.1e-13
    assert (right_spectral(x, alpha=1.0, eps=0.0) - nu * ref).abs().max() < 6e-13 * nu  # measured 2.1e-13
    # fp32, default eps and method; a square Gaussian has a tiny σ_min, so eps·‖XᵀX‖_F matters
    err = (right_spectral(x.float(), alpha=0.0).to(f64) - ref).abs().max()
    assert err < (3e-3 if m == n else 4e-6)  # measured 2.7e-4 (24×24), 4e-7 (rectangular)


def test_right_spectral_equivariance_and_centering():
    x = randn(30, 12, seed=181)
    p, q1, q2 = permutation(30, 182), orthogonal(30, 183), orthogonal(12, 184)
    out = right_spectral(x)
    assert ((right_spectral(x.mT) - out.mT).abs().max() / out.abs().max()) < 1e-6  # other Gram; measured 3.4e-7
    assert ((right_spectral(p @ x @ q2.T) - p @ out @ q2.T).abs().max() / out.abs().max()) < 2e-6  # measured 8.1e-7
    assert ((right_spectral(q1 @ x @ q2.T) - q1 @ out @ q2.T).abs().max() / out.abs().max()) < 2e-6  # measured 7.4e-7
    c = right_spectral(x, center=True)
    shift = ones_row(30).T @ randn(1, 12, seed=185)
    assert c.sum(dim=0).abs().max() < 1e-6 * c.abs().max()  # measured 4.1e-7
    assert ((right_spectral(x + shift, center=True) - c).abs().max() / c.abs().max()) < 1.5e-6  # measured 4.9e-7
    assert ((right_spectral(p @ x @ q2.T, center=True) - p @ c @ q2.T).abs().max()) < 3e-6 * c.abs().max()  # 9.8e-7
    ref, nu = svd_polar(center_rows(x.to(f64)))
    assert ((c.to(f64) - nu * ref).abs().max() / nu) < 1.5e-6  # measured 5.4e-7


@pytest.mark.parametrize("e,d,seed", [(8, 32, 191), (16, 24, 192), (6, 6, 193), (32, 8, 194), (128, 16, 195)])
def test_left_spectral_against_svd(e, d, seed):
    """Wide routers invert the e×e Gram, tall ones (more experts than the width) the d×d one."""
    m = randn(e, d, seed=seed, dtype=f64)
    mc = center_rows(m)
    ref, nu = svd_polar(mc, rank_tol=1e-6)  # drops the exact zero along 1
    assert torch.linalg.matrix_rank(mc) == min(e - 1, d) and ref.shape == (e, d)
    assert (left_spectral(m, alpha=1.0, eps=0.0) - nu * ref).abs().max() < 7e-15 * nu  # measured 2.3e-15
    got32 = left_spectral(m.float(), alpha=0.0)
    assert (got32.to(f64) - ref).abs().max() < 2e-5  # measured 1.5e-7 … 2.1e-6
    ns = left_spectral(m.float(), alpha=0.0, method="newton_schulz")
    assert (ns.to(f64) - ref).abs().max() < 5e-4  # measured 2.4e-5 … 5.5e-5 (ε on small σ²)
    # uncentred: the plain ν-scaled polar factor, not shift-free
    ref_u, nu_u = svd_polar(m)
    unc = left_spectral(m, alpha=1.0, center=False, eps=0.0)
    assert (unc - nu_u * ref_u).abs().max() < 1e-13 * nu_u  # measured 3.8e-14
    assert unc.sum(dim=0).abs().max() > 1e-3


def test_left_spectral_router_symmetries():
    m = randn(8, 40, seed=201)
    out = left_spectral(m)
    p, q = permutation(8, 202), orthogonal(40, 203)
    scale = out.abs().max()
    assert (left_spectral(p @ m) - p @ out).abs().max() < 5e-7 * scale  # experts permuted; measured 1.6e-7
    assert (left_spectral(m @ q.T) - out @ q.T).abs().max() < 2e-6 * scale  # right rotation; measured 7.3e-7
    assert out.sum(dim=0).abs().max() < 5e-7 * scale  # 1ᵀU = 0; measured 1.5e-7
    shift = ones_row(8).T @ randn(1, 40, seed=204)
    assert (left_spectral(m + 3 * shift) - out).abs().max() < 6e-7 * scale  # measured 2e-7


def test_spectral_rules_are_homogeneous():
    """Relative eps: f(cX) = c^α f(X), even for tiny gradients."""
    x = randn(12, 30, seed=211)
    for fn in (right_spectral, left_spectral):
        for alpha in (0.0, 1.0):
            out = fn(x, alpha=alpha)
            scaled = fn(x * 1e-4, alpha=alpha)
            assert (scaled - out * 1e-4**alpha).abs().max() < 1e-6 * out.abs().max() * 1e-4**alpha  # 4e-7


# ---------------------------------------------------------------- hybrid


def test_hybrid_row_then_polar_against_svd():
    x = randn(40, 24, seed=221, dtype=f64)
    n = row_norm(x)
    ref, nu = svd_polar(n)
    got = hybrid(x, steps=10, dtype=f64)
    assert (got - nu * ref).abs().max() < 5e-15 * nu  # converged polar of R(X); measured 1.7e-15
    assert (hybrid(x, alpha=0.0, steps=10, dtype=f64) - ref).abs().max() < 5e-15  # measured 1.6e-15
    assert (hybrid(x, steps=5, dtype=f64) - got).abs().max() > 1e-3  # polar kwargs reach polar


@pytest.mark.parametrize("order", ["row_then_polar", "polar_then_row"])
def test_hybrid_equivariance(order):
    x = randn(20, 14, seed=231)
    p_rows, q_right = permutation(20, 232), orthogonal(14, 233)
    out = hybrid(x, order=order)
    scale = out.abs().max()
    assert (hybrid(p_rows @ x @ q_right.T, order=order) - p_rows @ out @ q_right.T).abs().max() < 1.5e-5 * scale  # 4.6e-6
    # left=True: the column-aware version, f(Q X Pᵀ) = Q f(X) Pᵀ
    q_left, p_cols = orthogonal(20, 234), permutation(14, 235)
    out_l = hybrid(x, order=order, left=True)
    got_l = hybrid(q_left @ x @ p_cols.T, order=order, left=True)
    assert (got_l - q_left @ out_l @ p_cols.T).abs().max() < 1e-5 * out_l.abs().max()  # measured 3.3e-6
    # row normalisation really happens on the chosen side (measured: the rules differ by O(1))
    assert (out_l - out).abs().max() > 1e-2 * scale


def test_hybrid_polar_then_row_has_rows_of_norm_nu():
    x = randn(16, 24, seed=241)
    out = hybrid(x, alpha=0.0, order="polar_then_row")
    assert torch.allclose(out.norm(dim=-1), torch.ones(16), rtol=0, atol=4e-7)  # measured 1.2e-7
    assert torch.allclose(out, row_norm(polar(x)), rtol=0, atol=1e-7)  # measured 0


def test_hybrid_centred():
    x = randn(18, 10, seed=251)
    shift = ones_row(18).T @ randn(1, 10, seed=252)
    for order in ("row_then_polar", "polar_then_row"):
        out = hybrid(x, center=True, order=order)
        scale = out.abs().max()
        assert out.sum(dim=0).abs().max() < 1e-6 * scale  # measured 3.9e-7
        assert (hybrid(x + 5 * shift, center=True, order=order) - out).abs().max() < 1e-5 * scale  # measured 4e-6
    n = center_rows(row_norm(center_rows(x.to(f64))))
    ref, nu = svd_polar(n, rank_tol=1e-9)
    got = hybrid(x.to(f64), center=True, steps=12, dtype=f64)
    assert (got - nu * ref).abs().max() < 5e-15 * nu  # measured 1.7e-15


# ---------------------------------------------------------------- every function: degenerate, batched, dtypes

ALL_RULES = {
    "polar": polar,
    "polar_muon": lambda x: polar(x, coefficients="muon"),
    "row_norm": row_norm,
    "col_norm": col_norm,
    "center_rows": center_rows,
    "centered_row_norm": centered_row_norm,
    "right_spectral": right_spectral,
    "right_spectral_centred": lambda x: right_spectral(x, center=True),
    "right_spectral_eigh": lambda x: right_spectral(x, method="eigh"),
    "left_spectral": left_spectral,
    "left_spectral_ns": lambda x: left_spectral(x, method="newton_schulz"),
    "left_spectral_uncentred": lambda x: left_spectral(x, center=False),
    "hybrid": hybrid,
    "hybrid_centred": lambda x: hybrid(x, center=True),
    "hybrid_left": lambda x: hybrid(x, left=True),
    "hybrid_polar_then_row": lambda x: hybrid(x, order="polar_then_row"),
}


def degenerate_inputs():
    rank1 = randn(9, 1, seed=261) @ randn(1, 7, seed=262)
    zero_rows = randn(9, 7, seed=263)
    zero_rows[[0, 4]] = 0
    return {
        "zero": torch.zeros(9, 7),
        "zero_rows": zero_rows,
        "row_vector": randn(1, 7, seed=264),
        "column_vector": randn(9, 1, seed=265),
        "rank1": rank1,
        "equal_rows": ones_row(9).T @ randn(1, 7, seed=266),  # centres to exactly zero
    }


@pytest.mark.parametrize("rule", sorted(ALL_RULES))
def test_degenerate_inputs_give_finite_output(rule):
    fn = ALL_RULES[rule]
    for name, x in degenerate_inputs().items():
        out = fn(x)
        assert out.shape == x.shape, name
        assert torch.isfinite(out).all(), f"{rule} on {name}"
    assert torch.equal(fn(torch.zeros(5, 3)), torch.zeros(5, 3))


@pytest.mark.parametrize("rule", sorted(ALL_RULES))
def test_batched_equals_loop_and_dtype_round_trip(rule):
    fn = ALL_RULES[rule]
    x = randn(3, 2, 10, 6, seed=271)
    out = fn(x)
    assert out.shape == x.shape
    scale = out.abs().max()
    for i in range(3):
        for j in range(2):
            assert (out[i, j] - fn(x[i, j])).abs().max() <= 3e-6 * scale  # measured 9.7e-7
    assert fn(x.bfloat16()).dtype == torch.bfloat16
    assert fn(x.to(f64)).dtype == f64


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        polar(torch.ones(3))
    with pytest.raises(ValueError):
        polar(torch.ones(3, 4), coefficients=MUON_COEFFICIENTS)  # one triple, not a sequence
    with pytest.raises(ValueError):
        inv_sqrt(torch.ones(3, 4))
    with pytest.raises(ValueError):
        inv_sqrt(torch.eye(3), method="cholesky")
    with pytest.raises(ValueError):
        hybrid(torch.ones(3, 4), order="sideways")
    with pytest.raises(ValueError):
        nuclear_norm_scale(torch.ones(3, 4), torch.ones(3, 4), -1.0)


def test_no_torch_distributed_in_functional():
    import pathlib

    import dist_spectral.functional as functional

    for path in pathlib.Path(functional.__file__).parent.glob("*.py"):
        code = "\n".join(line for line in path.read_text().splitlines()
                         if line.lstrip().startswith(("import ", "from ")))
        assert "distributed" not in code, path


@pytest.mark.parametrize("shape", [(12, 64, 64), (7, 96, 48)])
def test_polar_on_cpu_chunks_batches_without_changing_results(shape, monkeypatch):
    """On CPU a large batch is iterated a few matrices at a time (cache-sized chunks): every
    matrix must come out bit for bit as it does alone, whatever chunk it fell in. One thread:
    with several, the BLAS splits a lone matrix's GEMM across threads (a different summation
    order, up to 9e-7 apart on 2 threads) but a batch by matrix, so "alone" would not mean the
    same arithmetic."""
    import importlib

    polar_module = importlib.import_module("dist_spectral.functional.polar")  # the package re-exports polar()

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s, l = min(shape[1:]), max(shape[1:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(polar_module, "CPU_CHUNK_BYTES", 5 * (2 * s * l + 2 * s * s) * 4)  # chunks of 5
        assert polar_module._cpu_chunk(s, l, 4) == 5
        batched = polar(x)
        alone = torch.stack([polar(x[i:i + 1])[0] for i in range(shape[0])])
        torch.testing.assert_close(batched, alone, rtol=0, atol=0)
        monkeypatch.setattr(polar_module, "CPU_CHUNK_BYTES", 1 << 40)  # one batch
        torch.testing.assert_close(polar(x), batched, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(2, 16, 64), (3, 96, 24), (1, 32, 48)])
@pytest.mark.parametrize("coefficients,steps", [("polar_express", 5), ("polar_express", 8), ("muon", 5)])
def test_gram_form_is_the_same_map_as_the_standard_form(shape, coefficients, steps):
    """In float64 Gram Newton–Schulz (restarts included) equals the standard iteration."""
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    standard = polar(x, steps=steps, coefficients=coefficients, dtype=torch.float64)
    gram = polar(x, steps=steps, coefficients=coefficients, dtype=torch.float64, form="gram")
    torch.testing.assert_close(gram, standard, rtol=0, atol=1e-14)  # measured 3.6e-15


def test_gram_form_keeps_fp32_accuracy_on_ill_conditioned_inputs():
    """The restarts matter: without them this input drifts to 6e-4 in fp32; the standard form gives 7e-6."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(256, 64, dtype=torch.float64, generator=g))
    x = (u * torch.logspace(0, -3, 64, dtype=torch.float64)) @ v.T
    exact = polar(x, dtype=torch.float64)  # standard form
    for form in ("standard", "gram"):
        err = (polar(x.float(), form=form).double() - exact).abs().max() / exact.abs().max()
        assert err < 2e-5, (form, float(err))


@pytest.mark.parametrize("m,n", [(64, 256), (256, 64), (64, 64), (64, 96), (32, 256)])
def test_polar_flops_count_what_polar_runs(m, n):
    """polar_flops equals torch's own count of the GEMMs polar runs, in both forms; the Gram form is
    used only where it is cheaper (l ≥ about 2s)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, m, n)
    for form in ("standard", "gram"):
        counter = FlopCounterMode(display=False)
        with counter:
            polar(x, form=form)
        assert counter.get_total_flops() == 2 * polar_flops(m, n, 5, form), form
    s, l = min(m, n), max(m, n)
    assert (polar_flops(m, n, 5, "gram") < polar_flops(m, n, 5)) == (l >= 2 * s)
    with pytest.raises(ValueError, match="form"):
        polar(x, form="fast")
