"""Hugging Face Accelerate and ``Trainer``: the optimizer built where each Accelerate plugin needs it.

dist_spectral reads each parameter's layout when the optimizer is built, so the order matters:

====================  =====================================================================
Accelerate runs        working order
====================  =====================================================================
one process, DDP       build before or after ``prepare`` (DDP keeps the parameters)
FSDP2 plugin           ``model = accelerator.prepare(model)`` (``fully_shard`` replaces the
                       parameters), build on it, then ``accelerator.prepare(model, opt)``:
                       Accelerate takes an FSDP2 optimizer only beside its model, and a model
                       already sharded passes through unchanged
DeepSpeed plugin       build before ``prepare`` (DeepSpeed takes the client optimizer), then
                       move it onto DeepSpeed's flat partitions (:func:`attach_deepspeed`)
====================  =====================================================================

:func:`prepare` does that for an ``Accelerator`` loop; :class:`SpectralTrainer` does it inside
``Trainer`` (which refuses ``optimizers=`` under FSDP, and under DeepSpeed drops them for its own
``create_optimizer``)::

    trainer = SpectralTrainer(model=model, args=args, train_dataset=ds, recipe="symmetric")
    trainer.train()
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

from ..build import build_optimizer
from ..optimizer import SpectralOptimizer
from ..schedules import paper_schedule

try:
    from transformers import Trainer
except ImportError as e:  # an optional integration: say what to install, not a bare ImportError
    raise ImportError("dist_spectral.integrations.hf needs transformers and accelerate "
                      "(pip install 'dist-spectral[hf]')") from e


def spectral_optimizer(optimizer) -> SpectralOptimizer:
    """The :class:`~dist_spectral.SpectralOptimizer` inside Accelerate's and DeepSpeed's wrappers."""
    seen = optimizer
    while not isinstance(seen, SpectralOptimizer):
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            raise TypeError(f"{type(optimizer).__name__} wraps no dist_spectral optimizer: build it with "
                            "dist_spectral.build_optimizer (or SpectralTrainer)")
    return seen


def attach_deepspeed(engine, optimizer) -> None:
    """Step ``optimizer`` on the flat partitions of an initialised DeepSpeed ``engine``.

    ``dist_spectral.deepspeed.initialize`` does this itself; Accelerate's DeepSpeed plugin calls
    ``deepspeed.initialize`` on its own, so call this after its ``prepare``. A no-op at ZeRO
    stage 0 (DeepSpeed then steps the real parameters) and when already attached.

    Args:
        engine (DeepSpeedEngine): e.g. ``accelerator.deepspeed_engine_wrapped.engine``.
        optimizer: the optimizer given to ``prepare``, or a wrapper of it.
    """
    import torch.distributed as dist

    from ..engines.deepspeed import ZeroEngine
    from ..engines.zero_map import _zero_optimizer, build_zero_map, flat_tensors

    opt = spectral_optimizer(optimizer)
    if engine.zero_optimization_stage() == 0 or isinstance(opt.topology, ZeroEngine):
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("DeepSpeed ZeRO needs torch.distributed initialised (Accelerate initialises it at launch)")
    # DeepSpeed keeps the module's Parameter objects (ZeRO-3 only empties them), so its names index the flats
    zero_map = build_zero_map(engine, list(engine.module.named_parameters()))
    opt.attach(ZeroEngine(zero_map, flat_tensors(engine), zero_optimizer=_zero_optimizer(engine)))


def _fsdp_version(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return None if plugin is None else getattr(plugin, "fsdp_version", 1)


def _check_fsdp2(accelerator) -> None:
    if _fsdp_version(accelerator) == 1:
        raise ValueError("Accelerate's FSDP plugin is at fsdp_version=1 (FullyShardedDataParallel flattens the "
                         "parameters, so no matrix keeps its shape): use FullyShardedDataParallelPlugin(fsdp_version=2) "
                         "or TrainingArguments(fsdp_config={'version': 2})")


def prepare(accelerator, model: torch.nn.Module, *objects, recipe="symmetric", **build_kwargs):
    """``accelerator.prepare`` for a model and a dist_spectral optimizer built on it, in the order
    the accelerator's plugin needs (see the module docstring).

    Args:
        accelerator (accelerate.Accelerator): the accelerator (FSDP2, DeepSpeed, DDP or one process).
        model (nn.Module): the unwrapped model.
        *objects: further objects to prepare with them (dataloaders); returned in order.
        recipe (str | dict | Path): the recipe (default: ``"symmetric"``).
        **build_kwargs: passed to :func:`~dist_spectral.build_optimizer`.

    Returns:
        ``(model, optimizer, *objects)``: prepared; ``optimizer`` is Accelerate's wrapper (pass it to
        the loop), :func:`spectral_optimizer` of it the dist_spectral optimizer (for schedules).
    """
    from accelerate.utils import DistributedType

    _check_fsdp2(accelerator)
    if _fsdp_version(accelerator) == 2:
        model = accelerator.prepare(model)
    opt = build_optimizer(model, recipe, **build_kwargs)
    model, opt, *objects = accelerator.prepare(model, opt, *objects)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        attach_deepspeed(accelerator.deepspeed_engine_wrapped.engine, opt)
    return (model, opt, *objects)


COUNTERS_NAME = "dist_spectral_counters.json"  # beside the Trainer's optimizer.pt / scheduler.pt
_COUNTERS = ("num_steps", "skipped_steps")


class SpectralTrainer(Trainer):
    """``transformers.Trainer`` training with a dist_spectral recipe, under any Accelerate plugin.

    Args:
        *args, **kwargs: ``Trainer``'s (not ``optimizers``).
        recipe (str | dict | Path): the recipe (default: ``"symmetric"``). The recipe's lrs are used
            (``lr_scale`` in ``optimizer_kwargs`` scales them), not ``TrainingArguments.learning_rate``.
        optimizer_kwargs (dict | None): passed to :func:`~dist_spectral.build_optimizer`
            (default: ``None``).
        schedule (callable | None): ``schedule(optimizer, num_training_steps)`` returning the LR
            scheduler (default: :func:`~dist_spectral.paper_schedule` over the run's steps with
            ``TrainingArguments``' warmup steps).

    Checkpoints also hold the step counters ``num_steps`` / ``skipped_steps`` in
    ``dist_spectral_counters.json``: under FSDP2 Accelerate saves the optimizer through torch's
    ``get_optimizer_state_dict``, which keeps only ``state`` and ``param_groups``.
    """

    def __init__(self, *args, recipe="symmetric", optimizer_kwargs: dict[str, Any] | None = None,
                 schedule: Callable | None = None, **kwargs):
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ValueError("SpectralTrainer builds its optimizer (recipe=, optimizer_kwargs=) and scheduler "
                             "(schedule=) itself: drop optimizers=, or use Trainer(optimizers=...) on one process")
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.schedule = schedule
        _check_fsdp2(self.accelerator)

    def create_optimizer(self, model=None):
        """Build the optimizer; under FSDP2 shard the model first (Trainer asks before it shards)."""
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.is_fsdp_enabled:
                from torch.distributed.fsdp import FSDPModule

                if not isinstance(model, FSDPModule):
                    # Accelerate's later prepare(model, optimizer) leaves a sharded model as it is
                    model = self.model = self.accelerator.prepare(model)
            self.optimizer = build_optimizer(model, self.recipe, **self.optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Called once the optimizer is prepared: move it onto DeepSpeed's flats, then schedule it."""
        opt = spectral_optimizer(self.optimizer if optimizer is None else optimizer)
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)  # None until prepare ran
        if self.is_deepspeed_enabled and wrapped is not None:
            attach_deepspeed(wrapped.engine, opt)
        if self.lr_scheduler is None:
            if self.schedule is not None:
                self.lr_scheduler = self.schedule(opt, num_training_steps)
            else:
                self.lr_scheduler = paper_schedule(opt, total_steps=num_training_steps,
                                                   warmup=self.args.get_warmup_steps(num_training_steps))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:  # every rank steps together: rank 0's counters are everyone's
            opt = spectral_optimizer(self.optimizer)
            with open(os.path.join(output_dir, COUNTERS_NAME), "w") as f:
                json.dump({key: getattr(opt, key) for key in _COUNTERS}, f)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, COUNTERS_NAME) if checkpoint is not None else None
        if path is not None and os.path.isfile(path):
            with open(path) as f:
                counters = json.load(f)
            opt = spectral_optimizer(self.optimizer)
            for key in _COUNTERS:
                setattr(opt, key, int(counters[key]))
