"""Update rules: momentum, the direction each class of weight gets, and what the direction needs.

A rule is pure math: it never communicates. It declares its *locality*, and the engine hands it
exactly that much of the tensor:

- ``element``: any shard (AdamW).
- ``rows``: rows of the 2-D view, as a dense ``[rows, n]`` tensor of the rows this rank touches.
  Statistics that span ranks come from a :class:`RowStats`: ``colsum`` (column sums over *all*
  rows of the matrix: centring, column norms; one all-reduce of a length-n vector when rows are
  sharded) and ``rowsum`` (row sums: local, except rows cut by a DeepSpeed partition boundary,
  whose partial sums are combined across the ranks holding them), ``total`` (one sum over every
  element of the matrix: an all-reduce of one number).
- ``matrix``: whole matrices, batched ``[B, m, n]`` of equal shape (Muon, hybrid, spectral rules).

Carried state. Some matrix rules keep state that is a function of the whole matrix and is updated
where the matrix is whole (Conda's singular basis and its second moment in that basis, ARO's
rotation). Such a rule lists the state keys in ``carried``: each is a tensor shaped and sharded
exactly like the parameter (created by ``init_state``), so ``state_dict``, DCP checkpoints and
resharding treat it like a momentum buffer. Every step the exchange moves the rule's inputs *and*
its carried state to the matrix's owner (``inputs + len(carried)`` tensors per element), the owner
calls :meth:`Rule.direction_with_state`, and the direction *and* the new state come back to the
ranks holding each piece (``1 + len(carried)``). A ``k × k`` matrix with ``k = min(m, n)`` (a
basis, a rotation) fits in an m×n block: the rule packs it in the block's first ``k²`` elements.
The alternative, state held by the owner and keyed by matrix, moves fewer bytes per step but ties
the state to the plan: checkpoints would need a gather and any change of W or owners a
redistribution, the failure Keller Jordan's DDP Muon has (its momentum lives only on owners).

Every step is ``W ← W·(1 − lr·wd) − lr·U`` with ``U`` the rule's direction (weight decay decoupled
and applied first). Momentum conventions:

- Muon (Moonlight): ``B ← μ·B + G``; direction input ``G + μ·B`` (Nesterov) or ``B``.
- the symmetry-compatible rules: EMA ``M ← β·M + (1 − β)·G``, direction input ``M``, no bias
  correction.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F

class RowStats:
    """What a row rule knows about the parts of its matrix on other ranks.

    Args:
        colsum (callable | None): per-row tensor ``[rows, n]`` → column sums over every row of the
            matrix ``[1, n]`` (default: the local sum).
        rowsum (callable | None): ``[rows, n]`` → row sums ``[rows, 1]`` over every column of each
            row (default: the local sum).
        total_rows (int | None): rows of the whole matrix (default: the local count).
        mask (Tensor | None): ``[rows, n]`` 0/1 of the elements this rank holds, when it holds
            parts of rows (the others are zero-filled and must stay zero between operations).
        total (callable | None): ``[rows, n]`` → the sum over every element of the matrix,
            ``[1, 1]`` (default: the local sum; per matrix ``[..., 1, 1]`` for a batch).
    """

    def __init__(self, colsum=None, rowsum=None, total_rows: int | None = None, mask: Tensor | None = None,
                 total=None):
        self._colsum, self._rowsum, self.total_rows, self.mask = colsum, rowsum, total_rows, mask
        self._total = total

    @property
    def rows_whole(self) -> bool:
        """Every row at hand is complete (row sums are local)."""
        return self.mask is None and self._rowsum is None

    def colsum(self, x: Tensor) -> Tensor:
        return self._colsum(x) if self._colsum else x.sum(-2, keepdim=True)

    def rowsum(self, x: Tensor) -> Tensor:
        return self._rowsum(x) if self._rowsum else x.sum(-1, keepdim=True)

    def total(self, x: Tensor) -> Tensor:
        """Sum over every element of the matrix, wherever it lives (zero-filled elements add 0)."""
        return self._total(x) if self._total else self.clean(x).sum((-2, -1), keepdim=True)

    def rows(self, x: Tensor) -> int:
        return self.total_rows if self.total_rows is not None else x.shape[-2]

    def clean(self, x: Tensor) -> Tensor:
        """Zero what this rank does not hold (after an operation that shifted it)."""
        return x if self.mask is None else x * self.mask


LOCAL = RowStats()


def orient(x: Tensor, axis: str) -> Tensor:
    """Put the permuted axis on the rows, so row rules can be written once."""
    return x if axis == "rows" else x.transpose(-2, -1)


class Rule:
    """Base class. Subclasses set ``name``, ``locality`` and ``defaults`` (hyperparameters with
    their defaults; a param group may set only these plus ``lr`` and ``weight_decay``)."""

    name = ""
    locality = "matrix"

    defaults = {}
    direction_options: tuple = ()
    #: The values its ``scale`` hyperparameter may take, where it has one as a name (checked at build).
    scales: tuple[str, ...] = ()

    #: Tensors :meth:`direction_input` returns (more than one only with :meth:`direction_with_state`).
    inputs: int = 1
    #: State keys moved to the owner with the inputs and returned updated (see the module docstring).
    carried: tuple[str, ...] = ()

    @property
    def stateful(self) -> bool:
        """Whether the owner runs :meth:`direction_with_state` (carried state or several inputs)."""
        return bool(self.carried) or self.inputs != 1

    def check(self, group: dict) -> None:
        """Raise ``ValueError`` naming a hyperparameter of ``group`` that this rule cannot use."""

    # ----- state and momentum (element-wise on the local shard) -----
    def init_state(self, p: Tensor, group: dict) -> dict:
        """Eagerly created state, shaped like the parameter (DTensor when the parameter is one);
        ``group`` holds the hyperparameters, for rules whose state depends on them."""
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int) -> Tensor:
        """Update the momentum in place and return what the direction is computed from.

        ``step`` counts this parameter's steps, this one included (1 on the first): what bias
        corrections need, so that an element-wise direction (Adam's) can be formed here, before
        any exchange."""
        m = local_state["momentum_buffer"]
        beta = group["beta"]
        m.lerp_(grad, 1 - beta)
        return m

    def direction_inputs(self, states: list[dict], grads: list[Tensor], group: dict, steps: list[int]) -> list:
        """:meth:`direction_input` for every parameter of one param group at once: ``states``,
        ``grads`` and ``steps`` are per parameter, and so is the result.

        A rule whose momentum is element-wise does it with foreach operations over the whole group
        (a fixed handful of kernel launches instead of a few per parameter), bit for bit the
        per-parameter result; a rule that overrides only :meth:`direction_input` (the neighbours)
        gets a loop over it."""
        if type(self).direction_input is not Rule.direction_input:
            return _loop(self, states, grads, group, steps)
        bufs = [s["momentum_buffer"] for s in states]
        if bufs:
            torch._foreach_lerp_(bufs, grads, 1 - group["beta"])
        return bufs

    # ----- direction -----
    def key(self, group: dict) -> tuple:
        """Everything that decides the direction's math, so equal keys can share a batch."""
        return (self.name,) + tuple((k, _hashable(group[k] if k in group else self.defaults[k]))
                                    for k in self.direction_options)

    def direction(self, x: Tensor, *, axis: str, transposed: bool, group: dict, stats: RowStats = LOCAL,
                  input_parts: int = 1) -> Tensor:
        """The direction of ``x``: rows of one matrix (``rows`` locality) or whole blocks ``[B, m, n]``.

        ``input_parts`` is :attr:`~dist_spectral.blocks.Block.input_parts` of the blocks (the heads
        of a per-head attention output split its input side into that many): Muon's
        ``scale="spectral"`` uses the whole matrix's input width; the other rules ignore it.
        """
        raise NotImplementedError

    def direction_with_state(self, inputs: list[Tensor], state: dict[str, Tensor], *, step: int, axis: str,
                             transposed: bool, group: dict, input_parts: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        """The direction of a batch of whole blocks and their new carried state.

        Args:
            inputs: ``self.inputs`` tensors ``[B, m, n]`` (what :meth:`direction_input` returned).
            state: every key of ``carried`` → ``[B, m, n]``, the blocks' current state (read-only).
            step: the parameter's step counter, this step included (1 on the first step).
            input_parts: as for :meth:`direction`.

        Returns:
            (direction ``[B, m, n]``, key of ``carried`` → new state ``[B, m, n]``).
        """
        raise NotImplementedError

    def cost(self, m: int, n: int, group: dict) -> int:
        """Estimated flops of the direction on one m×n block (used to balance owners)."""
        return 0

    def polar_flops(self, m: int, n: int, group: dict) -> int:
        """Flops spent in polar iterations on one block (the counter the engine reports)."""
        return 0

    def needs_matrix_statistics(self, axis: str) -> bool:
        """Row rules: whether the direction sums over the rows of its matrix (``colsum``, ``total``).
        Such statistics span one matrix, so a tensor holding several (experts, fused halves) goes
        per matrix through the owner exchange instead of running on its rows."""
        return True


def _loop(rule: Rule, states: list[dict], grads: list[Tensor], group: dict, steps: list[int]) -> list:
    return [rule.direction_input(s, g, group, step=t) for s, g, t in zip(states, grads, steps)]


def _hashable(v):
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    return v


def _polar_kwargs(group: dict) -> dict:
    return dict(steps=group["steps"], coefficients=_hashable(group["coefficients"]), safety=group["safety"],
                dtype=_DTYPES[group["polar_dtype"]], form=_polar_form(group))


_DTYPES = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_POLAR_DEFAULTS = {"steps": 5, "coefficients": "polar_express", "safety": 1.01, "polar_dtype": "auto",
                   "polar_form": "standard"}
_POLAR_OPTIONS = ("steps", "coefficients", "safety", "polar_dtype", "polar_form")


def _polar_form(group: dict) -> str:
    # Param groups restored from a checkpoint written before ``polar_form`` existed lack the key.
    return group.get("polar_form", _POLAR_DEFAULTS["polar_form"])


def _polar_flops(m: int, n: int, group: dict) -> int:
    """:func:`~dist_spectral.functional.polar_flops` of one ``m×n`` matrix under a group's polar options."""
    return F.polar_flops(m, n, group["steps"], _polar_form(group))


def check_polar_options(group: dict) -> None:
    """``ValueError`` naming a polar option of ``group`` (where it has them) that polar cannot use,
    raised when the optimizer is built, before any step touches momentum."""
    if "polar_dtype" in group and group["polar_dtype"] not in _DTYPES:
        raise ValueError(f"polar_dtype={group['polar_dtype']!r}: use one of {sorted(k for k in _DTYPES if k)}")
    if "polar_form" in group:
        try:
            F.check_form(group["polar_form"])
        except ValueError as e:
            raise ValueError(f"polar_form={group['polar_form']!r}: {e}") from None


def _number(value) -> float | None:
    """``value`` as a float when it is a real number (a 0-d tensor counts, as torch's lr may be one)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _check_range(key: str, value, low: float, high: float | None = None, *, open_low: bool = False) -> None:
    x = _number(value)
    if x is None:
        raise ValueError(f"{key}={value!r}: must be a number")
    ok = (x > low if open_low else x >= low) and (high is None or x < high)
    if not ok:
        bound = f"in [{low:g}, {high:g})" if high is not None else f"{'>' if open_low else '≥'} {low:g}"
        raise ValueError(f"{key}={value!r}: must be {bound}")


#: Keys checked alike for every rule that has them, as torch's optimizers check theirs.
_BOOLEAN_KEYS = ("nesterov", "per_head", "split_gate_up", "center", "normalize")


def check_lr_form(lr) -> None:
    """``ValueError`` unless ``lr`` is a number or a 0-d tensor: the update multiplies a tensor lr
    into foreach operations, which take a 0-d tensor only (a ``[1]``-shaped one would fail halfway
    through applying a step)."""
    if isinstance(lr, Tensor) and lr.ndim != 0:
        raise ValueError(f"lr={lr!r}: a tensor lr must be 0-d, e.g. torch.tensor({lr.reshape(-1)[0].item():g}) "
                         f"(shape {tuple(lr.shape)} given); or give a Python number")


def check_common(group: dict) -> None:
    """``ValueError`` naming the first of the hyperparameters every rule shares that is out of range:
    ``lr`` ≥ 0, ``weight_decay`` ≥ 0, ``beta`` and each of ``betas`` in [0, 1), ``eps`` > 0,
    ``norm_eps`` / ``spectral_eps`` ≥ 0, ``steps`` an integer ≥ 0, the switches booleans. A
    negative lr or weight decay would train uphill, a momentum of 1 or more diverges."""
    check_lr_form(group.get("lr"))
    _check_range("lr", group.get("lr"), 0.0)
    _check_range("weight_decay", group.get("weight_decay", 0.0), 0.0)
    if "beta" in group:
        _check_range("beta", group["beta"], 0.0, 1.0)
    if "betas" in group:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas={betas!r}: give two numbers [beta1, beta2], e.g. [0.9, 0.95]")
        for i, b in enumerate(betas):
            _check_range(f"betas[{i}]", b, 0.0, 1.0)
    if "eps" in group:
        _check_range("eps", group["eps"], 0.0, open_low=True)
    for key in ("norm_eps", "spectral_eps"):
        if key in group:
            _check_range(key, group[key], 0.0)
    if "steps" in group:
        steps = group["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps={steps!r}: must be an integer ≥ 0 (polar iterations)")
    for key in _BOOLEAN_KEYS:
        if key in group and not isinstance(group[key], bool):
            raise ValueError(f"{key}={group[key]!r}: must be true or false")


def check_group(group: dict) -> None:
    """Every check of a param group's hyperparameters: its rule's own (:meth:`Rule.check`), the polar
    options and :func:`check_common`. Raises ``ValueError`` naming the key and its value."""
    rule = get_rule(group["rule"])
    check_polar_options(group)
    if rule.scales and group.get("scale", rule.defaults.get("scale")) not in rule.scales:
        raise ValueError(f"scale={group['scale']!r}: rule {rule.name!r} takes one of {', '.join(rule.scales)} "
                         "('none' is the paper's rule, 'rms' the width-aware one)")
    rule.check(group)
    check_common(group)


def adam_direction(local_state: dict, grad: Tensor, betas: tuple[float, float], eps: float, step: int) -> Tensor:
    """Adam's moments, updated in place (``exp_avg``, ``exp_avg_sq``), and its bias-corrected
    direction ``m̂ / (√v̂ + ε)`` at ``step`` (1 on the first): element-wise, on any shard."""
    beta1, beta2 = betas
    local_state["exp_avg"].lerp_(grad, 1 - beta1)
    local_state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (local_state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(eps)
    return (local_state["exp_avg"] / (1 - beta1 ** step)).div_(denom)


class AdamW(Rule):
    """AdamW: ``m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², U = m̂ / (√v̂ + ε)`` with bias correction."""

    name = "adamw"
    locality = "element"
    defaults = {"betas": (0.9, 0.95), "eps": 1e-8}

    def init_state(self, p: Tensor, group: dict) -> dict:
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int) -> Tensor:
        """The direction itself: it is element-wise."""
        return adam_direction(local_state, grad, group["betas"], group["eps"], step)

    def direction_inputs(self, states, grads, group, steps):
        """:func:`adam_direction` over the whole group in foreach operations (the same operations
        per element, so the same bits)."""
        if type(self).direction_input is not AdamW.direction_input or not states:
            return _loop(self, states, grads, group, steps)
        (beta1, beta2), eps = group["betas"], group["eps"]
        exp_avg, exp_avg_sq = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sq, [1 - beta2 ** t for t in steps])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(exp_avg, [1 - beta1 ** t for t in steps])
        torch._foreach_div_(out, denom)
        return out


class Muon(Rule):
    """Muon: ``U = polar(G + μB) · s(m, n)`` with ``s = max(1, fan_out/fan_in)^½`` (``scale="spectral"``)
    or ``0.2·√max(m, n)`` (``scale="rms"``, Moonlight's AdamW-RMS match). A head block of a per-head
    attention output takes the whole output matrix's input width in ``s`` (``input_parts``, see
    :func:`~dist_spectral.functional.muon_scale`), so the stacked heads have whole-matrix Muon's RMS.

    The matrices are the blocks of :func:`~dist_spectral.blocks.unit_specs`: each head with
    ``per_head``, and a fused gate/up tensor as gate and up apart unless ``split_gate_up`` is
    False (then each expert's ``[2r, d]`` is one matrix, what Moonlight's and DeepSpeed's Muon do:
    fewer flops, a different update)."""

    name = "muon"
    locality = "matrix"
    defaults = {"beta": 0.95, "nesterov": True, "scale": "spectral", "per_head": True, "split_gate_up": True,
                **_POLAR_DEFAULTS}
    direction_options = _POLAR_OPTIONS + ("scale",)
    scales = ("spectral", "rms", "none")

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int) -> Tensor:
        buf = local_state["momentum_buffer"]
        buf.mul_(group["beta"]).add_(grad)
        return grad.add(buf, alpha=group["beta"]) if group["nesterov"] else buf

    def direction_inputs(self, states, grads, group, steps):
        """The momentum and Nesterov input over the whole group in foreach operations (same bits)."""
        if type(self).direction_input is not Muon.direction_input or not states:
            return _loop(self, states, grads, group, steps)
        bufs = [s["momentum_buffer"] for s in states]
        torch._foreach_mul_(bufs, group["beta"])
        torch._foreach_add_(bufs, grads)
        return torch._foreach_add(grads, bufs, alpha=group["beta"]) if group["nesterov"] else bufs

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        m, n = x.shape[-2:]
        fan_out, fan_in = (n, m) if transposed else (m, n)
        # polar returns a fresh tensor: scale it in place rather than allocate another (x · 1.0 is
        # x exactly, so a wide matrix's spectral scale, or scale "none", costs no pass)
        u, scale = F.polar(x, **_polar_kwargs(group)), F.muon_scale(fan_out, fan_in, group["scale"], input_parts)
        return u if scale == 1.0 else u.mul_(scale)

    def cost(self, m, n, group):
        return _polar_flops(m, n, group)

    polar_flops = cost


class RowNorm(Rule):
    """RowNormM: ``U = s · R(M)``, each row (along the permuted axis) divided by ``‖row‖₂ + ε``;
    ``s = 1`` (``scale="none"``, the paper's rule) or ``0.2·√n`` for rows of length n (``"rms"``:
    the same lr at any width, see :func:`~dist_spectral.functional.width_scale`)."""

    name = "row_norm"
    locality = "rows"
    defaults = {"beta": 0.95, "norm_eps": 1e-8, "scale": "none"}
    direction_options = ("norm_eps", "scale")
    scales = F.WIDTH_SCALES

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        return normalize(x, axis, stats, group["norm_eps"]).mul_(row_scale(x, axis, stats, group))

    def needs_matrix_statistics(self, axis):
        return axis == "cols"  # column norms sum over rows; row norms are per row

    def cost(self, m, n, group):
        return 3 * m * n


class CenteredRowNorm(Rule):
    """Centred RowNormM for blocks with a shared logit shift: ``U = s · C(R(C(M)))``, ``s`` as
    :class:`RowNorm`'s."""

    name = "centered_row_norm"
    locality = "rows"
    defaults = {"beta": 0.95, "norm_eps": 1e-8, "scale": "none"}
    direction_options = ("norm_eps", "scale")
    scales = F.WIDTH_SCALES

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        u = center(x, axis, stats)
        u = normalize(u, axis, stats, group["norm_eps"])
        return center(u, axis, stats).mul_(row_scale(x, axis, stats, group))

    def cost(self, m, n, group):
        return 7 * m * n


def row_scale(x: Tensor, axis: str, stats: RowStats, group: dict) -> float:
    """:func:`~dist_spectral.functional.width_scale` of the group's ``scale`` for rows along the
    permuted axis: a row's whole length is the view's column count (cut rows are zero-filled to
    it), a column's the matrix's row count, wherever its rows live."""
    length = x.shape[-1] if axis == "rows" else stats.rows(x)
    return F.width_scale(length, group.get("scale", "none"))


def normalize(x: Tensor, axis: str, stats: RowStats, eps: float) -> Tensor:
    """``R`` along the permuted axis: divide by ``‖row‖₂ + ε`` (or ``‖column‖₂ + ε``), the norm
    summed over every part of the row or column wherever it lives."""
    if axis == "rows":
        if stats.rows_whole:
            return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)
        return x / (stats.rowsum(x * x).sqrt() + eps)
    return x / (stats.colsum(x * x).sqrt() + eps)


def center(x: Tensor, axis: str, stats: RowStats) -> Tensor:
    """``C`` along the permuted axis: subtract the mean over it (the shared shift)."""
    if axis == "rows":
        return stats.clean(x - stats.colsum(x) / stats.rows(x))
    return stats.clean(x - stats.rowsum(x) / x.shape[-1])


def spectral_scale(x: Tensor, group: dict) -> float:
    """:func:`~dist_spectral.functional.width_scale` of the group's ``scale`` for a spectral rule on
    whole ``[..., m, n]`` blocks: ``L = max(m, n)``, where the unit singular values of its
    ``polar``-like factor give RMS ``1/√L``."""
    return F.width_scale(max(x.shape[-2:]), group.get("scale", "none"))


class Hybrid(Rule):
    """Hybrid row→polar: ``N = R(M); U = s · ν(N)^α · polar(N)``; centred (untied heads):
    ``U = s · C(ν^α · polar(C(R(C(M)))))``. Applied with the permuted axis on the rows; ``s = 1``
    (``scale="none"``) or ``0.2·√max(m, n)`` (``"rms"``, :func:`spectral_scale`)."""

    name = "hybrid"
    locality = "matrix"
    defaults = {"beta": 0.95, "alpha": 1.0, "center": False, "order": "row_then_polar", "scale": "none",
                **_POLAR_DEFAULTS}
    direction_options = ("alpha", "center", "order", "scale") + _POLAR_OPTIONS
    scales = F.WIDTH_SCALES

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        u = F.hybrid(orient(x, axis), alpha=group["alpha"], order=group["order"], center=group["center"],
                     **_polar_kwargs(group))
        return orient(u.mul_(spectral_scale(x, group)), axis)

    def cost(self, m, n, group):
        return _polar_flops(m, n, group)

    polar_flops = cost


class LeftSpectral(Rule):
    """Left-spectral router rule: ``Mc = C(M); L = (Mc Mcᵀ + εI)^{-½}; U = s · C(tr(Mc Mcᵀ L)^α · L Mc)``,
    ``s`` as :class:`Hybrid`'s."""

    name = "left_spectral"
    locality = "matrix"
    defaults = {"beta": 0.95, "alpha": 1.0, "center": True, "spectral_eps": 1e-7, "scale": "none"}
    direction_options = ("alpha", "center", "spectral_eps", "scale")
    scales = F.WIDTH_SCALES

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        u = F.left_spectral(orient(x, axis), alpha=group["alpha"], center=group["center"], eps=group["spectral_eps"])
        return orient(u.mul_(spectral_scale(x, group)), axis)

    def cost(self, m, n, group):
        k = min(m, n)
        return 2 * k * k * max(m, n) + 10 * k ** 3


class RightSpectral(Rule):
    """Right-spectral rule: ``U = s · ν^α · M (MᵀM + εI)^{-½}``, ``s`` as :class:`Hybrid`'s."""

    name = "right_spectral"
    locality = "matrix"
    defaults = {"beta": 0.95, "alpha": 1.0, "center": False, "spectral_eps": 1e-7, "scale": "none"}
    direction_options = ("alpha", "center", "spectral_eps", "scale")
    scales = F.WIDTH_SCALES

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        u = F.right_spectral(orient(x, axis), alpha=group["alpha"], center=group["center"], eps=group["spectral_eps"])
        return orient(u.mul_(spectral_scale(x, group)), axis)

    def cost(self, m, n, group):
        return 2 * m * n * n + 10 * n ** 3


RULES: dict[str, Rule] = {r.name: r for r in (AdamW(), Muon(), RowNorm(), CenteredRowNorm(), Hybrid(), LeftSpectral(),
                                                RightSpectral())}


def register(rule: Rule) -> Rule:
    """Add a rule (an instance) under ``rule.name``; rules from other papers live in ``neighbours/``."""
    if rule.name in RULES and type(RULES[rule.name]) is not type(rule):
        raise ValueError(f"a different rule is already registered as {rule.name!r}")
    if rule.stateful and rule.locality != "matrix":
        raise ValueError(f"rule {rule.name!r} carries state or takes {rule.inputs} inputs, which only the owner "
                         f"exchange moves: its locality must be 'matrix', not {rule.locality!r}")
    RULES[rule.name] = rule
    return rule


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(sorted(RULES))}") from None


def group_defaults(rule: Rule) -> dict:
    """Hyperparameters a group of this rule carries (besides lr and weight_decay)."""
    return dict(rule.defaults)


def block_cost(rule: Rule, shape: tuple[int, int], group: dict) -> int:
    return int(rule.cost(shape[0], shape[1], group))


def polar_flops_of(rule: Rule, shape: tuple[int, int], group: dict) -> int:
    return int(rule.polar_flops(shape[0], shape[1], group))


__all__ = ["Rule", "RULES", "RowStats", "get_rule", "register", "normalize", "center", "orient", "adam_direction"]
