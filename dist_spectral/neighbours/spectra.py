"""SPECTRA (Jiang, Semenov, Stich 2026, "Enhancing LLM Training via Spectral Clipping",
arXiv 2603.14315): soft spectral clipping of a base optimizer's update.

For a weight ``W`` (m×n) with base update ``U`` (AdamW's ``m̂/(√v̂+ε)``, the sign of the momentum,
or Muon's polar factor)::

    H_c(U) = (I + U Uᵀ/c²)^{-½} U            σ ↦ σ / √(1 + σ²/c²), singular vectors kept
    W ← (1 − lr·wd) W − lr · max(1, fan_out/fan_in)^½ · H_c(U)

The clip bounds the update's spectral norm by ``c`` (softly: ``σ ≪ c`` passes, ``σ ≫ c`` lands
just below ``c``), which the paper shows is a composite Frank–Wolfe step with spectral-norm
constraint; AdamW and Signum updates otherwise have spectral norms of order ``√max(m, n)`` and
above. ``H_c`` runs on the wide orientation with a coupled Newton–Schulz inverse square root
(:func:`~dist_spectral.functional.soft_clip`, 10 steps as in the paper's runs).

How it fits the engine: the base update is formed element-wise on each rank's shard in
``direction_input`` (Adam's moments and bias correction use the parameter's step counter, which
the engine passes), so only the finished base update travels to the matrix's owner, where
``direction`` clips it. State is the base optimizer's: ``exp_avg``/``exp_avg_sq`` (adamw) or
``momentum_buffer`` (sign, muon; Moonlight convention ``B ← βB + G``, input ``G + βB``, as in the
paper's Signum).

Pre-clipping (the paper's optional second clip, against sparse spectral spikes of the gradient
noise): the raw gradient of each block is clipped before it enters the base optimizer's state::

    G̃ = H_{c_pre}(G)                        per block, before any moment sees G
    m ← β₁m + (1−β₁)G̃,  v ← β₂v + (1−β₂)G̃²,  V = m̂ / (√v̂ + ε)        (adamw)
    B ← βB + G̃,  V = sign(G̃ + βB) or polar(G̃ + βB)                    (sign, muon)
    W ← (1 − lr·wd) W − lr · max(1, fan_out/fan_in)^½ · H_c(V)

with the post-clip's blocks (each expert; each head with ``per_head``) and ``c_pre`` the
``pre_clip_c`` hyperparameter (default: ``clip_c``; the paper gives no separate default, and the
gradient is in the loss's units, so tune it). A spike ``σ ≫ c_pre`` enters the moments at just
below ``c_pre``; the rest of the spectrum (``σ ≪ c_pre``) passes nearly unchanged.

``H_{c_pre}`` needs the whole block of the *gradient*, before the element-wise momentum, so the
moments cannot be updated on the shards: rules ``spectra_preclip`` (base adamw) and
``spectra_preclip_momentum`` (bases sign and muon) *carry* the base optimizer's state (see
:mod:`dist_spectral.rules`). The raw gradient and the state travel to the owner, which clips,
updates the moments, forms the base update with the step it is given, post-clips, and sends the
direction and the new state back: per element 3 tensors out and 3 back (adamw: G, m, v), or 2
and 2 (B), against plain SPECTRA's 1 and 1. The state is plain SPECTRA's, key for key (sharded
like the parameter, so ``state_dict`` and DCP checkpoints reshard it); only where it is updated
changes. Two rules, not an option of ``spectra``, because a rule declares its carried keys once,
and Adam's two moments and the momentum buffer differ in number. A wire ``comm_dtype`` of bf16
rounds the moments every step (keep fp32 for these rules).

Not here: the paper's schedule of ``c`` (``c·lr`` held constant during warmup, optional decay at
the end: set ``clip_c`` per phase if needed).
"""
from __future__ import annotations

import math

from torch import Tensor

from .. import functional as F
from ..rules import (
    _POLAR_DEFAULTS, _POLAR_OPTIONS, LOCAL, Rule, _polar_flops, _polar_kwargs, adam_direction, register,
)

BASES = ("adamw", "sign", "muon")


