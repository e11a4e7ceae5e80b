"""DeepSpeed ZeRO-1/2/3: the same optimizer on DeepSpeed's flat partitions.

DeepSpeed gives a client optimizer flat fp32 slices, not parameters (facts in ``zero_map.py``).
:func:`initialize` wraps ``deepspeed.initialize``: it builds the map from every rank's flat offsets
to (parameter, element range) from DeepSpeed's partition metadata, moves the optimizer's state
onto the flats, and from then on each ``step()`` call runs the usual rules on the pieces:

- element-wise (AdamW) on the slice as is;
- row rules on the slice when its rows are whole, else through the owner exchange (a matrix cut
  by a partition boundary is gathered once to one owner, like any sharded matrix);
- whole-matrix rules through the owner exchange: each piece goes to the matrix's owner once and
  comes back once; no rank orthogonalises a matrix another rank also orthogonalises. Small
  units of rules without polar iterations (routers) are replicated as under FSDP2: each rank
  holding part of one gets the rest in the gather and computes it (see plan.py).

Gradients arrive already averaged over ranks and accumulation micro-batches and clipped by
DeepSpeed (``gradient_clipping``); DeepSpeed checkpoints save and load the flat-keyed state.
"""
from __future__ import annotations

import copy

import torch.distributed as dist

from .dtensor import DTensorTopology
from .zero_map import build_zero_map, flat_tensors


class ZeroTopology(DTensorTopology):
    """Collectives over DeepSpeed's data-parallel group; layouts come from the ZeRO map."""

    def __init__(self, zero_map):
        super().__init__()
        self.zero_map = zero_map
        if self.world_size != zero_map.world_size:
            raise ValueError(f"DeepSpeed partitions over {zero_map.world_size} ranks but the world has "
                             f"{self.world_size}: dist_spectral supports ZeRO over the whole data-parallel world "
                             "(no model/pipeline/expert parallel groups inside DeepSpeed)")

    def layout(self, param):
        raise RuntimeError("under DeepSpeed ZeRO, layouts come from the ZeRO map (SpectralOptimizer.attach_zero)")


def prepare_config(config: dict) -> dict:
    """DeepSpeed accepts a client optimizer it does not know only with ``zero_allow_untested_optimizer``."""
    config = copy.deepcopy(config)
    config.setdefault("zero_allow_untested_optimizer", True)
    if "optimizer" in config:
        raise ValueError("the DeepSpeed config names an optimizer ('optimizer' section) and dist_spectral passes "
                         "its own: remove the 'optimizer' section")
    return config


def initialize(model, optimizer, config: dict, **kwargs):
    """``deepspeed.initialize`` for a :class:`~dist_spectral.SpectralOptimizer` (same arguments and
    return value: ``engine, optimizer, dataloader, lr_scheduler``).

    Args:
        model: the model (the one the optimizer was built from).
        optimizer (SpectralOptimizer): from :func:`dist_spectral.build_optimizer`.
        config (dict): DeepSpeed config; ``zero_allow_untested_optimizer`` is added if missing.
        **kwargs: passed to ``deepspeed.initialize``.
    """
    import deepspeed

    named = list(model.named_parameters())
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                   config=prepare_config(config), **kwargs)
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return engine, ds_optimizer, loader, scheduler  # DeepSpeed steps the client on the real parameters
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("DeepSpeed ZeRO needs torch.distributed initialised (deepspeed.init_distributed)")
    zero_map = build_zero_map(engine, named)
    optimizer.attach_zero(zero_map, flat_tensors(engine), ZeroTopology(zero_map))
    return engine, ds_optimizer, loader, scheduler
