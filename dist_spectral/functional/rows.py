"""Row/column normalisation and centering: the rules for blocks with a permutation side.

``R`` commutes with row permutations and right rotations, ``f(P M Qᵀ) = P f(M) Qᵀ``; the column
version with ``f(Q M Pᵀ) = Q f(M) Pᵀ``. Centering ``C`` removes the mean row, so ``1ᵀ C(M) = 0`` and
``C(M + 1aᵀ) = C(M)``: the update of a softmax-logit block (untied LM head, MoE router) cannot move
the direction that changes nothing.

All functions work on whole rows/columns of ``[..., m, n]`` tensors and compute in fp32 (fp64 for
fp64 input), returning the input dtype.
"""
from __future__ import annotations

import torch


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
