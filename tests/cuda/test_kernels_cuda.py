"""The one-triangle Triton kernel on the GPU against torch, and the kernel choice table on CUDA.

CPU runs of the kernel (Triton's interpreter, fp32/fp16) are in ``tests/unit/test_kernels.py``;
these are what only a GPU shows: bf16, real polar shapes, compiled tile configurations.

Bounds: a bf16 result rounded once from an fp32 accumulator is within 2⁻⁹ ≈ 2e-3 of the exact
product relatively, per entry; relative to the largest entry 1e-2 leaves room for the fp32
accumulation over l ≤ 7168 (√l · 6e-8 ≪ 2e-3). Polar through the kernel vs through torch, both
bf16: each is within 2–3e-2 of the exact polar factor (``polar``'s docstring), so 6e-2.
"""
from __future__ import annotations

import pytest
import torch

from dist_spectral.functional import polar
from dist_spectral.kernels import gram, symmetric_polynomial, triton_available
from dist_spectral.kernels import triton_gram
from dist_spectral.kernels.triton_gram import _CONFIGS, syrk_triton

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not triton_available(), reason="triton is not installed")]

BF16_RTOL = 1e-2
POLAR_BF16_DIFF = 6e-2
# (batch, s, l): per-head blocks (head_dim 128 × hidden), experts' gate or up (OLMoE 1024×2048,
# Qwen3-30B-A3B 768×2048, DeepSeek-V3 2048×7168), square Grams.
SHAPES = [(8, 128, 2048), (4, 768, 2048), (4, 1024, 2048), (2, 2048, 7168), (4, 1024, 1024)]


def _rel(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", range(len(_CONFIGS)))
def test_bf16_gram_and_square_match_float64(shape, config, record):
    x = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
    want = x.double() @ x.double().mT
    err = _rel(syrk_triton(x, config=_CONFIGS[config]), want)
    torch_err = _rel(torch.bmm(x, x.mT), want)
    record(f"gram triton:{config} rel error", err, BF16_RTOL)
    record("gram torch rel error", torch_err, None)
    assert err <= BF16_RTOL
    a = (want / shape[2]).bfloat16()
    want_sq = -1.5 * a.double() + 0.25 * a.double() @ a.double()
    err_sq = _rel(syrk_triton(a, 0.25, -1.5, a, _CONFIGS[config]), want_sq)
    record(f"square triton:{config} rel error", err_sq, BF16_RTOL)
    assert err_sq <= BF16_RTOL


@pytest.mark.parametrize("shape", [(4, 1024, 4096), (16, 128, 2048), (4, 2048, 1024)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_polar_through_the_kernel_matches_torch(shape, record):
    x = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    got = polar(x, backend="triton")
    want = polar(x, backend="torch")
    diff = (got - want).abs().max().item()
    record("polar bf16 triton vs torch max abs diff", diff, POLAR_BF16_DIFF)
    assert diff <= POLAR_BF16_DIFF
    sv = torch.linalg.svdvals(got.double())
    assert sv.min().item() > 0.5 and sv.max().item() < 1.5  # an orthogonalisation, not noise


def test_installed_table_decides_on_cuda_without_timing(fresh_choices, monkeypatch):
    """With a table installed, a listed shape runs its entry and an unlisted one torch, and
    nothing is timed on this process."""
    monkeypatch.setattr(triton_gram, "_time_candidate", lambda *a: pytest.fail("timed a kernel locally"))
    fresh_choices.install({fresh_choices.key("gram", 256, 1024, torch.bfloat16): "triton:1"})
    calls = []
    real = triton_gram.syrk_triton
    monkeypatch.setattr(triton_gram, "syrk_triton", lambda *a: calls.append(a[-1]) or real(*a))
    x = torch.randn(3, 256, 1024, device="cuda").bfloat16()
    gram(x)
    assert calls == [_CONFIGS[1]]
    y = torch.randn(3, 256, 1000, device="cuda").bfloat16()
    assert torch.equal(gram(y), torch.bmm(y, y.mT))
    a = torch.bmm(x, x.mT)
    assert torch.equal(symmetric_polynomial(a, -1.5, 0.25), torch.baddbmm(a, a, a, beta=-1.5, alpha=0.25))
    assert len(calls) == 1


def test_measure_times_on_the_gpu(fresh_choices, record):
    """The measurement the optimizer's rank 0 runs: one valid choice per key."""
    keys = {fresh_choices.key("gram", 1024, 4096, torch.bfloat16): 4,
            fresh_choices.key("square", 1024, 1024, torch.bfloat16): 4}
    table = fresh_choices.measure(keys, torch.device("cuda"))
    assert set(table) == set(keys)
    for k, v in table.items():
        triton_gram.decode(v)
        record(f"choice {k}: {v}", 0.0, None)
