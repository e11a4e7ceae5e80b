"""Token-routed expert parallelism: each rank holds ``E / W`` whole experts, and tokens travel to them.

transformers' MoE blocks call their experts module as ``experts(hidden [T, d], top_k_index [T, k],
top_k_weights [T, k]) -> [T, d]``. :func:`shard_experts` places every parameter of each experts module
``Shard(0)`` on the expert-parallel mesh (a DTensor; FSDP2 ignores it) and replaces that call::

    rank r: its T_r tokens, routed by its own router (top-k global expert ids)
      sort the (token, slot) pairs by expert: by owner rank, then by local expert
      counts [W, E/W] ──all_to_all_single──► what each rank receives from each (the only host sync)
      rows ──all_to_all_single (variable splits, autograd)──► owner
    owner: the experts' own forward on its local experts (top-1, unit weights)
      outputs ──all_to_all_single (splits reversed, autograd)──► rank r
    rank r: back into (token, slot) order, weighted by top_k_weights, summed over the k slots

as torchtitan and Megatron do. Autograd runs the two exchanges in reverse, so every rank's tokens get
their gradients and each expert's weight gradient sums the contributions of its EP group's tokens;
that sum is divided by the world size (the loss each rank computes is its local mean, and FSDP2
averages the other gradients the same way). The result equals the model computing every token's
experts on every rank (fp32, to rounding: the k slots are summed in another order).

With HSDP (a 2-D mesh ``(replicate, shard)``) the EP group is one replica's ``shard`` ranks: the
experts are ``(Replicate(), Shard(0))``, as HSDP places the other weights, and each replica routes its
own tokens among its own copies of the experts. Their gradients are then summed over the replicas
in one all-reduce per experts module, in backward, where FSDP2 would all-reduce an HSDP gradient::

    mesh (replicate R, shard S), W = R·S       rank = replica · S + shard
    experts:   rank holds E / S whole experts, the same ones as its peers in the other replicas
    dispatch:  all_to_all_single on the S ranks of its replica (the mesh's ``shard`` dim)
    gradients: Σ over the replica's tokens ──all_reduce over the R replicas──► × 1 / W

Limits: experts are not sharded further by FSDP; the number of experts divides by the EP group's
size; the experts module is transformers' batched form (``num_experts`` attribute, every parameter's
first dimension the expert), as in OLMoE, Qwen3-MoE, Mixtral and DeepSeek-V3.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn


class _ExpertGrads(torch.autograd.Function):
    """Identity forward on one experts module's local tensors; in backward their gradients, summed
    over the EP group's tokens, are summed over the replicas (``replicate_group``, HSDP) and times
    ``scale``: the mean over every rank, as FSDP2 makes the other gradients.

    One node for all of a module's tensors, so every rank makes the replicas' all-reduce at the same
    point of backward (one per experts module, in layer order), and makes it coalesced."""

    @staticmethod
    def forward(ctx, scale, replicate_group, *tensors):
        ctx.scale, ctx.group = scale, replicate_group
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.group is not None:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=ctx.group)
            grads = [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]
        return (None, None, *(g * ctx.scale for g in grads))


def _exchange(x: torch.Tensor, recv_sizes: list[int], send_sizes: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` of rows with variable splits, differentiable (its backward is the
    exchange the other way). torch's functional collective (``torch.distributed.nn.functional``'s
    is deprecated in its favour), waited on at once: the experts need the rows."""
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_to_all_single_autograd(x.contiguous(), recv_sizes, send_sizes, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


@contextlib.contextmanager
def _local_experts(module: nn.Module, num_local: int, scale: float, replicate_group=None):
    """Within the block, ``module``'s parameters are this rank's shards (plain tensors whose
    gradients reach the DTensor parameters, summed over the replicas and scaled) and
    ``num_experts`` their count."""
    saved, count = dict(module._parameters), module.num_experts
    try:
        names = [name for name, p in saved.items() if p is not None]
        local = _ExpertGrads.apply(scale, replicate_group, *(saved[name].to_local() for name in names))
        module._parameters.update(zip(names, local))
        module.num_experts = num_local
        yield
    finally:
        module._parameters.update(saved)
        module.num_experts = count


class TokenDispatch:
    """The replacement forward of one experts module (see the module docstring).

    Args:
        module (nn.Module): the experts module, its parameters already DTensors ``Shard(0)`` on the
            expert-parallel mesh dim.
        num_experts (int): experts in the whole module.
        group (ProcessGroup): the expert-parallel group (all ranks, or one HSDP replica's).
        replicate_group (ProcessGroup | None): the ranks holding the same experts in the other HSDP
            replicas, over which expert gradients are summed (default: ``None``, no replicas).
    """

    def __init__(self, module: nn.Module, num_experts: int, group, replicate_group=None):
        self.module, self.num_experts, self.group = module, num_experts, group
        self.replicate_group = replicate_group
        self.world = dist.get_world_size(group)
        self.num_local = num_experts // self.world
        # gradients: the mean over every rank (each rank's loss is its local mean)
        replicas = 1 if replicate_group is None else dist.get_world_size(replicate_group)
        self.scale = 1.0 / (self.world * replicas)
        self.experts_forward = type(module).forward  # transformers' own math, on local expert ids

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = hidden_states.shape[0], top_k_index.shape[-1]
        ids = top_k_index.reshape(-1)
        # stable: pairs of one expert keep token order, so the owner sees them as the dense model does
        order = torch.argsort(ids, stable=True)
        send = hidden_states[order // top_k]
        send_counts = torch.bincount(ids, minlength=self.num_experts).view(self.world, self.num_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_sizes, recv_sizes = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        recv = _exchange(send, recv_sizes, send_sizes, self.group)
        # received rows are grouped by sender, then by local expert: each row's local expert id
        local_ids = torch.arange(self.num_local, device=ids.device).repeat(self.world)
        local_ids = local_ids.repeat_interleave(recv_counts.reshape(-1)).unsqueeze(-1)
        with _local_experts(self.module, self.num_local, self.scale, self.replicate_group):
            out = self.experts_forward(self.module, recv, local_ids, recv.new_ones(local_ids.shape))
            if recv.shape[0] == 0:
                # nothing to compute here: keep the (empty) exchange and this rank's experts in the
                # graph, so backward runs the reverse exchange with the others and leaves zero gradients
                out = recv + sum(p.sum() for p in self.module.parameters()) * 0
        back = _exchange(out, send_sizes, recv_sizes, self.group)
        slots = torch.empty_like(back)
        slots[order] = back
        slots = slots.view(tokens, top_k, -1)
        return (slots * top_k_weights.unsqueeze(-1).to(slots.dtype)).sum(1).to(hidden_states.dtype)


def shard_experts(model: nn.Module, mesh) -> list[nn.Parameter]:
    """Make every experts module of ``model`` token-routed over the last dim of ``mesh``.

    Args:
        model (nn.Module): a transformers MoE model, on ``meta`` or allocated, not yet wrapped.
        mesh (DeviceMesh): the expert-parallel mesh, one dimension over every rank, or HSDP's
            ``(replicate, shard)``: experts ``Shard(0)`` over ``shard`` (tokens routed within a
            replica), replicated over ``replicate`` (gradients summed over it).

    Returns:
        list[nn.Parameter]: the experts' DTensor parameters, for FSDP2's ``ignored_params``.

    Raises:
        ValueError: the model has no routed experts, their count does not divide by the expert-parallel
            group's size, an experts module is not transformers' batched form, or the mesh has more
            than two dims.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ..roles import expert_containers

    if mesh.ndim not in (1, 2):
        raise ValueError(f"shard_experts: a {mesh.ndim}-D mesh {mesh.mesh_dim_names}; give the expert-parallel "
                         "mesh (1-D) or HSDP's (replicate, shard) mesh")
    containers = {path: e for path, e in expert_containers(model).items() if path}
    if not containers:
        raise ValueError(f"parallel.engine=ep but {type(model).__name__} has no routed experts; use fsdp")
    world = mesh.size(mesh.ndim - 1)
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0)]
    group = mesh.get_group(mesh.ndim - 1)
    replicate_group = mesh.get_group(0) if mesh.ndim == 2 else None
    replicas = f" (each of {mesh.size(0)} replicas)" if mesh.ndim == 2 else ""
    sharded = []
    for path, num_experts in containers.items():
        module = model.get_submodule(path)
        if num_experts % world:
            raise ValueError(f"parallel.engine=ep keeps whole experts per rank: {path!r} has {num_experts} experts, "
                             f"which do not split over the {world} ranks of the expert-parallel group{replicas}; "
                             f"use an expert-parallel size (world size / parallel.replicas) dividing {num_experts}")
        if getattr(module, "num_experts", None) != num_experts or not all(
                p.shape[0] == num_experts for p in module.parameters(recurse=False)) or any(
                True for _ in module.children() if list(_.parameters())):
            raise ValueError(f"parallel.engine=ep routes tokens to transformers' batched experts modules "
                             f"(num_experts and [E, ...] parameters); {path!r} ({type(module).__name__}) is not one: "
                             "use parallel=fsdp for this model")
        for name, p in list(module.named_parameters(recurse=False)):
            d = nn.Parameter(distribute_tensor(p.detach(), mesh, placements, src_data_rank=None),
                             requires_grad=p.requires_grad)
            setattr(module, name, d)
            sharded.append(d)
        module.forward = TokenDispatch(module, num_experts, group, replicate_group)
    return sharded


__all__ = ["shard_experts", "TokenDispatch"]
