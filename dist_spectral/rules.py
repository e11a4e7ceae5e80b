"""Update rules: momentum, the direction each class of weight gets, and what the direction needs.

A rule is pure math: it never communicates. It declares its *locality*, and the engine hands it
exactly that much of the tensor:

- ``element``: any shard (AdamW).
- ``rows``: rows of the 2-D view, as a dense ``[rows, n]`` tensor of the rows this rank touches.
  Statistics that span ranks come from a :class:`RowStats`: ``colsum`` (column sums over *all*
  rows of the matrix: centring, column norms; one all-reduce of a length-n vector when rows are
  sharded) and ``rowsum`` (row sums: local, except rows cut by a DeepSpeed partition boundary,
  whose partial sums are combined across the ranks holding them).
- ``matrix``: whole matrices, batched ``[B, m, n]`` of equal shape (Muon, hybrid, spectral rules).

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
    """

    def __init__(self, colsum=None, rowsum=None, total_rows: int | None = None, mask: Tensor | None = None):
        self._colsum, self._rowsum, self.total_rows, self.mask = colsum, rowsum, total_rows, mask

    @property
    def rows_whole(self) -> bool:
        """Every row at hand is complete (row sums are local)."""
        return self.mask is None and self._rowsum is None

    def colsum(self, x: Tensor) -> Tensor:
        return self._colsum(x) if self._colsum else x.sum(-2, keepdim=True)

    def rowsum(self, x: Tensor) -> Tensor:
        return self._rowsum(x) if self._rowsum else x.sum(-1, keepdim=True)

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

    # ----- state and momentum (element-wise on the local shard) -----
    def init_state(self, p: Tensor) -> dict:
        """Eagerly created state, shaped like the parameter (DTensor when the parameter is one)."""
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def direction_input(self, local_state: dict, grad: Tensor, group: dict) -> Tensor:
        """Update the momentum in place and return what the direction is computed from."""
        m = local_state["momentum_buffer"]
        beta = group["beta"]
        m.lerp_(grad, 1 - beta)
        return m

    # ----- direction -----
    def key(self, group: dict) -> tuple:
        """Everything that decides the direction's math, so equal keys can share a batch."""
        return (self.name,) + tuple((k, _hashable(group[k])) for k in self.direction_options)

    def direction(self, x: Tensor, *, axis: str, transposed: bool, group: dict, stats: RowStats = LOCAL) -> Tensor:
        raise NotImplementedError

    def cost(self, m: int, n: int, group: dict) -> int:
        """Estimated flops of the direction on one m×n block (used to balance owners)."""
        return 0

    def polar_flops(self, m: int, n: int, group: dict) -> int:
        """Flops spent in polar iterations on one block (the counter the engine reports)."""
        return 0


def _hashable(v):
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    return v


def _polar_kwargs(group: dict) -> dict:
    return dict(steps=group["steps"], coefficients=_hashable(group["coefficients"]), safety=group["safety"],
                dtype=_DTYPES[group["polar_dtype"]])


_DTYPES = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_POLAR_DEFAULTS = {"steps": 5, "coefficients": "polar_express", "safety": 1.01, "polar_dtype": "auto"}


