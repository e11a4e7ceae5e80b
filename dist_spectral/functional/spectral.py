"""Spectral rules built on Grams and the polar factor: right/left-spectral, hybrid, ``ν^α`` scaling.

Conventions shared by this file:

* ``ν(X) = ⟨X, polar(X)⟩ = ‖X‖_*`` (nuclear norm), and updates are multiplied by ``ν^α``.
* ``eps`` in :func:`inv_sqrt` (and the rules that call it) is **relative**: the regularised
  matrix is ``A + eps·‖A‖_F·I``. An absolute ε would swamp small gradients (the Gram of
  1e-4-sized entries is ~1e-8); relative, the rules are homogeneous: ``f(cX) = c^α f(X)``, c > 0.
* Grams and the inverse square root run in fp32 (fp64 for fp64 input), never bf16: a Gram squares
  the condition number. Results come back in the input dtype.
"""
from __future__ import annotations

import math

import torch

from .polar import polar
from .rows import _acc, _check_matrix, center_rows, col_norm, row_norm

_FP32_EPS = torch.finfo(torch.float32).eps


def nuclear_norm_scale(x: torch.Tensor, u: torch.Tensor, alpha: float) -> torch.Tensor:
    r"""Per-matrix scale :math:`\langle X, U\rangle^\alpha`, shape ``[..., 1, 1]``.

    With ``U = polar(X)`` this is ``ν(X)^α = ‖X‖_*^α`` (the sum of singular values). The inner
    product is accumulated in fp32 (fp64 for fp64 input) and clamped at 0 (a low-precision polar can
    make it a rounding error below 0). ``alpha = 0`` gives exactly 1, also for a zero matrix.

    Args:
        x (Tensor): ``[..., m, n]``.
        u (Tensor): ``[..., m, n]``, usually ``polar(x)``.
        alpha (float): exponent, ``>= 0``; 1 in the paper's runs, 0 gives Muon-like magnitudes.

    Returns:
        Tensor: ``[..., 1, 1]`` in the promoted dtype of ``x`` and ``u``.
    """
    if alpha < 0:
        raise ValueError(f"nuclear_norm_scale: alpha must be >= 0 (ν can be 0), got {alpha}")
    out_dtype = torch.promote_types(x.dtype, u.dtype)
    shape = torch.broadcast_shapes(x.shape[:-2], u.shape[:-2]) + (1, 1)
    if alpha == 0:
        return torch.ones(shape, dtype=out_dtype, device=x.device)
    acc = torch.float64 if torch.float64 in (x.dtype, u.dtype) else torch.float32
    nu = (x.to(acc) * u.to(acc)).sum(dim=(-2, -1), keepdim=True).clamp_min(0)
    return nu.pow(alpha).to(out_dtype)


def default_inv_sqrt_steps(eps: float) -> int:
    r"""Newton–Schulz steps that converge every eigenvalue ``≥ eps·‖A‖_F`` of :func:`inv_sqrt`.

    On an eigenvalue with ``w = λ/‖A‖_F`` the coupled iteration maps ``w ↦ w (3 − w)² / 4``:
    about ×2.25 per step while ``w`` is small, then quadratic. Reaching ``w ≈ 1`` to fp32 precision
    takes ``⌈log(1/eps) / log 2.25⌉ + 4`` steps (24 for eps = 1e-7, 16 for 1e-4, 10 for 1e-2).
    """
    if eps <= 0:
        return 30
    return max(4, math.ceil(math.log(1.0 / eps) / math.log(2.25)) + 4)


