"""The optimizer: one ``torch.optim.Optimizer`` whose param groups are roles, each with its rule.

For every parameter ``W`` with gradient ``G`` in a group with rule ``f``, learning rate ``lr``
and weight decay ``wd``::

    M ← momentum(M, G)                    element-wise on the local shard (rules.py)
    U = f(M)                              element-wise / on whole rows / on whole matrices
    W ← W · (1 − lr · wd) − lr · U

Where the direction needs more of the tensor than a rank holds, the engine brings it: row rules
get column statistics through one all-reduce, whole-matrix rules go through the owner exchange
(plan.py, exchange.py). Optimizer state is created for every parameter at construction and is
shaped and sharded exactly like the parameter (a DTensor under FSDP2), so ``state_dict`` and
``torch.distributed.checkpoint`` follow the parameter layout and every rank saves the same keys.
State that is a function of the whole matrix (Conda's basis, ARO's rotation) is stored the same
way and travels with the direction input to the owner and back (``Rule.carried`` in rules.py).
"""
from __future__ import annotations

import hashlib
import logging
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import Tensor

from .blocks import group_unit_specs, permuted_axis, unit_specs
from .compute import MatrixJob
from .engines import Topology, topology_for
from .engines.single import check_process_group
from .exchange import CollectiveError, Exchange, ExchangeStats
from .layout import Layout
from .plan import Plan, PlanParam, build_plan, check_replicate_below
from .roles import ParamInfo
from .rules import RULES, RowStats, check_group, get_rule

log = logging.getLogger(__name__)


#: Default ``replicate_below``, in elements (see :class:`SpectralOptimizer`): where replicating
#: stopped being faster in ``benchmarks/results/router_path.md``.
REPLICATE_BELOW = 8192


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf and the policy is ``"raise"``."""


@dataclass
class StepStats:
    """Counters of the last step on this rank (bytes are on the wire, flops are polar iterations).

    Attributes:
        bytes_sent (dict): per collective (``gather``, ``scatter``, ``colsum``) bytes this rank sent;
            ``replicate``: the part of the gather collective that carries replicated units.
        bytes_received (dict): the same, received.
        polar_flops (int): flops of polar iterations run on this rank (each unit on one rank).
        replicated_flops (int): estimated flops of the replicated units computed on this rank
            (each also computed on the other ranks holding part of it).
        exchange_seconds (float): time in packing, collectives and unpacking.
        compute_seconds (float): time in whole-matrix rule computation.
        step_seconds (float): the whole ``step()``.
        skipped (bool): the step was skipped for a non-finite gradient.
    """

    bytes_sent: dict = field(default_factory=dict)
    bytes_received: dict = field(default_factory=dict)
    polar_flops: int = 0
    replicated_flops: int = 0
    exchange_seconds: float = 0.0
    compute_seconds: float = 0.0
    step_seconds: float = 0.0
    skipped: bool = False


@dataclass
class _Item:
    """This rank's share of one parameter in a step: local views of it, its gradient and state."""

    group: dict
    name: str
    info: ParamInfo
    layout: Layout
    param: Tensor
    grad: Tensor
    state: dict
    step: Tensor  # the step counter (shared by every parameter of a DeepSpeed flat partition)


@dataclass
class _Entry:
    group: dict
    param: Tensor
    name: str
    info: ParamInfo


