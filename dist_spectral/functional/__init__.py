"""Pure update-rule math: polar factor, row/column rules, centering, spectral rules.

Every function takes whole (batched) matrices ``[..., m, n]`` and is a plain tensor function:
nothing here knows about processes, shards or ``torch.distributed``. The formulas are in
``docs/update-rules.md``; each docstring repeats its own.

=========================  ==========================================================
rule                       function
=========================  ==========================================================
Muon                       ``polar(M) * muon_scale(m, n)``
RowNormM                   ``row_norm``; column-aware: ``col_norm``
centred RowNormM           ``centered_row_norm`` = ``C(R(C(M)))``
right-spectral             ``right_spectral`` = ``ν^α M (MᵀM + εI)^{-½}``
left-spectral (router)     ``left_spectral`` = ``C(tr(G L)^α L C(M))``
hybrid                     ``hybrid`` = ``ν(R(M))^α polar(R(M))``
SPECTRA soft clip          ``soft_clip`` = ``(I + X Xᵀ/c²)^{-½} X``
AuON brake                 ``cosh_brake`` = ``N / √mean cosh²(γN)``, ``N = X/‖X‖_F``
width-aware scale          ``width_scale`` = ``0.2·√L`` (``scale: rms``) or 1 (``none``)
=========================  ==========================================================
"""
from .clip import cosh_brake, gram_bound, soft_clip, soft_clip_flops
from .polar import MUON_COEFFICIENTS, POLAR_EXPRESS_COEFFICIENTS, check_form, muon_scale, polar, polar_flops
from .rows import WIDTH_SCALES, center_rows, centered_row_norm, col_norm, row_norm, width_scale
from .spectral import (
    default_inv_sqrt_steps,
    hybrid,
    inv_sqrt,
    left_spectral,
    nuclear_norm_scale,
    right_spectral,
)

__all__ = [
    "MUON_COEFFICIENTS",
    "POLAR_EXPRESS_COEFFICIENTS",
    "center_rows",
    "centered_row_norm",
    "check_form",
    "col_norm",
    "cosh_brake",
    "default_inv_sqrt_steps",
    "gram_bound",
    "hybrid",
    "inv_sqrt",
    "left_spectral",
    "muon_scale",
    "nuclear_norm_scale",
    "polar",
    "polar_flops",
    "right_spectral",
    "row_norm",
    "soft_clip",
    "soft_clip_flops",
    "WIDTH_SCALES",
    "width_scale",
]
