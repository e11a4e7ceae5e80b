"""Accelerate's FSDP2 and DeepSpeed plugins at W = 2 (two processes, gloo, CPU): ``SpectralTrainer``
and an ``Accelerator`` loop over ``dist_spectral.integrations.hf.prepare`` train a tiny Qwen3 with
the ``symmetric`` recipe as our own one-process loop does, on the same data and schedule.

FSDP2 shards the data: each step's two half batches are the loop's whole batch, so the logged mean
of the ranks' losses is the loop's loss to rounding (measured: at most 4.8e-7, one float32 ulp at
4, over 6 steps). Under DeepSpeed on CPU Accelerate does not shard the data (see
``accelerate_workers``): both ranks take the loop's batch, and the losses are the loop's bit for bit
at ZeRO-2 and to one ulp at ZeRO-3 (measured: 4.8e-7 at step 3).
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")

import dist_spectral  # noqa: E402
from tests.distributed.ds_harness import launch  # noqa: E402
from tests.integrations.accelerate_workers import BATCH, CLIP, STEPS, WARMUP  # noqa: E402
from tests.integrations.hf_common import TokenDataset, own_loop  # noqa: E402
from tests.tiny import tiny_qwen3  # noqa: E402

ULPS_2 = 1e-6  # two float32 ulps at losses in [4, 8); measured at most one (4.8e-7)


def own_losses(batch: int) -> list[float]:
    model = tiny_qwen3()
    opt = dist_spectral.build_optimizer(model, "symmetric")
    sched = dist_spectral.paper_schedule(opt, total_steps=STEPS, warmup=WARMUP)
    return own_loop(model, opt, sched, TokenDataset().ids, batch, STEPS, CLIP)


def run(tmp_path, worker: str) -> dict:
    launch(2, f"tests.integrations.accelerate_workers:{worker}", tmp_path, timeout_s=300)
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.parametrize("worker", ["fsdp2_trainer", "fsdp2_loop"])
def test_fsdp2_plugin_trains_as_our_loop(tmp_path, worker):
    result = run(tmp_path, worker)
    assert result["engine"] == "DTensorEngine"  # sharded by Accelerate's FSDP2 path, not DDP
    assert result["num_steps"] == STEPS
    own = own_losses(2 * BATCH)
    assert result["losses"] == pytest.approx(own, rel=0, abs=ULPS_2)
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.parametrize("worker,stage", [("deepspeed_trainer", 2), ("deepspeed_loop", 2), ("deepspeed_trainer", 3)])
def test_deepspeed_plugin_trains_as_our_loop(tmp_path, monkeypatch, worker, stage):
    monkeypatch.setenv("DS_TEST_STAGE", str(stage))
    result = run(tmp_path, worker)
    assert result["engine"] == "ZeroEngine"  # stepping DeepSpeed's flat partitions
    own = own_losses(BATCH)
    if stage == 2:
        assert result["losses"] == own
    else:
        assert result["losses"] == pytest.approx(own, rel=0, abs=ULPS_2)
