"""Golden losses: the default job (tiny OLMoE, FSDP2 over 2 ranks under ``torchrun``), shortened, with
each main recipe, ends at the validation loss measured when its lrs were chosen.

The resume tests compare two runs of the same code, and the other end-to-end tests ask only that the
loss falls: a change to an update rule that moves every run alike passes them all. These numbers
catch it. The runs train on a fixed generated corpus (:func:`tests.e2e.runs.golden_corpus`), the
same bytes on every machine; fp32 on CPU with one thread per rank, so a rerun on one machine gives the
same bits and another x86 machine agrees far inside the tolerance. The DeepSpeed job's golden loss is
in tests/e2e/test_train_deepspeed.py.

A deliberate change to a rule or a recipe's defaults moves these numbers: measure again
(``pytest tests/e2e/test_golden.py`` prints the measured values on failure) and say why in the commit.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.runs import golden_data, records

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
SHORT = [f"train.steps={STEPS}", f"train.eval_every={STEPS}", "train.eval_batches=2", "data.seq_len=64",
         "data.batch_size=4", "optim.warmup=5", "train.progress=false", "train.plot=false"]

#: Final validation loss of each recipe, measured (2 ranks, fp32, the golden corpus). A wrong update
#: moves it by far more than the tolerance: e.g. the symmetric recipe without its width-aware scale
#: (symmetric-paper) ends at SYMMETRIC_PAPER.
GOLDEN = {"symmetric": 3.5060955834767173, "muon": 1.9418024032834977, "adamw": 3.092208256797185}
SYMMETRIC_PAPER = 4.090159824916294
TOLERANCE = 2e-4  # nats; runs on one machine agree bit for bit


@pytest.mark.parametrize("recipe", list(GOLDEN))
def test_default_job_ends_at_its_golden_loss(recipe, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "launch" / "train.py"), *SHORT, *golden_data(), f"optim.recipe={recipe}",
           f"out_dir={tmp_path}", f"name=golden-{recipe}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (last,) = [r for r in records(tmp_path, "eval") if r["step"] == STEPS]
    assert last["val_loss"] == pytest.approx(GOLDEN[recipe], abs=TOLERANCE), \
        f"{recipe}: measured {last['val_loss']!r}, golden {GOLDEN[recipe]!r}"
