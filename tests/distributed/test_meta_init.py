"""Initialisation does not depend on where the model is built: on meta, sharded, then allocated.

The training entry builds the model on ``meta``, shards it (FSDP2, HSDP, expert-dim sharding) and
allocates and initialises only each rank's shards (``models.init_weights``: every row from a
generator seeded by (seed, name, row)). The gathered weights must equal, to the bit, those of the
same model built whole on the host (``build_model(seed=...)``), at W = 1, 2, 4 and in every layout,
buffers (rotary frequencies) included. One process group per world size.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_world

pytest.importorskip("transformers")

SEED = 1234
PRESETS = ("tiny-olmoe", "tiny-deepseek-v3")  # DeepSeek-V3: shared experts, a router bias buffer, MLA
LAYOUTS = {1: ("none", "fsdp", "ep"), 2: ("fsdp", "ep", "ddp"), 4: ("fsdp", "ep", "hsdp", "ddp")}


def _full_state(model) -> dict:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[name] = t.detach().clone()
    return out


def _meta_built(rank: int, world_size: int) -> dict:
    from dist_spectral.models import build_model
    from dist_spectral.training.config import ParallelConfig
    from dist_spectral.training.launchers import DistEnv, unwrap, wrap_model

    env = DistEnv(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    results = {}
    for preset in PRESETS:
        for engine in LAYOUTS[world_size]:
            if preset == "tiny-deepseek-v3" and engine == "ep":
                continue  # its dense first layer has no experts to split; ep covered by tiny-olmoe
            model = build_model(preset, device="meta")
            cfg = ParallelConfig(engine=engine, replicas=2 if engine == "hsdp" else 1)
            wrapped = wrap_model(model, cfg, env, seed=SEED)
            local = [p for p in unwrap(wrapped).parameters()]
            assert not any(p.is_meta for p in local)
            results[(preset, engine)] = _full_state(unwrap(wrapped))
    return results if rank == 0 else {}


@pytest.fixture(scope="module")
def host_built() -> dict:
    from dist_spectral.models import build_model

    return {preset: _full_state(build_model(preset, seed=SEED)) for preset in PRESETS}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_meta_built_equals_host_built(world_size, host_built):
    (results, *_) = run_world(world_size, _meta_built)
    assert {engine for _, engine in results} == set(LAYOUTS[world_size])
    for (preset, engine), state in results.items():
        want = host_built[preset]
        assert state.keys() == want.keys(), (preset, engine)
        for name, value in state.items():
            assert torch.equal(value, want[name]), f"{preset} {engine} x{world_size}: {name} differs"


def test_host_build_is_seeded():
    """Same seed, same weights; another seed, other weights; every row drawn from its own stream."""
    from dist_spectral.models import _draw_rows, build_model

    a, b, c = (build_model("tiny-olmoe", seed=s) for s in (SEED, SEED, SEED + 1))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim >= 2:
            assert not torch.equal(pa, pc), name
    whole = torch.empty(6, 4, 5)
    _draw_rows(whole, 99, "normal_", {"std": 0.02})
    assert whole.std() == pytest.approx(0.02, rel=0.3)
    assert len({tuple(r.tolist()) for r in whole.reshape(-1, 5)}) == 24  # every row its own stream


def test_bf16_build_is_the_fp32_build_rounded():
    from dist_spectral.models import build_model

    fp32 = build_model("tiny-deepseek-v3", seed=SEED)
    bf16 = build_model("tiny-deepseek-v3", seed=SEED, dtype="bfloat16")
    for (name, p32), p16 in zip(fp32.named_parameters(), bf16.parameters()):
        assert torch.equal(p16, p32.to(p16.dtype)), name
