"""The slow, obvious single-process optimizer step: the oracle every other path is tested against.

It shares nothing with the fast path but the math functions and the block definitions: no plans,
no batching, no locality tricks. Each parameter is a full tensor; each whole-matrix rule runs
block by block in a Python loop, straight from ``functional``::

    muon               U = polar(G + μB) · max(1, fan_out/fan_in)^½      (B ← μB + G)
                       (a head of a per-head o, p heads: (max(fan_out, fan_in)/(p·fan_in))^½)
    row_norm           U = s_n · R(M)                                     (M ← βM + (1−β)G)
    centered_row_norm  U = s_n · C(R(C(M)))
    hybrid             U = s_max · ν(N)^α polar(N), N = R(M)   (centred: s_max · C(ν^α polar(C(R(C(M))))))
    left_spectral      U = s_max · C(tr(Gram L)^α · L Mc),  Mc = C(M), L = (Mc Mcᵀ + εI)^{-½}
    right_spectral     U = s_max · ν^α · M (MᵀM + εI)^{-½}
    adamw              U = m̂ / (√v̂ + ε)
    spectra            U = s · H_c(V), H_c(V) = (I + VVᵀ/c²)^{-½} V, V the base update: AdamW's
                       m̂/(√v̂ + ε), sign(G + μB) or polar(G + μB)                (B ← μB + G)
    spectra_preclip    the same with G replaced by H_{c_pre}(G), block by block, before the
    (_momentum)        moments (or B) see it; c_pre = pre_clip_c, or clip_c where that is None
    auon               U = s · N / (√mean cosh²(γN) + 1e-8), N = ĝ/(‖ĝ‖_F + 1e-7), ĝ = (1−β)G + βM
    auon_hybrid        the same on polar(ĝ) (one Newton–Schulz step)               (M ← βM + (1−β)G)
    conda              U = s · Q (m̂'/(√v̂ + ε)),  m' = Qᵀ M, v ← β₂v + (1−β₂)(Qᵀ G)²,
                       Q = SVD basis of M on the block's smaller side, recomputed at steps 1, T+1, …
                       (M ← β₁M + (1−β₁)G)
    aro                U = s · R f(Rᵀ M),  R = Q-factor(M f(R_prevᵀ M)ᵀ) with diag(R-factor) ≥ 0, R_0 = I
    aro_adam           the same with f(Y) = (Y/(1−β₁ᵗ)) / (√v̂ + ε): v̂ = v_prev/(1−β₂ᵗ⁻¹) for R (no v̂ at
                       t = 1), then v ← β₂v + (1−β₂)(Rᵀ G)², v̂ = v/(1−β₂ᵗ) for U    (M ← β₁M + (1−β₁)G)

with the permuted axis on the rows (column-aware rules transpose, apply, transpose back),
``s_L = 1`` (``scale: none``) or ``0.2·√L`` (``scale: rms``) for ``L`` the block's row length
(``s_n``) or its longer side (``s_max``), and
``W ← W(1 − lr·wd) − lr·U``. Conda's basis and ARO's rotation (k × k, k the block's smaller side)
are kept, as the fast path keeps them, in the first k² elements of each block of a
parameter-shaped buffer, so the two states compare element by element.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import functional as F
from .blocks import fan_out_in, group_unit_specs, permuted_axis, read_block, view_2d_shape, write_block
from .roles import ParamInfo

_DTYPES = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _polar_args(group: dict) -> dict:
    coeffs = group["coefficients"]
    coeffs = tuple(tuple(c) for c in coeffs) if isinstance(coeffs, (list, tuple)) else coeffs
    return dict(steps=group["steps"], coefficients=coeffs, safety=group["safety"], dtype=_DTYPES[group["polar_dtype"]],
                form=group.get("polar_form", "standard"))


def soft_clip(x: Tensor, c: float, steps: int) -> Tensor:
    """SPECTRA's ``H_c(X) = (I + XXᵀ/c²)^{-½} X`` for one matrix, written out: the Gram of the wide
    orientation, scaled by ``1 + min(Gershgorin, Frobenius bound)/c²``, coupled Newton–Schulz."""
    if math.isinf(c):
        return x
    wide = x if x.shape[0] <= x.shape[1] else x.T
    gram = wide @ wide.T
    bound = min(gram.abs().sum(dim=1).max(), torch.linalg.matrix_norm(gram))
    s = 1 + bound / c**2
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    y, z = (eye + gram / c**2) / s, eye
    for _ in range(steps):
        t = (3 * eye - z @ y) / 2
        y, z = y @ t, t @ z
    out = (z / s.sqrt()) @ wide
    return out if wide is x else out.T


def cosh_brake(g: Tensor, gamma: float, normalize: bool) -> Tensor:
    """AuON's ``N / (√mean cosh²(γN) + 1e-8)``, ``N = g/(‖g‖_F + 1e-7)`` (``g`` itself on top when
    not ``normalize``), in float64 straight from the formula."""
    g64 = g.double()
    n = g64 / (torch.linalg.matrix_norm(g64) + 1e-7)
    r = torch.cosh(gamma * n).pow(2).mean().sqrt()
    return ((n if normalize else g64) / (r + 1e-8)).to(g.dtype)


def block_direction(rule: str, block: Tensor, info: ParamInfo, group: dict, input_parts: int = 1) -> Tensor:
    """The direction of one matrix block, from ``functional`` directly (``input_parts``: the
    block's :attr:`~dist_spectral.blocks.Block.input_parts`)."""
    cols = permuted_axis(info) == "cols"
    x = block.T if cols else block
    if rule == "muon":
        fan_out, fan_in = fan_out_in(info, tuple(block.shape))
        u = F.polar(x, **_polar_args(group)) * F.muon_scale(fan_out, fan_in, group["scale"], input_parts)
    elif rule == "row_norm":
        u = F.row_norm(x, eps=group["norm_eps"]) * F.width_scale(x.shape[1], group["scale"])
    elif rule == "centered_row_norm":
        u = F.centered_row_norm(x, eps=group["norm_eps"]) * F.width_scale(x.shape[1], group["scale"])
    elif rule == "hybrid":
        u = F.hybrid(x, alpha=group["alpha"], order=group["order"], center=group["center"], **_polar_args(group))
        u = u * F.width_scale(max(x.shape), group["scale"])
    elif rule == "left_spectral":
        u = F.left_spectral(x, alpha=group["alpha"], center=group["center"], eps=group["spectral_eps"])
        u = u * F.width_scale(max(x.shape), group["scale"])
    elif rule == "right_spectral":
        u = F.right_spectral(x, alpha=group["alpha"], center=group["center"], eps=group["spectral_eps"])
        u = u * F.width_scale(max(x.shape), group["scale"])
    elif rule == "pre_clip":
        c = group["clip_c"] if group["pre_clip_c"] is None else group["pre_clip_c"]
        u = soft_clip(x, c, group["pre_clip_steps"])
    elif rule == "spectra":
        fan_out, fan_in = fan_out_in(info, tuple(block.shape))
        base = F.polar(x, **_polar_args(group)) if group["base"] == "muon" else x
        u = soft_clip(base, group["clip_c"], group["clip_steps"]) * F.muon_scale(fan_out, fan_in, group["scale"])
    elif rule in ("auon", "auon_hybrid"):
        fan_out, fan_in = fan_out_in(info, tuple(block.shape))
        g = F.polar(x, **_polar_args(group)) if rule == "auon_hybrid" else x
        scale = 1.0 if group["scale"] == "none" else F.muon_scale(fan_out, fan_in, group["scale"])
        u = cosh_brake(g, group["gamma"], group["normalize"]) * scale
    else:
        raise ValueError(f"no reference for rule {rule!r}")
    return u.T if cols else u


def matrix_direction(rule: str, m: Tensor, info: ParamInfo, group: dict) -> Tensor:
    """Apply a non-element-wise rule to a full tensor, one block at a time."""
    rows, n = view_2d_shape(tuple(m.shape))
    m2 = m.reshape(rows, n)
    out = torch.empty_like(m2)
    for unit in group_unit_specs(info, group):
        rows_of_unit = slice(unit.row_start, unit.row_stop)
        for b in unit.blocks:
            u = block_direction(rule, read_block(m2[rows_of_unit], b), info, group, b.input_parts)
            write_block(out[rows_of_unit], b, u)
    return out.reshape(m.shape)


def _unpack(block: Tensor, k: int) -> Tensor:
    return block.reshape(-1)[:k * k].reshape(k, k)


def _pack(block: Tensor, q: Tensor) -> None:
    flat = torch.zeros(block.numel(), dtype=block.dtype)
    flat[:q.numel()] = q.reshape(-1)
    block.copy_(flat.view(block.shape))


def _conda_block(m: Tensor, g: Tensor, v: Tensor, basis: Tensor, step: int, group: dict) -> Tensor:
    """One block of Conda: returns the direction, writes ``v`` and ``basis`` (views of the state)."""
    flip = m.shape[0] >= m.shape[1]  # the official "std" projection: right basis for tall and square
    M, G, V = (m.T, g.T, v.T) if flip else (m, g, v)
    k = M.shape[0]
    if (step - 1) % group["update_proj_gap"] == 0:
        Q = torch.linalg.svd(M, full_matrices=False)[0].clone()
        for j in range(k):  # sign: each column's entry of largest magnitude positive
            if Q[Q[:, j].abs().argmax(), j] < 0:
                Q[:, j] = -Q[:, j]
        _pack(basis, Q)
    else:
        Q = _unpack(basis, k)
    b1, b2 = group["betas"]
    V.copy_(b2 * V + (1 - b2) * (Q.T @ G) ** 2)
    m_hat = (Q.T @ M) / (1 - b1 ** step)
    v_hat = V / (1 - b2 ** step)
    u = group["scale"] * Q @ (m_hat / (v_hat.sqrt() + group["eps"]))
    return u.T if flip else u


def _aro_base(y: Tensor, group: dict) -> Tensor:
    eps, base = group["norm_eps"], group["base_rule"]
    k, n = y.shape
    rows = lambda z: z / (z.norm(dim=1, keepdim=True) + eps) * n ** 0.5  # noqa: E731
    cols = lambda z: z / (z.norm(dim=0, keepdim=True) + eps) * k ** 0.5  # noqa: E731
    if base == "sign":
        return torch.sign(y)
    if base == "row":
        return rows(y)
    if base == "col":
        return cols(y)
    for _ in range(group["sinkhorn_steps"]):
        y = cols(rows(y))
    return y


def _aro_block(m: Tensor, rotation: Tensor, step: int, group: dict) -> Tensor:
    """One block of ARO: returns the direction, writes ``rotation`` (a view of the state)."""
    flip = m.shape[0] > m.shape[1]
    X = m.T if flip else m
    k = X.shape[0]
    previous = torch.eye(k, dtype=X.dtype) if step == 1 else _unpack(rotation, k)
    Q, R = torch.linalg.qr(X @ _aro_base(previous.T @ X, group).T)
    Q = Q.clone()
    for j in range(k):
        if R[j, j] < 0:
            Q[:, j] = -Q[:, j]
    _pack(rotation, Q)
    u = group["scale"] * Q @ _aro_base(Q.T @ X, group)
    return u.T if flip else u


def _aro_adam_block(m: Tensor, g: Tensor, v: Tensor, rotation: Tensor, step: int, group: dict) -> Tensor:
    """One block of ARO with the Adam base: returns the direction, writes ``v`` and ``rotation``."""
    flip = m.shape[0] > m.shape[1]
    M, G, V = (m.T, g.T, v.T) if flip else (m, g, v)
    k = M.shape[0]
    b1, b2 = group["betas"]
    m_hat = M / (1 - b1 ** step)
    if step == 1:
        f_prev = m_hat
    else:
        previous = _unpack(rotation, k)
        f_prev = (previous.T @ m_hat) / ((V / (1 - b2 ** (step - 1))).sqrt() + group["eps"])
    Q, R = torch.linalg.qr(M @ f_prev.T)
    Q = Q.clone()
    for j in range(k):
        if R[j, j] < 0:
            Q[:, j] = -Q[:, j]
    _pack(rotation, Q)
    V.copy_(b2 * V + (1 - b2) * (Q.T @ G) ** 2)
    u = group["scale"] * Q @ ((Q.T @ m_hat) / ((V / (1 - b2 ** step)).sqrt() + group["eps"]))
    return u.T if flip else u


def stateful_direction(rule: str, inputs: list[Tensor], state: dict, info: ParamInfo, group: dict,
                       step: int) -> Tensor:
    """A rule with whole-matrix state on a full tensor, one block at a time; updates ``state`` in place."""
    rows, n = view_2d_shape(tuple(inputs[0].shape))
    x2 = [t.reshape(rows, n) for t in inputs]
    out = torch.empty_like(x2[0])
    carried = {"conda": ("exp_avg_sq", "basis"), "aro_adam": ("exp_avg_sq", "rotation"), "aro": ("rotation",)}
    if rule not in carried:
        raise ValueError(f"no reference for rule {rule!r}")
    for unit in group_unit_specs(info, group):
        rows_of_unit = slice(unit.row_start, unit.row_stop)
        for b in unit.blocks:
            x = [read_block(t[rows_of_unit], b) for t in x2]
            # The block rules update their state in place; a block of several row runs is read as a
            # copy, so its state is written back below.
            st = {k: read_block(state[k].view(rows, n)[rows_of_unit], b) for k in carried[rule]}
            if rule == "conda":
                u = _conda_block(x[0], x[1], st["exp_avg_sq"], st["basis"], step, group)
            elif rule == "aro_adam":
                u = _aro_adam_block(x[0], x[1], st["exp_avg_sq"], st["rotation"], step, group)
            else:
                u = _aro_block(x[0], st["rotation"], step, group)
            for k in carried[rule]:
                write_block(state[k].view(rows, n)[rows_of_unit], b, st[k])
            write_block(out[rows_of_unit], b, u)
    return out.reshape(inputs[0].shape)


class ReferenceOptimizer:
    """Single-process reference with the same param-group dicts as :class:`SpectralOptimizer`.

    Args:
        param_groups: ``[{"params": [(name, tensor)], "rule": ..., "lr": ..., ...}]`` on full tensors.
        infos: name → :class:`ParamInfo`.
    """

    def __init__(self, param_groups: list[dict], infos: dict[str, ParamInfo]):
        self.groups = [dict(g, params=list(g["params"])) for g in param_groups]
        self.infos = infos
        self.state: dict[str, dict] = {}
        for g in self.groups:
            for name, p in g["params"]:
                if g["rule"] == "adamw" or (g["rule"] in ("spectra", "spectra_preclip") and g["base"] == "adamw"):
                    self.state[name] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "step": 0}
                elif g["rule"] == "conda":
                    self.state[name] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                                        "basis": torch.zeros_like(p), "step": 0}
                elif g["rule"] == "aro_adam":
                    self.state[name] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                                        "rotation": torch.zeros_like(p), "step": 0}
                elif g["rule"] == "aro":
                    self.state[name] = {"momentum_buffer": torch.zeros_like(p), "rotation": torch.zeros_like(p),
                                        "step": 0}
                else:
                    self.state[name] = {"momentum_buffer": torch.zeros_like(p), "step": 0}

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor]) -> None:
        """Update every parameter that has an entry in ``grads``."""
        for g in self.groups:
            for name, p in g["params"]:
                if name not in grads:
                    continue
                grad, state, rule = grads[name], self.state[name], g["rule"]
                state["step"] += 1
                if rule == "adamw":
                    u = _adam(state, grad, g)
                elif rule in ("conda", "aro_adam"):
                    b1 = g["betas"][0]
                    state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * grad
                    u = stateful_direction(rule, [state["exp_avg"], grad], state, self.infos[name], g, state["step"])
                elif rule == "aro":
                    state["momentum_buffer"] = g["beta"] * state["momentum_buffer"] + (1 - g["beta"]) * grad
                    u = stateful_direction(rule, [state["momentum_buffer"]], state, self.infos[name], g, state["step"])
                elif rule in ("spectra", "spectra_preclip", "spectra_preclip_momentum"):
                    if rule != "spectra":
                        grad = matrix_direction("pre_clip", grad, self.infos[name], g)
                    if g["base"] == "adamw":
                        x = _adam(state, grad, g)
                    else:
                        state["momentum_buffer"] = g["beta"] * state["momentum_buffer"] + grad
                        x = grad + g["beta"] * state["momentum_buffer"] if g["nesterov"] else state["momentum_buffer"]
                        x = torch.sign(x) if g["base"] == "sign" else x
                    u = matrix_direction("spectra", x, self.infos[name], g)
                elif rule in ("auon", "auon_hybrid"):
                    state["momentum_buffer"] = g["beta"] * state["momentum_buffer"] + (1 - g["beta"]) * grad
                    m = state["momentum_buffer"]
                    x = (1 - g["beta"]) * grad + g["beta"] * m if g["nesterov"] else m
                    u = matrix_direction(rule, x, self.infos[name], g)
                elif rule == "muon":
                    state["momentum_buffer"] = g["beta"] * state["momentum_buffer"] + grad
                    x = grad + g["beta"] * state["momentum_buffer"] if g["nesterov"] else state["momentum_buffer"]
                    u = matrix_direction(rule, x, self.infos[name], g)
                else:
                    state["momentum_buffer"] = g["beta"] * state["momentum_buffer"] + (1 - g["beta"]) * grad
                    u = matrix_direction(rule, state["momentum_buffer"], self.infos[name], g)
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.sub_(g["lr"] * u)


def _adam(state: dict, grad: Tensor, g: dict) -> Tensor:
    """AdamW's moments (updated in ``state``) and its bias-corrected direction ``m̂ / (√v̂ + ε)``."""
    b1, b2 = g["betas"]
    state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * grad
    state["exp_avg_sq"] = b2 * state["exp_avg_sq"] + (1 - b2) * grad * grad
    m_hat = state["exp_avg"] / (1 - b1 ** state["step"])
    v_hat = state["exp_avg_sq"] / (1 - b2 ** state["step"])
    return m_hat / (v_hat.sqrt() + g["eps"])
