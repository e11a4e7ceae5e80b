"""The optimizer on one GPU (W = 1) against the single-process CPU reference (``reference.py``).

Same tiny OLMoE, recipe and synthetic gradients as the distributed parity tests; the comparison is
on the displacement ``W_STEPS − W_0`` of each parameter, relative to its largest entry.

Bounds, estimated before a GPU run (the record tightens them):

- bf16 polar (the CUDA default): bf16 keeps 8 bits (unit roundoff 2⁻⁹ ≈ 2e-3); five quintic
  steps amplify it to a max error of 2–3e-2 of the largest entry of the polar factor on Gaussian
  inputs (measured on CPU, ``polar``'s docstring), and the fp32 reference has none of it. Three
  steps of momentum average rather than add such errors, so 5e-2.
- fp32 polar: one fp32 ulp (6e-8) amplified to ~1e-6 by the steps (``polar``'s docstring) on two
  BLAS with different summation orders; the same comparison between two CPU runs that sum in
  different orders (FSDP2 vs the reference) measured 4.2e-6 on this model, so 2e-5.
- the side-stream path (an NCCL group of one rank, FSDP2): the same kernels on the same whole
  matrices as without a group (the second optimizer reuses the first one's kernel choices), so
  the same bits; the bound is the bf16 one against the reference and equality with the run
  without a group.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from tests.distributed.scenarios import STEPS, run_reference
from tests.tiny import MODELS, synthetic_grad

pytestmark = pytest.mark.cuda

BF16_DISPLACEMENT_RTOL = 5e-2
FP32_DISPLACEMENT_RTOL = 2e-5
FP32_POLAR = {group: {"polar_dtype": "float32"} for group in ("attention", "mlp")}


def _run_cuda(model, overrides: dict, grads_for) -> tuple[dict, object]:
    from dist_spectral import build_optimizer

    opt = build_optimizer(model, "symmetric", **overrides)
    for step in range(STEPS):
        for name, p in model.named_parameters():
            p.grad = grads_for(name, p, step)
        opt.step()
    return opt


def _worst(init: dict, got: dict, want: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, w in want.items():
        d_want = (w - init[name]).double()
        d_got = got[name].double().cpu() - init[name].double()
        scale = d_want.abs().max().item()
        if scale == 0:
            continue
        err = (d_got - d_want).abs().max().item() / scale
        if err > worst:
            worst, where = err, name
    return worst, where


def _plain_grads(name, p, step):
    return synthetic_grad(name, tuple(p.shape), step).to(p.device)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_w1_equals_reference(precision, record, fresh_choices):
    overrides = FP32_POLAR if precision == "fp32" else {}
    bound = FP32_DISPLACEMENT_RTOL if precision == "fp32" else BF16_DISPLACEMENT_RTOL
    init, want, _ = run_reference("olmoe", "symmetric", overrides)
    model = MODELS["olmoe"](seed=0).cuda()
    opt = _run_cuda(model, overrides, _plain_grads)
    got = {n: p.detach() for n, p in model.named_parameters()}
    assert all(p.is_cuda for p in got.values())
    err, where = _worst(init, got, want)
    record(f"max displacement error / max displacement ({precision} polar; worst: {where})", err, bound)
    assert err <= bound, f"{where}: {err:.3e} > {bound:.0e}"
    assert opt.last_stats.polar_flops > 0
    assert set(opt.kernel_choices) == set(fresh_choices.installed())


def test_side_stream_exchange_at_w1(record, fresh_choices, monkeypatch):
    """FSDP2 over an NCCL group of one rank: the exchange runs on its side stream (a stream that is
    not the compute stream), every buffer on the GPU, and the result is the run without a group's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    from dist_spectral import exchange

    init, want, _ = run_reference("olmoe", "symmetric")
    plain = MODELS["olmoe"](seed=0).cuda()
    _run_cuda(plain, {}, _plain_grads)

    seen = []
    real_init = exchange._Streams.__init__

    def spy(self, device):
        real_init(self, device)
        seen.append(self)

    monkeypatch.setattr(exchange._Streams, "__init__", spy)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1,
                                device_id=torch.device("cuda", 0))
        try:
            mesh = init_device_mesh("cuda", (1,))
            model = MODELS["olmoe"](seed=0).cuda()
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)

            def sharded_grads(name, p, step):
                full = synthetic_grad(name, tuple(p.shape), step).cuda()
                return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)

            _run_cuda(model, {}, sharded_grads)
            got = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()}
        finally:
            dist.destroy_process_group()
    assert seen and all(s.cuda and s.side != s.compute for s in seen)
    err, where = _worst(init, got, want)
    record("FSDP2 W=1 NCCL: max displacement error / max displacement (bf16 polar)", err, BF16_DISPLACEMENT_RTOL)
    assert err <= BF16_DISPLACEMENT_RTOL, f"{where}: {err:.3e}"
    diff = max((got[n] - p.detach()).abs().max().item() for n, p in plain.named_parameters())
    record("FSDP2 W=1 NCCL vs no group: max abs difference", diff, 0.0)
    assert diff == 0.0
