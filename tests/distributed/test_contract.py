"""The torch.optim contract at W = 2 (gloo): an optimizer built before ``fully_shard`` says so at
its first step instead of training nothing, and ``process_group="local"`` builds and steps an
optimizer on one rank while the other never builds one (an evaluation or reference copy).

One process group for the module, with a short timeout: a regression (a collective on the world
where none belongs) fails within it instead of hanging.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_spectral import build_optimizer
from tests.distributed.harness import run_world
from tests.distributed.scenarios import wrap
from tests.tiny import synthetic_grad, tiny_qwen3

PG_TIMEOUT_S = 30.0  # a normal run takes a few seconds; the old code waited here for the world
STEPS = 2


def local_run() -> dict:
    """A plain model on this process only: build with process_group='local', step twice."""
    model = tiny_qwen3(seed=3)
    opt = build_optimizer(model, "symmetric", process_group="local")
    for step in range(STEPS):
        for n, p in model.named_parameters():
            p.grad = synthetic_grad(n, tuple(p.shape), step)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def worker(rank: int, world: int) -> dict:
    out = {}
    done = torch.zeros(1)
    if rank == 0:
        out["local"] = local_run()
        dist.send(done, dst=1)  # point to point, so rank 1 joins no collective rank 0 might wrongly start
    else:
        dist.recv(done, src=0)

    model = tiny_qwen3(seed=0)
    opt = build_optimizer(model, "symmetric")  # before fully_shard: the mistake
    wrap(model, "fsdp", world)
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    try:
        opt.step()
        out["error"] = None
    except RuntimeError as err:
        out["error"] = str(err)
    out["unchanged"] = all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
    return out


@pytest.fixture(scope="module")
def results():
    return run_world(2, worker, timeout_s=PG_TIMEOUT_S)


def test_optimizer_built_before_fully_shard_raises_at_first_step(results):
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank}: the step passed silently"
        assert "is no longer the model's parameter" in r["error"]
        assert "Build the optimizer after fully_shard" in r["error"]
        assert r["error"].startswith("model.embed_tokens.weight (and ")
        assert r["unchanged"]


def test_local_process_group_builds_on_one_rank_and_equals_one_process(results):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the worker, so polar's matmuls round alike
    try:
        model = tiny_qwen3(seed=3)
        opt = build_optimizer(model, "symmetric")
        for step in range(STEPS):
            for n, p in model.named_parameters():
                p.grad = synthetic_grad(n, tuple(p.shape), step)
            opt.step()
    finally:
        torch.set_num_threads(threads)
    got = results[0]["local"]
    for n, p in model.named_parameters():
        assert torch.equal(got[n], p), n
