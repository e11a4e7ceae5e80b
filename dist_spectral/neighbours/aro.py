r"""ARO: steepest descent with a base rule in an adaptively rotated frame.

Gong et al., "ARO: A New Lens On Matrix Optimization For Large Models" (arXiv 2602.09006). Per
block ``W`` (m×n), with ``X`` the block oriented so the rotation acts on its smaller side
(``X = W`` if m ≤ n, else ``Wᵀ``), ``k = min(m, n)``, and a base rule ``f``::

    M ← β M + (1 − β) G                       element-wise on the shard   (state momentum_buffer)
    R_t = Q( M_X f(R_{t−1}ᵀ M_X)ᵀ )           k × k, R_0 = I               (state rotation)
    D   = s · R_t f(R_tᵀ M_X)

and ``W ← W(1 − lr·wd) − lr·D`` (oriented back). ``Q(A)`` is the Q factor of ``A = QR`` made
unique by ``diag(R) ≥ 0`` (columns of Q flipped where needed; a zero diagonal entry keeps the
sign the factorisation gave). The rotation is optimizer-aware: ``R_t`` solves the Procrustes
problem ``max_R tr(Rᵀ M f(R_{t−1}ᵀ M)ᵀ)`` with QR in place of the polar factor, as the paper does.

Base rules ``f`` (``base_rule``) on the rotated ``k × N`` matrix ``Y = Rᵀ M_X``, each with RMS 1
on non-zero input:

- ``sign``: ``sign(Y)`` (ARO-SignGD);
- ``row``: each row (one rotated direction) scaled to norm ``√N``. ``R_t`` is then one step of
  subspace iteration on ``M Mᵀ`` (positive column scalings do not change a Q factor), so on a
  fixed ``M`` ARO-row converges to ``√N · polar(M)``: Muon is its fixed point;
- ``col``: each column scaled to norm ``√k``;
- ``sinkhorn``: SinkGD (Scetbon et al. 2025), ``sinkhorn_steps`` rounds of row- then column-
  normalisation (the paper's default base).

``s`` (``scale``) plays the role of the paper's AdamW-RMS matching (``0.2·ΔW/RMS(ΔW)``): the base
rules already have RMS 1 and a rotation keeps the Frobenius norm, so ``s = 0.2`` matches it up to
zero rows.

Adam base (rule ``aro_adam``, a separate rule because its state differs: Adam's second moment ``v``
is carried too). ``f`` is Adam's normalisation in the rotated frame, with ``v`` an EMA of the
squared *rotated gradient* kept in that frame (as Conda keeps it in its basis) and ``M`` Adam's
first moment::

    M ← β₁ M + (1 − β₁) G                                             (state exp_avg)
    R_t = Q( M_X f_{t−1}(R_{t−1}ᵀ M_X)ᵀ )                             (state rotation)
    v ← β₂ v + (1 − β₂) (R_tᵀ G_X)²            k × N, rotated frame    (state exp_avg_sq)
    D   = s · R_t f_t(R_tᵀ M_X)
    f_τ(Y) = (Y / (1 − β₁ᵗ)) / (√(v_τ / (1 − β₂^τ)) + ε)

The rotation uses ``f`` with the statistics it has *before* this step (``v_{t−1}``, accumulated in
the frames up to ``R_{t−1}``, the frame ``R_{t−1}ᵀ M`` is in), and ``v`` is then updated once, in
the new frame, for the direction: it is never updated twice in a step. At step 1 there are no
statistics (``v_0 = 0``): ``f_0`` is any positive multiple of ``Y``, which leaves the Q factor
unchanged, so ``R_1 = Q(M Mᵀ)`` (here ``f_0(Y) = Y / (1 − β₁)``). As Conda keeps ``v`` across
basis refreshes, ``v`` is not transformed when ``R`` changes (squared entries have no exact
counterpart under a rotation). The first-moment bias correction is a positive scalar and does not
change ``R_t``; it matters for ``D``. ``s`` defaults to 1: ``D`` is Adam's update in the rotated
frame, and a rotation keeps its Frobenius norm, so AdamW's learning rates are the start. The
paper calls ``f_t`` a stateful base-optimizer projection and lists Adam among the bases; the
choices above (which ``v`` the rotation sees, bias correction as in this package's AdamW) are
this package's.

Orientation: the paper rotates the residual-stream side; here the rotation acts on the block's
smaller side, which is the side whose ``k × k`` matrix fits in the parameter-shaped state (see
:mod:`.square`) and the cheaper one (QR of k×k, products of ``k² N`` flops). For square blocks
it acts on the rows (the paper's ``R ∈ SO(m)``).

State: ``momentum_buffer`` (``exp_avg`` for ``aro_adam``) is element-wise; ``rotation`` (and
``aro_adam``'s ``exp_avg_sq``, parameter-shaped in the rotated frame) is *carried* (see
:mod:`dist_spectral.rules`): parameter-shaped, holding ``R_t`` in each block's first k² elements,
sent to the owner with the momentum and returned updated (two tensors out, two back per step;
``aro_adam`` sends the gradient and ``v`` too: four out, three back).
``R_0 = I`` is used at a parameter's first step, whatever the buffer holds. This works unchanged
under FSDP2/HSDP, DDP and DeepSpeed ZeRO-1/2/3 (the state is in DeepSpeed's flats like momentum).

Numerics. The base rules normalise rows and columns of ``Rᵀ M``. When the momentum is rank-
deficient (an expert that saw fewer tokens than its width; the first steps), the rows of ``Rᵀ M``
along its null space are zero in exact arithmetic but rounding noise in floating point, and the
row normalisations (``row``, ``sinkhorn``) scale that noise up to full-size rows once it exceeds
``norm_eps``: the update then has O(1) components along arbitrary null directions, which differ
between two runs that round differently (a looped and a batched matmul). ``sign`` has the same
edge on entries that vanish in exact arithmetic, which the sign base itself produces, and the Adam
base Adam's own (noise over ``√v + ε`` along null directions, bounded by ε). Parity tests
therefore run in float64, where the noise stays below ``norm_eps``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..rules import Rule, register
from . import square

BASES = ("sign", "row", "col", "sinkhorn")


def apply_base(y: Tensor, base: str, *, eps: float, sinkhorn_steps: int) -> Tensor:
    """``f(Y)`` for ``Y`` ``[B, k, N]`` (see the module docstring)."""
    k, n = y.shape[-2:]
    if base == "sign":
        return torch.sign(y)
    if base == "row":
        return y * (math.sqrt(n) / (torch.linalg.vector_norm(y, dim=-1, keepdim=True) + eps))
    if base == "col":
        return y * (math.sqrt(k) / (torch.linalg.vector_norm(y, dim=-2, keepdim=True) + eps))
    if base == "sinkhorn":
        for _ in range(sinkhorn_steps):
            y = y * (math.sqrt(n) / (torch.linalg.vector_norm(y, dim=-1, keepdim=True) + eps))
            y = y * (math.sqrt(k) / (torch.linalg.vector_norm(y, dim=-2, keepdim=True) + eps))
        return y
    raise ValueError(f"base_rule={base!r}: use one of {', '.join(BASES)}")


def q_factor(a: Tensor) -> Tensor:
    """Q of ``a = QR`` ``[B, k, k]`` with ``diag(R) ≥ 0`` (unique when ``a`` is invertible)."""
    q, r = torch.linalg.qr(a)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


def aro(m: Tensor, rotation: Tensor, *, step: int, base: str, scale: float, eps: float,
        sinkhorn_steps: int) -> tuple[Tensor, Tensor]:
    """One ARO step on a batch of blocks.

    Args:
        m: ``[B, m, n]`` momentum (already updated), in the parameter's orientation.
        rotation: ``[B, m, n]`` packed ``R_{t−1}`` (ignored at step 1, where ``R_0 = I``).
        step: this step (1-based).

    Returns:
        (direction ``[B, m, n]``, packed ``R_t`` ``[B, m, n]``).
    """
    flip = m.shape[-2] > m.shape[-1]
    work = square.work_dtype(m.dtype)
    x = square.orient(m, flip).to(work)
    k = x.shape[-2]
    f = dict(base=base, eps=eps, sinkhorn_steps=sinkhorn_steps)
    if step <= 1:
        previous = apply_base(x, **f)  # R_0 = I
    else:
        r_prev = square.unpack(rotation, k).to(work)
        previous = apply_base(r_prev.mT @ x, **f)
    r = q_factor(x @ previous.mT)
    d = scale * (r @ apply_base(r.mT @ x, **f))
    return square.orient(d, flip).to(m.dtype), square.pack(r, tuple(rotation.shape[-2:]), rotation.dtype)


def adam_base(y: Tensor, v_hat: Tensor, eps: float) -> Tensor:
    """Adam's ``f``: ``Y / (√v̂ + ε)`` for ``Y`` and ``v̂`` ``[B, k, N]`` (bias corrections applied by the caller)."""
    return y / (v_hat.sqrt() + eps)


