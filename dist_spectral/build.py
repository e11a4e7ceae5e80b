"""``build_optimizer``: classify a model, load a recipe, and make the optimizer."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .recipes import GroupSpec, apply_overrides, assign, load_recipe
from .roles import ParamInfo, classify

if TYPE_CHECKING:
    from .optimizer import SpectralOptimizer


def resolve_groups(model: nn.Module, recipe="symmetric", infos: list[ParamInfo] | None = None,
                   **overrides) -> tuple[list[GroupSpec], list[str], list[ParamInfo]]:
    """Groups of a recipe (with overrides) for a model, without building anything."""
    if infos is None:
        check_model(model)
        infos = classify(model)
    groups, report = assign(infos, apply_overrides(load_recipe(recipe), overrides))
    return groups, report, infos


def check_model(model) -> None:
    """``TypeError`` unless ``model`` is an ``nn.Module``: roles come from its parameter names and
    module types, which a bare iterable of parameters does not have."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: got {type(model).__name__}, not an nn.Module; pass the model itself, "
                        "build_optimizer(model), not model.parameters(): each parameter's role comes from its name and "
                        "module (to optimize a subset, build from the submodule, or freeze the rest with "
                        "requires_grad_(False))")


def build_optimizer(model: nn.Module, recipe="symmetric", *, nonfinite: str = "skip", bucket_mb: float = 256,
                    comm_dtype: torch.dtype | str | None = None, infos: list[ParamInfo] | None = None,
                    replicate_below: int | None = None, process_group=None, device_mesh=None,
                    **overrides) -> SpectralOptimizer:
    """The optimizer for ``model`` under a recipe.

    Call it after wrapping the model (``fully_shard``, DDP): it reads the parameters' layouts.
    An optimizer built before ``fully_shard`` raises at its first step, naming a replaced parameter.

    Args:
        model (nn.Module): the model (plain, DDP, FSDP2/HSDP, expert parallel).
        recipe (str | dict | Path): ``"symmetric"`` (default), ``"muon"``, ``"adamw"``, another
            name in ``configs/recipes``, a YAML path or a dict.
        nonfinite (str): ``"skip"`` or ``"raise"`` on a non-finite gradient (one host
            synchronisation per step), or ``"off"`` (no check and no synchronisation: the step to
            capture in a CUDA graph) (default: ``"skip"``).
        bucket_mb (float): memory bound of one exchange bucket in MiB (default: 256).
        comm_dtype: dtype of exchanged matrices, e.g. ``"bfloat16"`` (default: fp32).
        infos: roles from :func:`classify`, if already computed.
        replicate_below (int | None): small units of rules without polar iterations (routers) with
            fewer elements are computed on every rank holding part of them instead of one owner;
            0 = never (default: ``None``, :data:`~dist_spectral.optimizer.REPLICATE_BELOW`).
        process_group (ProcessGroup | str | None): the ranks that build and step this optimizer
            together: ``None`` the default process group, a ``ProcessGroup`` its ranks, ``"local"``
            this process alone, with no collective (a model on one rank: an evaluation or reference
            copy) (default: ``None``: for DTensor parameters the ranks of their device meshes, the
            whole default group unless they live on one pipeline stage's mesh).
        device_mesh (DeviceMesh | None): instead of ``process_group``, the mesh whose ranks build
            and step this optimizer together (a pipeline stage's; an N-D mesh is flattened into
            one group, which torch creates on every rank of its root mesh) (default: ``None``).
        **overrides: ``<group>={field: value}`` changes a group (e.g. ``router={"rule":
            "centered_row_norm"}``), ``groups=[...]`` adds groups in front, ``lr_scale=x``
            multiplies every lr, ``key=value`` sets a hyperparameter on every group whose rule
            takes it (e.g. ``steps=8``).
    """
    from .optimizer import SpectralOptimizer  # here: resolve_groups serves the simulator, which needs no optimizer

    check_model(model)
    if device_mesh is not None:
        if process_group is not None:
            raise ValueError("build_optimizer: give process_group= or device_mesh=, not both")
        from .engines.dtensor import mesh_process_group

        process_group = mesh_process_group(device_mesh)
    groups, report, infos = resolve_groups(model, recipe, infos, **overrides)
    named = dict(model.named_parameters())
    param_groups = []
    for g in groups:
        params = [(i.name, named[i.name]) for i in g.members if named[i.name].requires_grad]
        if params:
            param_groups.append({"params": params, "name": g.name, "rule": g.rule, **g.hyper})
    if isinstance(comm_dtype, str):
        comm_dtype = getattr(torch, comm_dtype)
    opt = SpectralOptimizer(param_groups, {i.name: i for i in infos}, nonfinite=nonfinite,
                            bucket_bytes=int(bucket_mb * (1 << 20)), comm_dtype=comm_dtype,
                            replicate_below=replicate_below, process_group=process_group, model=model)
    opt.report = report
    return opt
