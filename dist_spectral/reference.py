"""The slow, obvious single-process optimizer step: the oracle every other path is tested against.

It shares nothing with the fast path but the math functions and the block definitions: no plans,
no batching, no locality tricks. Each parameter is a full tensor; each whole-matrix rule runs
block by block in a Python loop, straight from ``functional``::

    muon               U = polar(G + μB) · max(1, fan_out/fan_in)^½      (B ← μB + G)
    row_norm           U = R(M)                                           (M ← βM + (1−β)G)
    centered_row_norm  U = C(R(C(M)))
    hybrid             U = ν(N)^α polar(N), N = R(M)   (centred variant: C(ν^α polar(C(R(C(M))))))
    left_spectral      U = C(tr(Gram L)^α · L Mc),  Mc = C(M), L = (Mc Mcᵀ + εI)^{-½}
    right_spectral     U = ν^α · M (MᵀM + εI)^{-½}
    adamw              U = m̂ / (√v̂ + ε)

with the permuted axis on the rows (column-aware rules transpose, apply, transpose back), and
``W ← W(1 − lr·wd) − lr·U``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F
from .blocks import fan_out_in, permuted_axis, unit_specs, view_2d_shape
from .roles import ParamInfo

_DTYPES = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _polar_args(group: dict) -> dict:
    coeffs = group["coefficients"]
    coeffs = tuple(tuple(c) for c in coeffs) if isinstance(coeffs, (list, tuple)) else coeffs
    return dict(steps=group["steps"], coefficients=coeffs, safety=group["safety"], dtype=_DTYPES[group["polar_dtype"]])


def block_direction(rule: str, block: Tensor, info: ParamInfo, group: dict) -> Tensor:
    """The direction of one matrix block, from ``functional`` directly."""
    cols = permuted_axis(info) == "cols"
    x = block.T if cols else block
    if rule == "muon":
        fan_out, fan_in = fan_out_in(info, tuple(block.shape))
        u = F.polar(x, **_polar_args(group)) * F.muon_scale(fan_out, fan_in, group["scale"])
    elif rule == "row_norm":
        u = F.row_norm(x, eps=group["norm_eps"])
    elif rule == "centered_row_norm":
        u = F.centered_row_norm(x, eps=group["norm_eps"])
    elif rule == "hybrid":
        u = F.hybrid(x, alpha=group["alpha"], order=group["order"], center=group["center"], **_polar_args(group))
    elif rule == "left_spectral":
        u = F.left_spectral(x, alpha=group["alpha"], center=group["center"], eps=group["spectral_eps"])
    elif rule == "right_spectral":
        u = F.right_spectral(x, alpha=group["alpha"], center=group["center"], eps=group["spectral_eps"])
    else:
        raise ValueError(f"no reference for rule {rule!r}")
    return u.T if cols else u


def matrix_direction(rule: str, m: Tensor, info: ParamInfo, group: dict) -> Tensor:
    """Apply a non-element-wise rule to a full tensor, one block at a time."""
    rows, n = view_2d_shape(tuple(m.shape))
    m2 = m.reshape(rows, n)
    out = torch.empty_like(m2)
    for unit in unit_specs(info, per_head=group.get("per_head", False)):
        for b in unit.blocks:
            r0, r1 = unit.row_start + b.row_start, unit.row_start + b.row_stop
            cols = slice(b.col_start, b.col_stop, b.col_step)
            out[r0:r1, cols] = block_direction(rule, m2[r0:r1, cols], info, group)
    return out.reshape(m.shape)


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
                if g["rule"] == "adamw":
                    self.state[name] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "step": 0}
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
                    b1, b2 = g["betas"]
                    state["exp_avg"] = b1 * state["exp_avg"] + (1 - b1) * grad
                    state["exp_avg_sq"] = b2 * state["exp_avg_sq"] + (1 - b2) * grad * grad
                    m_hat = state["exp_avg"] / (1 - b1 ** state["step"])
                    v_hat = state["exp_avg_sq"] / (1 - b2 ** state["step"])
                    u = m_hat / (v_hat.sqrt() + g["eps"])
                elif rule == "muon":
                    state["momentum_buffer"] = g["beta"] * state["momentum_buffer"] + grad
                    x = grad + g["beta"] * state["momentum_buffer"] if g["nesterov"] else state["momentum_buffer"]
                    u = matrix_direction(rule, x, self.infos[name], g)
                else:
                    state["momentum_buffer"] = g["beta"] * state["momentum_buffer"] + (1 - g["beta"]) * grad
                    u = matrix_direction(rule, state["momentum_buffer"], self.infos[name], g)
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.sub_(g["lr"] * u)
