"""Conda and ARO (its Adam base too): the rules' math against independent constructions (float64), and the optimizer
contract for rules with whole-matrix state (state_dict round trip, recipes, bad hyperparameters)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import dist_spectral
from dist_spectral.neighbours import square
from dist_spectral.neighbours.aro import BASES, aro, aro_adam, q_factor
from dist_spectral.neighbours.conda import conda, left_basis, refreshes
from dist_spectral.rules import get_rule
from tests.tiny import MODELS, synthetic_grad

CONDA = dict(betas=(0.9, 0.99), eps=1e-8, interval=2, scale=1.0)
ARO = dict(base="sinkhorn", scale=1.0, eps=1e-8, sinkhorn_steps=5)
ARO_ADAM = dict(betas=(0.9, 0.99), eps=1e-8, scale=1.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64)


def orthogonal(k: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(randn(k, k, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def run_conda(grads: list[torch.Tensor], **kw) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Conda over a sequence of ``[B, m, n]`` gradients: (direction, v, packed basis) per step."""
    opts = {**CONDA, **kw}
    m = torch.zeros_like(grads[0])
    v, basis = torch.zeros_like(m), torch.zeros_like(m)
    out = []
    for t, g in enumerate(grads, start=1):
        m = m.lerp(g, 1 - opts["betas"][0])
        d, v, basis = conda(m, g, v, basis, step=t, **opts)
        out.append((d, v, basis))
    return out


def run_aro(moments: list[torch.Tensor], rotation: torch.Tensor | None = None, first_step: int = 1, **kw):
    """ARO over a sequence of ``[B, m, n]`` momenta: (direction, packed rotation) per step."""
    opts = {**ARO, **kw}
    rotation = torch.zeros_like(moments[0]) if rotation is None else rotation
    out = []
    for t, m in enumerate(moments, start=first_step):
        d, rotation = aro(m, rotation, step=t, **opts)
        out.append((d, rotation))
    return out


# ----- Conda -----
def test_conda_in_an_identity_basis_is_adam():
    """Gradients ``diag(d_t) H`` (orthonormal rows H, d decreasing) keep the momentum's left singular
    vectors at I: Conda is then Adam with bias correction, step for step, basis refreshes included."""
    k, n, steps = 4, 9, 5
    h = torch.linalg.qr(randn(n, k, seed=1))[0].T  # k × n, orthonormal rows
    grads = [(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64) * (1 + 0.1 * t)) @ h)[None]
             for t in range(steps)]
    b1, b2 = CONDA["betas"]
    m = v = torch.zeros_like(grads[0])
    for t, ((d, _, basis), g) in enumerate(zip(run_conda(grads), grads), start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        adam = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + CONDA["eps"])
        torch.testing.assert_close(d, adam, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(square.unpack(basis, k), torch.eye(k, dtype=torch.float64)[None], atol=1e-12, rtol=0)


def test_conda_without_averaging_is_sign_descent_in_the_singular_basis():
    """β₁ = β₂ = 0, T = 1: ``D = U sign(Uᵀ G)`` with U the left singular vectors of G (from a separate SVD)."""
    g = randn(2, 5, 8, seed=2)
    (d, _, _), = run_conda([g], betas=(0.0, 0.0), eps=1e-14, interval=1)
    u = torch.linalg.svd(g, full_matrices=False).U
    torch.testing.assert_close(d, u @ torch.sign(u.mT @ g), rtol=1e-9, atol=1e-9)


def test_conda_is_equivariant_under_rotations_of_its_basis_side_and_permutations_of_the_other():
    """Wide blocks: ``Conda(Q G P) = Q Conda(G) P`` (Q rotates the rows, P permutes the columns); tall
    blocks the same with the sides swapped. Five steps, T = 2 (refreshes at 1, 3, 5)."""
    for m, n in ((5, 8), (8, 5)):
        grads = [randn(3, m, n, seed=10 + t) for t in range(5)]
        k, other = min(m, n), max(m, n)
        q = orthogonal(k, seed=3)
        p = torch.eye(other, dtype=torch.float64)[torch.randperm(other, generator=gen(4))]
        if m < n:
            transform = lambda x: q @ x @ p  # noqa: E731
        else:
            transform = lambda x: p.T @ x @ q.T  # noqa: E731
        plain = run_conda(grads)
        moved = run_conda([transform(g) for g in grads])
        for (d, _, _), (d_moved, _, _) in zip(plain, moved):
            torch.testing.assert_close(d_moved, transform(d), rtol=1e-9, atol=1e-10)


def test_conda_update_ignores_the_signs_of_its_basis():
    """Flipping columns of the stored U between refreshes changes neither the update nor v (v sees
    squares; a flipped column flips the matching rotated momentum row back)."""
    grads = [randn(2, 4, 7, seed=20 + t) for t in range(2)]
    (_, v, basis), = run_conda(grads[:1])
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    flipped = square.pack(square.unpack(basis, 4) * flips, (4, 7), basis.dtype)
    m = torch.zeros_like(grads[0]).lerp(grads[0], 1 - CONDA["betas"][0]).lerp(grads[1], 1 - CONDA["betas"][0])
    a = conda(m, grads[1], v, basis, step=2, **CONDA)
    b = conda(m, grads[1], v, flipped, step=2, **CONDA)
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-14)


