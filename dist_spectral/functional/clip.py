"""Soft spectral clipping (SPECTRA) and the cosh-RMS brake (AuON): whole-matrix maps that bound
an update's singular values without an SVD.

* ``soft_clip(X, c) = (I + X Xᵀ/c²)^{-½} X`` maps each singular value ``σ ↦ σ / √(1 + σ²/c²)``
  (below ``c`` and close to ``σ`` for ``σ ≪ c``) and keeps the singular vectors.
* ``cosh_brake(X) = N / √mean(cosh(γ N)²)`` with ``N = X / ‖X‖_F``: one scalar per matrix, so
  under sharding it needs only two all-reduces of one number (see ``neighbours/auon.py``).

Grams and their iterations run in fp32 (fp64 for fp64 input): a Gram squares the condition number.
"""
from __future__ import annotations

import math

import torch

from .rows import _acc, _check_matrix


def gram_bound(gram: torch.Tensor) -> torch.Tensor:
    r"""Upper bound of ``λ_max`` of symmetric PSD matrices ``[..., k, k]``, per matrix ``[..., 1, 1]``.

    .. math::
        \min\Big(\max_i \sum_j |G_{ij}|,\ \lVert G\rVert_F\Big) \ \ge\ \lambda_{\max}(G)

    The Gershgorin bound (largest absolute row sum) is tight for diagonally dominant Grams, the
    Frobenius bound for low-rank ones; their minimum is both.
    """
    gershgorin = gram.abs().sum(-1, keepdim=True).amax(-2, keepdim=True)
    frobenius = torch.linalg.matrix_norm(gram, keepdim=True)
    return torch.minimum(gershgorin, frobenius)


