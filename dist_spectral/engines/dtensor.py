"""FSDP2, HSDP and expert parallel: DTensor parameters on a device mesh.

A DTensor's placements say how its global tensor is cut over each mesh dimension; DTensor cuts
with ``torch.chunk`` semantics, so every rank's piece is known from (shape, mesh, placements)
alone and the layout of every rank is computed locally. Row rules that need column statistics
sum their local rows (each row counted by one holder only, so HSDP replicas do not double count)
and all-reduce a length-n vector over the group (``rows.py``).
"""
from __future__ import annotations

from functools import lru_cache

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..layout import Layout, mesh_layout, replicated
from .base import EngineAdapter, init_parameter_state, parameter_items
from .collectives import Collectives
from .rows import row_view


class DTensorEngine(EngineAdapter):
    """DTensor parameters (``Shard(d)`` / ``Replicate()`` placements); plain tensors count as
    replicated on every rank of ``collectives`` (default: the world)."""

    def __init__(self, collectives: Collectives | None = None):
        self.collectives = collectives or Collectives()

    def layout(self, param: Tensor) -> Layout:
        if not isinstance(param, DTensor):
            return replicated(tuple(param.shape), self.world_size)
        mesh = param.device_mesh
        placements = []
        for p in param.placements:
            if isinstance(p, Replicate):
                placements.append(("replicate", -1))
            elif type(p) is Shard:
                placements.append(("shard", p.dim % param.ndim))
            else:
                raise ValueError(f"a parameter of shape {tuple(param.shape)} has placement {p!r} on mesh "
                                 f"{mesh.mesh_dim_names or tuple(mesh.shape)}: dist_spectral supports Shard(d) and "
                                 "Replicate() placements; reshard it (e.g. fully_shard without shard_placement_fn "
                                 "strides) or redistribute it before building the optimizer")
        ranks = _ranks(mesh)
        if self.group is not dist.group.WORLD:  # layouts count ranks of the optimizer's group
            ranks = self._in_group(ranks, param)
        return _mesh_layout(tuple(param.shape), ranks, tuple(placements), self.world_size)

    def _in_group(self, ranks, param: Tensor):
        if isinstance(ranks, tuple):
            return tuple(self._in_group(r, param) for r in ranks)
        r = self.collectives.group_rank(ranks)
        if r < 0:
            raise ValueError(f"a parameter of shape {tuple(param.shape)} is a DTensor on a mesh of global ranks "
                             f"{_ranks(param.device_mesh)}, but rank {ranks} is not in the optimizer's process group "
                             f"({'this process only' if self.group is None else f'{self.world_size} ranks'}); "
                             "pass process_group=None (the default group) or a group holding every rank of the mesh")
        return r

    def local(self, tensor: Tensor) -> Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def bind_groups(self, param_groups):
        pass  # steps read the groups they are given

    def init_state(self, param_groups, infos, state):
        init_parameter_state(param_groups, state)

    def step_items(self, param_groups, infos, state):
        return parameter_items(self, param_groups, infos, state)

    def row_view(self, layout, flat):
        return row_view(layout, flat, self.collectives)


def _ranks(mesh) -> tuple:
    def freeze(x):
        return tuple(freeze(i) for i in x) if isinstance(x, list) else int(x)

    return freeze(mesh.mesh.tolist())


@lru_cache(maxsize=4096)
def _mesh_layout(shape, ranks, placements, world_size) -> Layout:
    return mesh_layout(shape, list(ranks), placements, world_size)


__all__ = ["DTensorEngine"]