def test_conda_refreshes_its_basis_every_T_steps_and_keeps_it_orthogonal():
    grads = [randn(2, 6, 4, seed=30 + t) for t in range(6)]
    assert [refreshes(t, 2) for t in range(1, 7)] == [True, False, True, False, True, False]
    bases = [basis for _, _, basis in run_conda(grads, interval=2)]
    for t in range(1, 6):  # basis after step t+1 vs after step t
        changed = not torch.equal(bases[t], bases[t - 1])
        assert changed == refreshes(t + 1, 2), t + 1
    for basis in bases:  # tall 6 × 4 blocks: the 4 × 4 right basis in the first 16 elements
        u = square.unpack(basis, 4)
        torch.testing.assert_close(u.mT @ u, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-12, rtol=0)
        assert torch.count_nonzero(basis.reshape(2, -1)[:, 16:]) == 0


def test_left_basis_sign_convention():
    u = left_basis(randn(3, 4, 6, seed=5))
    biggest = torch.gather(u, -2, u.abs().argmax(dim=-2, keepdim=True))
    assert bool((biggest > 0).all())


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (5, 5), (4, 6)])
def test_conda_and_aro_are_finite_on_degenerate_input(shape):
    zero = torch.zeros(2, *shape, dtype=torch.float64)
    rank_one = randn(2, shape[0], 1, seed=6) @ randn(2, 1, shape[1], seed=7)
    rank_one[:, 0] = 0  # and a zero row
    for g in (zero, rank_one):
        for d, v, basis in run_conda([g, g, g], interval=2):
            assert all(bool(torch.isfinite(x).all()) for x in (d, v, basis))
        for base in BASES:
            for d, r in run_aro([g, g], base=base):
                assert bool(torch.isfinite(d).all()) and bool(torch.isfinite(r).all())


# ----- ARO -----
def test_aro_rotation_is_the_unique_q_factor():
    """``R_t`` is orthogonal and ``R_tᵀ A`` is upper triangular with a non-negative diagonal, for
    ``A = M f(R_{t−1}ᵀ M)ᵀ`` built here independently (row base: f scales rows by √N / norm)."""
    moments = [randn(2, 4, 9, seed=40 + t) for t in range(3)]
    previous = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    for m, (d, packed) in zip(moments, run_aro(moments, base="row")):
        r = square.unpack(packed, 4)
        torch.testing.assert_close(r.mT @ r, torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-12, rtol=0)
        y = previous.mT @ m
        a = m @ (y * (3.0 / y.norm(dim=-1, keepdim=True))).mT
        upper = r.mT @ a
        torch.testing.assert_close(upper, torch.triu(upper), atol=1e-12, rtol=0)
        assert bool((torch.diagonal(upper, dim1=-2, dim2=-1) >= 0).all())
        previous = r


def test_aro_sign_base_moves_by_plus_minus_one_in_the_rotated_frame():
    m = randn(3, 5, 8, seed=8)
    (d, packed), = run_aro([m], base="sign", scale=0.5)
    rotated = square.unpack(packed, 5).mT @ d / 0.5
    torch.testing.assert_close(rotated.abs(), torch.ones_like(rotated), atol=1e-12, rtol=0)
    # the rotation is optimizer-aware: not the momentum's singular basis
    assert not torch.allclose(square.unpack(packed, 5).abs(), left_basis(m).abs(), atol=1e-3)


