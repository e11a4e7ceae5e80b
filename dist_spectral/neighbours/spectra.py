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

Not here: the paper's schedule of ``c`` (``c·lr`` held constant during warmup, optional decay at
the end: set ``clip_c`` per phase if needed) and its optional pre-clipping of raw gradients,
which needs the whole gradient before the (element-wise) momentum.
"""
from __future__ import annotations

import math

from torch import Tensor

from .. import functional as F
from ..rules import _POLAR_DEFAULTS, LOCAL, Rule, _polar_kwargs, adam_direction, register

BASES = ("adamw", "sign", "muon")


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
    direction_options = ("base", "clip_c", "clip_steps", "scale", "steps", "coefficients", "safety", "polar_dtype")

    def check(self, group: dict) -> None:
        if group["base"] not in BASES:
            raise ValueError(f"spectra: base={group['base']!r}; use one of {', '.join(map(repr, BASES))}")
        c = group["clip_c"]
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ValueError(f"spectra: clip_c={c!r}; it must be a number > 0 (.inf turns the clip off)")
        steps = group["clip_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"spectra: clip_steps={steps!r}; it must be an integer >= 1 (10 in the paper)")
        if group["scale"] not in ("spectral", "rms"):
            raise ValueError(f"spectra: scale={group['scale']!r}; use 'spectral' or 'rms'")
        betas = group["betas"]
        if len(tuple(betas)) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"spectra: betas={betas!r}; it must be two numbers in [0, 1)")
        if not group["eps"] >= 0:
            raise ValueError(f"spectra: eps={group['eps']!r}; it must be >= 0")
        if not 0 <= group["beta"] < 1:
            raise ValueError(f"spectra: beta={group['beta']!r}; it must be in [0, 1)")

    def init_state(self, p: Tensor, group: dict) -> dict:
        if group["base"] == "adamw":
            return {"exp_avg": p.new_zeros(p.shape), "exp_avg_sq": p.new_zeros(p.shape)}
        return super().init_state(p, group)

    def direction_input(self, local_state: dict, grad: Tensor, group: dict, *, step: int) -> Tensor:
        """The base update, element-wise on the shard: what the owner clips."""
        if group["base"] == "adamw":
            return adam_direction(local_state, grad, group["betas"], group["eps"], step)
        buf = local_state["momentum_buffer"]
        buf.mul_(group["beta"]).add_(grad)
        x = grad.add(buf, alpha=group["beta"]) if group["nesterov"] else buf
        return x.sign() if group["base"] == "sign" else x

    def direction(self, x, *, axis, transposed, group, stats=LOCAL):
        m, n = x.shape[-2:]
        fan_out, fan_in = (n, m) if transposed else (m, n)
        if group["base"] == "muon":
            x = F.polar(x, **_polar_kwargs(group))
        scale = F.muon_scale(fan_out, fan_in, group["scale"])
        return F.soft_clip(x, float(group["clip_c"]), group["clip_steps"]) * scale

    def polar_flops(self, m, n, group):
        """Newton–Schulz flops: the base's polar iterations (muon) and the clip's Gram, inverse
        square root and product. An infinite ``c`` skips the clip."""
        polar = F.polar_flops(m, n, group["steps"]) if group["base"] == "muon" else 0
        clip = 0 if math.isinf(group["clip_c"]) else F.soft_clip_flops(m, n, group["clip_steps"])
        return polar + clip

    cost = polar_flops


register(Spectra())