def inv_sqrt(
    a: torch.Tensor,
    eps: float = 1e-7,
    method: str = "newton_schulz",
    steps: int | None = None,
) -> torch.Tensor:
    r"""Inverse square root of symmetric PSD matrices ``[..., k, k]`` (Grams).

    ``method="newton_schulz"`` (default; GEMMs only, fast on GPU for any k): the coupled iteration
    on the regularised, normalised matrix,

    .. math::
        B = A + \varepsilon \lVert A\rVert_F I,\quad s = \lVert B\rVert_F,\quad
        Y_0 = B/s,\ Z_0 = I,\quad
        T = \tfrac12 (3I - Z_k Y_k),\ Y_{k+1} = Y_k T,\ Z_{k+1} = T Z_k,\quad
        A^{-1/2} \approx Z / \sqrt{s}

    ``Y → (B/s)^{½}``, ``Z → (B/s)^{-½}``. Run in fp32 (fp64 for fp64 input).

    ``method="eigh"``: float64 eigendecomposition ``A = V Λ Vᵀ`` with a pseudo-inverse cutoff:
    eigenvalues at or below ``λ_max · k · eps_fp32`` (the fp32 rounding level of a Gram) are
    dropped, i.e. get 0 in the inverse; the others map to ``(λ + ε‖A‖_F)^{-½}``. Exact on singular
    matrices (a centred router Gram is singular along ``1``); the test oracle; for small k.

    A zero matrix maps to zero on both paths (the pseudo-inverse convention).

    Accuracy of the NS path with default steps, relative Frobenius error against the float64
    ``V (Λ + ε‖A‖_F)^{-½} Vᵀ``: fp32, Grams of Gaussian k×2k matrices (k = 8…256): 3e-7 to 8e-7;
    eigenvalues log-spaced over [1e-3, 1]: 1e-5; over [1e-6, 1]: 4e-3 (fp32 rounding of A itself
    dominates; the same in fp64 gives 7e-12, so the iteration has converged).

    Args:
        a (Tensor): symmetric positive semi-definite ``[..., k, k]``.
        eps (float): relative regularisation, added as ``eps·‖A‖_F`` to the diagonal (NS) or to
            the eigenvalues (eigh) (default: 1e-7).
        method (str): ``"newton_schulz"`` or ``"eigh"`` (default: ``"newton_schulz"``).
        steps (int, optional): NS steps; default :func:`default_inv_sqrt_steps` of ``eps``
            (24 for 1e-7) (default: None).

    Returns:
        Tensor: ``[..., k, k]``, dtype of ``a``.
    """
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"inv_sqrt needs square matrices [..., k, k]; got shape {tuple(a.shape)}")
    if eps < 0:
        raise ValueError(f"inv_sqrt: eps must be >= 0, got {eps}")
    if method == "eigh":
        return _inv_sqrt_eigh(a, eps)
    if method == "newton_schulz":
        steps = default_inv_sqrt_steps(eps) if steps is None else steps
        return _inv_sqrt_newton_schulz(a, eps, steps)
    raise ValueError(f"inv_sqrt: unknown method {method!r}; use 'newton_schulz' or 'eigh'")


