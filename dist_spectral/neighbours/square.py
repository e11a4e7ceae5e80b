"""Small square matrices stored inside parameter-shaped state, for rules with carried state.

A rule that keeps a ``k × k`` matrix per block (Conda's singular basis, ARO's rotation) with
``k = min(m, n)`` stores it in a buffer shaped like the block: ``k² ≤ m·n``, so the matrix fits in
the block's first ``k²`` elements (row-major over the block as the rule sees it) and the rest stay
zero. The buffer is then sharded, checkpointed and resharded like the parameter, with no storage
of its own.

Blocks are oriented so the square side is the rows: ``X = W`` when that side is ``m``, ``X = Wᵀ``
otherwise; only a matrix on the smaller side fits, which is also the cheaper one.
"""
from __future__ import annotations

import torch
from torch import Tensor


def unpack(buf: Tensor, k: int) -> Tensor:
    """The ``[B, k, k]`` matrices held in the first ``k²`` elements of each block of ``buf`` ``[B, m, n]``."""
    return buf.reshape(buf.shape[0], -1)[:, :k * k].reshape(-1, k, k)


def pack(q: Tensor, block_shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """``[B, k, k]`` matrices as ``[B, m, n]`` blocks (first ``k²`` elements, zeros after)."""
    batch, k = q.shape[0], q.shape[-1]
    out = torch.zeros(batch, block_shape[0] * block_shape[1], dtype=dtype, device=q.device)
    out[:, :k * k] = q.reshape(batch, -1)
    return out.view(batch, *block_shape)


def orient(x: Tensor, flip: bool) -> Tensor:
    """Put the side the square matrix acts on first (``flip``: the columns)."""
    return x.transpose(-2, -1) if flip else x


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decompositions run in at least fp32 (bf16/fp16 have no SVD/QR kernels and too little precision)."""
    return torch.promote_types(dtype, torch.float32)


def check_int(group: dict, key: str, low: int = 1) -> None:
    value = group.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r}: must be an integer ≥ {low}")


def check_number(group: dict, key: str, low: float | None = None, high: float | None = None, *,
                 open_low: bool = False, open_high: bool = True) -> None:
    value = group.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{key}={value!r}: must be a number")
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"{key}={value!r}: must be {'>' if open_low else '≥'} {low}")
    if high is not None and (value > high or (open_high and value == high)):
        raise ValueError(f"{key}={value!r}: must be {'<' if open_high else '≤'} {high}")


def check_adam(group: dict) -> None:
    """Adam's hyperparameters of a rule in a rotated frame: ``betas`` two numbers in [0, 1],
    ``eps`` > 0, ``scale`` a number."""
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r}: must be two numbers (β₁, β₂)")
    for i, b in enumerate(betas):
        check_number({f"betas[{i}]": b}, f"betas[{i}]", 0.0, 1.0)
    check_number(group, "eps", 0.0, open_low=True)
    check_number(group, "scale")