def test_aro_row_base_converges_to_scaled_polar():
    """With f = row normalisation, ``R_t`` is subspace iteration on ``M Mᵀ``; on a fixed M with
    distinct singular values, ARO's direction tends to ``√N · polar(M)`` (Muon is its fixed point)."""
    k, n = 5, 9
    u = orthogonal(k, seed=9)
    v = torch.linalg.qr(randn(n, k, seed=10))[0]
    m = (u @ torch.diag(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0], dtype=torch.float64)) @ v.T)[None]
    d, _ = run_aro([m] * 120, base="row", eps=1e-15)[-1]
    torch.testing.assert_close(d, math.sqrt(n) * (u @ v.T)[None], atol=1e-9, rtol=0)


@pytest.mark.parametrize("base", BASES)
def test_aro_is_equivariant(base):
    """``ARO(Q M P; Q R) = (Q D P, Q R)``: a rotation Q of the rotated side carried by the state, and a
    permutation P of the other side (every base rule permutes with its columns)."""
    m = randn(2, 4, 7, seed=11)
    r_prev = square.pack(orthogonal(4, seed=12).expand(2, 4, 4), (4, 7), torch.float64)
    q = orthogonal(4, seed=13)
    p = torch.eye(7, dtype=torch.float64)[torch.randperm(7, generator=gen(14))]
    (d, r), = run_aro([m], r_prev, first_step=2, base=base)
    (d_moved, r_moved), = run_aro([q @ m @ p], square.pack(q @ square.unpack(r_prev, 4), (4, 7), torch.float64),
                                  first_step=2, base=base)
    torch.testing.assert_close(square.unpack(r_moved, 4), q @ square.unpack(r, 4), rtol=1e-9, atol=1e-10)
    # sign(·) of an entry of Rᵀ M that vanishes in exact arithmetic (the sign base makes some: here
    # one, at 2e-16) is rounding's choice and flips a whole column of D; compare the other columns.
    rotated = square.unpack(r, 4).mT @ m
    keep = ((rotated.abs() > 1e-9).all(dim=-2, keepdim=True).double() @ p > 0.5) if base == "sign" \
        else torch.ones(2, 1, 7) > 0
    assert base != "sign" or bool((~keep).any())  # the case the comment describes is in this test
    torch.testing.assert_close(torch.where(keep, d_moved, 0.0), torch.where(keep, q @ d @ p, 0.0), rtol=1e-9,
                               atol=1e-10)


def test_aro_starts_from_the_identity_and_orients_tall_blocks():
    """Step 1 uses R_0 = I whatever the buffer holds; a tall block is its transpose's mirror."""
    m = randn(2, 9, 4, seed=15)
    garbage = randn(2, 9, 4, seed=16)
    identity = square.pack(torch.eye(4, dtype=torch.float64).expand(2, 4, 4), (9, 4), torch.float64)
    first = aro(m, garbage, step=1, **ARO)
    from_identity = aro(m, identity, step=2, **ARO)
    torch.testing.assert_close(first[0], from_identity[0], rtol=1e-13, atol=1e-14)
    wide = aro(m.mT.contiguous(), square.pack(torch.eye(4, dtype=torch.float64).expand(2, 4, 4), (4, 9),
                                               torch.float64), step=2, **ARO)
    torch.testing.assert_close(wide[0].mT, first[0], rtol=1e-12, atol=1e-14)


def test_q_factor_sign_convention():
    a = randn(3, 5, 5, seed=17)
    q = q_factor(a)
    assert bool((torch.diagonal(q.mT @ a, dim1=-2, dim2=-1) > 0).all())


# ----- ARO with the Adam base -----
def run_aro_adam(grads: list[torch.Tensor], rotation: torch.Tensor | None = None, v: torch.Tensor | None = None,
                 first_step: int = 1, **kw):
    """ARO-Adam over a sequence of ``[B, m, n]`` gradients: (direction, v, packed rotation) per step."""
    opts = {**ARO_ADAM, **kw}
    m = torch.zeros_like(grads[0])
    rotation = torch.zeros_like(m) if rotation is None else rotation
    v = torch.zeros_like(m) if v is None else v
    out = []
    for t, g in enumerate(grads, start=first_step):
        m = m.lerp(g, 1 - opts["betas"][0])
        d, v, rotation = aro_adam(m, g, v, rotation, step=t, **opts)
        out.append((d, v, rotation))
    return out


