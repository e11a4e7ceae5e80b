r"""Conda: Adam's second moment in the singular basis of the momentum.

Wang et al., "Conda: Column-Normalized Adam for Training Large Language Models Faster" (arXiv
2509.24218; official code github.com/jie040109/Conda). Per block ``W`` (m×n), with ``X`` the block
oriented so the basis lies on its smaller side (``X = W`` if m < n, else ``Wᵀ``: the paper's
``std`` projection, which takes the right basis of tall *and square* blocks), ``k = min(m, n)``::

    M ← β₁ M + (1 − β₁) G                      element-wise on the shard      (state exp_avg)
    U = left singular vectors of M_X (k×k)     at steps 1, T+1, 2T+1, …, else kept (state basis)
    m' = Uᵀ M_X,   g' = Uᵀ G_X                 k × N
    v ← β₂ v + (1 − β₂) g'²                    in the rotated basis             (state exp_avg_sq)
    D = s · U · m̂' / (√v̂ + ε),   m̂' = m' / (1 − β₁ᵗ),   v̂ = v / (1 − β₂ᵗ)

and ``W ← W(1 − lr·wd) − lr·D`` (oriented back). ``T`` is ``update_proj_gap``; ``s`` is the
official code's ``scale`` (0.25 in its LLaMA runs). The basis is computed from the momentum after
this step's update, as in the official code, and ``v`` is kept across basis refreshes.

Conventions worth knowing:

- Bias correction is the paper's ``m̂'/(√v̂ + ε)`` (the same as this package's AdamW); the
  official code scales the step by ``√(1−β₂ᵗ)/(1−β₁ᵗ)`` and adds ε to ``√v``, i.e. uses
  ``ε·√(1−β₂ᵗ)`` in place of ε. The two differ only in ε's size during the first steps.
- Singular vectors have arbitrary signs: each column of ``U`` is flipped so its entry of largest
  magnitude is positive. The update does not depend on the signs (``v`` sees ``g'²``, and a flip
  of ``U``'s column flips the matching row of ``m'``); the stored state does, and is reproducible.
- The SVD runs in fp32 at least (bf16 inputs are upcast), as in the official code.

State: ``exp_avg`` is element-wise (updated on each rank's shard); ``exp_avg_sq`` and ``basis``
are *carried* (see :mod:`dist_spectral.rules`): parameter-shaped, sharded like the parameter, sent
to the block's owner with the momentum and the gradient, and returned updated. ``basis`` holds
``U`` in each block's first k² elements (:mod:`.square`). Per step the exchange therefore moves
four tensors to the owner (M, G, v, U) and three back (D, v, U), against Muon's one and one.

This works unchanged under FSDP2/HSDP, DDP and DeepSpeed ZeRO-1/2/3 (there the state lives in
DeepSpeed's flats like momentum). The basis layout depends on the blocks, so changing
``per_head`` between saving and loading a checkpoint makes the stored ``basis`` and ``exp_avg_sq``
meaningless; a wire ``comm_dtype`` of bf16 rounds them every step (keep fp32 for this rule).

Numerics. Along directions where the momentum has a zero singular value (rank-deficient momenta:
experts that saw few tokens, zero rows), ``m'`` and ``√v`` are both rounding noise and their ratio
is noise of size up to ``|m'|/ε`` (Adam's own sensitivity, bounded by ε): two runs that round
differently (looped vs batched) then differ there. Parity tests run in float64 for that reason.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..rules import Rule, register
from . import square


def left_basis(x: Tensor) -> Tensor:
    """Left singular vectors ``[B, k, k]`` of ``x`` ``[B, k, N]`` (k ≤ N), each column's largest entry positive."""
    u = torch.linalg.svd(x, full_matrices=False).U
    pick = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(u, -2, pick))
    return u * torch.where(sign == 0, torch.ones_like(sign), sign)


def refreshes(step: int, interval: int) -> bool:
    """Whether the basis is recomputed at ``step`` (1-based): steps 1, T+1, 2T+1, …"""
    return (step - 1) % interval == 0


def conda(m: Tensor, g: Tensor, v: Tensor, basis: Tensor, *, step: int, betas, eps: float, interval: int,
          scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One Conda step on a batch of blocks (see the module docstring).

    Args:
        m, g, v, basis: ``[B, m, n]`` momentum (already updated), gradient, second moment and packed
            basis, in the parameter's orientation.
        step: this step (1-based), for bias correction and the refresh schedule.

    Returns:
        (direction, new ``v``, new packed basis), each ``[B, m, n]``.
    """
    beta1, beta2 = betas
    flip = m.shape[-2] >= m.shape[-1]
    work = square.work_dtype(m.dtype)
    mx = square.orient(m, flip).to(work)
    gx = square.orient(g, flip).to(work)
    vx = square.orient(v, flip).to(work)
    k = mx.shape[-2]
    u = left_basis(mx) if refreshes(step, interval) else square.unpack(basis, k).to(work)
    m_rot = u.mT @ mx
    g_rot = u.mT @ gx
    vx = beta2 * vx + (1 - beta2) * g_rot * g_rot
    normed = (m_rot / (1 - beta1 ** step)) / ((vx / (1 - beta2 ** step)).sqrt() + eps)
    d = scale * (u @ normed)
    return (square.orient(d, flip).to(m.dtype), square.orient(vx, flip).to(v.dtype),
            square.pack(u, tuple(basis.shape[-2:]), basis.dtype))


class Conda(Rule):
    """Conda: ``D = s · U (m̂' / (√v̂ + ε))`` with ``U`` the momentum's singular basis on the block's
    smaller side, refreshed every ``update_proj_gap`` steps (see :mod:`dist_spectral.neighbours.conda`).

    Hyperparameters (recipe keys): ``betas`` (β₁, β₂) (default: (0.9, 0.99)), ``eps`` (default:
    1e-8), ``update_proj_gap`` T ≥ 1 (default: 2000), ``scale`` s (default: 0.25), ``per_head``
    (split attention projections into head blocks, default: True).
    """

    name = "conda"
    locality = "matrix"
    defaults = {"betas": (0.9, 0.99), "eps": 1e-8, "update_proj_gap": 2000, "scale": 0.25, "per_head": True}
    direction_options = ("betas", "eps", "update_proj_gap", "scale")
    inputs = 2
    carried = ("exp_avg_sq", "basis")

    def check(self, group: dict) -> None:
        square.check_int(group, "update_proj_gap")
        square.check_adam(group)

    def init_state(self, p: Tensor, group: dict) -> dict:
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "basis": torch.zeros_like(p)}

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int):
        local_state["exp_avg"].lerp_(grad, 1 - group["betas"][0])
        return local_state["exp_avg"], grad

    def direction_with_state(self, inputs, state, *, step, axis, transposed, group, input_parts=1):
        m, g = inputs
        d, v, basis = conda(m, g, state["exp_avg_sq"], state["basis"], step=step, betas=group["betas"],
                            eps=group["eps"], interval=group["update_proj_gap"], scale=group["scale"])
        return d, {"exp_avg_sq": v, "basis": basis}

    def cost(self, m, n, group):
        k, N = min(m, n), max(m, n)
        return 6 * k * k * N + (6 * k * k * N + 20 * k ** 3) // group["update_proj_gap"]


register(Conda())

__all__ = ["Conda", "conda", "left_basis", "refreshes"]