def base_update(state: dict, grad: Tensor, group: dict, step: int) -> Tensor:
    """The base optimizer's update of ``grad`` at ``step`` (1 on the first), its state updated in
    place: Adam's ``m̂ / (√v̂ + ε)``, or ``G + βB`` (Nesterov; ``B`` without) after ``B ← βB + G``,
    its sign for ``sign`` (``muon``'s polar factor is taken by ``direction``). Element-wise."""
    if group["base"] == "adamw":
        return adam_direction(state, grad, group["betas"], group["eps"], step)
    buf = state["momentum_buffer"]
    buf.mul_(group["beta"]).add_(grad)
    x = grad.add(buf, alpha=group["beta"]) if group["nesterov"] else buf
    return x.sign() if group["base"] == "sign" else x


def _check_clip(rule: str, group: dict, c_key: str, steps_key: str, *, none_means: str = "") -> None:
    c = group[c_key]
    if not (none_means and c is None) and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0):
        raise ValueError(f"{rule}: {c_key}={c!r}; it must be a number > 0 (.inf turns the clip off)"
                         + (f" or None ({none_means})" if none_means else ""))
    steps = group[steps_key]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{rule}: {steps_key}={steps!r}; it must be an integer >= 1 (10 in the paper)")


class Spectra(Rule):
    """SPECTRA: ``U = max(1, fan_out/fan_in)^½ · H_c(base update)``, ``H_c(X) = (I + XXᵀ/c²)^{-½} X``.

    Hyperparameters:
        base (str): ``"adamw"``, ``"sign"`` or ``"muon"`` (default: ``"adamw"``).
        clip_c (float): clipping level c of the update's singular values, ``> 0``; ``.inf`` turns
            the clip off (default: 5.0, the paper's 160M runs).
        clip_steps (int): Newton–Schulz steps of the inverse square root (default: 10).
        betas, eps: AdamW's (base ``adamw``) (default: (0.9, 0.95), 1e-8).
        beta, nesterov: momentum of the ``sign`` and ``muon`` bases (default: 0.95, True).
        scale (str): ``"spectral"`` (``max(1, fan_out/fan_in)^½``, the paper's) or ``"rms"``
            (default: ``"spectral"``).
        per_head (bool): clip attention q/k/v/o per head (default: False: whole matrices).
        steps, coefficients, safety, polar_dtype: the polar factor of the ``muon`` base.
    """

    name = "spectra"
    locality = "matrix"
    defaults = {"base": "adamw", "clip_c": 5.0, "clip_steps": 10, "betas": (0.9, 0.95), "eps": 1e-8,
                "beta": 0.95, "nesterov": True, "scale": "spectral", "per_head": False, **_POLAR_DEFAULTS}
    direction_options = ("base", "clip_c", "clip_steps", "scale") + _POLAR_OPTIONS

    #: The bases this rule takes.
    bases: tuple[str, ...] = BASES

    def check(self, group: dict) -> None:
        if group["base"] not in self.bases:
            raise ValueError(f"{self.name}: base={group['base']!r}; use one of {', '.join(map(repr, self.bases))}"
                             + self._other_rule_hint(group["base"]))
        _check_clip(self.name, group, "clip_c", "clip_steps")
        if group["scale"] not in ("spectral", "rms"):
            raise ValueError(f"{self.name}: scale={group['scale']!r}; use 'spectral' or 'rms'")
        betas = group["betas"]
        if len(tuple(betas)) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{self.name}: betas={betas!r}; it must be two numbers in [0, 1)")
        if not group["eps"] >= 0:
            raise ValueError(f"{self.name}: eps={group['eps']!r}; it must be >= 0")
        if not 0 <= group["beta"] < 1:
            raise ValueError(f"{self.name}: beta={group['beta']!r}; it must be in [0, 1)")

    def _other_rule_hint(self, base) -> str:
        return ""

    def init_state(self, p: Tensor, group: dict) -> dict:
        if group["base"] == "adamw":
            return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}
        return super().init_state(p, group)

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int) -> Tensor:
        """The base update, element-wise on the shard: what the owner clips."""
        return base_update(local_state, grad, group, step)

    def direction(self, x, *, axis, transposed, group, stats=LOCAL, input_parts=1):
        m, n = x.shape[-2:]
        fan_out, fan_in = (n, m) if transposed else (m, n)
        if group["base"] == "muon":
            x = F.polar(x, **_polar_kwargs(group))
        scale = F.muon_scale(fan_out, fan_in, group["scale"])
        return F.soft_clip(x, float(group["clip_c"]), group["clip_steps"]) * scale

    def polar_flops(self, m, n, group):
        """Newton–Schulz flops: the base's polar iterations (muon) and the clip's Gram, inverse
        square root and product. An infinite ``c`` skips the clip."""
        polar = _polar_flops(m, n, group) if group["base"] == "muon" else 0
        clip = 0 if math.isinf(group["clip_c"]) else F.soft_clip_flops(m, n, group["clip_steps"])
        return polar + clip

    cost = polar_flops