class AdamW(Rule):
    """AdamW: ``m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², U = m̂ / (√v̂ + ε)`` with bias correction."""

    name = "adamw"
    locality = "element"
    defaults = {"betas": (0.9, 0.95), "eps": 1e-8}

    def init_state(self, p: Tensor) -> dict:
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def direction_input(self, local_state: dict, grad: Tensor, group: dict) -> Tensor:
        beta1, beta2 = group["betas"]
        local_state["exp_avg"].lerp_(grad, 1 - beta1)
        local_state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return local_state["exp_avg"]

    def adam_direction(self, local_state: dict, step: int, group: dict) -> Tensor:
        beta1, beta2 = group["betas"]
        bias1 = 1 - beta1 ** step
        bias2 = 1 - beta2 ** step
        denom = (local_state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
        return (local_state["exp_avg"] / bias1).div_(denom)


class Muon(Rule):
    """Muon: ``U = polar(G + μB) · s(m, n)`` with ``s = max(1, fan_out/fan_in)^½`` (``scale="spectral"``)
    or ``0.2·√max(m, n)`` (``scale="rms"``, Moonlight's AdamW-RMS match)."""

    name = "muon"
    locality = "matrix"
    defaults = {"beta": 0.95, "nesterov": True, "scale": "spectral", "per_head": True, **_POLAR_DEFAULTS}
    direction_options = ("steps", "coefficients", "safety", "polar_dtype", "scale")

    def direction_input(self, local_state: dict, grad: Tensor, group: dict) -> Tensor:
        buf = local_state["momentum_buffer"]
        buf.mul_(group["beta"]).add_(grad)
        return grad.add(buf, alpha=group["beta"]) if group["nesterov"] else buf

    def direction(self, x, *, axis, transposed, group, stats=LOCAL):
        m, n = x.shape[-2:]
        fan_out, fan_in = (n, m) if transposed else (m, n)
        return F.polar(x, **_polar_kwargs(group)) * F.muon_scale(fan_out, fan_in, group["scale"])

    def cost(self, m, n, group):
        return F.polar_flops(m, n, group["steps"])

    polar_flops = cost


class RowNorm(Rule):
    """RowNormM: ``U = R(M)``, each row (along the permuted axis) divided by ``‖row‖₂ + ε``."""

    name = "row_norm"
    locality = "rows"
    defaults = {"beta": 0.95, "norm_eps": 1e-8}

    def direction(self, x, *, axis, transposed, group, stats=LOCAL):
        return normalize(x, axis, stats, group["norm_eps"])

    def cost(self, m, n, group):
        return 3 * m * n


class CenteredRowNorm(Rule):
    """Centred RowNormM for blocks with a shared logit shift: ``U = C(R(C(M)))``."""

    name = "centered_row_norm"
    locality = "rows"
    defaults = {"beta": 0.95, "norm_eps": 1e-8}

    def direction(self, x, *, axis, transposed, group, stats=LOCAL):
        x = center(x, axis, stats)
        x = normalize(x, axis, stats, group["norm_eps"])
        return center(x, axis, stats)

    def cost(self, m, n, group):
        return 7 * m * n


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


class Hybrid(Rule):
    """Hybrid row→polar: ``N = R(M); U = ν(N)^α · polar(N)``; centred (untied heads):
    ``U = C(ν^α · polar(C(R(C(M)))))``. Applied with the permuted axis on the rows."""

    name = "hybrid"
    locality = "matrix"
    defaults = {"beta": 0.95, "alpha": 1.0, "center": False, "order": "row_then_polar", **_POLAR_DEFAULTS}
    direction_options = ("alpha", "center", "order", "steps", "coefficients", "safety", "polar_dtype")

    def direction(self, x, *, axis, transposed, group, stats=LOCAL):
        u = F.hybrid(orient(x, axis), alpha=group["alpha"], order=group["order"], center=group["center"],
                     **_polar_kwargs(group))
        return orient(u, axis)

    def cost(self, m, n, group):
        return F.polar_flops(m, n, group["steps"])

    polar_flops = cost


class LeftSpectral(Rule):
    """Left-spectral router rule: ``Mc = C(M); L = (Mc Mcᵀ + εI)^{-½}; U = C(tr(Mc Mcᵀ L)^α · L Mc)``."""

    name = "left_spectral"
    locality = "matrix"
    defaults = {"beta": 0.95, "alpha": 1.0, "center": True, "spectral_eps": 1e-7}
    direction_options = ("alpha", "center", "spectral_eps")

    def direction(self, x, *, axis, transposed, group, stats=LOCAL):
        u = F.left_spectral(orient(x, axis), alpha=group["alpha"], center=group["center"], eps=group["spectral_eps"])
        return orient(u, axis)

    def cost(self, m, n, group):
        k = min(m, n)
        return 2 * k * k * max(m, n) + 10 * k ** 3


class RightSpectral(Rule):
    """Right-spectral rule: ``U = ν^α · M (MᵀM + εI)^{-½}``."""

    name = "right_spectral"
    locality = "matrix"
    defaults = {"beta": 0.95, "alpha": 1.0, "center": False, "spectral_eps": 1e-7}
    direction_options = ("alpha", "center", "spectral_eps")

    def direction(self, x, *, axis, transposed, group, stats=LOCAL):
        u = F.right_spectral(orient(x, axis), alpha=group["alpha"], center=group["center"], eps=group["spectral_eps"])
        return orient(u, axis)

    def cost(self, m, n, group):
        return 2 * m * n * n + 10 * n ** 3


RULES: dict[str, Rule] = {r.name: r for r in (AdamW(), Muon(), RowNorm(), CenteredRowNorm(), Hybrid(), LeftSpectral(),
                                                RightSpectral())}


def register(rule: Rule) -> Rule:
    """Add a rule (an instance) under ``rule.name``; rules from other papers live in ``neighbours/``."""
    if rule.name in RULES and type(RULES[rule.name]) is not type(rule):
        raise ValueError(f"a different rule is already registered as {rule.name!r}")
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


__all__ = ["Rule", "RULES", "RowStats", "get_rule", "register", "normalize", "center", "orient"]
