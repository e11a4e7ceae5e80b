"""The boundary between the optimizer and an engine: the :class:`Engine` protocol.

The optimizer asks its adapter four things and never looks at the engine itself: which layout a
parameter has, this rank's items to step (local views of parameters, gradients, state and step
counters), a row rule's view of a local piece, and the small collectives (:class:`Collectives`).
:class:`EngineAdapter` declares every method abstract, so an adapter that forgets one cannot be
instantiated: a silent single-process fallback would let ranks desynchronise.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..layout import Layout
from ..roles import ParamInfo
from ..rules import RowStats, get_rule
from .collectives import Collectives


@dataclass
class StepItem:
    """This rank's share of one parameter in a step: local views of it, its gradient and state.

    Attributes:
        group (dict): the param group (rule and hyperparameters).
        name (str): parameter name.
        info (ParamInfo): its role and structure.
        layout (Layout): where every rank's elements are.
        param (Tensor): this rank's elements, updated in place.
        grad (Tensor): their gradient.
        state (dict): local views of the state tensors (``step`` excluded).
        step (Tensor): the step counter (shared by every parameter of a DeepSpeed flat partition).
    """

    group: dict
    name: str
    info: ParamInfo
    layout: Layout
    param: Tensor
    grad: Tensor
    state: dict
    step: Tensor


RowView = tuple[Tensor, RowStats, Callable[[Tensor], Tensor]]


@runtime_checkable
class Engine(Protocol):
    """What the optimizer needs from an engine adapter (see :class:`EngineAdapter`)."""

    collectives: Collectives

    def layout(self, param: Tensor) -> Layout: ...

    def local(self, tensor: Tensor) -> Tensor: ...

    def bind_groups(self, param_groups: list[dict]) -> None: ...

    def init_state(self, param_groups: list[dict], infos: dict[str, ParamInfo], state: dict) -> None: ...

    def step_items(self, param_groups: list[dict], infos: dict[str, ParamInfo], state: dict) -> list[StepItem]: ...

    def row_view(self, layout: Layout, flat: Tensor) -> RowView: ...


#: Methods every adapter implements (the protocol's, less its attribute).
PROTOCOL_METHODS = ("layout", "local", "bind_groups", "init_state", "step_items", "row_view")


class EngineAdapter(abc.ABC):
    """Base of engine adapters: each protocol method is abstract; the group, rank, world size and
    timeout are those of :attr:`collectives`.

    Attributes:
        collectives (Collectives): the process group this engine's ranks form, and its collectives.
    """

    collectives: Collectives

    @abc.abstractmethod
    def layout(self, param: Tensor) -> Layout:
        """Where every rank's elements of ``param`` are."""

    @abc.abstractmethod
    def local(self, tensor: Tensor) -> Tensor:
        """The part of ``tensor`` (a parameter or a state tensor shaped like it) this rank stores."""

    @abc.abstractmethod
    def bind_groups(self, param_groups: list[dict]) -> None:
        """The optimizer's full list of param groups, at construction and after ``load_state_dict``
        (an engine that shows the optimizer only some groups per ``step()`` looks them up here)."""

    @abc.abstractmethod
    def init_state(self, param_groups: list[dict], infos: dict[str, ParamInfo], state: dict) -> None:
        """Create the optimizer ``state`` for what this engine steps (every rule's buffers and ``step``)."""

    @abc.abstractmethod
    def step_items(self, param_groups: list[dict], infos: dict[str, ParamInfo], state: dict) -> list[StepItem]:
        """This rank's items for this ``step()`` call: those with a gradient, in group order."""

    @abc.abstractmethod
    def row_view(self, layout: Layout, flat: Tensor) -> RowView:
        """This rank's part of a 2-D parameter as dense rows ``[local_rows, n]``, the
        :class:`~dist_spectral.rules.RowStats` that complete it over every rank, and the map from
        a dense result back to the flat local layout."""

    @property
    def world_size(self) -> int:
        return self.collectives.world_size

    @property
    def rank(self) -> int:
        return self.collectives.rank

    @property
    def group(self):
        return self.collectives.group

    @property
    def timeout(self) -> timedelta | None:
        return self.collectives.timeout

    @timeout.setter
    def timeout(self, value: timedelta | None) -> None:
        self.collectives.timeout = value


