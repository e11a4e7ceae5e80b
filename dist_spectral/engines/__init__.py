"""Engine adapters: turn an engine's storage into :class:`~dist_spectral.layout.Layout` values.

One small module per engine; only these and :mod:`dist_spectral.exchange` touch
``torch.distributed``::

    single.py    one process, or DDP / any replicated tensors (every rank holds everything)
    dtensor.py   FSDP2 ``fully_shard``, HSDP, expert parallel: DTensor params on a device mesh
    deepspeed.py DeepSpeed ZeRO flat partitions
"""
from __future__ import annotations

from torch import Tensor

from .base import Topology


def topology_for(params: list[Tensor], process_group=None) -> Topology:
    """Pick the adapter from what the parameters are (DTensor → mesh layouts, else replicated),
    communicating over ``process_group`` (see :func:`~dist_spectral.engines.single.check_process_group`)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):
        from .dtensor import DTensorTopology

        return DTensorTopology(process_group)
    from .single import ReplicatedTopology

    return ReplicatedTopology(process_group)


__all__ = ["Topology", "topology_for"]
