"""Atomic checkpoints: a save killed on one rank (SIGKILL, the ``DIST_SPECTRAL_TEST_KILL`` hook after
that rank's shard file is written) leaves the previous checkpoint complete and loadable, and the run
resumed from it continues the uninterrupted trajectory bit for bit.

Two spawns of W=2 (tiny OLMoE under FSDP2, recipe ``symmetric``)::

    killed   step, save step_000001 (complete), step, then a save killed on one rank:
               sync   rank 1 killed saving step_000002 (a new name)
               async  rank 0 killed in the writer thread re-saving step_000001 (replacing it)
    resume   load step_000001 in both, step: equals the killed run's state before its save;
             the next save deletes the killed saves' temporaries
"""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.harness import run_world

pytest.importorskip("transformers")

MODES = {"sync": (1, "step_000002"), "async": (0, "step_000001")}  # killed rank, second save's name


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


def _state(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd.get("state", {}), "num_steps": opt.num_steps}  # full on rank 0 only


def _save(mode: str, path, model, opt, step: int) -> None:
    import torch.distributed as dist

    from dist_spectral import checkpoint

    if mode == "sync":
        checkpoint.save(path, model, opt, extra={"step": step})
    else:
        checkpoint.async_save(path, model, opt, extra={"step": step},
                              process_group=dist.new_group(backend="gloo")).result()
        dist.barrier()


def _killed(rank: int, world_size: int, root: str, mode: str) -> None:
    from dist_spectral import faults

    victim, second = MODES[mode]
    model, opt = _model_and_opt(world_size)
    _step(model, opt, 0)
    _save(mode, os.path.join(root, "step_000001"), model, opt, 1)
    _step(model, opt, 1)
    state = _state(model, opt)  # collective: every rank
    if rank == 0:
        torch.save(state, os.path.join(root, "expected.pt"))
    os.environ[faults.ENV] = f"save:{victim}:2"
    _save(mode, os.path.join(root, second), model, opt, 2)
    raise AssertionError(f"rank {rank} finished a save that should have been killed")


def _resume(rank: int, world_size: int, roots: list[str]) -> dict:
    from dist_spectral import checkpoint

    out = {}
    for mode, root in zip(MODES, roots):
        before = sorted(os.listdir(root))
        model, opt = _model_and_opt(world_size)
        extra = checkpoint.load(os.path.join(root, "step_000001"), model, opt)
        _step(model, opt, 1)
        state = _state(model, opt)
        checkpoint.save(os.path.join(root, "step_000003"), model, opt, extra={"step": 3})
        out[mode] = {"before": before, "after": sorted(os.listdir(root)), "extra": extra, "state": state}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    roots, killed = [], {}
    for mode in MODES:
        root = tmp_path_factory.mktemp(mode)
        with pytest.raises(mp.ProcessExitedException) as exc:
            run_world(2, _killed, str(root), mode, timeout_s=30)
        killed[mode] = exc.value
        roots.append(str(root))
    return killed, run_world(2, _resume, roots)[0]


@pytest.mark.parametrize("mode", MODES)
def test_killed_save_leaves_the_previous_checkpoint(runs, mode):
    killed, resumed = runs
    victim, second = MODES[mode]
    assert killed[mode].error_index == victim and killed[mode].exit_code == -signal.SIGKILL
    before = resumed[mode]["before"]
    assert "step_000001" in before and (second == "step_000001" or second not in before)
    staging = [n for n in before if n.startswith(f"{second}.tmp-")]
    assert len(staging) == 1, before  # the killed save's files, under a name nothing resumes from
    assert not any(n.startswith("step_000001.old-") for n in before)


@pytest.mark.parametrize("mode", MODES)
def test_resume_from_it_continues_bit_for_bit(runs, tmp_path_factory, mode):
    _, resumed = runs
    got = resumed[mode]
    assert got["extra"] == {"step": 1}
    root = [p for p in tmp_path_factory.getbasetemp().iterdir() if p.name.startswith(mode)][0]
    want = torch.load(root / "expected.pt", weights_only=False)
    assert got["state"]["num_steps"] == want["num_steps"] == 2
    for key, value in want["model"].items():
        assert torch.equal(got["state"]["model"][key], value), key
    for fqn, st in want["optim"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(got["state"]["optim"][fqn][k]), torch.as_tensor(v)), (fqn, k)


@pytest.mark.parametrize("mode", MODES)
def test_next_save_deletes_the_stale_temporaries(runs, mode):
    after = runs[1][mode]["after"]
    assert [n for n in after if ".tmp-" in n or ".old-" in n] == []
    assert {"step_000001", "step_000003"} <= set(after)


# ----- the training entry's pointer, keep-last-k and resume choice (no processes) -----
STALE = "step_000002.tmp-0123456789ab"


def test_prune_counts_only_complete_checkpoints(tmp_path):
    from dist_spectral.training.loop import point_latest, prune_checkpoints

    for name in ("step_000002", STALE, "step_000004"):
        (tmp_path / name).mkdir()
    point_latest(tmp_path, "step_000004")
    # A stale temporary sorts between the two complete checkpoints: it must not count as one.
    assert prune_checkpoints(tmp_path, keep=2) == []
    assert [p.name for p in prune_checkpoints(tmp_path, keep=1)] == ["step_000002"]
    assert (tmp_path / "step_000004").is_dir() and (tmp_path / STALE).is_dir()  # the next save's to delete
    point_latest(tmp_path, "step_000006")  # names nothing (deleted by hand): the only complete one stays
    assert prune_checkpoints(tmp_path, keep=1) == [] and (tmp_path / "step_000004").is_dir()
    assert (tmp_path / "latest").read_text() == "step_000006" and not list(tmp_path.glob("latest.tmp-*"))


def test_resume_ignores_temporaries_and_restarts_resume_this_jobs_latest(tmp_path, monkeypatch):
    import json

    from dist_spectral.training.loop import Trainer, elastic_resume, point_latest, resolve_resume

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()

    def saved(name: str, job: str) -> None:  # a checkpoint as the DeepSpeed path records it
        (ckpts / name).mkdir()
        (ckpts / name / Trainer.MANIFEST).write_text(json.dumps({"step": int(name[5:]), "elastic_job": job}))

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert elastic_resume(None, tmp_path) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert elastic_resume(None, tmp_path) is None  # killed before its first checkpoint: from the start
    saved("step_000008", "job-a")  # an earlier job's, left in the same output directory
    point_latest(ckpts, "step_000008")
    assert elastic_resume(None, tmp_path) is None and elastic_resume("/x/step_000010", tmp_path) == "/x/step_000010"
    saved("step_000002", "job-b")
    (ckpts / "step_000004.tmp-0123456789ab").mkdir()  # a save killed after step 2's
    point_latest(ckpts, "step_000002")
    assert elastic_resume(None, tmp_path) == "auto" and elastic_resume("/x/step_000010", tmp_path) == "auto"
    assert resolve_resume("auto", tmp_path) == ckpts / "step_000002"
    with pytest.raises(ValueError, match="never finished"):
        resolve_resume(str(ckpts / "step_000004.tmp-0123456789ab"), tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert elastic_resume(None, tmp_path) is None  # the first attempt does what it was asked