def check_engine(engine) -> None:
    """Raise ``TypeError`` naming what an adapter lacks, before any collective can run."""
    if isinstance(engine, EngineAdapter):
        return  # abstract methods were checked when it was instantiated
    missing = [m for m in PROTOCOL_METHODS if not callable(getattr(engine, m, None))]
    if not isinstance(getattr(engine, "collectives", None), Collectives):
        missing.append("collectives (a Collectives)")
    if missing:
        raise TypeError(f"engine adapter {type(engine).__name__} lacks {', '.join(missing)}: implement the "
                        "dist_spectral.engines.Engine protocol (subclass EngineAdapter)")


# ----- shared by the adapters whose items are the optimizer's own parameters -----
def init_parameter_state(param_groups: list[dict], state: dict) -> None:
    """Rule state for every parameter without state, shaped (and sharded) like the parameter."""
    for g in param_groups:
        rule = get_rule(g["rule"])
        for p in g["params"]:
            if not state[p]:
                state[p].update(rule.init_state(p, g))
                state[p]["step"] = torch.tensor(0.0)


def check_params_are_own(param_groups: list[dict], state: dict) -> None:
    """The groups still hold the tensors the optimizer was built with: plain ``deepspeed.initialize``
    (ZeRO) swaps them for flat partitions the optimizer has no map or state for."""
    for g in param_groups:
        foreign = len(g["params"]) != len(g["param_names"]) or any("step" not in state.get(p, {}) for p in g["params"])
        if foreign:
            shapes = [tuple(p.shape) for p in g["params"][:2]]
            head = (f"param group {g.get('name', '?')!r} holds {len(g['params'])} tensor(s) (shapes {shapes}) in "
                    f"place of its {len(g['param_names'])} parameters ({', '.join(g['param_names'][:2])}, ...): ")
            if any(hasattr(p, "device_mesh") for p in g["params"]):  # DTensors: the model was sharded afterwards
                raise RuntimeError(head + "the model was sharded (fully_shard, or Accelerate's prepare with its FSDP2 "
                                   "plugin) after the optimizer was built. Build the optimizer on the sharded model "
                                   "(after accelerator.prepare(model)), or let dist_spectral.integrations.hf.prepare / "
                                   "SpectralTrainer do it. Nothing was updated")
            raise RuntimeError(head + "something replaced them, as DeepSpeed ZeRO does with flat partitions. Pass the "
                               "optimizer to DeepSpeed through dist_spectral.deepspeed.initialize(model=model, "
                               "optimizer=opt, config=ds_config) instead of deepspeed.initialize, or under Accelerate "
                               "use dist_spectral.integrations.hf.prepare / SpectralTrainer. Nothing was updated")


def parameter_items(engine: EngineAdapter, param_groups: list[dict], infos: dict[str, ParamInfo],
                    state: dict) -> list[StepItem]:
    """Items of every parameter with a gradient, as the engine's local views."""
    check_params_are_own(param_groups, state)
    local = engine.local
    items = []
    for g in param_groups:
        for name, p in zip(g["param_names"], g["params"]):
            if p.grad is None:
                continue
            s = state[p]
            items.append(StepItem(g, name, infos[name], engine.layout(p), local(p), local(p.grad),
                                  {k: local(v) for k, v in s.items() if k != "step"}, s["step"]))
    return items


__all__ = ["Engine", "EngineAdapter", "StepItem", "PROTOCOL_METHODS", "check_engine", "check_params_are_own",
           "init_parameter_state", "parameter_items"]
