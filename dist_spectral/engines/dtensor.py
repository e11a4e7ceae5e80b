"""FSDP2, HSDP and expert parallel: DTensor parameters on a device mesh.

A DTensor's placements say how its global tensor is cut over each mesh dimension; DTensor cuts
with ``torch.chunk`` semantics, so every rank's piece is known from (shape, mesh, placements)
alone and the layout of every rank is computed locally. Row rules that need column statistics
sum their local rows (each row counted by one holder only, so HSDP replicas do not double count)
and all-reduce a length-n vector over the group (``rows.py``).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ..layout import Layout, grid_to_intervals, replicated
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
        placements = tuple(param.placements)
        check_placements(tuple(param.shape), placements, mesh)
        # A DTensor on a sub-mesh (FSDP2's norms on ``dp`` beside weights on ``(dp, tp)``) is
        # replicated over the sibling slices of its root mesh that are in the optimizer's group:
        # one more, leading, Replicate() mesh dim.
        slices = [s for s in (self._in_group(x, param) for x in _slices(mesh)) if s is not None]
        return placement_layout(tuple(param.shape), _freeze(slices), (Replicate(),) + placements, self.world_size)

    def _in_group(self, ranks: list, param: Tensor) -> list | None:
        """One slice of a mesh (nested lists of global ranks) as ranks of the optimizer's group;
        ``None`` for a slice wholly outside it (another pipeline stage's); a slice the group cuts,
        or this rank's own slice outside the group, is an error."""
        flat = np.asarray(ranks).reshape(-1)
        inside = np.asarray([self.collectives.group_rank(int(r)) for r in flat])
        if (inside >= 0).all():
            return inside.reshape(np.asarray(ranks).shape).tolist()
        me = dist.get_rank() if dist.is_initialized() else 0
        if (inside >= 0).any() or me in flat.tolist():
            raise ValueError(f"a parameter of shape {tuple(param.shape)} is a DTensor on a mesh of global ranks "
                             f"{_ranks(param.device_mesh)}, but the optimizer's process group "
                             f"({'this process only' if self.group is None else f'{self.world_size} ranks'}) holds "
                             f"only some of ranks {flat.tolist()}: pass process_group= (or device_mesh=) covering "
                             "every rank of the parameters' meshes (under pipeline parallel: the stage's)")
        return None

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


def _slices(mesh) -> list:
    """Every slice of ``mesh``'s root mesh shaped like ``mesh`` (``mesh`` itself among them), as
    nested lists of global ranks, from DeviceMesh's own bookkeeping (it lists the slices this rank
    is not in, which ``mesh.mesh`` does not)."""
    layout, rank_map = getattr(mesh, "_layout", None), getattr(mesh, "_rank_map", None)
    if layout is None or rank_map is None:  # a DeviceMesh without that bookkeeping: itself only
        return [mesh.mesh.tolist()]
    return layout.remap_to_tensor(rank_map).reshape(-1, *mesh.shape).tolist()


def _freeze(x):
    return tuple(_freeze(i) for i in x) if isinstance(x, list) else int(x)


def _ranks(mesh) -> tuple:
    return _freeze(mesh.mesh.tolist())


def mesh_process_group(mesh):
    """The process group of every rank of ``mesh``: a 1-D mesh's own group; an N-D mesh's
    flattened one (``DeviceMesh._flatten``, which creates it on every rank of the root mesh the first
    time: all ranks, every pipeline stage, build their optimizers at the same point)."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"device_mesh={mesh!r}: give a torch.distributed.device_mesh.DeviceMesh")
    if dist.get_rank() not in mesh.mesh.reshape(-1).tolist():
        raise ValueError(f"device_mesh: rank {dist.get_rank()} is not in the mesh of ranks {mesh.mesh.tolist()}; "
                         "build each optimizer on the ranks of its own (stage) mesh")
    if mesh.ndim == 1:
        return mesh.get_group()
    return mesh._flatten().get_group()


def derived_process_group(params: list[Tensor]):
    """The process group the parameters' device meshes imply: ``None`` (the default group) when
    the meshes together cover every rank, else the group of the one mesh whose slice holds every
    rank any of them has (a pipeline stage's mesh; its sub-meshes, such as FSDP2's ``dp`` beside
    ``(dp, tp)``, are inside it). Meshes that no single mesh covers are an error."""
    meshes = {}
    for p in params:
        if isinstance(p, DTensor):
            meshes.setdefault(id(p.device_mesh), p.device_mesh)
    if not meshes or not dist.is_initialized():
        return None
    ranks = {id_: frozenset(m.mesh.reshape(-1).tolist()) for id_, m in meshes.items()}
    union = frozenset().union(*ranks.values())
    if len(union) == dist.get_world_size():
        return None
    widest = [meshes[i] for i, r in ranks.items() if r == union]
    if not widest:
        raise ValueError(f"the parameters are DTensors on meshes of ranks {sorted(sorted(r) for r in ranks.values())}, "
                         "which no one of them covers and which are not the whole world: pass process_group= or "
                         "device_mesh= (the ranks that build and step this optimizer together)")
    return mesh_process_group(min(widest, key=lambda m: m.ndim))


def check_placements(shape: tuple[int, ...], placements: tuple, mesh) -> None:
    """``ValueError`` for a placement whose layout is not a set of held elements (``Partial``: each
    rank holds a summand) or that DTensor's splitting does not describe (an unknown subclass)."""
    for p in placements:
        if not (isinstance(p, Replicate) or type(p) in (Shard, _StridedShard)):
            names = mesh.mesh_dim_names or tuple(mesh.shape)
            raise ValueError(f"a DTensor parameter of shape {shape} has placements {placements} on mesh {names}: "
                             f"dist_spectral reads layouts of Shard(d), _StridedShard (FSDP2 over tensor parallel) and "
                             f"Replicate() placements, not {p!r} (a {type(p).__qualname__}); redistribute it to one of those (Partial: reduce "
                             "it, e.g. redistribute(mesh, [Replicate()]) or [Shard(0)]) before building the optimizer")


def _split_indices(placement, indices: Tensor, parts: int, index: int) -> Tensor:
    """Piece ``index`` of ``parts`` of a 1-D tensor as ``placement`` cuts its dim: DTensor's own
    split (``torch.chunk`` for ``Shard``, chunks of chunks for ``_StridedShard``)."""
    if isinstance(placement, _StridedShard):
        one_d = _StridedShard(0, split_factor=placement.split_factor)
    else:
        one_d = Shard(0)
    pieces, _ = one_d._split_tensor(indices, parts, with_padding=False, contiguous=False)
    return pieces[index] if index < len(pieces) else indices[:0]


@lru_cache(maxsize=4096)
def placement_layout(shape: tuple[int, ...], ranks: tuple, placements: tuple, world_size: int) -> Layout:
    """Layout of a tensor of ``shape`` with DTensor ``placements`` over a mesh of ``ranks`` (nested
    tuples of ranks in the optimizer's group; outside the mesh a rank holds nothing).

    Placements apply left to right, each cutting one dim of what earlier ones left (as
    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset`` does), so each
    rank's piece is, per tensor dim, a list of global indices: a range for ``Shard``, a union of
    ranges for ``_StridedShard`` (FSDP2's dim-0 shard of a column-parallel weight: ``dp`` cuts each
    ``tp`` piece). Only 1-D index lists are split, never a tensor of the parameter's size, so a
    planner can lay out 1024 ranks on ``meta`` models.
    """
    grid = np.asarray(ranks, dtype=object) if ranks != () else np.empty(0, dtype=object)
    mesh_shape = grid.shape
    holdings: list[tuple] = [() for _ in range(world_size)]
    for coord in np.ndindex(*mesh_shape):
        indices = [torch.arange(n) for n in shape]
        for mesh_dim, p in enumerate(placements):
            if isinstance(p, Replicate):
                continue
            d = p.dim % len(shape)
            indices[d] = _split_indices(p, indices[d], mesh_shape[mesh_dim], coord[mesh_dim])
        holdings[int(grid[coord])] = grid_to_intervals(shape, tuple(tuple(ix.tolist()) for ix in indices))
    kind = "(" + ", ".join(str(p) for p in placements) + ")"
    return Layout(shape, tuple(holdings), kind)


__all__ = ["DTensorEngine", "check_placements", "derived_process_group", "mesh_process_group", "placement_layout"]
