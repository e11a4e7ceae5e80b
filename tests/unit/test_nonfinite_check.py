"""The non-finite check costs one fused reduction and one host synchronisation per step, however
many parameters there are, and still sees a NaN or Inf in any one of them (and no overflow in
large finite gradients, where a sum of squares would overflow fp32)."""
from __future__ import annotations

import torch
from torch import nn

import dist_spectral


def _count_host_syncs(monkeypatch) -> list:
    calls = []
    for attr in ("item", "__bool__", "tolist"):
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _original=original, _attr=attr, **k):
            calls.append(_attr)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    return calls


def test_one_host_sync_and_every_parameter_seen(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(12)])
    opt = dist_spectral.build_optimizer(model, "adamw")
    params = list(model.parameters())
    cases = [(None, 1.0), (None, 3e38)] + [(i, v) for i in (0, 11, 23)
                                           for v in (float("nan"), float("inf"), -float("inf"))]
    for position, value in cases:
        for i, p in enumerate(params):
            p.grad = torch.randn_like(p).sign() * value if position is None else torch.randn_like(p)
            if i == position:
                p.grad.view(-1)[-1] = value
        items = opt._items()
        with monkeypatch.context() as m:
            calls = _count_host_syncs(m)
            skip = opt._nonfinite(items)
        assert skip is (position is not None), (position, value)
        if position is None:
            assert len(calls) == 1, calls  # the flag's one .item(), for 24 gradients


def test_large_finite_gradients_of_every_dtype_pass_and_a_nan_in_any_is_seen():
    """The check reduces a float64 2-norm (float32/bf16 squares cannot overflow it) and a max-abs
    for float64 gradients (whose squares could): 1e300 in float64 and 3e38 in bf16 are finite,
    a NaN or Inf in any one of the dtypes is not."""
    from dist_spectral.optimizer import _any_nonfinite

    def grads():
        return [torch.full((5, 3), 1e300, dtype=torch.float64), torch.full((7,), 3e38, dtype=torch.bfloat16),
                torch.full((4, 4), 3e38), torch.full((2,), 6e4, dtype=torch.float16), torch.empty(0)]

    assert _any_nonfinite(grads()).tolist() == [0.0]
    for i in range(4):
        for value in (float("nan"), float("inf")):
            g = grads()
            g[i].view(-1)[-1] = value
            assert _any_nonfinite(g).tolist() == [1.0], (g[i].dtype, value)
