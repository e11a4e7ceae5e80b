"""Accelerate's FSDP2 and DeepSpeed plugins at W = 2 (two processes, gloo, CPU): ``SpectralTrainer``
and an ``Accelerator`` loop over ``dist_spectral.integrations.hf.prepare`` train a tiny Qwen3 with
the ``symmetric`` recipe as our own one-process loop does, on the same data and schedule, and a
Trainer run resumed from its halfway checkpoint ends where the uninterrupted run ends.

FSDP2 shards the data: each step's two half batches are the loop's whole batch, so the logged mean
of the ranks' losses is the loop's loss to rounding (measured: at most 4.8e-7, one float32 ulp at
4, over 6 steps). Under DeepSpeed on CPU Accelerate does not shard the data (see
``accelerate_workers``): both ranks take the loop's batch, and the losses are the loop's to one ulp
at ZeRO-2 and ZeRO-3 (measured: 4.8e-7). Not bit for bit: after the first ZeRO-2 step the
embedding and the LM head (row rules, whose statistics are summed over the two ranks' partitions)
differ from the loop's in the last bit (up to 3.7e-9, in 52 and 275 of their elements), while every
Muon matrix is equal. Those differences reach the logged losses on some trajectories and not on
others.
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


def run(out_dir, worker: str, mode: str = "whole", monkeypatch=None) -> dict:
    out_dir.mkdir(exist_ok=True)
    if monkeypatch is not None:
        monkeypatch.setenv("TRAINER_MODE", mode)
    launch(2, f"tests.integrations.accelerate_workers:{worker}", out_dir, timeout_s=300)
    return json.loads((out_dir / f"{mode}.json").read_text())


@pytest.mark.parametrize("worker", ["fsdp2_trainer", "fsdp2_loop"])
def test_fsdp2_plugin_trains_as_our_loop(tmp_path, worker):
    result = run(tmp_path, worker)
    assert result["engine"] == "DTensorEngine"  # sharded by Accelerate's FSDP2 path, not DDP
    assert result["num_steps"] == STEPS
    assert result["losses"] == pytest.approx(own_losses(2 * BATCH), rel=0, abs=ULPS_2)
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.parametrize("worker,stage", [("deepspeed_trainer", 2), ("deepspeed_loop", 2), ("deepspeed_trainer", 3)])
def test_deepspeed_plugin_trains_as_our_loop(tmp_path, monkeypatch, worker, stage):
    monkeypatch.setenv("DS_TEST_STAGE", str(stage))
    result = run(tmp_path, worker)
    assert result["engine"] == "ZeroEngine"  # stepping DeepSpeed's flat partitions
    assert result["losses"] == pytest.approx(own_losses(BATCH), rel=0, abs=ULPS_2)


@pytest.mark.parametrize("worker", ["fsdp2_trainer", "deepspeed_trainer"])
def test_trainer_resume_ends_where_the_whole_run_ends(tmp_path, monkeypatch, worker):
    whole = run(tmp_path / "whole", worker, "whole", monkeypatch)
    first = run(tmp_path / "halves", worker, "half", monkeypatch)
    resumed = run(tmp_path / "halves", worker, "resume", monkeypatch)
    # restored, then counted on: training steps under every plugin
    assert resumed["num_steps"] == whole["num_steps"] == 2 * first["num_steps"] == STEPS
    assert first["losses"] == whole["losses"][:STEPS // 2]
    assert resumed["losses"] == whole["losses"]  # the log holds the first half, restored, and the second


def test_fsdp1_and_given_optimizers_are_refused_before_anything_is_built(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from dist_spectral.integrations.hf import SpectralTrainer, prepare

    fsdp1 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match=r"fsdp_version=1 .* use FullyShardedDataParallelPlugin\(fsdp_version=2\)"):
        prepare(fsdp1, tiny_qwen3())
    model = tiny_qwen3()
    opt = dist_spectral.build_optimizer(model, "symmetric")
    with pytest.raises(ValueError, match="SpectralTrainer builds its optimizer .* drop optimizers="):
        SpectralTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]), optimizers=(opt, None))
