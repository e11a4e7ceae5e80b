"""Process group setup and model wrapping, one small function per engine (``parallel.engine``).

=========  ==========================================================================================
none       one process, the plain module
ddp        ``DistributedDataParallel``: every rank holds everything, gradients all-reduced (mean)
fsdp       FSDP2: ``fully_shard`` each decoder layer, then the root, on a 1-D mesh over all ranks
hsdp       FSDP2 on a 2-D mesh ``(replicate, shard) = (replicas, world / replicas)``
ep         FSDP2 with expert-dim sharding: 3-D expert weights ``[E, ., .]`` placed ``Shard(0)``
           explicitly (``shard_placement_fn``) and each experts module its own FSDP unit, so every
           rank stores ``E / W`` whole experts and the optimizer orthogonalises them without moving
           them. This is sharding of expert *storage*: forward still all-gathers the experts.
           Real expert parallelism (tokens routed to the rank owning the expert, all-to-all) needs a
           model rewritten for it and is out of scope of this entry point; the optimizer itself
           handles such models (DTensor experts on an EP mesh, see tests/distributed).
=========  ==========================================================================================

Every engine averages gradients over data-parallel ranks, so the loss each rank computes is its
local mean and the update is that of the global mean. The optimizer is built after wrapping.

Adding an engine (DeepSpeed ZeRO): write ``_deepspeed(model, cfg, env)`` and register it in
``WRAPPERS``; ``wrap_model`` hands every wrapper the same arguments. DeepSpeed's
``deepspeed.initialize`` wraps the optimizer too, so that wrapper will also need the loop to call
``engine.backward`` / ``engine.step`` (see ``loop.train``: the three calls are kept in one place).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import ParallelConfig


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    Attributes:
        rank, world_size: global rank and number of processes.
        local_rank, local_world_size: the same on this machine.
        device (torch.device): ``cpu`` or ``cuda:<local_rank>``.
        backend (str): ``gloo`` or ``nccl``.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Start the process group (torchrun's environment, or a world of one when run directly) and pin
    the device and CPU threads."""
    if "RANK" not in os.environ:
        # Started without torchrun: a world of one, so every engine (fsdp included) still works.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but CUDA is not available; use parallel.device=cpu")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cfg.threads or max(1, cores // local_world))
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10),
                                device_id=device if use_cuda else None)
    return DistEnv(rank, world, local_rank, local_world, device, backend)


def _mesh(env: DistEnv, shape: tuple, names: tuple):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(env.device.type, shape, mesh_dim_names=names)


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers: FSDP2 wrapping here expects a transformers "
                         "*ForCausalLM (decoder layers in model.model.layers)")
    return list(layers)


def _fully_shard(model: nn.Module, mesh, cfg: ParallelConfig, shard_placement_fn=None, units=()) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if cfg.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_as_dtype(cfg.mixed_precision), reduce_dtype=torch.float32)
    for module in list(units) + _layers(model):
        fully_shard(module, shard_placement_fn=shard_placement_fn, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _as_dtype(name: str) -> torch.dtype:
    from ..models import _as_dtype as as_dtype

    return as_dtype(name)


def _no_mixed_precision(cfg: ParallelConfig) -> None:
    if cfg.mixed_precision:
        raise ValueError(f"parallel.mixed_precision={cfg.mixed_precision} is an FSDP2 policy (engines fsdp, hsdp, ep); "
                         f"with engine {cfg.engine} set model.dtype instead")


def _none(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    _no_mixed_precision(cfg)
    if env.world_size != 1:
        raise ValueError(f"parallel.engine=none runs one process but the job has {env.world_size}; "
                         "use parallel=ddp, fsdp, hsdp or ep")
    return model


def _ddp(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    _no_mixed_precision(cfg)
    return nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def _fsdp(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    return _fully_shard(model, _mesh(env, (env.world_size,), ("shard",)), cfg)


def _hsdp(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    r = cfg.replicas
    if env.world_size % r:
        raise ValueError(f"parallel.replicas={r} does not divide the world size {env.world_size}; HSDP needs "
                         "world = replicas x shard size")
    return _fully_shard(model, _mesh(env, (r, env.world_size // r), ("replicate", "shard")), cfg)


def _ep(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    from torch.distributed.tensor import Shard

    from ..roles import expert_containers

    containers = expert_containers(model)
    if not containers:
        raise ValueError(f"parallel.engine=ep but {type(model).__name__} has no routed experts; use fsdp")
    bad = {path: e for path, e in containers.items() if e % env.world_size}
    if bad:
        raise ValueError(f"parallel.engine=ep keeps whole experts per rank: {len(bad)} expert module(s) (e.g. "
                         f"{next(iter(bad))!r} with {next(iter(bad.values()))} experts) do not split over "
                         f"{env.world_size} ranks; use a world size dividing the expert count, or fsdp")
    units = [model.get_submodule(path) for path in containers if path]
    return _fully_shard(model, _mesh(env, (env.world_size,), ("ep",)), cfg,
                        shard_placement_fn=lambda p: Shard(0) if p.ndim == 3 else None, units=units)


WRAPPERS = {"none": _none, "ddp": _ddp, "fsdp": _fsdp, "hsdp": _hsdp, "ep": _ep}


def wrap_model(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    """``model`` (on ``env.device``) wrapped by the engine ``cfg.engine`` names (see the module docstring)."""
    if cfg.engine not in WRAPPERS:
        raise ValueError(f"parallel.engine={cfg.engine!r}: engines available here are {', '.join(WRAPPERS)}")
    return WRAPPERS[cfg.engine](model.to(env.device), cfg, env)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own class)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = ["DistEnv", "init_distributed", "wrap_model", "unwrap", "WRAPPERS"]
