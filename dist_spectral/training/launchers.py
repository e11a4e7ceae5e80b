"""Process group setup and model wrapping, one small function per engine (``parallel.engine``).

=========  ==========================================================================================
none       one process, the plain module
ddp        ``DistributedDataParallel``: every rank holds everything, gradients all-reduced (mean)
fsdp       FSDP2: ``fully_shard`` each decoder layer, then the root, on a 1-D mesh over all ranks
hsdp       FSDP2 on a 2-D mesh ``(replicate, shard) = (replicas, world / replicas)``
ep         FSDP2 with expert-dim sharding: 3-D expert weights ``[E, ., .]`` placed ``Shard(0)``
           explicitly (``shard_placement_fn``) and each experts module its own FSDP unit, so every
           rank stores ``E / W`` whole experts and the optimizer orthogonalises them without moving
           them. With ``expert_dispatch: all_gather`` (default) forward all-gathers the experts;
           with ``all_to_all`` the experts stay put, FSDP2 ignores them, and tokens travel to the
           rank holding their expert and back (``expert_parallel.py``). ``replicas`` > 1 makes both
           HSDP: the mesh is ``(replicate, shard)``, experts split over ``shard`` within a replica.
deepspeed  DeepSpeed ZeRO-1/2/3 (``parallel.deepspeed``): the plain module here; the optimizer and
           scheduler are built on it, then :func:`deepspeed_initialize` wraps all three in one
           engine and attaches the optimizer to DeepSpeed's flat partitions. The loop then calls
           ``engine(...)``, ``engine.backward(loss)`` and ``engine.step()`` per micro-batch.
=========  ==========================================================================================

Every engine averages gradients over data-parallel ranks, so the loss each rank computes is its
local mean and the update is that of the global mean. The optimizer is built after wrapping.

Adding an engine: write ``_<name>(model, cfg, env)`` and register it in ``WRAPPERS``;
``wrap_model`` hands every wrapper the same arguments.

DeepSpeed launchers: ``deepspeed --num_gpus N launch/train.py ...`` (sets RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_SIZE and passes ``--local_rank``) and ``torchrun`` both work, also on CPU
(gloo). DeepSpeed JIT-builds a shared-memory comm op on CPU the first time (~40 s), cached in
``TORCH_EXTENSIONS_DIR`` (default here ``~/.cache/dist_spectral/torch_extensions``); on CPU
``TORCHDYNAMO_DISABLE=1`` is the default too (DeepSpeed's own Muon would torch.compile).
"""
from __future__ import annotations

import collections
import copy
import datetime
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError, ParallelConfig


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


def _elastic_restart_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """``init_process_group`` arguments for a restarted torchrun worker group: torchrun's store under a
    prefix of its own.

    The workers share the agent's TCPStore, which lives across restarts, and torch 2.13 adds no
    per-attempt prefix: a restarted rank can read a dead rank's address from the previous attempt
    and fail to connect (pytorch/pytorch#135712, #167288). ``TORCHELASTIC_RESTART_COUNT`` is the same
    on every worker of a single-node (``--standalone``) run; across nodes, launch torchrun with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` instead (a fresh store on every restart)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return {"store": dist.PrefixStore(f"/dist_spectral/attempt_{restart}", store), "rank": rank, "world_size": world}


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Start the process group (torchrun's environment, or a world of one when run directly) and pin
    the device and CPU threads."""
    if "RANK" not in os.environ:
        # Started without torchrun: a world of one, so every engine (fsdp included) still works.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))  # torchrun / deepspeed
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
        timeout = datetime.timedelta(minutes=10)
        dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None,
                                **_elastic_restart_store(rank, world, timeout))
    if cfg.engine == "deepspeed":
        _deepspeed_environment(use_cuda)
        import deepspeed

        if not use_cuda:
            # Before DeepSpeed maps its CPU all-reduce buffers: delete those of killed runs (a
            # restart on the same port would map them); every rank waits for its node's local rank 0.
            if local_rank == 0:
                from .shm import remove_stale_buffers

                gone = remove_stale_buffers()
                if gone:
                    print(f"removed {len(gone)} stale DeepSpeed shared-memory buffer(s) of dead processes from "
                          f"/dev/shm ({sum(n for _, n in gone) / 2**20:.0f} MiB): {', '.join(g for g, _ in gone)}",
                          flush=True)
            dist.barrier()
        # DeepSpeed keeps its own view of the group (deepspeed.comm) on torch's, and sets up its CPU op.
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=10))
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