def _inv_sqrt_newton_schulz(a: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    k = a.shape[-1]
    A = a.to(_acc(a)).reshape(math.prod(a.shape[:-2]), k, k)
    eye = torch.eye(k, dtype=A.dtype, device=A.device)
    B = A + (eps * torch.linalg.matrix_norm(A, keepdim=True)) * eye
    s = torch.linalg.matrix_norm(B, keepdim=True)
    nonzero = s > 0
    s = torch.where(nonzero, s, torch.ones_like(s))
    Y = B / s
    Z = eye.expand_as(Y)
    three_halves = (1.5 * eye).expand_as(Y)
    for _ in range(steps):
        T = torch.baddbmm(three_halves, Z, Y, alpha=-0.5)
        Y, Z = torch.bmm(Y, T), torch.bmm(T, Z)
    Z = Z * (nonzero / s.sqrt())
    return Z.reshape(a.shape).to(a.dtype)


def _inv_sqrt_eigh(a: torch.Tensor, eps: float) -> torch.Tensor:
    k = a.shape[-1]
    A = a.to(torch.float64)
    lam, V = torch.linalg.eigh(A)
    cutoff = lam[..., -1:].clamp_min(0) * (k * _FP32_EPS)
    keep = lam > cutoff
    reg = eps * torch.linalg.matrix_norm(A).unsqueeze(-1)
    inv = (lam.clamp_min(0) + reg).clamp_min(1e-300).rsqrt()
    inv = torch.where(keep, inv, torch.zeros_like(inv))
    return ((V * inv.unsqueeze(-2)) @ V.mT).to(a.dtype)


def right_spectral(
    x: torch.Tensor,
    alpha: float = 1.0,
    center: bool = False,
    eps: float = 1e-7,
    method: str = "newton_schulz",
    steps: int | None = None,
) -> torch.Tensor:
    r"""Right-spectral rule (embedding / LM-head alternative): ``U = ν^α · X (XᵀX + εI)^{-½}``.

    .. math::
        U_0 = X (X^\top X + \varepsilon I)^{-1/2} = (X X^\top + \varepsilon I)^{-1/2} X,\qquad
        \nu = \langle X, U_0\rangle,\qquad U = \nu^\alpha U_0

    ``U_0`` is the polar factor for full column rank (``U Σ (Σ² + ε)^{-½} Vᵀ`` in general), and
    ``ν`` then the nuclear norm. The two forms are equal for any X; the smaller Gram is used
    (``XᵀX`` for tall, ``XXᵀ`` for wide). ``ε`` is relative to the Gram: ``eps·‖XᵀX‖_F``.

    ``center=True`` (untied LM head): the same on ``X_c = C(X)``, then re-centred,
    ``U = C(ν(X_c)^α · X_c (X_cᵀX_c + εI)^{-½})``. Mathematically ``1ᵀ X_c (·) = 0`` already; the
    outer ``C`` removes rounding (the wide form's Gram is singular along ``1``).

    Equivariant: ``f(Q₁ X Q₂ᵀ) = Q₁ f(X) Q₂ᵀ`` for orthogonal Q₁, Q₂ (centred: Q₁ a permutation).

    Args:
        x (Tensor): ``[..., m, n]``.
        alpha (float): exponent of ``ν`` (default: 1.0).
        center (bool): centre before and after (default: False).
        eps (float): relative regularisation of the Gram, see :func:`inv_sqrt` (default: 1e-7).
        method (str): :func:`inv_sqrt` method (default: ``"newton_schulz"``).
        steps (int, optional): :func:`inv_sqrt` NS steps (default: None, from ``eps``).

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "right_spectral")
    X = x.to(_acc(x))
    if center:
        X = center_rows(X)
    # U_0 is scale-invariant (ε is relative), so form it on X / max|X|: the Gram of a matrix with
    # entries near 1e9 would overflow fp32's Frobenius norm. ν is taken on X itself.
    scale = X.abs().amax(dim=(-2, -1), keepdim=True)
    Xs = X / torch.where(scale > 0, scale, torch.ones_like(scale))
    if X.shape[-2] < X.shape[-1]:
        U = inv_sqrt(Xs @ Xs.mT, eps, method, steps) @ Xs
    else:
        U = Xs @ inv_sqrt(Xs.mT @ Xs, eps, method, steps)
    U = nuclear_norm_scale(X, U, alpha) * U
    if center:
        U = center_rows(U)
    return U.to(x.dtype)


def left_spectral(
    x: torch.Tensor,
    alpha: float = 1.0,
    center: bool = True,
    eps: float = 1e-7,
    method: str = "eigh",
    steps: int | None = None,
) -> torch.Tensor:
    r"""Left-spectral rule for an MoE router ``e×d`` (rows = experts).

    .. math::
        M_c = C(M),\quad G = M_c M_c^\top,\quad L = (G + \varepsilon I)^{-1/2},\quad
        U = C\big(\operatorname{tr}(G L)^\alpha \, L M_c\big)

    ``tr(G L) = ⟨M_c, L M_c⟩`` is the nuclear norm of ``M_c``, and ``L M_c`` its polar factor: the
    rule equals the centred :func:`right_spectral` up to how the null space is handled. For a tall
    router (more experts than its width) the d×d form ``M_c (M_cᵀM_c + εI)^{-½}`` is used, which
    is the same matrix (the two Grams share their nonzero spectrum). The e×e Gram
    of a centred matrix is exactly singular along ``1``; the default ``eigh`` path drops it with the
    pseudo-inverse cutoff (eigenvalues ``≤ λ_max · e · eps_fp32``, see :func:`inv_sqrt`). With
    ``method="newton_schulz"`` only ``ε`` bounds it and the outer ``C`` removes what leaks.
    ``center=False`` skips both ``C``.

    Equivariant: permuting experts permutes the rows of ``U``; ``f(M Qᵀ) = f(M) Qᵀ`` for orthogonal
    Q; ``1ᵀU = 0`` and ``f(M + 1aᵀ) = f(M)`` when centred.

    Args:
        x (Tensor): ``[..., e, d]``.
        alpha (float): exponent of ``tr(G L)`` (default: 1.0).
        center (bool): centre before and after (default: True).
        eps (float): relative regularisation of the Gram, see :func:`inv_sqrt` (default: 1e-7).
        method (str): :func:`inv_sqrt` method (default: ``"eigh"``).
        steps (int, optional): :func:`inv_sqrt` NS steps (default: None, from ``eps``).

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "left_spectral")
    M = x.to(_acc(x))
    if center:
        M = center_rows(M)
    # L M_c = M_c (M_cᵀM_c + εI)^{-½}: the two Grams share their nonzero eigenvalues and their
    # Frobenius norm (so ε means the same), so the smaller one is inverted. A tiny model's router
    # (128 experts × width 16) would otherwise spend most of a step in a 128×128 eigh.
    if M.shape[-2] <= M.shape[-1]:
        U = inv_sqrt(M @ M.mT, eps, method, steps) @ M
    else:
        U = M @ inv_sqrt(M.mT @ M, eps, method, steps)
    U = nuclear_norm_scale(M, U, alpha) * U
    if center:
        U = center_rows(U)
    return U.to(x.dtype)


