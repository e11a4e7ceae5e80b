"""A training-entry checkpoint saved under one layout resumes under another (DCP reshards):
saved by ``parallel=fsdp`` at W=2, loaded under expert parallel (``parallel=ep``, FSDP-gathered and
token-routed experts) and HSDP (2 replicas) at W=2 and ``parallel=none`` at W=1, with the same weights and optimizer state,
and, at W=2, the run continues the uninterrupted one. Between DCP and DeepSpeed checkpoints the
refusal names both layouts.

Three spawns: W=2 saves (tiny OLMoE, symmetric recipe, steps 1-2, checkpoint, step 3), W=2 resumes
under both eps and hsdp, W=1 under none; each resumed run takes step 3. At W=1 the same 8 sequences make
one batch instead of two of 4, and OLMoE's router load-balancing loss is a function of each rank's
batch, so its step-3 loss is not the W=2 run's (5.1304 vs 5.1293): only its loaded state is compared.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_world

pytest.importorskip("transformers")

STEPS = 3
COMMON = [f"train.steps={STEPS}", "train.eval_every=0", "data.seq_len=32", "data.max_bytes=200000",
          "optim.warmup=1", "train.progress=false", "train.plot=false"]
LAYOUTS = {"ep": (2, ["parallel=ep"]), "ep-all-to-all": (2, ["parallel=ep", "parallel.expert_dispatch=all_to_all"]),
           "hsdp": (2, ["parallel=hsdp", "parallel.replicas=2"]),
           "none": (1, ["parallel=none", "data.batch_size=8"])}  # W=1 takes both ranks' 2 x 4 sequences


def _config(root: str, name: str, overrides: list[str]):
    from dist_spectral.training.config import load_config

    return load_config("tiny-olmoe-fsdp", [*COMMON, f"out_dir={root}/{name}", f"name={name}", *overrides])


def _full_state(trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(trainer.model, trainer.opt, options=StateDictOptions(full_state_dict=True))
    return {"model": {k: v.detach().clone() for k, v in msd.items()},
            "optim": {f"{fqn}.{k}": torch.as_tensor(v).clone()
                      for fqn, st in osd["state"].items() for k, v in st.items()},
            "lrs": [g["lr"] for g in trainer.opt.param_groups], "num_steps": trainer.opt.num_steps}


def _losses(root: str, name: str) -> dict:
    from pathlib import Path

    from dist_spectral.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(root, name, "metrics.jsonl")) if r["kind"] == "train"}


def _save(rank: int, world_size: int, root: str) -> dict:
    from dist_spectral.training.launchers import init_distributed
    from dist_spectral.training.loop import Trainer

    cfg = _config(root, "fsdp", ["parallel=fsdp", "train.ckpt_every=2"])
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    trainer.run()
    saved = Trainer(cfg, init_distributed(cfg.parallel))
    saved.load(cfg.output / "checkpoints" / "step_000002")
    return {"saved": _full_state(saved), "losses": _losses(root, "fsdp") if rank == 0 else None}


def _resume(rank: int, world_size: int, root: str, names: list[str]) -> dict:
    from dist_spectral.training.launchers import init_distributed
    from dist_spectral.training.loop import Trainer

    out = {}
    ckpt = f"{root}/fsdp/checkpoints/step_000002"
    for name in names:
        cfg = _config(root, name, LAYOUTS[name][1])
        trainer = Trainer(cfg, init_distributed(cfg.parallel))
        step = trainer.load(ckpt)
        loaded = _full_state(trainer)
        Trainer(cfg, init_distributed(cfg.parallel)).run(resume=ckpt)
        out[name] = {"step": step, "loaded": loaded, "losses": _losses(root, name) if rank == 0 else None}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    saved = run_world(2, _save, root)[0]
    resumed = run_world(2, _resume, root, [name for name, (world, _) in LAYOUTS.items() if world == 2])[0]
    resumed.update(run_world(1, _resume, root, ["none"])[0])
    return saved, resumed, root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loaded_state_equals_the_saved_one(runs, layout):
    saved, resumed, _ = runs
    got, want = resumed[layout], saved["saved"]
    assert got["step"] == 2 and got["loaded"]["num_steps"] == want["num_steps"] == 2
    assert got["loaded"]["lrs"] == want["lrs"]
    for part in ("model", "optim"):
        assert sorted(got["loaded"][part]) == sorted(want[part]), part
        for key, value in want[part].items():
            assert torch.equal(got["loaded"][part][key], value), (layout, part, key)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resumed_step_continues_the_uninterrupted_run(runs, layout):
    saved, resumed, _ = runs
    losses = resumed[layout]["losses"]
    assert sorted(losses) == [3] and math.isfinite(losses[3])
    if LAYOUTS[layout][0] == 2:  # the same per-rank batches: measured equal to the last bit (5.129267930984497)
        assert losses[3] == saved["losses"][3], (losses[3], saved["losses"][3])


def test_dcp_and_deepspeed_checkpoints_refuse_each_other_naming_the_layouts(runs, tmp_path):
    from dist_spectral.training.loop import Trainer, format_mismatch, saved_layout

    dcp_ckpt = Path(runs[2], "fsdp", "checkpoints", "step_000002")
    assert saved_layout(dcp_ckpt) == "fsdp x2"
    assert format_mismatch(dcp_ckpt, "ep x4", deepspeed=False) is None
    message = format_mismatch(dcp_ckpt, "deepspeed ZeRO-2 x2", deepspeed=True)
    assert "saved under fsdp x2" in message and "this run is deepspeed ZeRO-2 x2" in message
    assert "parallel=none, ddp, fsdp, hsdp or ep" in message
    ds_ckpt = tmp_path / "step_000004"  # what the manifest of a DeepSpeed save says is all that is read
    ds_ckpt.mkdir()
    (ds_ckpt / Trainer.MANIFEST).write_text(json.dumps({"step": 4, "world_size": 2, "zero_stage": 2}))
    assert format_mismatch(ds_ckpt, "deepspeed ZeRO-2 x2", deepspeed=True) is None
    message = format_mismatch(ds_ckpt, "fsdp x2", deepspeed=False)
    assert "saved under deepspeed ZeRO-2 x2" in message and "this run is fsdp x2" in message
    assert "parallel.engine=deepspeed" in message