def aro_adam(m: Tensor, g: Tensor, v: Tensor, rotation: Tensor, *, step: int, betas, eps: float,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One step of ARO with the Adam base on a batch of blocks (see the module docstring).

    Args:
        m, g, v: ``[B, m, n]`` first moment (already updated), gradient and second moment (rotated
            frame), in the parameter's orientation.
        rotation: ``[B, m, n]`` packed ``R_{t−1}`` (ignored at step 1).
        step: this step (1-based), for the bias corrections.

    Returns:
        (direction, new ``v``, packed ``R_t``), each ``[B, m, n]``.
    """
    beta1, beta2 = betas
    flip = m.shape[-2] > m.shape[-1]
    work = square.work_dtype(m.dtype)
    x, gx, vx = (square.orient(t, flip).to(work) for t in (m, g, v))
    k = x.shape[-2]
    m_hat = x / (1 - beta1 ** step)
    if step <= 1:
        previous = m_hat  # R_0 = I, v_0 = 0: f_0 is a positive multiple of Y
    else:
        r_prev = square.unpack(rotation, k).to(work)
        previous = adam_base(r_prev.mT @ m_hat, vx / (1 - beta2 ** (step - 1)), eps)
    r = q_factor(x @ previous.mT)
    g_rot = r.mT @ gx
    vx = beta2 * vx + (1 - beta2) * g_rot * g_rot
    d = scale * (r @ adam_base(r.mT @ m_hat, vx / (1 - beta2 ** step), eps))
    return (square.orient(d, flip).to(m.dtype), square.orient(vx, flip).to(v.dtype),
            square.pack(r, tuple(rotation.shape[-2:]), rotation.dtype))


class ARO(Rule):
    """ARO: ``R_t = Q(M f(R_{t−1}ᵀ M)ᵀ)``, ``D = s · R_t f(R_tᵀ M)`` on the block's smaller side
    (see :mod:`dist_spectral.neighbours.aro`).

    Hyperparameters (recipe keys): ``beta`` momentum EMA (default: 0.95), ``base_rule`` f, one of
    ``sign``, ``row``, ``col``, ``sinkhorn`` (default: ``sinkhorn``), ``sinkhorn_steps`` (default:
    5), ``scale`` s (default: 0.2), ``norm_eps`` ε of the normalisations (default: 1e-8),
    ``per_head`` (default: True).
    """

    name = "aro"
    locality = "matrix"
    defaults = {"beta": 0.95, "base_rule": "sinkhorn", "sinkhorn_steps": 5, "scale": 0.2, "norm_eps": 1e-8,
                "per_head": True}
    direction_options = ("base_rule", "sinkhorn_steps", "scale", "norm_eps")
    carried = ("rotation",)

    def check(self, group: dict) -> None:
        if group.get("base_rule") not in BASES:
            raise ValueError(f"base_rule={group.get('base_rule')!r}: ARO's base rule f must be one of "
                             f"{', '.join(BASES)} (for the Adam base use rule 'aro_adam')")
        square.check_int(group, "sinkhorn_steps")
        square.check_number(group, "beta", 0.0, 1.0)
        square.check_number(group, "norm_eps", 0.0, open_low=True)
        square.check_number(group, "scale")

    def init_state(self, p: Tensor, group: dict) -> dict:
        return {"momentum_buffer": torch.zeros_like(p), "rotation": torch.zeros_like(p)}

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int) -> Tensor:
        local_state["momentum_buffer"].lerp_(grad, 1 - group["beta"])
        return local_state["momentum_buffer"]

    def direction_with_state(self, inputs, state, *, step, axis, transposed, group, input_parts=1):
        d, r = aro(inputs[0], state["rotation"], step=step, base=group["base_rule"], scale=group["scale"],
                   eps=group["norm_eps"], sinkhorn_steps=group["sinkhorn_steps"])
        return d, {"rotation": r}

    def cost(self, m, n, group):
        k, N = min(m, n), max(m, n)
        return 8 * k * k * N + 3 * k ** 3


register(ARO())


class AROAdam(Rule):
    """ARO with the Adam base: ``R_t = Q(M f_{t−1}(R_{t−1}ᵀ M)ᵀ)``, ``D = s · R_t f_t(R_tᵀ M)`` with
    ``f_τ(Y) = m̂ / (√v̂_τ + ε)`` and ``v`` the EMA of ``(R_tᵀ G)²`` in the rotated frame (see
    :mod:`dist_spectral.neighbours.aro`).

    Hyperparameters (recipe keys): ``betas`` (β₁ the momentum EMA, β₂ the second moment's)
    (default: (0.95, 0.99)), ``eps`` ε (default: 1e-8), ``scale`` s (default: 1.0), ``per_head``
    (default: True).
    """

    name = "aro_adam"
    locality = "matrix"
    defaults = {"betas": (0.95, 0.99), "eps": 1e-8, "scale": 1.0, "per_head": True}
    direction_options = ("betas", "eps", "scale")
    inputs = 2
    carried = ("exp_avg_sq", "rotation")

    def check(self, group: dict) -> None:
        square.check_adam(group)

    def init_state(self, p: Tensor, group: dict) -> dict:
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "rotation": torch.zeros_like(p)}

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int):
        local_state["exp_avg"].lerp_(grad, 1 - group["betas"][0])
        return local_state["exp_avg"], grad

    def direction_with_state(self, inputs, state, *, step, axis, transposed, group, input_parts=1):
        m, g = inputs
        d, v, r = aro_adam(m, g, state["exp_avg_sq"], state["rotation"], step=step, betas=group["betas"],
                           eps=group["eps"], scale=group["scale"])
        return d, {"exp_avg_sq": v, "rotation": r}

    def cost(self, m, n, group):
        k, N = min(m, n), max(m, n)
        return 10 * k * k * N + 3 * k ** 3


register(AROAdam())

__all__ = ["ARO", "AROAdam", "aro", "aro_adam", "adam_base", "apply_base", "q_factor", "BASES"]