def hybrid(
    x: torch.Tensor,
    alpha: float = 1.0,
    order: str = "row_then_polar",
    left: bool = False,
    center: bool = False,
    eps: float = 1e-8,
    **polar_kwargs,
) -> torch.Tensor:
    r"""Hybrid rule: row-normalise, then take the ``ν``-scaled polar factor.

    ``order="row_then_polar"`` (the paper's hybrid):

    .. math::
        N = R(X),\qquad U = \nu(N)^\alpha\, \mathrm{polar}(N)

    ``order="polar_then_row"``: ``N = X``, ``U = ν(N)^α · R(polar(N))`` (unit rows whose directions
    come from the polar factor; ``ν`` still of the polar input).

    ``center=True`` (untied LM head): ``N = C(R(C(X)))`` and ``U = C(ν(N)^α polar(N))``; for
    ``polar_then_row``, ``N = C(X)`` and ``U = C(ν(N)^α R(polar(N)))``.

    ``left=True`` (column-aware layers, e.g. SwiGLU down, whose columns are neurons): ``R`` becomes
    the column normalisation ``X diag(1/(‖X_{:,j}‖ + ε))``; centering, if asked, is still over rows.

    Equivariant: rows ``f(P X Qᵀ) = P f(X) Qᵀ``; with ``left=True`` columns
    ``f(Q X Pᵀ) = Q f(X) Pᵀ``
    (P a permutation, Q orthogonal).

    Args:
        x (Tensor): ``[..., m, n]``.
        alpha (float): exponent of ``ν`` (default: 1.0).
        order (str): ``"row_then_polar"`` or ``"polar_then_row"`` (default: ``"row_then_polar"``).
        left (bool): normalise columns instead of rows (default: False).
        center (bool): centre before and after (default: False).
        eps (float): added to row (column) norms (default: 1e-8).
        **polar_kwargs: ``steps``, ``coefficients``, ``safety``, ``dtype`` for :func:`polar`.

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "hybrid")
    if order not in ("row_then_polar", "polar_then_row"):
        raise ValueError(
            f"hybrid: unknown order {order!r}; use 'row_then_polar' or 'polar_then_row'")
    normalise = col_norm if left else row_norm
    X = x.to(_acc(x))
    if center:
        X = center_rows(X)
    if order == "row_then_polar":
        N = normalise(X, eps)
        if center:
            N = center_rows(N)
        P = polar(N, **polar_kwargs)
        U = nuclear_norm_scale(N, P, alpha) * P
    else:
        P = polar(X, **polar_kwargs)
        U = nuclear_norm_scale(X, P, alpha) * normalise(P, eps)
    if center:
        U = center_rows(U)
    return U.to(x.dtype)
