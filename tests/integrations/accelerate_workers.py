"""Workers of the Accelerate tests: each rank of a W = 2 run (gloo, CPU) started by
``tests.distributed.ds_harness.launch`` with the environment Accelerate reads at launch (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Rank 0 writes the logged losses.

Accelerate 1.16 on a machine without accelerators, as measured here:

- FSDP: it applies the plugin only for accelerator distributed types; a CPU run (``cpu=True``,
  MULTI_CPU over gloo) gets DDP instead. :func:`fsdp_on_cpu` applies it as a GPU launch does.
- DeepSpeed: it takes the plugin only with ``cpu=False``; its state then finds no backend and
  counts one process while DeepSpeed starts its own gloo group over both ranks. So DeepSpeed
  partitions over W = 2, but Accelerate does not shard the data: every rank draws the same
  batches, and the run equals a one-process loop on one rank's batch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tests.distributed.ds_harness import leave_worker
from tests.integrations.hf_common import TokenDataset
from tests.tiny import tiny_qwen3

STEPS, BATCH, CLIP, WARMUP = 6, 2, 1.0, 2  # BATCH per rank: the one-process loop takes 2 * BATCH
DS_STAGE = int(os.environ.get("DS_TEST_STAGE", "2"))


def _args(out_dir: str, use_cpu: bool, **plugin):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(Path(out_dir) / "trainer"), max_steps=STEPS, per_device_train_batch_size=BATCH,
        max_grad_norm=CLIP, warmup_steps=WARMUP, train_sampling_strategy="sequential", logging_steps=1,
        report_to=[], seed=0, save_strategy="no", disable_tqdm=True, use_cpu=use_cpu, **plugin)


def fsdp_on_cpu() -> None:
    """Let Accelerate apply its FSDP plugin on CPU, as it does on GPUs.

    Accelerate 1.16 turns the plugin on only for accelerator distributed types
    (``AcceleratorState.__init__``: MULTI_GPU, MULTI_NPU, MULTI_XPU, ...); a gloo run is MULTI_CPU,
    where it silently wraps the model in DDP instead. This sets what that branch sets (with no
    mixed precision), so Accelerate's own FSDP2 code (``fsdp2_prepare_model``, the optimizer
    parameter switch, clipping) runs here.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def enabled(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = enabled


def _ds_config(clip) -> dict:
    """ZeRO stage ``DS_TEST_STAGE``. Without ``train_batch_size``: counting one process, Accelerate
    would fill an ``"auto"`` one as micro batch x 1, which DeepSpeed, seeing two ranks, rejects."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "gradient_clipping": clip,
            "steps_per_print": 10 ** 9, "zero_optimization": {"stage": DS_STAGE}}


def _trainer_run(out_dir: str, use_cpu: bool, **plugin) -> None:
    """``TRAINER_MODE``: ``whole`` (``STEPS`` steps, nothing saved), ``half`` (the first half under
    the whole run's schedule, saved at its end) or ``resume`` (from ``half``'s checkpoint to the end)."""
    import dist_spectral
    from dist_spectral.integrations.hf import SpectralTrainer, spectral_optimizer

    torch.set_num_threads(1)
    mode = os.environ.get("TRAINER_MODE", "whole")
    args = _args(out_dir, use_cpu, **plugin)
    schedule = None  # the default: paper_schedule over max_steps with args' warmup, as the one-process loop's
    if mode == "half":
        args.max_steps, args.save_strategy, args.save_steps = STEPS // 2, "steps", STEPS // 2
        schedule = lambda opt, n: dist_spectral.paper_schedule(opt, total_steps=STEPS, warmup=WARMUP)  # noqa: E731
    trainer = SpectralTrainer(model=tiny_qwen3(), args=args, train_dataset=TokenDataset(), recipe="symmetric",
                              schedule=schedule)
    trainer.train(resume_from_checkpoint=str(Path(args.output_dir) / f"checkpoint-{STEPS // 2}")
                  if mode == "resume" else None)
    opt = spectral_optimizer(trainer.optimizer)
    if trainer.args.process_index == 0:
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        (Path(out_dir) / f"{mode}.json").write_text(json.dumps(
            {"losses": losses, "num_steps": opt.num_steps, "engine": type(opt.topology).__name__}))
    leave_worker()


def fsdp2_trainer(rank: int, world: int, out_dir: str) -> None:
    """SpectralTrainer under Accelerate's FSDP2 plugin (``fsdp=True, fsdp_config={"version": 2}``).

    Sharded checkpoints: with the Trainer's default FULL_STATE_DICT, ``save_pretrained`` of the
    gathered weights fails here in safetensors ("Attempted to access the data pointer on an invalid
    python storage"), before any optimizer state is written."""
    fsdp_on_cpu()
    _trainer_run(out_dir, True, fsdp=True, fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT"})


def deepspeed_trainer(rank: int, world: int, out_dir: str) -> None:
    """SpectralTrainer under Accelerate's DeepSpeed plugin at ZeRO stage ``DS_TEST_STAGE``."""
    _trainer_run(out_dir, False, deepspeed=_ds_config("auto"))


def _loop_run(out_dir: str, accelerator) -> None:
    """An Accelerator loop over ``prepare``: the losses averaged over ranks, as the Trainer logs them."""
    import dist_spectral
    from dist_spectral.integrations.hf import prepare, spectral_optimizer

    loader = torch.utils.data.DataLoader(TokenDataset(), batch_size=BATCH, shuffle=False)
    model, opt, loader = prepare(accelerator, tiny_qwen3(), loader, recipe="symmetric")
    sched = dist_spectral.paper_schedule(spectral_optimizer(opt), total_steps=STEPS, warmup=WARMUP)
    losses = []
    for _, batch in zip(range(STEPS), loader):
        loss = model(**batch).loss
        accelerator.backward(loss)
        if accelerator.distributed_type.value != "DEEPSPEED":  # DeepSpeed clips by its config
            accelerator.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
        # the world's mean, not accelerator.reduce: on CPU under DeepSpeed Accelerate counts one process
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / torch.distributed.get_world_size())
    inner = spectral_optimizer(opt)
    if accelerator.is_main_process:
        (Path(out_dir) / "whole.json").write_text(json.dumps(
            {"losses": losses, "num_steps": inner.num_steps, "engine": type(inner.topology).__name__}))
    leave_worker()


def fsdp2_loop(rank: int, world: int, out_dir: str) -> None:
    """``prepare`` under ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))``."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    torch.set_num_threads(1)
    fsdp_on_cpu()
    _loop_run(out_dir, Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2)))


def deepspeed_loop(rank: int, world: int, out_dir: str) -> None:
    """``prepare`` under ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=DS_TEST_STAGE))``."""
    from accelerate import Accelerator, DeepSpeedPlugin

    torch.set_num_threads(1)
    _loop_run(out_dir, Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=_ds_config(CLIP))))
