"""Token-routed expert parallelism (``parallel.engine=ep``, ``expert_dispatch=all_to_all``) computes
the model that computes every token's experts on one process, at W = 2 and 4.

Each rank holds a different number of tokens (batch and length differ per rank), and the routers
are steered (a forward hook, the same in the reference) so that experts 4 and 5 never receive a
token: at W = 4 rank 2 holds exactly those and receives nothing. Loss, the gradient of every
parameter (the mean over ranks of each rank's local-mean loss, as FSDP2 averages) and the
optimizer's update on top must equal the single-process run to fp32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_world

pytest.importorskip("transformers")

SEED, PRESET, DEAD = 7, "tiny-olmoe", (4, 5)


def _batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 256, (1 + rank % 2, 5 + 7 * rank), generator=g)


def _steer(model) -> list:
    """Routes to experts 4 and 5 go to 0 and 1 instead; returns the list the hooks fill with the
    routed expert ids (so the test can check what the scenario covers)."""
    seen = []

    def hook(module, args, out):
        logits, scores, index = out
        index = torch.where((index == DEAD[0]) | (index == DEAD[1]), index - DEAD[0], index)
        seen.append(index.flatten())
        return logits, scores, index

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)
    return seen


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _ep_worker(rank: int, world_size: int) -> dict:
    from dist_spectral import build_optimizer
    from dist_spectral.models import build_model
    from dist_spectral.training.config import ParallelConfig
    from dist_spectral.training.expert_parallel import TokenDispatch
    from dist_spectral.training.launchers import DistEnv, wrap_model

    env = DistEnv(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    model = wrap_model(build_model(PRESET, device="meta"),
                       ParallelConfig(engine="ep", expert_dispatch="all_to_all"), env, seed=SEED)
    assert all(isinstance(layer.mlp.experts.forward, TokenDispatch) for layer in model.model.layers)
    _steer(model)
    x = _batch(rank)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    opt = build_optimizer(model, "symmetric")
    opt.step()
    params = {n: _full(p) for n, p in model.named_parameters()}
    local_experts = model.model.layers[0].mlp.experts.gate_up_proj.to_local().shape[0]
    return {"loss": loss.item(), "grads": grads, "params": params, "local_experts": local_experts}


def _reference(world_size: int) -> dict:
    from dist_spectral import build_optimizer
    from dist_spectral.models import build_model

    model = build_model(PRESET, seed=SEED)
    seen = _steer(model)
    losses = []
    for rank in range(world_size):
        x = _batch(rank)
        loss = model(input_ids=x, labels=x).loss
        (loss / world_size).backward()
        losses.append(loss.item())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, "symmetric", process_group="local")
    opt.step()
    return {"losses": losses, "grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "routed": torch.cat(seen)}


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    # fp32 rounding of sums taken in another order (the k slots, the ranks): measured at most
    # 1.6e-6 of the tensor's largest entry (gradients and updated parameters, W = 2, 4); the bound is 4e-6 of it
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= 4e-6 * scale, f"{name}: differs by {err:.3g} (largest entry {scale:.3g})"


@pytest.mark.parametrize("world_size", [2, 4])
def test_token_routed_ep_equals_one_process(world_size):
    ref = _reference(world_size)
    routed = torch.bincount(ref["routed"], minlength=8)
    assert routed[list(DEAD)].sum() == 0 and (routed > 0).sum() == 6  # experts 4, 5 idle, the rest used
    results = run_world(world_size, _ep_worker)
    assert [r["local_experts"] for r in results] == [8 // world_size] * world_size
    assert [r["loss"] for r in results] == pytest.approx(ref["losses"], rel=1e-6)
    got = results[0]
    for name, want in ref["grads"].items():
        _close(got["grads"][name], want, name)
    for name, want in ref["params"].items():
        _close(got["params"][name], want, name)
