"""Asynchronous checkpoints (``checkpoint.async_save``) and keep-last-k (``prune_checkpoints``).

An async save copies the state before it returns: the model and optimizer stepped while the files
are written must not leak into the checkpoint, which, once its future has resolved, loads (at
another world size too) to the state at the moment of the save. Pruning keeps the newest k complete
checkpoints up to ``latest`` and never touches one still being written.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_world

pytest.importorskip("transformers")


def _model_and_opt(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_spectral import build_optimizer
    from dist_spectral.models import build_model

    model = build_model("tiny-olmoe", seed=3)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, build_optimizer(model, "symmetric")


def _step(model, opt, seed: int) -> None:
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def _full(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _save_while_training(rank: int, world_size: int, path: str) -> dict:
    import torch.distributed as dist

    from dist_spectral import checkpoint

    model, opt = _model_and_opt(world_size)
    _step(model, opt, 0)
    saved = _full(model)
    future = checkpoint.async_save(path, model, opt, extra={"step": 1},
                                   process_group=dist.new_group(backend="gloo"))
    _step(model, opt, 1)  # while the writer may still run: must not reach the files
    after = _full(model)
    future.result()
    dist.barrier()
    return {"saved": saved, "after": after}


def _load(rank: int, world_size: int, path: str) -> dict:
    from dist_spectral import checkpoint

    model, opt = _model_and_opt(world_size)
    extra = checkpoint.load(path, model, opt)
    return {"extra": extra, "params": _full(model), "num_steps": opt.num_steps}


def test_async_save_holds_the_state_at_the_save(tmp_path):
    path = str(tmp_path / "ckpt")
    saved = run_world(2, _save_while_training, path)[0]
    assert any(not torch.equal(saved["saved"][n], saved["after"][n]) for n in saved["saved"])
    loaded = run_world(1, _load, path)[0]  # at another world size
    assert loaded["extra"] == {"step": 1} and loaded["num_steps"] == 1
    for name, want in saved["saved"].items():
        assert torch.equal(loaded["params"][name], want), name


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    from dist_spectral.training.loop import prune_checkpoints

    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"step_{step:06d}").mkdir()
    (tmp_path / "latest").write_text("step_000008")  # step 10 still being written
    gone = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in gone] == ["step_000002", "step_000004"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000006", "step_000008", "step_000010"]
    assert prune_checkpoints(tmp_path, keep=0) == []  # 0 keeps all
