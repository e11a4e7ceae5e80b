"""Engine adapters: the one boundary between the optimizer and an engine's storage.

The optimizer talks to every engine through the :class:`Engine` protocol (``base.py``); each
adapter is a small class composed with a :class:`Collectives` over its process group, and only
these modules and :mod:`dist_spectral.exchange` touch ``torch.distributed``::

                        SpectralOptimizer.step
                                 │ layout(p), local(t), step_items(...), row_view(...)
                                 ▼
       ┌──────────────────┬──────────────────┬────────────────────────┐
       │ ReplicatedEngine │ DTensorEngine    │ ZeroEngine             │  one adapter per engine
       │ single.py        │ dtensor.py       │ deepspeed.py           │  (EngineAdapter: every
       │ one process, DDP │ FSDP2, HSDP, EP  │ ZeRO-1/2/3 flats,      │   method abstract)
       │                  │                  │ zero_map.py            │
       └────────┬─────────┴────────┬─────────┴───────────┬────────────┘
                └── rows.py (row rules on local pieces) ─┘
                                   │ all_reduce_sum, any_true, all_gather_object, barrier
                                   ▼
                    Collectives (collectives.py): one process group

An adapter says what a rank holds (a :class:`~dist_spectral.layout.Layout` per parameter), gives
its local view of a tensor, creates the state for what it steps and hands the optimizer this rank's
items for a step (:class:`StepItem`: local parameter, gradient, state views and step counter). A
new layout (tensor or pipeline parallel) is a new adapter; ``SpectralOptimizer.step`` does not change.
"""
from __future__ import annotations

from torch import Tensor

from .base import PROTOCOL_METHODS, Engine, EngineAdapter, StepItem, check_engine
from .collectives import Collectives


def topology_for(params: list[Tensor], process_group=None) -> EngineAdapter:
    """Pick the adapter from what the parameters are (DTensor → mesh layouts, else replicated),
    with collectives over ``process_group`` (see :func:`~dist_spectral.engines.collectives.check_process_group`;
    for DTensors ``None`` means the ranks of their meshes, see
    :func:`~dist_spectral.engines.dtensor.derived_process_group`)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        from .dtensor import DTensorEngine, derived_process_group

        if process_group is None:  # the ranks of the parameters' meshes (a pipeline stage's)
            process_group = derived_process_group(params)
        return DTensorEngine(Collectives(process_group))
    collectives = Collectives(process_group)
    from .single import ReplicatedEngine

    return ReplicatedEngine(collectives)


__all__ = ["Engine", "EngineAdapter", "StepItem", "Collectives", "PROTOCOL_METHODS", "check_engine", "topology_for"]
