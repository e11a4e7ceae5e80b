"""The one-triangle Triton kernel against torch: on CPU through Triton's interpreter, on CUDA natively.

Without CUDA the kernel runs under ``TRITON_INTERPRET=1`` (set per test before the kernel is first
defined). The interpreter mishandles bf16 loads from CPU tensors, so bf16 is checked on CUDA only.
"""
from __future__ import annotations

import pytest
import torch

from dist_spectral.functional import polar
from dist_spectral.functional.polar import _schedule
from dist_spectral.kernels import gram, symmetric_polynomial, syrk, triton_available
from dist_spectral.kernels.triton_gram import _CONFIGS, syrk_triton

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# fp32: relative error vs float64 measured at ≤ 2.4e-7 for these shapes (interpreter); fp16: ≤ 3.8e-4.
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@needs_triton
@pytest.mark.parametrize("shape", [(1, 64, 64), (2, 70, 130), (3, 17, 200), (1, 129, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", _CONFIGS)
def test_gram_matches_float64(interpret, shape, dtype, config):
    """Tiles on, below and (mirrored) above the diagonal; sizes that are not multiples of a tile."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    want = x.double() @ x.double().mT
    got = syrk_triton(x, config=config)
    assert got.dtype == dtype and got.shape == (shape[0], shape[1], shape[1])
    assert _rel(got, want) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_symmetric_polynomial_matches_float64(interpret, dtype):
    x = torch.randn(2, 90, 150, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a64 = x @ x.mT
    a64 = a64 / a64.norm()
    a = a64.to(DEVICE, dtype)
    want = -2.9 * a.double() + 0.55 * a.double() @ a.double()
    got = symmetric_polynomial(a, -2.9, 0.55, backend="triton")
    assert _rel(got, want) <= TOL[dtype]


@needs_triton
def test_strided_input(interpret):
    """Polar works on ``x.mT`` for tall inputs: a non-contiguous batch."""
    tall = torch.randn(2, 100, 48, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    x = tall.mT
    assert not x.is_contiguous()
    assert _rel(gram(x, backend="triton"), x.double() @ x.double().mT) <= TOL[torch.float32]


@needs_triton
def test_polar_through_the_kernels_matches_polar_through_torch(interpret):
    """Five Polar Express steps with both symmetric products from the kernel equal the torch path
    to fp32 rounding, on a wide and on a tall batch."""
    for shape in ((2, 40, 72), (2, 72, 40)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        got = polar(x, steps=5, dtype=torch.float32, backend="triton")
        want = polar(x, steps=5, dtype=torch.float32, backend="torch")
        assert (got - want).abs().max().item() < 1e-5


def test_polar_on_cpu_runs_the_torch_ops_bit_for_bit():
    """``backend="auto"`` on CPU is exactly the torch path (the kernel is only ever a CUDA choice)."""
    x = torch.randn(3, 24, 50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(polar(x, backend="auto"), polar(x, backend="torch"))
    schedule, scale = _schedule("polar_express", 5, 1.01)
    X = x / (scale * torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in schedule:
        A = torch.bmm(X, X.mT)
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a, alpha=1.0)
    assert torch.equal(polar(x), X)


def test_torch_fallback_is_polars_own_ops():
    """On CPU (and wherever the kernel is not used) the functions run exactly the ops polar runs."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 20, 33, generator=g)
    a = torch.bmm(x, x.mT)
    assert torch.equal(gram(x), torch.bmm(x, x.mT))
    assert torch.equal(symmetric_polynomial(a, -1.5, 0.25), torch.baddbmm(a, a, a, beta=-1.5, alpha=0.25))
    assert torch.equal(syrk(x, alpha=2.0), torch.bmm(x, x.mT) * 2.0)
    assert torch.equal(syrk(x, alpha=0.5, beta=3.0, c=a, backend="torch"), torch.baddbmm(a, x, x.mT, beta=3.0, alpha=0.5))


def test_bad_arguments():
    x = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="must be"):
        syrk(x[0])
    with pytest.raises(ValueError, match="must be"):
        syrk(x, c=torch.zeros(2, 6, 6))
    with pytest.raises(ValueError, match="backend"):
        syrk(x.cuda() if torch.cuda.is_available() else x, backend="cutlass")


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error message")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        syrk_triton(torch.randn(1, 16, 16))


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_and_dispatch():
    """bf16 on the GPU, and the auto backend: measured once per shape, then remembered."""
    from dist_spectral.kernels import triton_gram

    x = torch.randn(4, 1024, 4096, device="cuda", dtype=torch.bfloat16)
    want = x.double() @ x.double().mT
    assert _rel(syrk_triton(x), want) <= TOL[torch.bfloat16]
    got = gram(x)
    assert _rel(got, want) <= TOL[torch.bfloat16]
    key = next(k for k in triton_gram._CHOICE if tuple(k[:3]) == (4, 1024, 4096))
    assert triton_gram._CHOICE[key] == "torch" or triton_gram._CHOICE[key] in _CONFIGS


@pytest.fixture
def no_choices():
    from dist_spectral.kernels import choice

    choice.clear()
    yield choice
    choice.clear()


@needs_triton
def test_installed_choice_is_honoured(interpret, no_choices, monkeypatch):
    """An installed table decides the kernel per (product, s, l, dtype) whatever the batch; a shape
    it lacks runs torch, bit for bit."""
    from dist_spectral.kernels import triton_gram

    calls = []
    real = triton_gram.syrk_triton
    monkeypatch.setattr(triton_gram, "syrk_triton", lambda *a: calls.append(a[-1]) or real(*a))
    no_choices.install({no_choices.key("gram", 24, 40, torch.float32): "triton:1",
                        no_choices.key("square", 24, 24, torch.float32): "torch"})
    assert no_choices.strict()
    for batch in (1, 3):
        x = torch.randn(batch, 24, 40, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
        assert _rel(gram(x), x.double() @ x.double().mT) <= TOL[torch.float32]
        a = torch.bmm(x, x.mT)
        assert torch.equal(symmetric_polynomial(a, -1.5, 0.25), torch.baddbmm(a, a, a, beta=-1.5, alpha=0.25))
    assert calls == [_CONFIGS[1]] * 2
    other = torch.randn(2, 24, 41, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    assert torch.equal(gram(other), torch.bmm(other, other.mT))
    assert len(calls) == 2


def test_choice_keys_cover_the_plans_polar_shapes(no_choices):
    """Both products of every block shape with polar flops, each with the largest batch one owner
    runs; bf16 on CUDA by default, the group's polar_dtype where set."""
    from types import SimpleNamespace as NS

    from dist_spectral.blocks import Block, UnitSpec

    def unit(owner, shapes, param=0, flops=1):
        blocks = tuple(Block(0, m, 0, n) for m, n in shapes)
        return NS(owner=owner, polar_flops=flops, param=param, spec=UnitSpec(0, 1, blocks))

    plan = NS(units=(unit(0, [(32, 96)] * 2), unit(1, [(96, 32)]), unit(1, [(8, 8)], flops=0),
                     unit(0, [(16, 64)], param=1)))
    keys = no_choices.polar_keys(plan, [{}, {"polar_dtype": "float32"}], torch.device("cuda"))
    assert keys == {("gram", 32, 96, "bfloat16"): 2, ("square", 32, 32, "bfloat16"): 2,
                    ("gram", 16, 64, "float32"): 1, ("square", 16, 16, "float32"): 1}


def test_bad_choice_is_refused_before_anything_is_installed(no_choices):
    with pytest.raises(ValueError, match="triton:i"):
        no_choices.install({("gram", 8, 8, "float32"): "torch", ("gram", 8, 16, "float32"): "cutlass"})
    assert no_choices.installed() == {} and not no_choices.strict()


@needs_triton
def test_agree_keeps_a_decided_choice_and_measures_the_rest(no_choices, monkeypatch):
    """A later plan (another optimizer in the process) reuses what an earlier one decided, so the
    same shape never changes kernel mid-run; only new keys are timed."""
    from types import SimpleNamespace as NS

    from dist_spectral.kernels import triton_gram

    timed = []
    monkeypatch.setattr(triton_gram, "_time_candidate",
                        lambda name, fn, device: timed.append(name) or (0.5 if name == "triton:0" else 1.0))
    old = no_choices.key("gram", 8, 16, torch.float32)
    new = no_choices.key("gram", 8, 24, torch.float32)
    no_choices.install({old: "torch"})
    table = no_choices.agree({old: 1, new: 2}, torch.device("cpu"), NS(rank=0, all_gather_object=lambda o: [o]))
    assert table == {old: "torch", new: "triton:0"}
    assert sorted(timed) == ["torch", "triton:0", "triton:1"]
