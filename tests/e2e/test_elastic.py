"""End to end under ``torchrun --max-restarts=2`` (elastic, ``--standalone``, W=2): ranks SIGKILLed once
inside a checkpoint save and once between checkpoints; each restart resumes from the run's last
complete checkpoint, and the final checkpoint equals an uninterrupted run's bit for bit.

One elastic run per engine (FSDP2 with synchronous and asynchronous saves, DeepSpeed ZeRO-2), killed
by the ``DIST_SPECTRAL_TEST_KILL`` hook (dist_spectral/faults.py) at deterministic points,
checkpoints every 2 of 6 steps::

    attempt 0   saves step 2; rank 1 killed inside the save of step 4, its shard file written
                (async: in the writer thread)
    attempt 1   resumes from step 2 (step 4's files are a temporary); synchronous saves: saves
                step 4, rank 0 killed after step 5; async: rank 0 killed after step 3, before the
                next save starts (killed after step 5, the async save of step 4 may or may not have
                completed: either is right, but the test could not say which resume to expect)
    attempt 2   resumes from step 4 (async: 2), saves step 6

and one uninterrupted run of the same job to compare with. The run's metrics read as one run.

Under DeepSpeed the runs set ``LOCAL_SIZE`` as DeepSpeed's own launcher does, so its CPU op keeps its
all-reduce buffers in /dev/shm (about 66 MiB per rank, named by MASTER_PORT, which torchrun keeps
across restarts): each restart must find the killed rank's buffer and remove it, and none may be left.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.runs import records

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
SHORT = [f"train.steps={STEPS}", "train.ckpt_every=2", "train.ckpt_keep=2", "train.eval_every=0",
         "data.seq_len=64", "data.batch_size=4", "data.max_bytes=400000", "optim.warmup=2", "train.progress=false",
         "train.plot=false"]
# run config and overrides, kill points, the steps the two restarts resume from
CONFIGS = {"fsdp": (("tiny-olmoe-fsdp",), "save:1:2,step:0:5@1", (2, 4)),
           "fsdp-async": (("tiny-olmoe-fsdp", "train.ckpt_async=true"), "save:1:2,step:0:3@1", (2, 2)),
           "deepspeed-zero2": (("tiny-olmoe-zero2",), "save:1:2,step:0:5@1", (2, 4))}


def torchrun(config: tuple, out: Path, *, kills: str | None = None) -> str:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(bindir), os.environ.get("PATH", "")])}
    if "zero" in config[0]:
        env["LOCAL_SIZE"] = "2"  # as the deepspeed launcher: DeepSpeed's shared-memory all-reduce
    env.pop("DIST_SPECTRAL_TEST_KILL", None)
    elastic = []
    if kills:
        env["DIST_SPECTRAL_TEST_KILL"] = kills
        elastic = ["--max-restarts=2", "--monitor-interval=0.2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *elastic,
           str(ROOT / "launch" / "train.py"), "--config", config[0], *SHORT, *config[1:], f"out_dir={out}",
           "name=elastic"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers
        output, _ = proc.communicate()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-8000:]}"
    return output


def tensors(obj, prefix: str = "") -> dict:
    """Every tensor in a nested state, keyed by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def checkpoint_tensors(path: Path, tmp: Path) -> dict:
    """Model and optimizer tensors of a DCP or DeepSpeed checkpoint directory."""
    if (path / ".metadata").is_file():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, tmp / f"{path.parent.parent.name}.pt")
        return tensors(torch.load(tmp / f"{path.parent.parent.name}.pt", weights_only=False))
    out = {}
    for file in sorted(path.glob("*.pt")):
        out.update(tensors(torch.load(file, weights_only=False), file.name))
    return out


@pytest.fixture(scope="module", params=list(CONFIGS))
def runs(request, tmp_path_factory):
    from dist_spectral.training.shm import stale_buffers

    config, kills, resumes = CONFIGS[request.param]
    stale_before = {p.name for p in stale_buffers()}
    ref, elastic = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("elastic")
    torchrun(config, ref)
    output = torchrun(config, elastic, kills=kills)
    return {"engine": request.param, "ref": ref, "elastic": elastic, "output": output, "resumes": resumes,
            "stale": {p.name for p in stale_buffers()} - stale_before}


def test_restarts_resume_from_the_last_complete_checkpoint(runs):
    out, resumes = runs["output"], runs["resumes"]
    for restart, step in enumerate(resumes, 1):
        assert f"resumed at step {step} (elastic restart {restart})" in out, out[-4000:]
    # a launch resumed where the previous one did replaces its segment
    assert [r["step"] for r in records(runs["elastic"], "segment")] == sorted({0, *resumes})
    # keep-last-k=2 after the last save; the killed save's temporary deleted by the next save
    kept = sorted(p.name for p in (runs["elastic"] / "checkpoints").iterdir() if not p.name.endswith(".py"))
    assert kept == ["latest", "step_000004", "step_000006"]  # DeepSpeed adds its zero_to_*.py scripts
    assert (runs["elastic"] / "checkpoints" / "latest").read_text() == "step_000006"


def test_final_checkpoint_equals_the_uninterrupted_run(runs, tmp_path):
    got = checkpoint_tensors(runs["elastic"] / "checkpoints" / "step_000006", tmp_path)
    want = checkpoint_tensors(runs["ref"] / "checkpoints" / "step_000006", tmp_path)
    assert sorted(got) == sorted(want) and len(want) > 20
    assert any(".weight" in k or "module" in k for k in want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    ref_losses = [r["loss"] for r in records(runs["ref"], "train")]
    assert [r["loss"] for r in records(runs["elastic"], "train")] == ref_losses  # one record per step


def test_restarts_remove_the_killed_attempts_shared_memory(runs):
    if not runs["engine"].startswith("deepspeed"):
        assert "shared-memory" not in runs["output"]
    else:
        lines = re.findall(r"removed \d+ stale DeepSpeed shared-memory buffer\(s\).*: (.*)", runs["output"])
        assert len(lines) >= 2, runs["output"][-4000:]  # one per restart
        ports = set(re.findall(rf"deepspeed_allreduce_buffer_{os.getuid()}_[^_]+_(\d+)_0", runs["output"]))
        assert len(ports) == 1, ports  # torchrun keeps MASTER_PORT: the restart would have mapped them
        (port,) = ports
        # The killed rank cannot remove its own buffer: the next attempt's cleanup must (attempt 0
        # kills rank 1, attempt 1 rank 0; see CONFIGS). The rank torchrun stops may have removed its
        # own on the way out (when the collective with the dead rank failed first) or left it to
        # the cleanup: either way none is left, which the last assertion checks.
        killed = {0: 1, 1: 0}
        for attempt, rank in killed.items():
            assert f"_{port}_{rank}" in lines[attempt], (attempt, lines)
    assert runs["stale"] == set()  # and the last attempt removed its own