def soft_clip(x: torch.Tensor, c: float, steps: int = 10) -> torch.Tensor:
    r"""Soft spectral clipping :math:`H_c(X) = (I + X X^\top / c^2)^{-1/2} X`, batched.

    Each singular value maps ``σ ↦ σ / √(1 + σ²/c²)`` (always below both ``σ`` and ``c``), the
    singular vectors stay, so ``H_c(Q₁ X Q₂ᵀ) = Q₁ H_c(X) Q₂ᵀ`` for orthogonal Q₁, Q₂, and
    ``H_c(Xᵀ) = H_c(X)ᵀ``. Computed on the wide orientation (the Gram ``X Xᵀ`` is the small side;
    tall inputs are transposed and back), with the coupled Newton–Schulz inverse square root on
    ``A / s``, ``A = I + G/c²``, ``s = 1 + gram_bound(G)/c² ≥ λ_max(A)``:

    .. math::
        Y_0 = A/s,\ Z_0 = I,\qquad T = \tfrac12 (3I - Z_k Y_k),\ Y_{k+1} = Y_k T,\ Z_{k+1} = T Z_k,
        \qquad H_c(X) \approx (Z / \sqrt{s})\, X

    ``A/s`` has eigenvalues in ``[1/s, 1]``; an eigenvalue ``w`` grows about ×2.25 a step while
    small, then converges quadratically. Short of convergence ``Z`` underestimates ``(A/s)^{-½}``,
    so the least-clipped directions (``σ ≪ c``, ``w ≈ 1/s``) are the last to reach their exact
    value and come out shrunk more than they should: ``steps`` must cover about
    ``log(s)/log(2.25) + 4``. Measured in fp32 against a float64 SVD, largest relative error of
    the singular values: 64×128 Gaussians with ``σ_max`` = 0.2c…30c, 10 steps: ≤ 6e-7. A rank-one
    spike over a floor at 0.01c (AdamW's "spectral spikes"): spike 10c: 2e-6 after 10 steps;
    30c: 1.8e-2 after 10, 9e-6 after 14; 100c: 0.47 after 10, 4e-4 after 14 (the spike itself
    is always within 1e-5: only the small singular values lag).

    The bound is per matrix, so the result of each matrix does not depend on its batch. A zero
    matrix maps to zero; ``c = inf`` returns ``X`` unchanged.

    Args:
        x (Tensor): ``[..., m, n]``.
        c (float): clipping level, ``> 0`` (``inf`` disables the clip).
        steps (int): coupled Newton–Schulz steps, ``>= 1`` (default: 10).

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "soft_clip")
    if not c > 0:
        raise ValueError(f"soft_clip: c must be > 0, got {c}")
    if steps < 1:
        raise ValueError(f"soft_clip: steps must be >= 1, got {steps}")
    if math.isinf(c):
        return x.clone()
    m, n = x.shape[-2:]
    X = x.to(_acc(x))
    X = X.mT if m > n else X
    X = X.reshape(math.prod(X.shape[:-2]), *X.shape[-2:])
    k = X.shape[-2]
    G = torch.bmm(X, X.mT)
    scale = 1.0 + gram_bound(G) / (c * c)
    eye = torch.eye(k, dtype=X.dtype, device=X.device)
    Y = (eye + G / (c * c)) / scale
    Z = eye.expand_as(Y)
    three_halves = (1.5 * eye).expand_as(Y)
    for _ in range(steps):
        T = torch.baddbmm(three_halves, Z, Y, alpha=-0.5)
        Y, Z = torch.bmm(Y, T), torch.bmm(T, Z)
    out = torch.bmm(Z / scale.sqrt(), X)
    out = out.mT if m > n else out
    return out.reshape(x.shape).to(x.dtype)


def soft_clip_flops(m: int, n: int, steps: int) -> int:
    r"""Flops of :func:`soft_clip` on one ``m×n`` matrix: ``4 k² l + 6 k³ · steps``.

    With ``k = min(m, n)``, ``l = max(m, n)``: the Gram and the final product are ``2 k² l`` each,
    every step three ``k×k`` products (``Z Y``, ``Y T``, ``T Z``).
    """
    k, l = min(m, n), max(m, n)
    return 4 * k * k * l + 6 * k**3 * steps


def cosh_brake(x: torch.Tensor, gamma: float = 1.5, normalize: bool = True, total=None,
               count: int | None = None) -> torch.Tensor:
    r"""AuON's brake: ``U = N / (r + 10⁻⁸)``, ``r = √mean(cosh(γN)²)``, ``N = X / (‖X‖_F + 10⁻⁷)``.

    ``‖U‖_F < 1`` and ``‖U‖₂ < 1``, whatever the scale of ``X``; the brake ``r`` is ≥ 1 and
    grows with the heavy tail of ``N``, so spiky updates shrink most. ``normalize=False`` divides
    ``X`` itself, ``U = X / (r + 10⁻⁸)`` (the released code's form: the step then scales with the
    gradient). Only two numbers per matrix are needed,
    ``Σ X²`` and ``Σ sinh(γN)²`` (``mean cosh² = 1 + mean sinh²``; ``sinh(0) = 0``, so zero-filled
    elements of a partial matrix add nothing), which ``total`` sums wherever the matrix lives.

    Args:
        x (Tensor): ``[..., m, n]`` (whole matrices), or this rank's part of one matrix.
        gamma (float): the scale inside ``cosh`` (default: 1.5).
        normalize (bool): divide ``N`` (True) or ``X`` (False) by the brake (default: True).
        total (callable, optional): ``[..., m, n]`` → the sum over each whole matrix,
            ``[..., 1, 1]`` (default: the local sum over the last two dims).
        count (int, optional): elements of the whole matrix (default: ``m·n`` of ``x``).

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "cosh_brake")
    X = x.to(_acc(x))
    total = total or (lambda t: t.sum((-2, -1), keepdim=True))
    count = count if count is not None else x.shape[-2] * x.shape[-1]
    N = X / (total(X * X).sqrt() + 1e-7)
    brake = (1.0 + total(torch.sinh(gamma * N).square()) / max(count, 1)).sqrt()
    return ((N if normalize else X) / (brake + 1e-8)).to(x.dtype)
