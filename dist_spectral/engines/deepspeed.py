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

Non-finite gradients are decided per training step, not per ``step()`` call: DeepSpeed steps
the groups one by one and forms group i's flat gradient just before calling us for it, so the
first call of a training step checks every flat's gradient (formed, or still in DeepSpeed's
``averaged_gradients``) and later calls reuse that decision (:meth:`ZeroEngine.nonfinite_scope`).
By default DeepSpeed itself skips a step whose global gradient norm is not finite (every ZeRO-3
step; ZeRO-1/2 in fp32, and in bf16 with ``bf16.check_grad_overflow``): the optimizer is then
not called at all and the skip is counted in ``engine.skipped_steps``.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import Layout
from ..rules import get_rule
from .base import EngineAdapter, StepItem
from .collectives import Collectives
from .rows import row_view
from .zero_map import ZeroMap, _zero_optimizer, build_zero_map, flat_tensors


class ZeroEngine(EngineAdapter):
    """DeepSpeed's flat partitions: the optimizer's state lives on the flats, items are their pieces.

    DeepSpeed hands the optimizer one flat fp32 slice per group (ZeRO-1/2) or sub-group (ZeRO-3)
    and calls ``step()`` with only some of them; ``zero_map`` says which element range of which
    parameter each rank's slice holds. State is shaped like the flats (as DeepSpeed checkpoints
    expect); the rules, plans and exchange run unchanged on the parameters' pieces.

    Args:
        zero_map (ZeroMap): from :func:`~dist_spectral.engines.zero_map.build_zero_map`.
        flats (list[Tensor]): this rank's flat tensors, in ``zero_map.flats`` order.
        collectives (Collectives): over DeepSpeed's data-parallel group (default: the world).
        zero_optimizer: DeepSpeed's ZeRO optimizer, whose ``averaged_gradients`` hold the groups'
            gradients before their flats get them (default: ``None``: only formed flat
            gradients are seen, each at its own ``step()`` call).
    """

    def __init__(self, zero_map: ZeroMap, flats: list[Tensor], collectives: Collectives | None = None,
                 zero_optimizer=None):
        self.collectives = collectives or Collectives()
        self.zero_map = zero_map
        self.flats = list(flats)
        self.zero_optimizer = zero_optimizer
        self._last_flat: int | None = None  # highest flat index stepped in this training step
        self._checked: set[int] = set()  # flats whose gradients this training step's check covered
        self._groups: list[dict] = []
        self._layouts: dict[int, Layout] = {}
        if self.world_size != zero_map.world_size:
            raise ValueError(f"DeepSpeed partitions over {zero_map.world_size} ranks but the world has "
                             f"{self.world_size}: dist_spectral supports ZeRO over the whole data-parallel world "
                             "(no model/pipeline/expert parallel groups inside DeepSpeed)")

    def layout(self, param: Tensor) -> Layout:
        raise RuntimeError("under DeepSpeed ZeRO, layouts come from the ZeRO map (ZeroEngine.step_items)")

    def local(self, tensor: Tensor) -> Tensor:
        return tensor  # flats are this rank's own already

    def bind_groups(self, param_groups: list[dict]) -> None:
        # DeepSpeed later shows only some groups per step() call: a flat finds its group by index here
        self._groups = list(param_groups)

    def init_state(self, param_groups, infos, state) -> None:
        """Move the state onto the flats: the parameters' state is dropped, each flat gets its group's."""
        zmap = self.zero_map
        for meta in zmap.flats:
            for pi in meta.param_indices:
                if zmap.names[pi] not in infos:
                    raise ValueError(f"DeepSpeed partitions parameter {zmap.names[pi]!r}, which this optimizer "
                                     "was not built with: build it from the same model you pass to deepspeed")
        state.clear()
        for meta, flat in zip(zmap.flats, self.flats):
            group = self._groups[meta.group_index]
            state[flat].update(get_rule(group["rule"]).init_state(flat, group))
            state[flat]["step"] = torch.tensor(0.0)

    def step_items(self, param_groups, infos, state) -> list[StepItem]:
        zmap, rank = self.zero_map, self.zero_map.rank  # the rank inside the partitioning group
        items = []
        for _, meta, flat in zmap.stepping(param_groups):
            if flat.grad is None:
                continue
            group = self._groups[meta.group_index]
            s = state[flat]
            segments = {seg.param_index: seg for seg in meta.partitions[rank].segments}
            for pi in meta.param_indices:
                seg = segments.get(pi)
                view = slice(seg.local_offset, seg.local_stop) if seg else slice(0, 0)
                name = zmap.names[pi]
                if pi not in self._layouts:
                    self._layouts[pi] = zmap.layout(pi)
                items.append(StepItem(group, name, infos[name], self._layouts[pi], flat.data[view], flat.grad[view],
                                      {k: v[view] for k, v in s.items() if k != "step"}, s["step"]))
        return items

    def row_view(self, layout, flat):
        return row_view(layout, flat, self.collectives)

    # ----- non-finite gradients, decided once per training step -----
    def nonfinite_scope(self, param_groups: list[dict]) -> tuple[bool, list[tuple[str, Tensor]]]:
        """Whether this ``step()`` call starts a training step, and the gradients to check now,
        each with a label naming where it is.

        DeepSpeed calls ``step()`` for its flats in increasing index, once per training step, so a
        call whose first flat is not after the last one stepped starts a new training step. That
        call returns the gradients of every flat (formed, or still in the ZeRO optimizer's
        ``averaged_gradients``), so no group is updated before all are checked; later calls
        return only what the first could not see (nothing, with the DeepSpeed versions tested).
        """
        indices = sorted(meta.flat_index for _, meta, _ in self.zero_map.stepping(param_groups))
        if not indices:
            return False, []
        new = self._last_flat is None or indices[0] <= self._last_flat
        self._last_flat = indices[-1]
        if new:
            self._checked = set()
        wanted = range(len(self.flats)) if new else [i for i in indices if i not in self._checked]
        out = []
        for i in wanted:
            grads = self._flat_grads(i)
            if grads is None:
                continue  # not formed yet and not where we know to look: checked at its own call
            self._checked.add(i)
            label = self._flat_label(i)
            out.extend((label, g) for g in grads)
        return new, out

    def _flat_grads(self, index: int) -> list[Tensor] | None:
        """Flat ``index``'s gradient on this rank: the flat's own, or DeepSpeed's pending pieces."""
        flat = self.flats[index]
        if flat.grad is not None:
            return [flat.grad]
        pending = getattr(self.zero_optimizer, "averaged_gradients", None)
        pending = pending.get(index) if isinstance(pending, dict) else None
        if pending is None:
            return None
        flat_partition = getattr(pending, "flat_partition", None)  # DeepSpeed's pre-flattened buffers
        if flat_partition is not None:
            return [flat_partition]
        return [g for g in pending if g is not None]

    def _flat_label(self, index: int) -> str:
        meta = self.zero_map.flats[index]
        names = [self.zero_map.names[pi] for pi in meta.param_indices]
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        return f"one of {', '.join(names[:2])}{more} (DeepSpeed flat {index}, group {meta.group_index})"


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
    optimizer.attach(ZeroEngine(zero_map, flat_tensors(engine), zero_optimizer=_zero_optimizer(engine)))
    return engine, ds_optimizer, loader, scheduler
