"""AuON (Maity 2025, "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates",
arXiv 2509.24320): momentum normalised by its Frobenius norm and a cosh-RMS brake, no
orthogonalisation.

For a weight ``W`` (m×n) with gradient ``G``::

    M ← β M + (1 − β) G                     ĝ = (1 − β) G + β M   (Nesterov; else ĝ = M)
    N = ĝ / (‖ĝ‖_F + 1e-7)
    r = √mean(cosh(γ N)²)                    γ = 1.5, the mean over the m·n elements
    U = s · N / (r + 1e-8)                   s = max(1, fan_out/fan_in)^½
    W ← (1 − lr·wd) W − lr · U

``‖U/s‖₂ ≤ ‖U/s‖_F < 1``, and the brake ``r ≥ 1`` grows with the heavy tail of ``N``. The update is
invariant to the scale of the gradient (``normalize=False`` gives the released code's ``ĝ/(r+1e-8)``
instead, which is not). The direction needs two numbers per matrix, ``Σ ĝ²`` and ``Σ sinh²(γN)``
(``mean cosh² = 1 + mean sinh²``, and ``sinh 0 = 0``, so zero-filled elements of a DeepSpeed
partition add nothing), so it is a *row* rule: each rank works on its own rows, and under sharding
the engine adds two all-reduces of one number per matrix (:meth:`RowStats.total`), no gather. A
tensor holding several matrices (3-D experts, fused gate/up) needs per-matrix statistics and goes
through the owner exchange, where ``direction`` gets whole matrices ``[B, m, n]``.

Hybrid-AuON (``auon_hybrid``, whole-matrix): one Newton–Schulz step with Muon's quintic first,
``U = s · cosh_brake(NS₁(ĝ))``.
"""
from __future__ import annotations

from torch import Tensor

from .. import functional as F
from ..rules import _POLAR_DEFAULTS, _POLAR_OPTIONS, LOCAL, Rule, _polar_flops, _polar_kwargs, register

SCALES = ("spectral", "rms", "none")


def shape_scale(fan_out: int, fan_in: int, kind: str) -> float:
    """``max(1, fan_out/fan_in)^½`` (``"spectral"``), Moonlight's ``0.2·√max`` (``"rms"``) or 1."""
    return 1.0 if kind == "none" else F.muon_scale(fan_out, fan_in, kind)


class AuON(Rule):
    """AuON: ``U = s · N / (√mean cosh²(γN) + 1e-8)``, ``N = ĝ / (‖ĝ‖_F + 1e-7)``, ĝ Nesterov EMA momentum.

    Hyperparameters:
        beta (float): EMA momentum, in [0, 1) (default: 0.95).
        nesterov (bool): ``ĝ = (1 − β)G + βM`` instead of ``M`` (default: True).
        gamma (float): scale inside ``cosh``, ``> 0`` (default: 1.5).
        normalize (bool): divide ``N`` (scale-free) or ``ĝ`` by the brake (default: True).
        scale (str): ``"spectral"``, ``"rms"`` or ``"none"`` (default: ``"spectral"``).
    """

    name = "auon"
    locality = "rows"
    defaults = {"beta": 0.95, "nesterov": True, "gamma": 1.5, "normalize": True, "scale": "spectral"}
    direction_options = ("gamma", "normalize", "scale")

    def check(self, group: dict) -> None:
        if not 0 <= group["beta"] < 1:
            raise ValueError(f"{self.name}: beta={group['beta']!r}; it must be in [0, 1)")
        gamma = group["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < float("inf"):
            raise ValueError(f"{self.name}: gamma={gamma!r}; it must be a finite number > 0 (1.5 in the paper)")
        if group["scale"] not in SCALES:
            raise ValueError(f"{self.name}: scale={group['scale']!r}; use one of {', '.join(map(repr, SCALES))}")

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int) -> Tensor:
        m = local_state["momentum_buffer"]
        m.lerp_(grad, 1 - group["beta"])
        return grad.lerp(m, group["beta"]) if group["nesterov"] else m

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        # Rows of one matrix (stats span it) or whole matrices [B, m, n] (LOCAL: per matrix).
        m, n = stats.rows(x), x.shape[-1]
        fan_out, fan_in = (n, m) if transposed else (m, n)
        u = F.cosh_brake(x, group["gamma"], group["normalize"], total=stats.total, count=m * n)
        return stats.clean(u * shape_scale(fan_out, fan_in, group["scale"]))

    def cost(self, m, n, group):
        return 10 * m * n


class AuONHybrid(AuON):
    """Hybrid-AuON: ``U = s · cosh_brake(polar_k(ĝ))``, ``k`` Newton–Schulz steps (default: one,
    Muon's quintic, as in the paper) before the brake. Whole matrices.

    Hyperparameters: those of ``auon``, plus ``steps``, ``coefficients``, ``safety``,
    ``polar_dtype`` of the polar step (default: 1, ``"muon"``).
    """

    name = "auon_hybrid"
    locality = "matrix"
    defaults = {**AuON.defaults, **_POLAR_DEFAULTS, "steps": 1, "coefficients": "muon"}
    direction_options = AuON.direction_options + _POLAR_OPTIONS

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        m, n = x.shape[-2:]
        fan_out, fan_in = (n, m) if transposed else (m, n)
        u = F.cosh_brake(F.polar(x, **_polar_kwargs(group)), group["gamma"], group["normalize"])
        return u * shape_scale(fan_out, fan_in, group["scale"])

    def polar_flops(self, m, n, group):
        return _polar_flops(m, n, group)

    def cost(self, m, n, group):
        return self.polar_flops(m, n, group) + 10 * m * n


register(AuON())
register(AuONHybrid())
