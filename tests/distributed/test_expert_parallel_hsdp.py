"""Token-routed expert parallel with HSDP (``parallel=ep-hsdp``: ``replicas=2``, ``expert_dispatch=all_to_all``)
at W = 4 computes the model that computes every token's experts on one process.

The mesh is ``(replicate 2, shard 2)``: each replica routes its own tokens among its own copy of the
experts (4 of 8 per rank), FSDP2 shards the other weights over ``shard`` and replicates them over
``replicate``. Each rank holds a different number of tokens, and the routers are steered (a forward
hook, the same in the reference) so that experts 4 and 5 receive no token anywhere, and in replica 1
experts 6 and 7 receive none either: rank 3, which holds experts 4-7 there, receives no token at all,
so its experts' gradients come from replica 0's tokens through the replicas' all-reduce alone. Loss,
every gradient (the mean over ranks of each rank's local-mean loss) and the symmetric optimizer's
update must equal the single-process run to fp32 rounding; the layouts must be the ones described, and
what each rank holds what the dry run simulates.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_world

pytest.importorskip("transformers")

SEED, PRESET, WORLD, REPLICAS = 7, "tiny-olmoe", 4, 2


def _batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 256, (1 + rank % 2, 5 + 7 * rank), generator=g)


def _steer(model, rank_of: dict) -> list:
    """Experts 4, 5 (and 6, 7 on the ranks of replica 1) are replaced by the expert 4 below; returns
    the list the hooks fill with (rank, routed expert ids)."""
    seen = []

    def hook(module, args, out):
        logits, scores, index = out
        upper = 8 if rank_of["rank"] >= WORLD // REPLICAS else 6
        index = torch.where((index >= 4) & (index < upper), index - 4, index)
        seen.append((rank_of["rank"], index.flatten()))
        return logits, scores, index

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(hook)
    return seen


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _worker(rank: int, world_size: int) -> dict:
    from torch.distributed.tensor import DTensor

    from dist_spectral import build_optimizer
    from dist_spectral.models import build_model
    from dist_spectral.training.config import load_config
    from dist_spectral.training.launchers import DistEnv, wrap_model

    cfg = load_config("tiny-olmoe-fsdp", ["parallel=ep-hsdp"]).parallel
    assert (cfg.engine, cfg.expert_dispatch, cfg.replicas) == ("ep", "all_to_all", REPLICAS)
    env = DistEnv(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    model = wrap_model(build_model(PRESET, device="meta"), cfg, env, seed=SEED)
    layouts = {n: (p.device_mesh.mesh_dim_names, tuple(str(x) for x in p.placements), tuple(p.to_local().shape))
               for n, p in model.named_parameters() if isinstance(p, DTensor)}
    _steer(model, {"rank": rank})
    x = _batch(rank)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    opt = build_optimizer(model, "symmetric")
    opt.step()
    params = {n: _full(p) for n, p in model.named_parameters()}
    return {"loss": loss.item(), "grads": grads, "params": params, "layouts": layouts,
            "local_numel": sum(p.to_local().numel() for p in model.parameters())}


def _reference() -> dict:
    from dist_spectral import build_optimizer
    from dist_spectral.models import build_model

    model = build_model(PRESET, seed=SEED)
    current = {"rank": 0}
    seen = _steer(model, current)
    losses = []
    for rank in range(WORLD):
        current["rank"] = rank
        x = _batch(rank)
        loss = model(input_ids=x, labels=x).loss
        (loss / WORLD).backward()
        losses.append(loss.item())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, "symmetric", process_group="local")
    opt.step()
    return {"losses": losses, "grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "seen": seen}


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    # fp32 rounding of sums taken in another order (the k slots, the ranks, the replicas): measured
    # at most 1.5e-6 of the tensor's largest entry (gradients and updated parameters); the bound is 4e-6
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= 4e-6 * scale, f"{name}: differs by {err:.3g} (largest entry {scale:.3g})"


def test_token_routed_ep_with_hsdp_equals_one_process():
    ref = _reference()
    routed = {r: torch.bincount(torch.cat([i for rank, i in ref["seen"] if rank in r]), minlength=8)
              for r in ((0, 1), (2, 3))}
    # replica 0 uses experts 0-3, 6, 7 (4, 5 idle); replica 1 only 0-3, so rank 3 (experts 4-7) gets nothing
    assert (routed[(0, 1)] > 0).tolist() == [True] * 4 + [False] * 2 + [True] * 2
    assert (routed[(2, 3)] > 0).tolist() == [True] * 4 + [False] * 4
    results = run_world(WORLD, _worker)
    expert = results[0]["layouts"]["model.layers.0.mlp.experts.gate_up_proj"]
    attn = results[0]["layouts"]["model.layers.0.self_attn.q_proj.weight"]
    assert expert == (("replicate", "shard"), ("R", "S(0)"), (4, 128, 64))
    assert attn[:2] == (("replicate", "shard"), ("R", "S(0)"))
    # what each rank holds is what the dry run (launch/train.py --dry-run) simulates for this layout
    from dist_spectral.training.config import load_config
    from dist_spectral.training.dryrun import dry_run

    simulated = dry_run(load_config("tiny-olmoe-fsdp", ["parallel=ep-hsdp"]), WORLD)
    assert [4 * r["local_numel"] for r in results] == simulated.params.tolist()
    assert [r["loss"] for r in results] == pytest.approx(ref["losses"], rel=1e-6)
    for got in (results[0], results[3]):  # one rank of each replica
        for name, want in ref["grads"].items():
            _close(got["grads"][name], want, name)
        for name, want in ref["params"].items():
            _close(got["params"][name], want, name)
