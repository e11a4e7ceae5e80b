"""End to end under the ``deepspeed`` launcher: ``deepspeed --num_gpus 2 launch/train.py --config
tiny-olmoe-zero2`` (2 local gloo processes on CPU, ZeRO-2, dist_spectral's ``symmetric`` recipe on
DeepSpeed's flat partitions) for a few steps on a fixed generated corpus, then ``--resume`` from its
mid-run DeepSpeed checkpoint.

Two launches for the module (~25-30 s each on 2 shared cores once DeepSpeed's shared-memory op is
cached in TORCH_EXTENSIONS_DIR; the first build costs ~90 s more).
"""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.runs import RESUME_MODEL_SETTINGS, golden_data, model_overrides, records, saved_model_settings

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVAL_EVERY, CKPT_AT = 16, 8, 8
# The fixed generated corpus (tests/e2e/runs.py), the same bytes on every machine, so the final
# validation loss is pinned: GOLDEN_VAL, measured, to GOLDEN_TOLERANCE (runs on one machine agree bit
# for bit). A change to the update that moves this run and the FSDP2 ones alike
# (tests/e2e/test_golden.py) is caught here too.
GOLDEN_VAL = 4.0269051809159535
GOLDEN_TOLERANCE = 2e-4
SHORT = [f"train.steps={STEPS}", f"train.eval_every={EVAL_EVERY}", "train.eval_batches=2", "data.seq_len=64",
         "data.batch_size=4", *golden_data(), "optim.warmup=5", "train.progress=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launch(*args: str) -> str:
    """Run the entry point under the deepspeed launcher; returns its output."""
    bindir = Path(sys.executable).parent
    # The venv's bin first: its ninja builds DeepSpeed's op (see training/launchers.py), and the
    # launcher starts the ranks with the interpreter it runs under.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(bindir), os.environ.get("PATH", "")])}
    cmd = [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "launch" / "train.py"), "--config", "tiny-olmoe-zero2", *SHORT, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        out, _ = proc.communicate()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-8000:]}"
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds_full")
    deepspeed_launch(f"train.ckpt_every={CKPT_AT}", f"out_dir={out}", "name=e2e-ds-full")
    return out


def test_outputs_steps_and_checkpoints(full_run):
    train = records(full_run, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records(full_run, "eval")] == list(range(0, STEPS + 1, EVAL_EVERY))
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in train)
    # Whole-matrix rules go through the owner exchange on DeepSpeed's flats: both parts measured.
    assert all(r["opt_s"] > 0 and r["exchange_s"] > 0 and r["compute_s"] > 0 for r in train)
    (summary,) = records(full_run, "summary")
    assert summary["world_size"] == 2 and summary["step"] == STEPS
    assert "engine: deepspeed" in (full_run / "config.yaml").read_text()
    ckpts = full_run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:06d}"
    for step in (CKPT_AT, STEPS):  # each rank's partition of the optimizer state
        files = {p.name for p in (ckpts / f"step_{step:06d}").iterdir()}
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "mp_rank_00_model_states.pt", "dist_spectral.json"} <= files, files


def test_validation_loss_ends_at_its_golden_value(full_run):
    evals = [r["val_loss"] for r in records(full_run, "eval")]
    assert abs(evals[0] - math.log(256)) < 0.1  # random init predicts ~uniform bytes
    assert evals[-1] == pytest.approx(GOLDEN_VAL, abs=GOLDEN_TOLERANCE), f"measured {evals[-1]!r}"


@pytest.mark.parametrize("model_settings", RESUME_MODEL_SETTINGS.values(), ids=RESUME_MODEL_SETTINGS.keys())
def test_resume_reproduces_the_uninterrupted_run(full_run, tmp_path, model_settings):
    checkpoint = full_run / "checkpoints" / f"step_{CKPT_AT:06d}"
    deepspeed_launch(f"out_dir={tmp_path}", "name=e2e-ds-resumed", *model_overrides(model_settings),
                     "--resume", str(checkpoint))
    assert saved_model_settings(tmp_path, model_settings) == model_settings
    full = {r["step"]: r for r in records(full_run, "train")}
    resumed = {r["step"]: r for r in records(tmp_path, "train")}
    assert sorted(resumed) == list(range(CKPT_AT + 1, STEPS + 1))
    # Measured: bitwise the same losses and learning rates (same data, weights, moments, schedule).
    for step, r in resumed.items():
        assert (r["loss"], r["lr"]) == (full[step]["loss"], full[step]["lr"]), step
    full_val = {r["step"]: r["val_loss"] for r in records(full_run, "eval")}
    for r in records(tmp_path, "eval"):
        assert r["val_loss"] == full_val[r["step"]]