def _all_finite(t: Tensor) -> bool:
    """Whether every element is finite. A sum is non-finite if any element is, and costs a ninth
    of ``isfinite(t).all()`` (no bool tensor); only when the sum is not finite (or overflowed)
    is the exact test run."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def runs_on_rows(rule_name: str, info: ParamInfo, layout: Layout) -> bool:
    """Whether a row rule runs on the shard, with only small all-reduces for statistics: its
    parameter is one matrix (statistics span exactly that matrix), or its rows are whole and it
    needs no statistics over rows (:meth:`~dist_spectral.rules.Rule.needs_matrix_statistics`).
    Rows cut by partition boundaries (ZeRO) are fine for a 2-D parameter when no element is held
    twice. Everything else (per-expert statistics of a 3-D tensor, a 2-D tensor holding several
    blocks) goes per matrix through the owner exchange."""
    rule = get_rule(rule_name)
    if rule.locality != "rows":
        return False
    if rule.needs_matrix_statistics(permuted_axis(info)):
        specs = unit_specs(info, per_head=False)
        if len(info.shape) != 2 or len(specs) != 1 or len(specs[0].blocks) != 1:
            return False
    if len(info.shape) == 2:
        return layout.whole_rows() or layout.each_element_once()
    return layout.whole_rows()


class SpectralOptimizer(torch.optim.Optimizer):
    r"""Symmetry-compatible optimizer: each param group applies its rule (see :mod:`dist_spectral.rules`).

    Build it with :func:`dist_spectral.build_optimizer`, which classifies parameters and loads a
    recipe. Works unchanged on plain, DDP, FSDP2/HSDP and expert-parallel models.

    Args:
        param_groups (list[dict]): groups with ``params`` as ``(name, parameter)`` pairs, ``rule``,
            ``lr``, ``weight_decay`` and the rule's hyperparameters.
        infos (dict[str, ParamInfo]): role and structure of every named parameter.
        nonfinite (str): ``"skip"`` a step with a non-finite gradient on every rank (counted in
            ``skipped_steps``), or ``"raise"`` :class:`NonFiniteGradientError` (default: ``"skip"``).
            A skipped step changes no weight, state or ``step`` counter and sets
            ``last_stats.skipped``; call ``scheduler.step()`` only when it is false, so the
            learning rate follows the updates actually applied (as if that batch never came).
        bucket_bytes (int): most unit bytes gathered at once per bucket (default: 256 MiB).
        comm_dtype (torch.dtype | None): dtype of exchanged matrices (default: the state dtype).
        topology (Topology | None): engine adapter (default: chosen from the parameters).
        process_group (ProcessGroup | str | None): the ranks this optimizer talks to: ``None`` the
            default process group (every rank of it must build the optimizer and step it), a
            ``ProcessGroup`` its ranks only, ``"local"`` none at all (a model that lives on this
            rank only, such as an evaluation or reference copy, while a process group is
            initialised: nothing waits on other ranks) (default: ``None``).
        model (nn.Module | None): the model the parameters belong to, held by a weak reference. At
            the first step, and at any step where no parameter has a gradient, the optimizer checks
            that its parameters are still the model's (``fully_shard`` replaces them: an optimizer
            built before it would train nothing) and raises naming the parameter if not;
            :meth:`add_param_group` classifies parameters it does not know from it
            (default: ``None``, no check; :func:`~dist_spectral.build_optimizer` passes it).
        timeout (float | timedelta | None): seconds one collective of a step may wait before
            :class:`~dist_spectral.exchange.CollectiveError` names the step and collective
            (default: the process group's timeout).
        replicate_below (int): a whole-matrix unit with fewer elements than this, of a rule without
            polar iterations or carried state (a router ``e×d`` under left-spectral), is computed
            on every rank holding part of it: its pieces ride the gather all_to_all to all of them
            (no scatter), or under DDP nothing moves at all; 0 = never, every unit goes to one
            owner. Polar units never qualify (default: :data:`REPLICATE_BELOW` = 8192, i.e.
            routers smaller than 16×512). Chosen from ``benchmarks/results/router_path.md``
            (FSDP2, gloo, one CPU thread per rank, 4 left-spectral routers alone): at 8×256 the
            replicated step took 0.95× (W = 2) and 0.83× (W = 4) the owner path's, at 16×512
            1.07× and 0.89× (a draw), from 32×1024 on it was slower (1.12×, 1.09×), up to 1.9×
            and 4.1× at 256×7168: every holder repeats the compute the owners split, while
            replicating saves at most one all_to_all (the scatter, where routers are alone in a
            bucket). In the full model the choice was within noise. Collective latency and
            small-matrix compute weigh differently on GPUs: measure there with
            ``benchmarks/router_path.py`` before raising it.

    At construction every rank compares a fingerprint of its parameters (names, shapes, rules,
    layouts) with the others' and raises ``ValueError`` on all ranks if they differ. Hyperparameters
    are checked as torch's optimizers check theirs (:func:`~dist_spectral.rules.check_group`: lr
    and weight decay ≥ 0, momenta in [0, 1), eps > 0, ...), here and in :meth:`add_param_group`.
    """

    def __init__(self, param_groups: list[dict], infos: dict[str, ParamInfo], *, nonfinite: str = "skip",
                 bucket_bytes: int = 256 << 20, comm_dtype: torch.dtype | None = None,
                 topology: Topology | None = None, timeout: float | timedelta | None = None,
                 replicate_below: int | None = None, process_group=None, model=None):
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite={nonfinite!r}: use 'skip' or 'raise'")
        replicate_below = check_replicate_below(REPLICATE_BELOW if replicate_below is None else replicate_below)
        for g in param_groups:
            if "rule" not in g:
                raise ValueError(f"param group {g.get('name', '?')!r} names no 'rule'; give one of {', '.join(RULES)}")
            get_rule(g["rule"])
        self._process_group = check_process_group(process_group)
        super().__init__(param_groups, {"lr": 1e-3, "weight_decay": 0.0})
        missing = [n for g in self.param_groups for n in g["param_names"] if n not in infos]
        if missing:
            raise ValueError(f"no ParamInfo for parameters {missing[:5]}: pass infos from dist_spectral.classify(model)")
        self.infos = infos
        self.nonfinite = nonfinite
        self.bucket_bytes = bucket_bytes
        self.comm_dtype = comm_dtype
        self.replicate_below = replicate_below
        self._topology = topology
        self._model = weakref.ref(model) if model is not None else None
        self._model_checked = False  # whether the first step checked the parameters are the model's
        self._plans: dict[tuple, tuple[Plan, Exchange]] = {}
        self._zero = None  # a ZeroMap once attached to DeepSpeed (see dist_spectral.deepspeed)
        self._zero_groups = list(self.param_groups)  # DeepSpeed later shows only some groups per step() call
        self.timeout = timeout
        self.skipped_steps = 0
        self.total_polar_flops = 0  # over all step() calls on this rank (DeepSpeed calls step() per group)
        self.num_steps = 0  # step() calls, skipped ones included (saved by dist_spectral.checkpoint)
        self.last_stats = StepStats()
        self._check_hyperparameters()
        self._check_shapes()
        self._check_ranks_agree()
        self._init_state()

    # ----- construction -----
    @property
    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = topology_for([p for g in self.param_groups for p in g["params"]], self._process_group)
            self._topology.timeout = self.timeout
        return self._topology

    @property
    def timeout(self) -> timedelta | None:
        """Longest wait of one collective of a step (settable, in seconds or as a timedelta)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | timedelta | None) -> None:
        self._timeout = timedelta(seconds=value) if isinstance(value, (int, float)) else value
        if self._topology is not None:
            self._topology.timeout = self._timeout
        for _, exchange in self._plans.values():
            exchange.timeout = self._timeout

    def _entries(self, only_with_grad: bool) -> list[_Entry]:
        out = []
        for g in self.param_groups:
            for name, p in zip(g["param_names"], g["params"]):
                if only_with_grad and p.grad is None:
                    continue
                out.append(_Entry(g, p, name, self.infos[name]))
        return out

    def _check_hyperparameters(self, groups: list[dict] | None = None) -> None:
        for g in self.param_groups if groups is None else groups:
            try:
                check_group(g)
            except ValueError as err:
                raise ValueError(f"param group {g.get('name', '?')!r} (rule {g['rule']!r}, parameters "
                                 f"{', '.join(g['param_names'][:3])}{', ...' if len(g['param_names']) > 3 else ''}): "
                                 f"{err}") from None

    def _check_shapes(self, entries: list[_Entry] | None = None) -> None:
        for e in self._entries(only_with_grad=False) if entries is None else entries:
            rule = get_rule(e.group["rule"])
            if tuple(e.param.shape) != tuple(e.info.shape):
                raise ValueError(f"{e.name}: parameter shape {tuple(e.param.shape)} differs from its ParamInfo "
                                 f"{tuple(e.info.shape)}; classify the model after wrapping it")
            if rule.locality != "element" and e.param.ndim < 2:
                raise ValueError(f"{e.name}: rule {rule.name!r} needs a matrix but the parameter has shape "
                                 f"{tuple(e.param.shape)}; give 1-D parameters an element-wise rule such as adamw")
            if rule.locality == "matrix":
                group_unit_specs(e.info, e.group)  # raises on bad head/fused shapes

    def fingerprint(self) -> str:
        """A short digest of what every rank must agree on: names, global shapes, dtypes, rules and layouts."""
        topo, h = self.topology, hashlib.sha256()
        for e in self._entries(only_with_grad=False):
            rule = get_rule(e.group["rule"])
            try:
                layout = topo.layout(e.param)
            except ValueError as err:  # the adapter cannot describe this layout: say which parameter
                raise ValueError(f"{e.name}: {err}") from None
            h.update(repr((e.name, tuple(e.param.shape), str(e.param.dtype), rule.key(e.group),
                           layout.holdings)).encode())
        return h.hexdigest()[:16]

    def _check_ranks_agree(self) -> None:
        topo = self.topology
        mine = self.fingerprint()  # also raises on layouts the engine adapter does not support
        if topo.world_size == 1:
            return
        prints = self._guard("fingerprint all_gather_object", lambda: topo.all_gather_object(mine))
        if len(set(prints)) > 1:
            groups: dict[str, list[int]] = {}
            for r, fp in enumerate(prints):
                groups.setdefault(fp, []).append(r)
            raise ValueError(f"ranks disagree on the parameters to optimize (fingerprint -> ranks: {groups}); every "
                             "rank must build the optimizer from the same model (parameter names, shapes, dtypes, "
                             "layouts) and recipe. Nothing was created")

    def _guard(self, what: str, fn):
        """Run a collective; a failure or timeout becomes a :class:`CollectiveError` naming the step."""
        try:
            return fn()
        except CollectiveError:
            raise
        except RuntimeError as e:  # gloo/NCCL errors and timeouts (DistBackendError is a RuntimeError)
            raise CollectiveError(self.num_steps or None, what, e, self.timeout) from e

    def _init_state(self) -> None:
        for e in self._entries(only_with_grad=False):
            state = self.state[e.param]
            if not state:
                state.update(get_rule(e.group["rule"]).init_state(e.param, e.group))
                state["step"] = torch.tensor(0.0)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group, as ``torch.optim.Optimizer.add_param_group`` (e.g. layers unfrozen
        later). Its rule decides its update, so the group must say it.

        Args:
            param_group (dict): ``params`` as ``(name, parameter)`` pairs (``module.named_parameters()``
                with the model's prefix: names give roles and structure, looked up in the optimizer's
                ``infos`` or classified from the model it was built from), ``rule``, and optionally
                ``name``, ``lr``, ``weight_decay`` and the rule's hyperparameters (missing ones take the
                rule's defaults; lr 1e-3, weight_decay 0).

        Every check (names, rule, hyperparameters, shapes, layouts, ranks agreeing) runs before the
        group is kept: on an error the optimizer is as before. Like construction, it is a collective
        over the optimizer's process group: every rank adds its shards of the same parameters.
        """
        if not hasattr(self, "infos"):  # torch.optim.Optimizer.__init__ adding the constructor's groups
            super().add_param_group(param_group)
            return
        if self._zero is not None:
            raise RuntimeError("add_param_group after dist_spectral.deepspeed.initialize: DeepSpeed has already "
                               "partitioned the param groups; add the group before initialising DeepSpeed")
        if not isinstance(param_group, dict):
            raise TypeError(f"add_param_group takes a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        where = f"add_param_group (group {group.get('name', len(self.param_groups))!r})"
        params = group.get("params")
        params = [params] if isinstance(params, (Tensor, tuple)) else list(params or [])
        if not params or not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in params):
            raise TypeError(f"{where}: give 'params' as (name, parameter) pairs from the model's named_parameters() "
                            "(the names give each parameter's role, as build_optimizer reads them), e.g. "
                            "[(n, p) for n, p in model.named_parameters() if n.startswith('layers.3.')]")
        if "rule" not in group:
            raise ValueError(f"{where}: the group names no 'rule'; give one of {', '.join(RULES)}")
        rule = get_rule(group["rule"])
        allowed = {"params", "name", "rule", "lr", "weight_decay", "schedule", "initial_lr"} | set(rule.defaults)
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise ValueError(f"{where}: key(s) {unknown} are not hyperparameters of rule {rule.name!r}; it takes "
                             f"{', '.join(sorted(allowed - {'params'}))}")
        for key, value in {**rule.defaults, **self.defaults}.items():
            group.setdefault(key, value)
        group.setdefault("name", f"group{len(self.param_groups)}")
        names = [n for n, _ in params]
        held = {n for g in self.param_groups for n in g["param_names"]}
        again = [n for n in names if n in held] + [n for i, n in enumerate(names) if n in names[:i]]
        if again:
            raise ValueError(f"{where}: parameter {again[0]!r} is already in a param group of this optimizer")
        infos = {n: self.infos[n] for n in names if n in self.infos}
        model = self._model() if self._model is not None else None
        if len(infos) < len(names) and model is not None:
            from .roles import classify

            infos.update({i.name: i for i in classify(model) if i.name in names and i.name not in infos})
        missing = [n for n in names if n not in infos]
        if missing:
            raise ValueError(f"{where}: parameter {missing[0]!r} is not a parameter of the model this optimizer "
                             "was built from, so its role is unknown: pass names as model.named_parameters() gives "
                             "them (with the model's prefix)")
        group["param_names"] = names
        self._check_hyperparameters([group])
        group["params"] = params
        self._check_shapes([_Entry(group, p, n, infos[n]) for n, p in params])
        before = len(self.param_groups)
        super().add_param_group(group)  # torch's checks: tensors, leaves, no parameter in two groups
        added = self.param_groups[before]
        topology = self._topology
        if topology is not None and type(topology_for(added["params"], self._process_group)) is not type(topology):
            self._topology = None  # new parameters need another adapter (e.g. DTensors after plain tensors)
        new_infos = {n: i for n, i in infos.items() if n not in self.infos}
        self.infos.update(new_infos)
        try:
            self._check_ranks_agree()
        except Exception:
            del self.param_groups[before]
            for n in new_infos:
                del self.infos[n]
            self._topology = topology
            raise
        if self._zero_groups is not self.param_groups:
            self._zero_groups.append(added)
        self._init_state()

    def _check_model(self) -> None:
        """Raise if the model the optimizer was built from no longer holds its parameters."""
        model = self._model() if self._model is not None else None
        if model is None or self._zero is not None:
            return
        now = dict(model.named_parameters())
        stale = [e.name for e in self._entries(only_with_grad=False) if e.name in now and now[e.name] is not e.param]
        if stale:
            raise RuntimeError(f"{stale[0]}{f' (and {len(stale) - 1} more)' if len(stale) > 1 else ''} is no longer "
                               "the model's parameter: the model's parameters were replaced after the optimizer was "
                               "built (fully_shard replaces them with DTensor parameters; so do to_empty and "
                               "load_state_dict(assign=True)), and this optimizer would update tensors nothing uses. "
                               "Build the optimizer after fully_shard. Nothing was updated")

    def _check_params_are_own(self) -> None:
        """The groups still hold the tensors the optimizer was built with: plain ``deepspeed.initialize``
        (ZeRO) swaps them for flat partitions the optimizer has no map or state for."""
        for g in self.param_groups:
            foreign = len(g["params"]) != len(g["param_names"]) or any(
                "step" not in self.state.get(p, {}) for p in g["params"])
            if foreign:
                shapes = [tuple(p.shape) for p in g["params"][:2]]
                raise RuntimeError(f"param group {g.get('name', '?')!r} holds {len(g['params'])} tensor(s) (shapes "
                                   f"{shapes}) in place of its {len(g['param_names'])} parameters "
                                   f"({', '.join(g['param_names'][:2])}, ...): something replaced them, as DeepSpeed "
                                   "ZeRO does with flat partitions. Pass the optimizer to DeepSpeed through "
                                   "dist_spectral.deepspeed.initialize(model=model, optimizer=opt, config=ds_config) "
                                   "instead of deepspeed.initialize. Nothing was updated")

    # ----- the step -----
    def _items(self, topo: Topology) -> list[_Item]:
        """This rank's share of every parameter with a gradient, as local views."""
        if self._zero is not None:
            return self._zero_items()
        self._check_params_are_own()
        items = []
        for e in self._entries(only_with_grad=True):
            state = self.state[e.param]
            items.append(_Item(e.group, e.name, e.info, topo.layout(e.param), topo.local(e.param),
                               topo.local(e.param.grad), {k: topo.local(v) for k, v in state.items() if k != "step"},
                               state["step"]))
        return items

    # ----- state_dict, DeepSpeed ZeRO -----
    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict`` with the step counters ``num_steps`` and
        ``skipped_steps`` beside ``state`` and ``param_groups``, so a trainer's resume keeps them."""
        out = super().state_dict()
        out["num_steps"], out["skipped_steps"] = self.num_steps, self.skipped_steps
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, restoring ``num_steps`` / ``skipped_steps`` when
        saved and keeping the param-group dicts DeepSpeed's per-group ``step()`` calls refer to in
        sync with the loaded ones."""
        super().load_state_dict(state_dict)
        self.num_steps = int(state_dict.get("num_steps", self.num_steps))
        self.skipped_steps = int(state_dict.get("skipped_steps", self.skipped_steps))
        if self._zero is not None:
            self._zero_groups = list(self.param_groups)

    def attach_zero(self, zero_map, flats: list[Tensor], topology: Topology) -> None:
        """Switch to DeepSpeed's flat partitions (called by :func:`dist_spectral.deepspeed.initialize`).

        DeepSpeed hands the optimizer one flat fp32 slice per group (ZeRO-1/2) or sub-group
        (ZeRO-3); ``zero_map`` says which element range of which parameter each rank's slice
        holds. State moves to the flats (shaped like them, as DeepSpeed checkpoints expect); the
        rules, plans and exchange run unchanged on the parameters' pieces.
        """
        self.state.clear()
        for meta, flat in zip(zero_map.flats, flats):
            group = self._zero_group(meta.group_index)
            state = self.state[flat]
            state.update(get_rule(group["rule"]).init_state(flat, group))
            state["step"] = torch.tensor(0.0)
            for pi in meta.param_indices:
                if zero_map.names[pi] not in self.infos:
                    raise ValueError(f"DeepSpeed partitions parameter {zero_map.names[pi]!r}, which this optimizer "
                                     "was not built with: build it from the same model you pass to deepspeed")
        self._zero = zero_map
        self._zero_layouts: dict[int, Layout] = {}
        self._topology = topology
        self._topology.timeout = self.timeout
        self._plans.clear()

    def _zero_group(self, group_index: int) -> dict:
        """The param group dict of a flat (its rule and hyperparameters), by the group's name order."""
        return self._zero_groups[group_index]

    def _zero_items(self) -> list[_Item]:
        zmap, rank = self._zero, self._zero.rank
        items = []
        for _, meta, flat in zmap.stepping(self.param_groups):
            if flat.grad is None:
                continue
            group = self._zero_group(meta.group_index)
            state = self.state[flat]
            segments = {seg.param_index: seg for seg in meta.partitions[rank].segments}
            for pi in meta.param_indices:
                seg = segments.get(pi)
                view = slice(seg.local_offset, seg.local_stop) if seg else slice(0, 0)
                name = zmap.names[pi]
                if pi not in self._zero_layouts:
                    self._zero_layouts[pi] = zmap.layout(pi)
                items.append(_Item(group, name, self.infos[name], self._zero_layouts[pi], flat.data[view], flat.grad[view],
                                   {k: v[view] for k, v in state.items() if k != "step"}, state["step"]))
        return items

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the class docstring); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t_start = time.perf_counter()
        topo = self.topology
        items = self._items(topo)
        if not self._model_checked or not items:
            self._check_model()  # raises before anything changes
            self._model_checked = True
        self.num_steps += 1
        stats = StepStats()
        if self._nonfinite(items, topo):
            stats.skipped = True
            self.last_stats = stats
            return loss
        counters = {id(it.step): it.step for it in items}
        for counter in counters.values():
            counter += 1
        steps = {key: int(counter.item()) for key, counter in counters.items()}

        element, rows, matrix = [], [], []
        inputs: dict[int, Tensor] = {}
        for i, it in enumerate(items):
            rule = get_rule(it.group["rule"])
            inputs[i] = rule.direction_input(it.state, it.grad, it.group, step=steps[id(it.step)])
            if rule.locality == "element":
                element.append(i)
            elif runs_on_rows(it.group["rule"], it.info, it.layout):
                rows.append(i)
            else:
                matrix.append(i)

        updates: dict[int, Tensor] = {}
        for i in element:
            updates[i] = inputs[i]  # element-wise rules return the direction itself
        reduced_bytes = 0
        for i in rows:
            it = items[i]
            x, row_stats, back = topo.row_view(it.layout, inputs[i].reshape(-1))
            calls = []

            def counted(fn, what, _calls=calls, _name=it.name):
                def run(t):
                    out = self._guard(f"{what} all_reduce of {_name}", lambda: fn(t))
                    _calls.append(out.numel())
                    return out
                return run

            if topo.world_size > 1 and not it.layout.is_replicated():
                row_stats = RowStats(colsum=counted(row_stats.colsum, "column-statistics"),
                                     rowsum=None if row_stats.rows_whole else counted(row_stats.rowsum, "row-statistics"),
                                     total_rows=row_stats.total_rows, mask=row_stats.mask,
                                     total=counted(row_stats.total, "matrix-statistics"))
            rule = get_rule(it.group["rule"])
            updates[i] = back(rule.direction(x, axis=permuted_axis(it.info), transposed=it.info.transposed,
                                             group=it.group, stats=row_stats))
            reduced_bytes += 4 * sum(calls)
        if matrix:
            plan, exchange = self._plan_for([items[i] for i in matrix], topo)
            flat = {pos: self._channels(items[i], inputs[i]) for pos, i in enumerate(matrix)}

            def make_job(unit, mat, _items=items, _matrix=matrix):
                it = _items[_matrix[unit.param]]
                rule = get_rule(it.group["rule"])
                return MatrixJob(mat if rule.stateful else mat[0], unit.spec, rule, it.group, permuted_axis(it.info),
                                 it.info.transposed, int(it.step.item()))

            ex = ExchangeStats()
            exchange.step = self.num_steps
            out, ex = exchange.run(flat, make_job, ex)
            for pos, i in enumerate(matrix):
                updates[i] = self._take_state(items[i], out[pos])
            stats.bytes_sent.update(ex.bytes_sent)
            stats.bytes_received.update(ex.bytes_received)
            stats.polar_flops = ex.polar_flops
            stats.replicated_flops = ex.replicated_flops
            stats.exchange_seconds = ex.exchange_seconds
            stats.compute_seconds = ex.compute_seconds
        stats.bytes_sent["colsum"] = reduced_bytes
        stats.bytes_received["colsum"] = reduced_bytes

        for i, it in enumerate(items):
            lr, wd = it.group["lr"], it.group["weight_decay"]
            if wd:
                it.param.mul_(1 - lr * wd)
            it.param.add_(updates[i].reshape(it.param.shape).to(it.param.dtype), alpha=-lr)
        stats.step_seconds = time.perf_counter() - t_start
        self.last_stats = stats
        self.total_polar_flops += stats.polar_flops
        return loss

    @staticmethod
    def _channels(it: _Item, x) -> Tensor:
        """What the exchange moves for one parameter: its direction input (flat), or for a rule with
        carried state ``[inputs + carried, local]``: its inputs, then its carried state."""
        rule = get_rule(it.group["rule"])
        if not rule.stateful:
            return x.reshape(-1).contiguous()
        parts = list(x) if isinstance(x, (tuple, list)) else [x]
        if len(parts) != rule.inputs:
            raise RuntimeError(f"rule {rule.name!r} returned {len(parts)} direction inputs for {it.name}, "
                               f"it declares {rule.inputs}")
        return torch.stack([t.reshape(-1) for t in parts] + [it.state[k].reshape(-1) for k in rule.carried])

    @staticmethod
    def _take_state(it: _Item, out: Tensor) -> Tensor:
        """Store the new carried state the owner sent back (in place, into the local shards of the
        state) and return the direction."""
        rule = get_rule(it.group["rule"])
        if not rule.stateful:
            return out
        for c, key in enumerate(rule.carried):
            it.state[key].copy_(out[1 + c].view_as(it.state[key]))
        return out[0]

    def _plan_for(self, items: list[_Item], topo: Topology) -> tuple[Plan, Exchange]:
        key = tuple(it.name for it in items)
        if key not in self._plans:
            params = [self.plan_param(pos, it.name, it.info, it.group, it.layout) for pos, it in enumerate(items)]
            plan = build_plan(params, topo.world_size, self.bucket_bytes, self._element_bytes(), self.replicate_below)
            prints = self._guard("plan fingerprint all_gather_object", lambda: topo.all_gather_object(plan.fingerprint))
            if len(set(prints)) > 1:
                raise RuntimeError(f"ranks disagree on the parameters to optimize (plan fingerprints {prints}): every "
                                   "rank must build the optimizer from the same model, with the same shapes and recipe")
            self._plans[key] = (plan, Exchange(plan, topo.rank, topo.group, self.comm_dtype, self.timeout))
        return self._plans[key]

    def _element_bytes(self) -> int:
        return torch.finfo(self.comm_dtype).bits // 8 if self.comm_dtype else 4

    @staticmethod
    def plan_param(pos: int, name: str, info: ParamInfo, group: dict, layout) -> PlanParam:
        """The planner's view of one whole-matrix parameter."""
        rule = get_rule(group["rule"])
        specs = group_unit_specs(info, group)
        costs = tuple(sum(rule.cost(*b.shape, group) for b in s.blocks) for s in specs)
        polar = tuple(sum(rule.polar_flops(*b.shape, group) for b in s.blocks) for s in specs)
        channels = (rule.inputs + len(rule.carried), 1 + len(rule.carried)) if rule.stateful else (1, 1)
        return PlanParam(pos, name, layout, specs, costs, polar, rule.key(group), channels)

    def plan(self) -> Plan:
        """The plan for a step in which every parameter has a gradient (for printing and tests)."""
        topo = self.topology
        entries = self._entries(only_with_grad=False)
        matrix = [i for i, e in enumerate(entries) if get_rule(e.group["rule"]).locality != "element"
                  and not runs_on_rows(e.group["rule"], e.info, topo.layout(e.param))]
        params = [self.plan_param(pos, entries[i].name, entries[i].info, entries[i].group, topo.layout(entries[i].param))
                  for pos, i in enumerate(matrix)]
        return build_plan(params, topo.world_size, self.bucket_bytes, self._element_bytes(), self.replicate_below)

    def _nonfinite(self, items: list[_Item], topo: Topology) -> bool:
        bad_names = [it.name for it in items if not _all_finite(it.grad)]
        bad = self._first_in_model_order(bad_names) if bad_names else None
        if not self._guard("non-finite check all_reduce", lambda: topo.any_true(bad is not None)):
            return False
        if self.nonfinite == "raise":
            names = self._guard("non-finite names all_gather_object", lambda: topo.all_gather_object(bad))
            first = self._first_in_model_order([n for n in names if n])
            raise NonFiniteGradientError(f"non-finite gradient in {first} (the first parameter with one, on any rank; "
                                         f"step {self.num_steps}); nothing was updated. Use nonfinite='skip' to skip "
                                         "such steps")
        self.skipped_steps += 1
        log.warning("skipped an optimizer step: non-finite gradient in %s (skipped so far: %d)",
                    bad or "a parameter on another rank", self.skipped_steps)
        return True

    def _first_in_model_order(self, names: list[str]) -> str:
        order = {n: i for i, n in enumerate(self.infos)}  # infos follow model.named_parameters()
        return min(names, key=lambda n: order.get(n, len(order)))


__all__ = ["SpectralOptimizer", "StepStats", "NonFiniteGradientError", "REPLICATE_BELOW"]
