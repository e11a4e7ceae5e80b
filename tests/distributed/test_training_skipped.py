"""The training loop counts every skipped step under DeepSpeed, whichever side skipped it.

DeepSpeed skips a step itself when the global gradient norm is not finite (ZeRO-3 always checks
it): the optimizer is not called and only ``engine.skipped_steps`` counts it. A non-finite gradient
that reaches the optimizer is skipped and counted by ``opt.skipped_steps``. A ZeRO-3 run of the
training loop at W = 2 meets one of each: the per-step records flag both steps and the summary
counts 2, also after a resume from a checkpoint written after both.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

STEPS, CKPT_AT = 6, 5
DEEPSPEED_SKIPS, OPTIMIZER_SKIPS = 1, 3  # 0-based training steps (records' ``step`` is one more)
SETTINGS = ["parallel.deepspeed.stage=3", f"train.steps={STEPS}", f"train.ckpt_every={CKPT_AT}", "train.eval_every=0",
            "train.progress=false", "train.plot=false", "data.seq_len=32", "data.batch_size=2",
            "data.max_bytes=200000", "optim.warmup=2"]


def _poisoning(trainer, rank: int):
    """Wrap ``trainer.train_step``: at DEEPSPEED_SKIPS a NaN enters rank 1's gradient in backward
    (DeepSpeed's norm check sees it); at OPTIMIZER_SKIPS rank 1's pending gradient of the first flat
    becomes NaN at the optimizer's first call (after DeepSpeed's check)."""
    from tests.distributed.ds_nonfinite import _poison_pending

    engine, opt = trainer.engine, trainer.opt
    weight = dict(engine.module.named_parameters())["model.layers.0.mlp.gate.weight"]
    train_step, opt_step, calls = trainer.train_step, opt.step, []

    poison_now = [False]

    def step(closure=None):
        calls.append(1)
        if len(calls) == 1 and poison_now[0] and rank == 1:
            _poison_pending(engine, opt, 0, float("nan"))
        return opt_step(closure)

    def poisoned_train_step(step_no: int) -> dict:
        calls.clear()
        poison_now[0] = step_no == OPTIMIZER_SKIPS
        handle = weight.register_hook(lambda g: g + float("nan")) if step_no == DEEPSPEED_SKIPS and rank == 1 else None
        try:
            return train_step(step_no)
        finally:
            if handle is not None:
                handle.remove()

    opt.step = step
    trainer.train_step = poisoned_train_step


def worker(rank: int, world: int, out_dir: str) -> None:
    from pathlib import Path

    from dist_spectral.training.config import load_config
    from dist_spectral.training.launchers import init_distributed
    from dist_spectral.training.loop import Trainer
    from dist_spectral.training.metrics import read_metrics
    from tests.distributed.ds_harness import leave_worker

    out = {}
    for name, resume in (("full", None), ("resumed", f"{out_dir}/full/checkpoints/step_{CKPT_AT:06d}")):
        cfg = load_config("tiny-olmoe-zero3", [*SETTINGS, f"out_dir={out_dir}/{name}", f"name={name}"])
        env = init_distributed(cfg.parallel)
        trainer = Trainer(cfg, env)
        if resume is None:
            _poisoning(trainer, rank)
        summary = trainer.run(resume)
        out[name] = {"summary": summary, "opt": trainer.opt.skipped_steps, "engine": trainer.engine.skipped_steps}
        if rank == 0:
            out[name]["records"] = [r for r in read_metrics(Path(out_dir) / name / "metrics.jsonl")
                                    if r["kind"] == "train"]
    torch.save(out, Path(out_dir) / f"result{rank}.pt")
    leave_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from tests.distributed.ds_harness import launch

    d = tmp_path_factory.mktemp("training_skipped")
    launch(2, "tests.distributed.test_training_skipped:worker", d, timeout_s=300)
    return [torch.load(d / f"result{r}.pt", weights_only=False) for r in range(2)]


def test_records_flag_both_skipped_steps(ranks):
    records = ranks[0]["full"]["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["skipped"]] == [DEEPSPEED_SKIPS + 1, OPTIMIZER_SKIPS + 1]


def test_summary_counts_both_sources_once(ranks):
    for res in ranks:
        assert (res["full"]["opt"], res["full"]["engine"]) == (1, 1)  # one step skipped by each side
        assert res["full"]["summary"]["skipped_steps"] == 2
        # the resumed run restored both counters from the checkpoint at step 5
        assert (res["resumed"]["opt"], res["resumed"]["engine"]) == (1, 1)
        assert res["resumed"]["summary"]["skipped_steps"] == 2
