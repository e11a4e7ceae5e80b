"""End to end, one process (``parallel=none``, no torchrun): a run saved at its last step and
resumed with more ``train.steps`` continues on the schedule of the new total.

Two launches (~4 s each on 2 cores): 6 steps with a final checkpoint, then ``--resume`` with
``train.steps=10``. Each schedule is a function of the run's total, so steps 7..10 must run at the
lrs of a run planned for 10 steps from the start (the checkpoint restored the 6-step schedule's
last lrs, 0, which ran one step before the fix), and the resume says so in one line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_spectral.training.metrics import plot_data, read_metrics
from tests.e2e.runs import planned_lrs, records

ROOT = Path(__file__).resolve().parents[2]
FIRST, EXTENDED, WARMUP = 6, 10, 2
SMALL = ["--config", "tiny-olmoe-fsdp", "parallel=none", "model.config.num_hidden_layers=1", "data.seq_len=32",
         "data.batch_size=2", "data.max_bytes=100000", "train.eval_every=0", f"optim.warmup={WARMUP}",
         "train.progress=false", "train.plot=false", "name=e2e-extend"]


def train(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a world of one, whatever the test process runs under
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *SMALL, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("extend")
    train(f"train.steps={FIRST}", "train.ckpt_final=true", f"out_dir={out}")
    return out, train(f"train.steps={EXTENDED}", f"out_dir={out}", "--resume")


def test_extended_run_follows_the_new_totals_schedule(extended):
    out, _ = extended
    lrs = {r["step"]: r["lr"] for r in records(out, "train")}
    assert sorted(lrs) == list(range(1, EXTENDED + 1))
    assert all(lr > 0 for step in range(FIRST + 1, EXTENDED + 1) for lr in lrs[step].values())
    first, new = planned_lrs("symmetric", FIRST, WARMUP), planned_lrs("symmetric", EXTENDED, WARMUP)
    for step in range(1, FIRST + 1):
        assert lrs[step] == first[step], step
    for step in range(FIRST + 1, EXTENDED + 1):
        assert lrs[step] == new[step], step


def test_the_resume_says_how_the_schedule_changed(extended):
    _, stdout = extended
    lines = [line for line in stdout.splitlines() if "schedule changed" in line]
    assert len(lines) == 1, stdout
    assert f"train.steps {FIRST} -> {EXTENDED}" in lines[0] and f"from step {FIRST} on" in lines[0]
    assert "matrix groups x0.000 -> x1.000" in lines[0]  # the 6-step decay ended at 0; 10 steps hold to step 6


def test_the_resume_is_a_segment_of_the_plot(extended):
    out, _ = extended
    segments = [(r["step"], r["layout"]) for r in records(out, "segment")]
    assert segments == [(0, "none x1"), (FIRST, "none x1")]
    d = plot_data(read_metrics(out / "metrics.jsonl"))
    assert d["resumes"] == [(FIRST, "resumed: none x1")] and d["layouts"] == ["none x1"]


@pytest.fixture(scope="module")
def overridden(tmp_path_factory) -> tuple[Path, str]:
    """The same first run, resumed with an embedding lr and an mlp weight decay of its own."""
    out = tmp_path_factory.mktemp("override")
    train(f"train.steps={FIRST}", "train.ckpt_final=true", f"out_dir={out}")
    return out, train(f"train.steps={EXTENDED}", f"out_dir={out}", "--resume", "optim.overrides.embedding.lr=0.01",
                      "optim.overrides.mlp.weight_decay=0.0")


def test_hyperparameters_changed_at_resume_apply_and_are_said(overridden):
    """A checkpoint load restores the saved hyperparameters (torch's convention); the resumed run's
    config must win, and say so, rather than train on the old values in silence."""
    out, stdout = overridden
    lines = [line for line in stdout.splitlines() if "hyperparameters differ" in line]
    assert len(lines) == 1, stdout
    assert "embedding lr 0.02 -> 0.01" in lines[0] and "mlp weight_decay 0.001 -> 0.0" in lines[0], lines[0]
    lrs = {r["step"]: r["lr"] for r in records(out, "train")}
    planned = planned_lrs("symmetric", EXTENDED, WARMUP)
    for step in range(FIRST + 1, EXTENDED + 1):
        assert lrs[step]["embedding"] == pytest.approx(planned[step]["embedding"] / 2, rel=1e-12), step
        assert lrs[step]["mlp"] == planned[step]["mlp"], step


def test_unchanged_hyperparameters_say_nothing(extended):
    _, stdout = extended
    assert "hyperparameters differ" not in stdout