def _fully_shard(model: nn.Module, mesh, cfg: ParallelConfig, shard_placement_fn=None, units=(),
                 ignored=()) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if ignored:
        kwargs["ignored_params"] = set(ignored)
    if cfg.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=_as_dtype(cfg.mixed_precision), reduce_dtype=torch.float32)
    # What transformers keeps in fp32 (DeepSeek-V3's router) is a unit of its own: FSDP2 wants one
    # dtype per unit, and under mixed precision it computes in fp32 as transformers intends.
    from ..models import kept_in_fp32

    dtype = (_as_dtype(cfg.mixed_precision) if cfg.mixed_precision else
             collections.Counter(p.dtype for p in model.parameters()).most_common(1)[0][0])
    fp32 = {**kwargs, "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)}
    for name in kept_in_fp32(model, dtype):
        if "." in name:
            fully_shard(model.get_submodule(name.rpartition(".")[0]), shard_placement_fn=shard_placement_fn, **fp32)
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


def _ep_mesh(env: DistEnv, cfg: ParallelConfig):
    """1-D ``ep`` over every rank, or with ``replicas`` > 1 HSDP's ``(replicate, shard)``: experts split
    over ``shard`` within each replica, replicated over ``replicate``, as the other weights are."""
    r = cfg.replicas
    if r == 1:
        return _mesh(env, (env.world_size,), ("ep",))
    if env.world_size % r:
        raise ValueError(f"parallel.replicas={r} does not divide the world size {env.world_size}; expert parallel "
                         "with HSDP needs world = replicas x expert-parallel size")
    return _mesh(env, (r, env.world_size // r), ("replicate", "shard"))


def _ep(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    from torch.distributed.tensor import Shard

    from ..roles import expert_containers

    if cfg.expert_dispatch == "all_to_all":
        from .expert_parallel import shard_experts

        if cfg.mixed_precision:
            raise ValueError("parallel.expert_dispatch=all_to_all computes experts in their parameter dtype; "
                             "unset parallel.mixed_precision or use expert_dispatch=all_gather")
        mesh = _ep_mesh(env, cfg)
        return _fully_shard(model, mesh, cfg, ignored=shard_experts(model, mesh))
    containers = expert_containers(model)
    if not containers:
        raise ValueError(f"parallel.engine=ep but {type(model).__name__} has no routed experts; use fsdp")
    mesh = _ep_mesh(env, cfg)
    size = env.world_size // cfg.replicas
    bad = {path: e for path, e in containers.items() if e % size}
    if bad:
        raise ValueError(f"parallel.engine=ep keeps whole experts per rank: {len(bad)} expert module(s) (e.g. "
                         f"{next(iter(bad))!r} with {next(iter(bad.values()))} experts) do not split over "
                         f"{size} ranks (world size / parallel.replicas); use a size dividing the expert count, or fsdp")
    units = [model.get_submodule(path) for path in containers if path]
    return _fully_shard(model, mesh, cfg, shard_placement_fn=lambda p: Shard(0) if p.ndim == 3 else None, units=units)


def _deepspeed(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    _no_mixed_precision(cfg)
    return model  # deepspeed.initialize needs the optimizer too: see deepspeed_initialize


WRAPPERS = {"none": _none, "ddp": _ddp, "fsdp": _fsdp, "hsdp": _hsdp, "ep": _ep, "deepspeed": _deepspeed}


SHARDED = ("fsdp", "hsdp", "ep")  # engines that shard a model built on meta before it is allocated


def wrap_model(model: nn.Module, cfg: ParallelConfig, env: DistEnv, seed: int | None = None) -> nn.Module:
    """``model`` wrapped by the engine ``cfg.engine`` names (see the module docstring), on ``env.device``.

    A model built on ``meta`` is allocated and initialised here (``models.materialize``, with
    ``seed``): after sharding under fsdp, hsdp and ep, so a rank allocates and draws only its shards;
    before wrapping under the engines that replicate it. The weights are the same either way.
    """
    if cfg.engine not in WRAPPERS:
        raise ValueError(f"parallel.engine={cfg.engine!r}: engines available here are {', '.join(WRAPPERS)}")
    from ..models import materialize

    on_meta = any(t.is_meta for t in model.parameters())
    if on_meta and seed is None:
        raise ValueError("wrap_model: the model is on meta; pass seed= to initialise it after sharding")
    if on_meta and cfg.engine in SHARDED:
        return materialize(WRAPPERS[cfg.engine](model, cfg, env), env.device, seed)
    if on_meta:
        model = materialize(model, env.device, seed)
    return WRAPPERS[cfg.engine](model.to(env.device), cfg, env)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper or DeepSpeed engine (FSDP2 modules are their own class)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        return model.module
    return model


# ----- DeepSpeed -----

DEFAULT_EXTENSIONS_DIR = Path.home() / ".cache" / "dist_spectral" / "torch_extensions"


def _deepspeed_environment(use_cuda: bool) -> None:
    """Before DeepSpeed is imported: a persistent cache for its JIT-built ops; on CPU no torch.compile."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(DEFAULT_EXTENSIONS_DIR))
    Path(os.environ["TORCH_EXTENSIONS_DIR"]).mkdir(parents=True, exist_ok=True)
    # torch builds the op with the first `ninja` on PATH. ninja 1.11 (a system's) and 1.13 (pip's)
    # hash build commands differently, so alternating between them rebuilds the cached op (~90 s on
    # 2 cores) every time: prefer this interpreter's, as tests/distributed/ds_harness.py does.
    bindir = Path(sys.executable).parent
    if (bindir / "ninja").is_file() and os.environ.get("PATH", "").split(os.pathsep)[0] != str(bindir):
        os.environ["PATH"] = os.pathsep.join([str(bindir), os.environ.get("PATH", "")])
    if not use_cuda:
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def deepspeed_json(name: str) -> dict:
    """``<name>.json`` in the package's ``configs/deepspeed``, or ``name`` itself when it is a ``.json``
    path. Keys that start with ``_`` (``_command``, ``_comment``: JSON has no comments) are dropped."""
    from ..recipes import configs_dir

    path = Path(name) if name.endswith(".json") else configs_dir() / "deepspeed" / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in (configs_dir() / "deepspeed").glob("*.json"))
        raise ConfigError(f"parallel.deepspeed.config={name!r}: no {path}; available: {', '.join(known)} or a .json path")
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def deepspeed_config(cfg: ParallelConfig, batch_size: int, world_size: int, clip_grad: float | None = None) -> dict:
    """The config handed to ``deepspeed.initialize``.

    Precedence: the JSON file (``parallel.deepspeed.config``) < the section's non-null fields <
    ``parallel.deepspeed.overrides``. ``gradient_clipping`` is the section's, else ``optim.clip_grad``,
    else the file's, else 0 (off, as on the other engines; DeepSpeed's own default is 1.0).
    Batches: ``data.batch_size`` sequences per rank and optimizer step, cut into
    ``gradient_accumulation_steps`` micro-batches, so accumulation changes memory, not the update.
    """
    ds = cfg.deepspeed
    base = deepspeed_json(ds.config) if ds.config else {}
    for key in ("optimizer", "scheduler"):
        if key in base:
            raise ConfigError(f"the DeepSpeed config {ds.config!r} has a {key!r} section, but the training entry point "
                              f"passes dist_spectral's {key} (optim.recipe, paper_schedule): remove it")
    out = copy.deepcopy(base)
    zero = out.setdefault("zero_optimization", {})
    zero["stage"] = ds.stage if ds.stage is not None else zero.get("stage", 2)
    out.setdefault("bf16", {})["enabled"] = ds.bf16 if ds.bf16 is not None else bool(out["bf16"].get("enabled", False))
    accum = ds.gradient_accumulation_steps or out.get("gradient_accumulation_steps", 1)
    if ds.gradient_clipping is not None:
        out["gradient_clipping"] = ds.gradient_clipping
    elif clip_grad is not None:
        out["gradient_clipping"] = clip_grad
    else:
        out.setdefault("gradient_clipping", 0.0)
    if batch_size % accum:
        raise ConfigError(f"data.batch_size={batch_size} sequences per rank do not split into "
                          f"gradient_accumulation_steps={accum} equal micro-batches")
    batches = {"train_micro_batch_size_per_gpu": batch_size // accum, "gradient_accumulation_steps": accum,
               "train_batch_size": batch_size * world_size}
    for key, value in batches.items():
        if key in out and key != "gradient_accumulation_steps" and out[key] != value:
            raise ConfigError(f"the DeepSpeed config sets {key}={out[key]} but data.batch_size={batch_size} per rank "
                              f"over {world_size} ranks gives {value}: leave batch sizes out of the DeepSpeed config")
    out.update(batches)
    out.setdefault("steps_per_print", 10 ** 9)
    out = _merge(out, ds.overrides)
    if out["zero_optimization"]["stage"] not in (1, 2, 3):
        raise ConfigError(f"ZeRO stage {out['zero_optimization']['stage']}: the training entry point runs stages "
                          "1, 2 and 3 (stage 0 is data parallel: use parallel=ddp)")
    return out


def deepspeed_initialize(model: nn.Module, optimizer, scheduler, config: dict):
    """``dist_spectral.deepspeed.initialize``: one engine for model, optimizer and scheduler (which
    DeepSpeed steps once per optimizer step, at gradient-accumulation boundaries, and checkpoints)."""
    from ..deepspeed import initialize

    engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=config, lr_scheduler=scheduler)
    return engine


def deepspeed_load(engine, optimizer, load_dir: str, tag: str) -> dict:
    """``engine.load_checkpoint`` (module, optimizer partitions, scheduler); returns the client state.
    (``SpectralOptimizer.load_state_dict`` hands the loaded group dicts to its ZeRO adapter.)"""
    loaded, client = engine.load_checkpoint(load_dir, tag=tag)
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} in {load_dir}")
    return client


__all__ = ["DistEnv", "init_distributed", "wrap_model", "unwrap", "WRAPPERS", "deepspeed_config", "deepspeed_json",
           "deepspeed_initialize", "deepspeed_load"]
