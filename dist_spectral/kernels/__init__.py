"""GPU kernels for the polar iteration, each behind a function that falls back to torch.

``gram(x)`` = ``x xᵀ`` and ``symmetric_polynomial(a, b, c)`` = ``b a + c a a`` (``a`` symmetric),
both computing one triangle with a Triton kernel on CUDA where a one-time micro-benchmark says
it is faster, and the exact torch ops of :func:`dist_spectral.functional.polar` otherwise; see
:mod:`dist_spectral.kernels.triton_gram`. Which of the two runs for a shape is decided once for
every rank by the optimizer (:mod:`dist_spectral.kernels.choice`).
"""
from __future__ import annotations

from . import choice
from .triton_gram import (gram, reload_environment, resolve, symmetric_polynomial, syrk, syrk_torch, syrk_triton,
                          triton_available)

__all__ = ["choice", "gram", "reload_environment", "resolve", "symmetric_polynomial", "syrk", "syrk_torch",
           "syrk_triton", "triton_available"]
