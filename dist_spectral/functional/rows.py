"""Row/column normalisation and centering: the rules for blocks with a permutation side.

``R`` commutes with row permutations and right rotations, ``f(P M Qᵀ) = P f(M) Qᵀ``; the column
version with ``f(Q M Pᵀ) = Q f(M) Pᵀ``. Centering ``C`` removes the mean row, so ``1ᵀ C(M) = 0`` and
``C(M + 1aᵀ) = C(M)``: the update of a softmax-logit block (untied LM head, MoE router) cannot move
the direction that changes nothing.

All functions work on whole rows/columns of ``[..., m, n]`` tensors and compute in fp32 (fp64 for
fp64 input), returning the input dtype.

Width. ``R`` gives every nonzero row unit norm, so an element of a length-``n`` row moves by about
``1/√n``: the same lr moves a width-64 embedding √(2048/64) ≈ 5.7 times further per element than a
width-2,048 one. :func:`width_scale` is the factor that removes that dependence (``scale: rms``).
"""
from __future__ import annotations

import math

import torch

#: The kinds of :func:`width_scale`, as a param group's ``scale`` names them.
WIDTH_SCALES = ("none", "rms")

#: The update RMS ``scale: rms`` aims at: AdamW's typical one (Moonlight's Muon match), so that
#: AdamW learning rates carry over.
TARGET_RMS = 0.2


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if x.ndim < 2:
        raise ValueError(
            f"{name} needs a matrix or a batch [..., m, n]; got shape {tuple(x.shape)}")


def row_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Normalise each row: :math:`R(X)_{i,:} = X_{i,:} / (\lVert X_{i,:}\rVert_2 + \varepsilon)`.

    A zero row stays zero. Equivariant: ``R(P X Qᵀ) = P R(X) Qᵀ`` for a permutation P and an
    orthogonal Q.

    Args:
        x (Tensor): ``[..., m, n]``.
        eps (float): added to each row norm (default: 1e-8).

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "row_norm")
    acc = _acc(x)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    return (x.to(acc) / (norm + eps)).to(x.dtype)


def col_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Normalise each column: :math:`X\,\mathrm{diag}(1/(\lVert X_{:,j}\rVert_2 + \varepsilon))`.

    The row rule applied to ``Xᵀ`` and transposed back (SwiGLU down projection, whose columns are
    neurons). Equivariant: ``f(Q X Pᵀ) = Q f(X) Pᵀ``.

    Args:
        x (Tensor): ``[..., m, n]``.
        eps (float): added to each column norm (default: 1e-8).

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "col_norm")
    acc = _acc(x)
    norm = torch.linalg.vector_norm(x, dim=-2, keepdim=True, dtype=acc)
    return (x.to(acc) / (norm + eps)).to(x.dtype)


def center_rows(x: torch.Tensor) -> torch.Tensor:
    r"""Remove the mean row: :math:`C(X) = X - \tfrac1m \mathbf 1 \mathbf 1^\top X` (``Π⊥ X``).

    Every column of the result sums to zero, and ``C(X + 1aᵀ) = C(X)``.

    Args:
        x (Tensor): ``[..., m, n]``.

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "center_rows")
    xa = x.to(_acc(x))
    return (xa - xa.mean(dim=-2, keepdim=True)).to(x.dtype)


def centered_row_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Centred RowNormM: :math:`U = C(R(C(X)))`.

    The inner ``C`` makes the rule blind to a shared shift ``X + 1aᵀ``; the outer one makes the
    update itself shift-free (``1ᵀU = 0``). The rows of ``U`` are then only approximately unit.

    Args:
        x (Tensor): ``[..., m, n]``.
        eps (float): added to each row norm (default: 1e-8).

    Returns:
        Tensor: same shape and dtype as ``x``.
    """
    _check_matrix(x, "centered_row_norm")
    acc = _acc(x)
    return center_rows(row_norm(center_rows(x.to(acc)), eps)).to(x.dtype)


def width_scale(length: int, kind: str = "rms") -> float:
    r"""The factor that makes a direction's size independent of its width.

    .. math::
        \text{none (the paper's rules): } 1 \qquad \text{rms: } 0.2\,\sqrt{L}

    ``L`` is the length over which the direction has RMS ``1/√L``: a row's length (the whole row,
    wherever its parts live) for the row rules, whose rows have unit norm; ``max(m, n)`` for the
    spectral rules, whose factor ``polar``-like part has unit singular values (``‖U‖_F² = min(m, n)``).
    With ``rms`` the direction's RMS is 0.2 per nonzero row (row rules) or per matrix (spectral rules,
    before any ``ν^α``), AdamW's typical update RMS, as Muon's ``scale: rms`` (Moonlight) makes it:
    one lr then moves a width-64 and a width-4,096 matrix alike, per element.

    Args:
        length (int): ``L`` above, ≥ 1.
        kind (str): ``"none"`` or ``"rms"`` (default: ``"rms"``).

    Returns:
        float: the factor that multiplies the direction.
    """
    if kind == "none":
        return 1.0
    if kind == "rms":
        return TARGET_RMS * math.sqrt(length)
    raise ValueError(f"width_scale: unknown scale {kind!r}; use one of {', '.join(WIDTH_SCALES)}")
