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
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import Tensor

from .blocks import group_unit_specs, permuted_axis
from .compute import ParamContext
from .engines import EngineAdapter, StepItem, check_engine, topology_for
from .engines.collectives import check_process_group, collective_device
from .exchange import CollectiveError, Exchange
from .kernels import choice as kernel_choice
from .plan import Plan, build_plan, check_replicate_below
from .roles import ParamInfo
from .route import REPLICATE_BELOW, plan_param, runs_on_rows
from .rules import RULES, RowStats, check_group, check_lr_form, get_rule
from .stats import StepStats

log = logging.getLogger(__name__)


#: What :class:`SpectralOptimizer` may do on a non-finite gradient (its ``nonfinite`` argument).
NONFINITE_POLICIES = ("skip", "raise", "off")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf and the policy is ``"raise"``."""


@dataclass
class _Entry:
    group: dict
    param: Tensor
    name: str
    info: ParamInfo


def _any_nonfinite(grads: list[Tensor]) -> Tensor:
    """A one-element float tensor, 1 where some gradient holds NaN or Inf, without a host sync:
    one fused reduction over all of them. The 2-norm accumulated in float64 is finite exactly when
    every element is (NaN and Inf propagate; the squares of float32, bf16 or fp16 values cannot
    overflow a float64 sum), and on CPU it runs 4× faster than the max-abs (2.7 → 0.6 ms on 1M
    elements in 113 tensors, one thread); float64 gradients, whose squares could overflow, take
    the max-abs."""
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.zeros(1)
    wide = [g for g in grads if g.dtype == torch.float64]
    narrow = [g for g in grads if g.dtype != torch.float64]
    peaks = list(torch._foreach_norm(narrow, 2, dtype=torch.float64)) if narrow else []
    if wide:
        peaks += torch._foreach_norm(wide, float("inf"))
    peak = torch.stack(peaks).amax() if len(peaks) > 1 else peaks[0]
    return (~torch.isfinite(peak)).float().reshape(1)


class SpectralOptimizer(torch.optim.Optimizer):
    r"""Symmetry-compatible optimizer: each param group applies its rule (see :mod:`dist_spectral.rules`).

    Build it with :func:`dist_spectral.build_optimizer`, which classifies parameters and loads a
    recipe. Works unchanged on plain, DDP, FSDP2/HSDP and expert-parallel models.

    Args:
        param_groups (list[dict]): groups with ``params`` as ``(name, parameter)`` pairs, ``rule``,
            ``lr``, ``weight_decay`` and the rule's hyperparameters.
        infos (dict[str, ParamInfo]): role and structure of every named parameter.
        nonfinite (str): ``"skip"`` a step with a non-finite gradient on every rank (counted in
            ``skipped_steps``), ``"raise"`` :class:`NonFiniteGradientError`, or ``"off"``: no check,
            a NaN or Inf flows into the weights as with ``torch.optim`` (default: ``"skip"``).
            A skipped step changes no weight, state or ``step`` counter and sets
            ``last_stats.skipped``; call ``scheduler.step()`` only when it is false, so the
            learning rate follows the updates actually applied (as if that batch never came).
            ``"skip"`` and ``"raise"`` cost one host synchronisation per training step (the flag
            of one fused check, all-reduced, decides on the host whether anything runs); ``"off"``
            costs none (see *Host synchronisation* below).
        bucket_bytes (int): most unit bytes gathered at once per bucket (default: 256 MiB).
        comm_dtype (torch.dtype | None): dtype of exchanged matrices (default: the state dtype).
        topology (EngineAdapter | None): engine adapter, an implementation of
            :class:`~dist_spectral.engines.Engine` (default: chosen from the parameters; see
            :mod:`dist_spectral.engines`).
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

    Host synchronisation. After the first step (which checks the parameters are the model's
    and reads the step counters once), a step with ``nonfinite="off"`` reads nothing back from
    the device: step counters are counted on the host beside their tensors (re-read only after
    something else wrote them, such as a checkpoint load), learning rates are Python numbers
    or 0-d tensors on the parameters' device (multiplied in on the device, so a scheduler filling
    them in place changes a captured step; torch's ``LambdaLR`` does), and the plan, its batches
    and the kernel choices are built once. That is the configuration to capture in a CUDA graph (with the gradients'
    reduction) or to run ahead of the GPU; a check of your own (``GradScaler``, a loss check)
    replaces the non-finite policy there. ``nonfinite="skip"`` or ``"raise"`` adds one
    synchronisation per training step, for the skip decision. Under ``W > 1`` the exchange's
    collectives run on the process group's stream as the engine's do; rules that decompose on
    the host side of the math (``left_spectral``'s float64 ``eigh``) may synchronise inside
    torch's linear-algebra calls on CUDA, which checks their convergence.

    At construction every rank compares a fingerprint of its parameters (names, shapes, rules,
    layouts) with the others' and raises ``ValueError`` on all ranks if they differ. Hyperparameters
    are checked as torch's optimizers check theirs (:func:`~dist_spectral.rules.check_group`: lr
    and weight decay ≥ 0, momenta in [0, 1), eps > 0, ...), here and in :meth:`add_param_group`.
    """

    def __init__(self, param_groups: list[dict], infos: dict[str, ParamInfo], *, nonfinite: str = "skip",
                 bucket_bytes: int = 256 << 20, comm_dtype: torch.dtype | None = None,
                 topology: EngineAdapter | None = None, timeout: float | timedelta | None = None,
                 replicate_below: int | None = None, process_group=None, model=None):
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r}: use 'skip', 'raise' or 'off' (no check, no host "
                             "synchronisation: the CUDA-graph-friendly step)")
        replicate_below = check_replicate_below(REPLICATE_BELOW if replicate_below is None else replicate_below)
        if topology is not None:
            check_engine(topology)
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
        self._attached = False  # whether attach() moved the optimizer onto an engine's own storage
        self._plans: dict[tuple, tuple[Plan, Exchange]] = {}
        self.timeout = timeout
        self.skipped_steps = 0
        self.total_polar_flops = 0  # over all step() calls on this rank (DeepSpeed calls step() per group)
        self.num_steps = 0  # training steps, skipped ones included (saved by dist_spectral.checkpoint)
        self.last_stats = StepStats()
        self.kernel_choices: dict = {}  # (op, s, l, dtype) -> "torch" / "triton:i", as every rank runs them
        self._host_steps: dict[int, tuple] = {}  # id(step counter) -> (counter, its value, its tensor version)
        kernel_choice.reload_environment()  # DIST_SPECTRAL_TRITON / TRITON_INTERPRET, read here, not per product
        self._check_hyperparameters()
        self._check_shapes()
        self._check_ranks_agree()
        self.topology.bind_groups(self.param_groups)
        self.topology.init_state(self.param_groups, self.infos, self.state)

    # ----- construction -----
    @property
    def topology(self) -> EngineAdapter:
        """The engine adapter: layouts, local views, this rank's items and the collectives."""
        if self._topology is None:
            self._topology = topology_for([p for g in self.param_groups for p in g["params"]], self._process_group)
            self._topology.collectives.timeout = self.timeout
        return self._topology

    @property
    def timeout(self) -> timedelta | None:
        """Longest wait of one collective of a step (settable, in seconds or as a timedelta)."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | timedelta | None) -> None:
        self._timeout = timedelta(seconds=value) if isinstance(value, (int, float)) else value
        if self._topology is not None:
            self._topology.collectives.timeout = self._timeout
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
        if topo.collectives.world_size == 1:
            return
        prints = self._guard("fingerprint all_gather_object", lambda: topo.collectives.all_gather_object(mine))
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
        if self._attached:
            raise RuntimeError(f"add_param_group after the optimizer was attached to {type(self.topology).__name__} "
                               "(dist_spectral.deepspeed.initialize does it): the engine has already partitioned the "
                               "param groups; add the group before initialising the engine")
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
        self.topology.bind_groups(self.param_groups)
        self.topology.init_state(self.param_groups, self.infos, self.state)

    def _check_model(self) -> None:
        """Raise if the model the optimizer was built from no longer holds its parameters."""
        model = self._model() if self._model is not None else None
        if model is None or self._attached:  # an attached engine steps its own storage, not the model's tensors
            return
        now = dict(model.named_parameters())
        stale = [e.name for e in self._entries(only_with_grad=False) if e.name in now and now[e.name] is not e.param]
        if stale:
            raise RuntimeError(f"{stale[0]}{f' (and {len(stale) - 1} more)' if len(stale) > 1 else ''} is no longer "
                               "the model's parameter: the model's parameters were replaced after the optimizer was "
                               "built (fully_shard replaces them with DTensor parameters; so do to_empty and "
                               "load_state_dict(assign=True)), and this optimizer would update tensors nothing uses. "
                               "Build the optimizer after fully_shard (under Accelerate: after "
                               "accelerator.prepare(model), or through dist_spectral.integrations.hf). Nothing was "
                               "updated")

    # ----- state_dict, engines -----
    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict`` with the step counters ``num_steps`` and
        ``skipped_steps`` beside ``state`` and ``param_groups``, so a trainer's resume keeps them."""
        out = super().state_dict()
        out["num_steps"], out["skipped_steps"] = self.num_steps, self.skipped_steps
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, restoring ``num_steps`` / ``skipped_steps`` when
        saved; the engine adapter then sees the loaded param-group dicts (DeepSpeed's per-group
        ``step()`` calls refer to them)."""
        super().load_state_dict(state_dict)
        self._host_steps.clear()
        self.num_steps = int(state_dict.get("num_steps", self.num_steps))
        self.skipped_steps = int(state_dict.get("skipped_steps", self.skipped_steps))
        self.topology.bind_groups(self.param_groups)

    def attach(self, engine: EngineAdapter) -> None:
        """Step through another engine adapter from now on; it creates its state afresh.

        :func:`dist_spectral.deepspeed.initialize` does this to move the optimizer onto DeepSpeed's
        flat partitions (:class:`~dist_spectral.engines.deepspeed.ZeroEngine`).
        """
        check_engine(engine)
        engine.collectives.timeout = self.timeout
        engine.bind_groups(self.param_groups)
        engine.init_state(self.param_groups, self.infos, self.state)
        self._topology = engine
        self._attached = True
        self._plans.clear()
        self._host_steps.clear()

    # ----- the step -----
    def _items(self) -> list[StepItem]:
        """This rank's share of every parameter with a gradient in this ``step()`` call."""
        return self.topology.step_items(self.param_groups, self.infos, self.state)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the class docstring); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t_start = time.perf_counter()
        items = self._items()
        if not self._model_checked or not items:
            self._check_model()  # raises before anything changes
            self._model_checked = True
        self._check_lrs()  # a scheduler or the user may have set them since the groups were checked
        stats = StepStats()
        if self._nonfinite(items):
            stats.skipped = True
            self.last_stats = stats
            return loss
        steps = self._advance_counters(items)
        inputs = self._direction_inputs(items, steps)
        element, rows, matrix = self._route(items)
        updates = {i: inputs[i] for i in element}  # element-wise rules return the direction itself
        reduced = self._row_directions(items, rows, inputs, updates)
        self._matrix_directions(items, matrix, inputs, updates, stats, steps)
        stats.bytes_sent["colsum"] = stats.bytes_received["colsum"] = reduced
        self._apply(items, updates)
        stats.step_seconds = time.perf_counter() - t_start
        stats.host_seconds = max(0.0, stats.step_seconds - stats.exchange_seconds - stats.compute_seconds)
        self.last_stats = stats
        self.total_polar_flops += stats.polar_flops
        return loss

    def _check_lrs(self) -> None:
        """Each group's lr in a form the update takes, before anything changes (no device read)."""
        for i, group in enumerate(self.param_groups):
            try:
                check_lr_form(group["lr"])
            except ValueError as err:
                raise ValueError(f"param group {group.get('name', i)!r}: {err}. Nothing was updated") from None

    def _advance_counters(self, items: list[StepItem]) -> dict[int, int]:
        """Count this step once per counter (a DeepSpeed flat's counter is shared by its
        parameters); returns counter id → the new step. One foreach add on the counters, and their
        values from a host copy kept beside them: a counter is read from its tensor (one read of
        all such counters together) only when the copy may be stale, i.e. on its first step, after
        ``load_state_dict`` or when anything else wrote the tensor since the last step (its version
        counter moved: a checkpoint loaded into it in place). A run that only steps never reads."""
        counters = list({id(it.step): it.step for it in items}.values())
        if not counters:
            return {}
        host = self._host_steps
        stale = [c for c in counters if (known := host.get(id(c))) is None or known[0] is not c
                 or known[2] != c._version]
        if stale:
            values = torch.stack([c.reshape(()) for c in stale]).tolist()
            for c, v in zip(stale, values):
                host[id(c)] = (c, int(v), c._version)
        torch._foreach_add_(counters, 1)
        out = {}
        for c in counters:
            out[id(c)] = value = host[id(c)][1] + 1
            host[id(c)] = (c, value, c._version)
        return out

    @staticmethod
    def _direction_inputs(items: list[StepItem], steps: dict[int, int]) -> list:
        """Every item's direction input, momentum updated in place: one
        :meth:`~dist_spectral.rules.Rule.direction_inputs` call per param group."""
        by_group: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            by_group.setdefault(id(it.group), []).append(i)
        inputs: list = [None] * len(items)
        for positions in by_group.values():
            group = items[positions[0]].group
            members = [items[i] for i in positions]
            outs = get_rule(group["rule"]).direction_inputs([it.state for it in members], [it.grad for it in members],
                                                             group, [steps[id(it.step)] for it in members])
            for i, x in zip(positions, outs):
                inputs[i] = x
        return inputs

    @staticmethod
    def _route(items: list[StepItem]) -> tuple[list[int], list[int], list[int]]:
        """Positions of the items whose rule runs element-wise, on local rows, or on whole matrices."""
        element, rows, matrix = [], [], []
        for i, it in enumerate(items):
            if get_rule(it.group["rule"]).locality == "element":
                element.append(i)
            elif runs_on_rows(it.group["rule"], it.info, it.layout):
                rows.append(i)
            else:
                matrix.append(i)
        return element, rows, matrix

    def _row_directions(self, items: list[StepItem], rows: list[int], inputs: list, updates: dict) -> int:
        """Directions of the row-rule items into ``updates``; returns the bytes all-reduced."""
        topo, reduced = self.topology, 0
        for i in rows:
            it = items[i]
            x, row_stats, back = topo.row_view(it.layout, inputs[i].reshape(-1))
            sizes: list[int] = []
            if topo.collectives.world_size > 1 and not it.layout.is_replicated():
                row_stats = self._counted_stats(row_stats, it.name, sizes)
            rule = get_rule(it.group["rule"])
            updates[i] = back(rule.direction(x, axis=permuted_axis(it.info), transposed=it.info.transposed,
                                             group=it.group, stats=row_stats))
            reduced += 4 * sum(sizes)
        return reduced

    def _counted_stats(self, row_stats: RowStats, name: str, sizes: list[int]) -> RowStats:
        """``row_stats`` whose all-reduces are guarded (a failure names the parameter) and append
        the elements they reduce to ``sizes``."""
        def counted(fn, what):
            def run(t):
                out = self._guard(f"{what} all_reduce of {name}", lambda: fn(t))
                sizes.append(out.numel())
                return out
            return run

        return RowStats(colsum=counted(row_stats.colsum, "column-statistics"),
                        rowsum=None if row_stats.rows_whole else counted(row_stats.rowsum, "row-statistics"),
                        total_rows=row_stats.total_rows, mask=row_stats.mask,
                        total=counted(row_stats.total, "matrix-statistics"))

    def _matrix_directions(self, items: list[StepItem], matrix: list[int], inputs: list, updates: dict,
                           stats: StepStats, steps: dict[int, int]) -> None:
        """Directions of the whole-matrix items into ``updates``, through the owner exchange."""
        if not matrix:
            return
        members = [items[i] for i in matrix]
        _, exchange = self._plan_for(members)
        flat = {pos: self._channels(it, inputs[i]) for pos, (i, it) in enumerate(zip(matrix, members))}
        contexts = {pos: ParamContext(get_rule(it.group["rule"]), it.group, permuted_axis(it.info),
                                      it.info.transposed, steps[id(it.step)]) for pos, it in enumerate(members)}
        exchange.step = self.num_steps
        out = exchange.run(flat, contexts, stats)
        for pos, i in enumerate(matrix):
            updates[i] = self._take_state(items[i], out[pos])

    @staticmethod
    def _apply(items: list[StepItem], updates: dict) -> None:
        """``W ← W · (1 − lr · wd) − lr · U`` on each local piece: two foreach operations per param
        group (one learning rate and weight decay), not two per parameter.

        ``lr`` may be a 0-d tensor (as torch's capturable optimizers take it): the update is then
        multiplied by it on the device instead of passing it as ``alpha`` (a Python number, which
        would read the tensor back every step), so a scheduler that writes it in place
        (``LambdaLR`` fills tensor lrs) changes a step captured in a CUDA graph."""
        by_group: dict[int, tuple[dict, list, list]] = {}
        for i, it in enumerate(items):
            _, params, ups = by_group.setdefault(id(it.group), (it.group, [], []))
            params.append(it.param)
            ups.append(updates[i].reshape(it.param.shape).to(it.param.dtype))
        for group, params, ups in by_group.values():
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            if isinstance(lr, Tensor):
                torch._foreach_sub_(params, torch._foreach_mul(ups, lr))
            else:
                torch._foreach_add_(params, ups, alpha=-lr)

    @staticmethod
    def _channels(it: StepItem, x) -> Tensor:
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
    def _take_state(it: StepItem, out: Tensor) -> Tensor:
        """Store the new carried state the owner sent back (in place, into the local shards of the
        state) and return the direction."""
        rule = get_rule(it.group["rule"])
        if not rule.stateful:
            return out
        for c, key in enumerate(rule.carried):
            it.state[key].copy_(out[1 + c].view_as(it.state[key]))
        return out[0]

    def _plan_for(self, items: list[StepItem]) -> tuple[Plan, Exchange]:
        coll = self.topology.collectives
        key = tuple(it.name for it in items)
        if key not in self._plans:
            params = [plan_param(pos, it.name, it.info, it.group, it.layout) for pos, it in enumerate(items)]
            plan = build_plan(params, coll.world_size, self.bucket_bytes, self._element_bytes(), self.replicate_below)
            prints = self._guard("plan fingerprint all_gather_object", lambda: coll.all_gather_object(plan.fingerprint))
            if len(set(prints)) > 1:
                raise RuntimeError(f"ranks disagree on the parameters to optimize (plan fingerprints {prints}): every "
                                   "rank must build the optimizer from the same model, with the same shapes and recipe")
            self._plans[key] = (plan, Exchange(plan, coll.rank, coll.group, self.comm_dtype, self.timeout))
            # One Triton/torch choice per polar shape, rank 0's, on every rank: a per-rank timing
            # could run other kernels (other bf16 rounding) on the same matrices (kernels/choice.py).
            device = items[0].grad.device if items else torch.device("cpu")
            self.kernel_choices.update(self._guard("kernel choice all_gather_object", lambda: kernel_choice.decide(
                plan, [it.group for it in items], device, coll)))
        return self._plans[key]

    def _element_bytes(self) -> int:
        return torch.finfo(self.comm_dtype).bits // 8 if self.comm_dtype else 4

    def plan(self) -> Plan:
        """The plan for a step in which every parameter has a gradient (for printing and tests)."""
        topo = self.topology
        entries = self._entries(only_with_grad=False)
        matrix = [i for i, e in enumerate(entries) if get_rule(e.group["rule"]).locality != "element"
                  and not runs_on_rows(e.group["rule"], e.info, topo.layout(e.param))]
        params = [plan_param(pos, entries[i].name, entries[i].info, entries[i].group, topo.layout(entries[i].param))
                  for pos, i in enumerate(matrix)]
        return build_plan(params, topo.collectives.world_size, self.bucket_bytes, self._element_bytes(),
                          self.replicate_below)

    # ----- non-finite gradients: one decision per training step -----
    def _nonfinite(self, items: list[StepItem]) -> bool:
        """Whether to skip this ``step()`` call: one fused check of every gradient, one all-reduce
        of the flag and one host sync. An engine that steps a training step in several calls
        (DeepSpeed ZeRO, per group or sub-group) says through ``nonfinite_scope`` which call starts
        the training step and hands all its gradients at once; later calls reuse the decision,
        so a training step is skipped whole or applied whole, and counted once."""
        collectives = self.topology.collectives
        scope = getattr(self.topology, "nonfinite_scope", None)
        new, labelled = scope(self.param_groups) if scope else (True, [(it.name, it.grad) for it in items])
        if new:
            self.num_steps += 1  # training steps, not step() calls: DeepSpeed makes one call per group
        if self.nonfinite == "off":
            return False
        skipping = getattr(self, "_skipping", False)  # this training step's decision so far
        if not new and (skipping or not labelled):
            return skipping
        flag = _any_nonfinite([g for _, g in labelled]).to(collective_device(collectives.group)
                                                            if collectives.world_size > 1 else "cpu")
        if collectives.world_size > 1:
            self._guard("non-finite check all_reduce", lambda: collectives.all_reduce_sum(flag, "non-finite flag"))
        self._skipping = bool(flag.item() > 0)
        if not self._skipping:
            return False
        # Rare path: name the culprit (per-tensor checks and host syncs are fine here).
        bad_names = [label for label, g in labelled if not bool(torch.isfinite(g).all())]
        bad = self._first_in_model_order(bad_names) if bad_names else None
        if self.nonfinite == "raise":
            self._skipping = False  # nothing was stepped; the next call starts afresh
            names = self._guard("non-finite names all_gather_object", lambda: collectives.all_gather_object(bad))
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