def test_aro_adam_with_the_identity_rotation_is_adam():
    """Gradients ``diag(d_t) H`` whose rows have disjoint supports make ``M f(Rᵀ M)ᵀ`` diagonal and
    positive, so ``R_t = I`` at every step: the direction is then Adam's, bias correction included."""
    k, n, steps = 3, 8, 5
    support = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])  # column j belongs to row support[j]
    h = randn(k, n, seed=50) * (torch.arange(k)[:, None] == support[None])
    grads = [(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * (1 + 0.2 * t)) @ h)[None]
             for t in range(steps)]
    b1, b2 = ARO_ADAM["betas"]
    m = v = torch.zeros_like(grads[0])
    for t, ((d, v_got, rotation), g) in enumerate(zip(run_aro_adam(grads), grads), start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        adam = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + ARO_ADAM["eps"])
        torch.testing.assert_close(square.unpack(rotation, k), torch.eye(k, dtype=torch.float64)[None], atol=1e-12,
                                   rtol=0)
        torch.testing.assert_close(v_got, v, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(d, adam, rtol=1e-10, atol=1e-12)


def test_aro_adam_is_equivariant():
    """``ARO-Adam(Q M P, Q G P; Q R, v P) = (Q D P, v' P, Q R')``: a rotation Q of the rotated side,
    carried by the state (the rotated frame, where v lives, does not move), and a permutation P of
    the other side; tall blocks the same with the sides swapped. Three steps from a rotated start."""
    for m, n in ((4, 7), (7, 4)):
        k, other = min(m, n), max(m, n)
        grads = [randn(2, m, n, seed=51 + t) for t in range(3)]
        q = orthogonal(k, seed=55)
        p = torch.eye(other, dtype=torch.float64)[torch.randperm(other, generator=gen(56))]
        r0 = orthogonal(k, seed=57).expand(2, k, k)
        v0 = randn(2, m, n, seed=58).abs()
        if m < n:
            transform, on_v = (lambda x: q @ x @ p), (lambda x: x @ p)  # noqa: E731
        else:
            transform, on_v = (lambda x: p.T @ x @ q.T), (lambda x: p.T @ x)  # noqa: E731
        plain = run_aro_adam(grads, square.pack(r0, (m, n), torch.float64), v0, first_step=2)
        moved = run_aro_adam([transform(g) for g in grads], square.pack(q @ r0, (m, n), torch.float64), on_v(v0),
                             first_step=2)
        for (d, v, r), (d_moved, v_moved, r_moved) in zip(plain, moved):
            torch.testing.assert_close(square.unpack(r_moved, k), q @ square.unpack(r, k), rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(v_moved, on_v(v), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(d_moved, transform(d), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (6, 6)])
def test_aro_adam_matches_the_reference_and_keeps_v_nonnegative(shape):
    """Six steps of the batched rule equal the reference's block loop (direction, v and rotation);
    v stays finite, non-negative and zero nowhere the rotated gradient was not."""
    from dist_spectral.reference import _aro_adam_block

    grads = [randn(3, *shape, seed=60 + t) for t in range(6)]
    group = {"betas": ARO_ADAM["betas"], "eps": ARO_ADAM["eps"], "scale": 0.7}
    m = v = rotation = torch.zeros(3, *shape, dtype=torch.float64)
    ref_m, ref_v, ref_r = m.clone(), v.clone(), rotation.clone()
    for t, g in enumerate(grads, start=1):
        m = m.lerp(g, 1 - group["betas"][0])
        d, v, rotation = aro_adam(m, g, v, rotation, step=t, **group)
        ref_m = ref_m.lerp(g, 1 - group["betas"][0])
        ref_d = torch.stack([_aro_adam_block(ref_m[b], g[b], ref_v[b], ref_r[b], t, group) for b in range(3)])
        torch.testing.assert_close(d, ref_d, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(v, ref_v, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(rotation, ref_r, rtol=1e-10, atol=1e-12)
        assert bool(torch.isfinite(v).all()) and bool((v >= 0).all())
        assert bool((v > 0).all())  # random gradients: every rotated entry is non-zero


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (5, 5), (4, 6)])
def test_aro_adam_is_finite_on_degenerate_input(shape):
    zero = torch.zeros(2, *shape, dtype=torch.float64)
    rank_one = randn(2, shape[0], 1, seed=6) @ randn(2, 1, shape[1], seed=7)
    rank_one[:, 0] = 0
    for g in (zero, rank_one):
        for d, v, r in run_aro_adam([g, g, g]):
            assert all(bool(torch.isfinite(x).all()) for x in (d, v, r)) and bool((v >= 0).all())


# ----- the optimizer -----
def _grads(model, step):
    return {n: synthetic_grad(n, tuple(p.shape), step).to(p.dtype) for n, p in model.named_parameters()}


def _train(model, opt, start, stop):
    for step in range(start, stop):
        for n, g in _grads(model, step).items():
            dict(model.named_parameters())[n].grad = g
        opt.step()


ARO_ADAM_RECIPE = {"attention": {"rule": "aro_adam"}, "mlp": {"rule": "aro_adam", "betas": (0.9, 0.95)}}


@pytest.mark.parametrize("recipe,overrides", [("conda", {"update_proj_gap": 2}), ("aro", {"base_rule": "col"}),
                                              ("aro", ARO_ADAM_RECIPE)])
def test_state_dict_round_trip_continues_the_run(recipe, overrides):
    """``state_dict`` → a fresh optimizer's ``load_state_dict`` → three more steps equals six steps
    uninterrupted, bit for bit (the whole-matrix state is ordinary parameter-shaped state)."""
    torch.set_num_threads(1)
    model = MODELS["olmoe"](seed=0).double()
    opt = dist_spectral.build_optimizer(model, recipe, **overrides)
    _train(model, opt, 0, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, 6)

    resumed = MODELS["olmoe"](seed=1).double()
    resumed.load_state_dict(saved_model)
    opt2 = dist_spectral.build_optimizer(resumed, recipe, **overrides)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 3, 6)
    for (n, p), p2 in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, p2), n
        for key, value in opt.state[p].items():
            assert torch.equal(opt2.state[p2][key], value), (n, key)
    for g in opt.param_groups:
        for carried in get_rule(g["rule"]).carried:  # the whole-matrix state is really there
            assert any(bool(opt.state[p][carried].abs().sum() > 0) for p in g["params"]), (g["name"], carried)


