"""What a DeepSpeed user does first: the optimizer passed to plain ``deepspeed.initialize`` (W = 2,
gloo, CPU).

- ZeRO-1/2/3 swap the optimizer's parameters for flat partitions it has no map for: the first step
  must stop, naming ``dist_spectral.deepspeed.initialize``, with the model unchanged (it died in a
  bare ``KeyError: 'step'`` before).
- ZeRO stage 0 steps the client optimizer on the real parameters: plain ``deepspeed.initialize``
  works and equals one process stepping the same gradients.
"""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.distributed.ds_harness import launch, leave_worker  # noqa: E402
from tests.tiny import tiny_qwen3  # noqa: E402

STEPS = 2


def batch(step: int) -> torch.Tensor:
    return torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(100 + step))


def config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
            "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage}}


def run(stage: int) -> dict:
    import deepspeed

    import dist_spectral

    model = tiny_qwen3(seed=0)
    opt = dist_spectral.build_optimizer(model, "symmetric")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config(stage))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    error = None
    try:
        for step in range(STEPS):  # every rank the same batch: the averaged gradient is one process's
            ids = batch(step)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
    except RuntimeError as err:
        error = str(err)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"error": error, "params": params, "unchanged": all(torch.equal(p, before[n]) for n, p in params.items())}


def worker(rank: int, world: int, out_dir: str) -> None:
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=120))
    results = {stage: run(stage) for stage in (0, 1, 2, 3)}
    torch.save(results, Path(out_dir) / f"result{rank}.pt")
    leave_worker()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain_ds")
    launch(2, "tests.distributed.test_contract_deepspeed:worker", d, timeout_s=300)
    return [torch.load(d / f"result{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_plain_initialize_under_zero_names_dist_spectral_initialize(results, stage):
    for rank, r in enumerate(results):
        got = r[stage]
        assert got["error"] is not None, f"rank {rank}: stage {stage} stepped flat partitions without a map"
        assert "dist_spectral.deepspeed.initialize(model=model, optimizer=opt, config=ds_config)" in got["error"]
        assert "param group 'embedding'" in got["error"]
        assert got["unchanged"]


def test_plain_initialize_at_stage_0_equals_one_process(results):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import dist_spectral

        model = tiny_qwen3(seed=0)
        opt = dist_spectral.build_optimizer(model, "symmetric")
        for step in range(STEPS):
            ids = batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    for rank, r in enumerate(results):
        assert r[0]["error"] is None
        for n, p in model.named_parameters():
            torch.testing.assert_close(r[0]["params"][n], p.detach(), rtol=0, atol=0, msg=f"rank {rank} {n}")
