"""``launch/train.py --dry-run --world-size W``: the large presets on ``meta`` at a simulated world size,
their numbers those of the planner and predictor; memory of a small preset computed by hand."""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _config(*overrides):
    from dist_spectral.training.config import load_config

    return load_config("tiny-olmoe-fsdp", list(overrides))


def test_small_preset_memory_and_flops_by_hand():
    from dist_spectral.training.dryrun import dry_run

    run = dry_run(_config(), 2)  # tiny-olmoe, fp32, FSDP2 over 2 ranks, symmetric, 8 x 128 tokens per rank
    # tiny-olmoe: vocab 256, d 64, 4 layers, 4 heads of 16, 8 experts of 64 (top-2), untied head.
    # per layer: q, k, v, o 4·64·64 = 16384; q_norm, k_norm, two layer norms 4·64 = 256; router 8·64 = 512;
    # experts gate_up 8·128·64 = 65536 and down 8·64·64 = 32768
    layer = 16384 + 256 + 512 + 65536 + 32768
    total = 4 * layer + 256 * 64 + 256 * 64 + 64  # + embedding, LM head, final norm
    assert total == 494656
    # every first dimension is even: FSDP2 halves each parameter; fp32
    assert run.params.tolist() == run.grads.tolist() == [4 * total / 2] * 2
    # symmetric: one buffer per element (momentum), two for the AdamW norms (4 per layer + the final one)
    adamw = 4 * 4 * 64 + 64
    assert run.prediction.state.tolist() == [4 * (total + adamw) / 2] * 2
    assert run.gathered == 2 * 4 * layer  # one layer in use, the next prefetched, unsharded fp32
    # activations per token and layer: norms 4·64, attention 2·(4 + 4)·16 + (4 + 4)·16, MoE router 8 +
    # 2 slots · (2·64 + 4·64); all layers + the embedding's output, fp32; logits and their gradient 8·256 B
    per_token = 4 * (4 * (4 * 64 + 2 * 8 * 16 + 8 * 16 + 8 + 2 * (2 * 64 + 4 * 64)) + 64) + 8 * 256
    assert per_token == 24960
    assert run.tokens == 8 * 128 and run.activations == 1024 * per_token
    # flops: 6 per activated parameter (experts 2/8 of theirs; not the input embedding) and token, attention
    # 3 · s · H · (d_qk + d_v) per layer and token
    active = total - 4 * (65536 + 32768) + 4 * (65536 + 32768) * 2 // 8 - 256 * 64
    assert run.flops == 1024 * (6 * active + 3 * 128 * 4 * (16 + 16) * 4)
    assert np.array_equal(run.memory, run.params + run.grads + run.prediction.state + run.prediction.peak_extra
                          + run.gathered + run.activations)

    ckpt = dry_run(_config("model.activation_checkpointing=true"), 2)
    # each layer keeps its input; one layer's full set while it is recomputed; + the embedding's output
    assert ckpt.activations == 1024 * (4 * (4 * 64 + 1416 + 64) + 8 * 256)
    assert ckpt.flops == pytest.approx(run.flops * 4 / 3)


def test_layouts_map_to_the_planner():
    from dist_spectral.planner import Parallel
    from dist_spectral.training.dryrun import simulated_parallel

    assert simulated_parallel(_config(), 8) == Parallel(8)
    assert simulated_parallel(_config("parallel=hsdp"), 8) == Parallel(8, replicas=2)
    assert simulated_parallel(_config("parallel=ddp"), 8) == Parallel(8, replicas=8)
    assert simulated_parallel(_config("parallel=ep"), 8) == Parallel(8)
    assert simulated_parallel(_config("parallel=ep-hsdp"), 8) == Parallel(8, replicas=2)


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--world-size", "6", "parallel=ep-hsdp"],
     "'model.layers.0.mlp.experts' has 8 experts, which do not split over 3 ranks"),
    (["--dry-run", "--world-size", "4", "parallel=hsdp", "parallel.replicas=3"],
     "parallel.replicas=3 does not divide --world-size 4"),
    (["--dry-run", "--world-size", "2", "parallel.engine=deepspeed"], "the dry run simulates the none, ddp"),
    (["--world-size", "4"], "--world-size simulates ranks for --dry-run"),
])
def test_bad_layouts_are_one_line(argv, message, capsys):
    from dist_spectral.training import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _gb(x) -> str:
    x = float(x)
    return f"{x / 1e9:.2f} GB" if x >= 1e9 else f"{x / 1e6:.2f} MB"


@pytest.mark.parametrize("preset, layout, world, parallel", [
    ("qwen3-235b-a22b", ["parallel=ep-hsdp"], 64, dict(replicas=2)),
    ("deepseek-v3", ["parallel=ep", "parallel.expert_dispatch=all_to_all"], 64, {}),
])
def test_large_preset_dry_run_prints_the_planners_numbers(preset, layout, world, parallel):
    from dist_spectral.cli import _print_plan
    from dist_spectral.models import build_model
    from dist_spectral.planner import Parallel, simulate_step
    from dist_spectral.predict import Rates, predict

    argv = [sys.executable, "launch/train.py", "--dry-run", "--world-size", str(world), f"model={preset}", *layout,
            "data.seq_len=4096", "data.batch_size=1"]
    # the budget for the dry run of a large preset, start-up included
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout

    # the same model, layout and recipe through the planner and predictor directly
    sim = simulate_step(build_model(preset, device="meta"), Parallel(world, **parallel), "symmetric")
    pred = predict(sim, Rates())
    plan = io.StringIO()
    with contextlib.redirect_stdout(plan):
        _print_plan(sim, pred, Rates(), types.SimpleNamespace(units=False, buckets=False, all_ranks=False))
    assert plan.getvalue() in out

    worst = int(re.search(r"training memory per rank \(the largest, rank (\d+)\)", out).group(1))
    for label, value in (("parameters", 4 * sim.local_numel[worst]), ("gradients", 4 * sim.local_numel[worst]),
                         ("optimizer state", pred.state[worst]), ("optimizer peak extra", pred.peak_extra[worst])):
        assert f"{label} {_gb(value)}" in out
    slow = int(re.search(r"predicted training step \(rank (\d+)\)", out).group(1))
    assert f"optimizer {pred.step[slow] * 1e3:.2f} ms" in out