def test_recipes_put_conda_and_aro_on_hidden_matrices_and_experts():
    for recipe, rule in (("conda", "conda"), ("aro", "aro")):
        opt = dist_spectral.build_optimizer(MODELS["olmoe"](seed=0), recipe)
        rules = {n: g["rule"] for g in opt.param_groups for n in g["param_names"]}
        assert rules["model.layers.0.self_attn.q_proj.weight"] == rule
        assert rules["model.layers.0.mlp.experts.gate_up_proj"] == rule
        assert rules["model.layers.0.mlp.experts.down_proj"] == rule
        others = ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight", "model.norm.weight")
        assert {rules[n] for n in others} == {"adamw"}


@pytest.mark.parametrize("recipe,overrides,names", [
    ("conda", {"update_proj_gap": 0}, "update_proj_gap=0"),
    ("conda", {"update_proj_gap": 2.5}, "update_proj_gap=2.5"),
    ("conda", {"attention": {"betas": (0.9, 1.0)}}, "betas[1]=1.0"),
    ("conda", {"attention": {"eps": 0.0}}, "eps=0.0"),
    ("aro", {"base_rule": "adam"}, "base_rule='adam'"),
    ("aro", {"sinkhorn_steps": 0}, "sinkhorn_steps=0"),
    ("aro", {"beta": -0.1}, "beta=-0.1"),
    ("aro", {"attention": {"rule": "aro_adam", "betas": (0.9, 1.0)}}, "betas[1]=1.0"),
    ("aro", {"attention": {"rule": "aro_adam", "betas": (0.9, 0.9, 0.9)}}, "betas=\\(0.9, 0.9, 0.9\\); give two numbers"),
    ("aro", {"attention": {"rule": "aro_adam", "eps": -1e-8}}, "eps=-1e-08"),
    ("aro", {"attention": {"rule": "aro_adam", "scale": "big"}}, "scale='big'"),
])
def test_bad_hyperparameters_name_the_parameter(recipe, overrides, names):
    rule = overrides.get("attention", {}).get("rule", recipe)
    with pytest.raises(ValueError, match=f"group 'attention' \\(rule '{rule}'\\).*{names}".replace("[", "\\[")
                       .replace("]", "\\]")):
        dist_spectral.build_optimizer(MODELS["qwen3"](seed=0), recipe, **overrides)


def test_direct_construction_checks_hyperparameters_too():
    model = torch.nn.Linear(6, 4, bias=False)
    infos = {i.name: i for i in dist_spectral.classify(model)}
    group = {"params": [("weight", model.weight)], "name": "w", "rule": "conda", "lr": 1e-2, "weight_decay": 0.0,
             **get_rule("conda").defaults, "update_proj_gap": -3}
    with pytest.raises(ValueError, match=r"param group 'w' \(rule 'conda', parameters weight\): update_proj_gap=-3"):
        dist_spectral.SpectralOptimizer([group], infos)