register(Spectra())


class SpectraPreclip(Spectra):
    """SPECTRA with pre-clipping: ``G̃ = H_{c_pre}(G)`` per block, the base update ``V`` of ``G̃``
    from the carried state, ``U = max(1, fan_out/fan_in)^½ · H_c(V)`` (module docstring).

    Registered twice, by what it carries: ``spectra_preclip`` (base ``adamw``; ``exp_avg``,
    ``exp_avg_sq``) and ``spectra_preclip_momentum`` (bases ``sign``, the default, and ``muon``;
    ``momentum_buffer``). The base optimizer's step runs at the owner on whole blocks, in the same
    element-wise arithmetic as :class:`Spectra`'s on the shards, so ``pre_clip_c = .inf`` gives
    plain SPECTRA's step exactly.

    Hyperparameters: those of :class:`Spectra`, and

        pre_clip_c (float | None): clipping level c_pre of the gradient's singular values, ``> 0``;
            ``.inf`` turns the pre-clip off; ``None`` takes ``clip_c`` (default: None). The paper
            gives no separate default. The gradient is in the loss's units, not the update's:
            set it against the gradient's typical top singular value.
        pre_clip_steps (int): Newton–Schulz steps of the pre-clip (default: 10). A spike far above
            c_pre is clipped right within them, but the singular values well below c_pre lag: they
            come out too small, never too large, until about ``log(σ_max²/c_pre²)/log 2.25 + 4``
            steps (measured: 14 steps keep them within 1e-3 for a spike of 100·c_pre; a spike of
            1000·c_pre over a floor at 0.14·c_pre leaves the floor 17× too small at 10 steps,
            within 1% at 20 in fp32).
    """

    direction_options = Spectra.direction_options + ("pre_clip_c", "pre_clip_steps", "betas", "eps", "beta",
                                                     "nesterov")

    def __init__(self, name: str, bases: tuple[str, ...], carried: tuple[str, ...]):
        self.name, self.bases, self.carried = name, bases, carried
        self.defaults = {**Spectra.defaults, "base": bases[0], "pre_clip_c": None, "pre_clip_steps": 10}

    def check(self, group: dict) -> None:
        super().check(group)
        _check_clip(self.name, group, "pre_clip_c", "pre_clip_steps", none_means="the same as clip_c")

    def _other_rule_hint(self, base) -> str:
        other = next((r for r in PRECLIP_RULES if base in r.bases), None)
        if other is None or other is self:
            return ""
        return (f" (the {base!r} base keeps {', '.join(other.carried)}, not {', '.join(self.carried)}: "
                f"use rule {other.name!r})")

    def init_state(self, p: Tensor, group: dict) -> dict:
        return {k: p.new_zeros(p.shape) for k in self.carried}

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int) -> Tensor:
        """The raw gradient: its moments need it clipped, so it travels to the owner as it is."""
        return grad

    def direction_with_state(self, inputs, state, *, step, axis, transposed, group, input_parts=1):
        (g,) = inputs
        g = F.soft_clip(g, pre_clip_c(group), group["pre_clip_steps"])
        new = {k: v.clone() for k, v in state.items()}
        x = base_update(new, g, group, step)
        return self.direction(x, axis=axis, transposed=transposed, group=group), new

    def polar_flops(self, m, n, group):
        """Plain SPECTRA's and the pre-clip's (none when ``c_pre`` is infinite)."""
        c = pre_clip_c(group)
        pre = 0 if math.isinf(c) else F.soft_clip_flops(m, n, group["pre_clip_steps"])
        return super().polar_flops(m, n, group) + pre

    cost = polar_flops


def pre_clip_c(group: dict) -> float:
    """The pre-clip level: ``pre_clip_c``, or ``clip_c`` where it is None."""
    c = group["pre_clip_c"]
    return float(group["clip_c"] if c is None else c)


PRECLIP_RULES = (register(SpectraPreclip("spectra_preclip", ("adamw",), ("exp_avg", "exp_avg_sq"))),
                 register(SpectraPreclip("spectra_preclip_momentum", ("sign", "muon"), ("momentum_buffer",))))

__all__ = ["Spectra", "SpectraPreclip", "base_update", "pre_clip_c", "BASES"]
