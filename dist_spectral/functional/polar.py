"""Polar factor by Newton–Schulz-type iterations (Muon's quintic, Polar Express), and Muon's scale.

Every step is the odd quintic ``p(X) = a X + b (X Xᵀ) X + c (X Xᵀ)² X``, which maps each singular
value ``σ ↦ a σ + b σ³ + c σ⁵`` and keeps the singular vectors. On the wide orientation (rows ≤
columns) the step costs three GEMMs:

    A = X Xᵀ                 (s×s, s = min(m, n): the small Gram)
    B = b A + c A A          (one baddbmm: BLAS beta/alpha, no extra pass over memory)
    X = a X + B X            (one baddbmm)

so ``4 s² l + 2 s³`` flops per step (l = max(m, n)); :func:`polar_flops` counts exactly these.
``A`` and ``B`` are symmetric: on CUDA, :mod:`dist_spectral.kernels` computes them with a Triton
kernel that forms one triangle, where a one-time measurement on the running GPU says that is faster
than torch's full GEMM; elsewhere they are exactly the torch ops above. Working on the small Gram
is what keeps the count down for rectangular matrices.

``form="gram"`` runs the same steps on the s×s Gram alone (Gram Newton–Schulz): with
``R = X Xᵀ`` and ``P_k = a I + b R_k + c R_k²``, ``X_{k+1} = P_k X_k`` and ``R_{k+1} = P_k R_k P_k``,
so the ``s×l`` matrix is touched only to form ``R`` and to apply ``Q = P_{n-1}⋯P_0`` at the end.
Every second step it restarts (``X ← Q X``, ``R ← X Xᵀ``), which keeps fp32 as accurate as the
standard form on ill-conditioned inputs. Exactly the same map in exact arithmetic (float64 agrees
to 1e-13); fewer flops once ``l`` is about twice ``s`` (−8 % at l = 2s, −22 % at l = 4s, see
:func:`polar_flops`), and where it would not save, polar runs the standard form.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..kernels import gram, resolve, symmetric_polynomial

Triple = tuple[float, float, float]

# Amsel, Persson, Musco, Gower, "The Polar Express" (arXiv 2505.16932): one triple per step, each
# the minimax-optimal quintic for the singular-value interval left by the previous steps.
POLAR_EXPRESS_COEFFICIENTS: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

# Keller Jordan's Muon quintic: maximal slope at 0; singular values settle in about [0.68, 1.13]
# and never converge to 1 (the map has no attracting fixed point at 1).
MUON_COEFFICIENTS: Triple = (3.4445, -4.7750, 2.0315)


def _schedule(coefficients, steps: int, safety: float) -> tuple[list[Triple], float]:
    """The ``steps`` triples to run and the input scale s (input: ``X / (s ‖X‖_F + 1e-7)``)."""
    if steps < 0:
        raise ValueError(f"polar: steps must be >= 0, got {steps}")
    if isinstance(coefficients, str):
        if coefficients == "polar_express":
            if not safety >= 1.0:
                raise ValueError(f"polar: safety must be >= 1 (1.01 by default), got {safety}")
            # Safety: σ_max may be slightly above 1 after the (s ‖X‖_F) normalisation in low
            # precision; dividing p(σ) as p(σ/s) keeps every step's image inside the interval the
            # next step was designed for. The last triple is the exact fixed-point map: left alone.
            table = [(a / safety, b / safety**3, c / safety**5)
                     for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:-1]]
            table.append(POLAR_EXPRESS_COEFFICIENTS[-1])
            scale = float(safety)
        elif coefficients == "muon":
            table, scale = [MUON_COEFFICIENTS], 1.0
        else:
            raise ValueError(
                f"polar: unknown coefficient set {coefficients!r}; use 'polar_express', 'muon' or "
                "a sequence of (a, b, c) triples")
    else:
        try:
            table = [tuple(float(v) for v in t) for t in coefficients]
        except TypeError:  # e.g. one bare (a, b, c) instead of a sequence of triples
            table = []
        if not table or any(len(t) != 3 for t in table):
            raise ValueError(
                f"polar: custom coefficients must be a non-empty sequence of (a, b, c) triples, "
                f"got {coefficients!r}")
        scale = 1.0
    return [table[min(i, len(table) - 1)] for i in range(steps)], scale


def polar(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: str | Sequence[Sequence[float]] = "polar_express",
    safety: float = 1.01,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    form: str = "standard",
) -> torch.Tensor:
    r"""Approximate polar factor ``U Vᵀ`` of ``X = U Σ Vᵀ``, batched over leading dims.

    .. math::
        X_0 = X / (s\,\lVert X\rVert_F + 10^{-7}),\qquad
        A_k = X_k X_k^\top,\qquad
        X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2)\, X_k

    run on the orientation where ``X Xᵀ`` is the smaller Gram (tall inputs are transposed and the
    result transposed back), so ``polar(Xᵀ) = polar(X)ᵀ``. Each step maps the singular values by
    ``σ ↦ a σ + b σ³ + c σ⁵`` and keeps the singular vectors; the iteration is exactly equivariant:
    ``polar(Q₁ X Q₂ᵀ) = Q₁ polar(X) Q₂ᵀ`` for orthogonal Q₁, Q₂. The result depends on the values
    of ``x`` only, not on its strides: it runs on a contiguous copy (on a strided view the norm and
    the GEMMs round differently, which the steps amplify to ~1e-6 in fp32).

    Accuracy (fp32, safety 1.01; singular values of the output against float64 SVD):
    Polar Express on 64×256 Gaussians gives [0.870, 1.124] after 5 steps and 1 ± 2.5e-7 after 8
    (and ``‖polar(X) − UVᵀ‖_max`` < 1e-6); on a 64×128 input with condition number 1e3,
    [0.417, 1.123] after 5 and [0.9995, 1 + 3e-7] after 8. Muon's quintic stays in about
    [0.682, 1.134] at any step count.

    Args:
        x (Tensor): input ``[..., m, n]``; m = 1 or n = 1 and all-zero matrices are fine (a zero
            matrix maps to zero).
        steps (int): number of quintic steps (default: 5).
        coefficients (str or sequence of (a, b, c)): ``"polar_express"`` (the 8 triples of
            :data:`POLAR_EXPRESS_COEFFICIENTS`, the last one repeated for later steps),
            ``"muon"`` (3.4445, −4.7750, 2.0315 every step, input scale 1), or a custom sequence of
            triples, used as given with input scale 1, the last one repeated
            (default: ``"polar_express"``).
        safety (float): Polar Express only: every triple but the last becomes
            ``(a/s, b/s³, c/s⁵)`` and the input is divided by ``s·‖X‖_F`` (default: 1.01).
        dtype (torch.dtype, optional): iteration dtype; by default bf16 on CUDA (fp32
            accumulation inside the GEMMs) and fp32 elsewhere, since CPUs have no fast bf16 GEMM
            (default: None).
        backend (str): how ``A`` and ``B`` are formed: ``"auto"`` (the one-triangle Triton kernel
            on CUDA where measured faster, torch otherwise), ``"torch"`` or ``"triton"``; see
            :func:`dist_spectral.kernels.syrk` (default: ``"auto"``).
        form (str): ``"standard"`` (three GEMMs per step on ``X``) or ``"gram"`` (Gram
            Newton–Schulz on ``X Xᵀ``, restarted every second step, where it needs fewer flops;
            see the module docstring). In fp32 it is as accurate as the standard form; in bf16
            its error is about twice the standard form's (max error 4–5e-2 vs 2–3e-2 on 64×256
            and 128×512 Gaussians; singular values [0.86, 1.13] vs [0.87, 1.12])
            (default: ``"standard"``).

    Returns:
        Tensor: same shape and dtype as ``x``, contiguous.
    """
    if x.ndim < 2:
        raise ValueError(f"polar needs a matrix or a batch [..., m, n]; got shape {tuple(x.shape)}")
    check_form(form)
    schedule, scale = _schedule(coefficients, steps, safety)
    work = dtype if dtype is not None else (torch.bfloat16 if x.is_cuda else torch.float32)
    norm_dtype = torch.float64 if torch.float64 in (work, x.dtype) else torch.float32

    m, n = x.shape[-2], x.shape[-1]
    tall = m > n
    X = x.mT if tall else x
    # Contiguous whatever the input's strides: the norm's sum and the GEMMs of a step round
    # differently on a strided view (another summation order, a transposed BLAS kernel), and the
    # quintic steps amplify one fp32 ulp to ~1e-6, so the same values in another layout (a tall
    # block, the transpose of a wide one) would get another polar factor. One copy of the input.
    copied = not X.is_contiguous()
    X = X.reshape(math.prod(X.shape[:-2]), *X.shape[-2:]).contiguous()  # [batch, s, l], s <= l
    denom = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=norm_dtype).mul_(scale).add_(1e-7)
    if copied and X.dtype == norm_dtype == work:
        X = X.div_(denom)  # our own copy: divide in place (the same operation, one tensor fewer)
    else:
        X = (X.to(norm_dtype) / denom).to(work)
    backend = resolve(backend, X.device)  # once per call: the iterations only pass it on

    iterate = _iterate_gram if form == "gram" and _gram_saves(*X.shape[-2:], len(schedule)) else _iterate
    chunk = _cpu_chunk(*X.shape[-2:], X.element_size()) if X.device.type == "cpu" else X.shape[0]
    if chunk >= X.shape[0]:
        X = iterate(X, schedule, backend)
    else:  # each matrix is independent: bit for bit the same as one batch, and it stays in cache
        for i in range(0, X.shape[0], chunk):  # X is this call's own copy: results go back into it
            X[i:i + chunk] = iterate(X[i:i + chunk], schedule, backend)

    X = X.mT if tall else X
    return X.reshape(x.shape).to(x.dtype).contiguous()


#: Working set (bytes) of the matrices a CPU iterates on at once: X, A, B and the new X of each
#: stay in a core's caches through the 3 GEMMs of a step, instead of streaming a whole batch
#: (96 experts of 256² are 25 MB per tensor) through memory three times per step. Measured on
#: a 2-core EPYC: 256² × 96 in chunks of 4 runs 1.25× faster than one batch, 512×256 × 32 in
#: chunks of 2 1.1× faster, bit for bit the same result.
CPU_CHUNK_BYTES = 4 << 20


def _cpu_chunk(s: int, l: int, element_size: int) -> int:
    """How many ``s×l`` matrices (s ≤ l) to iterate on at once on a CPU."""
    per_matrix = (2 * s * l + 2 * s * s) * element_size  # X, new X, A, B
    return max(1, CPU_CHUNK_BYTES // per_matrix)


def _iterate(X: torch.Tensor, schedule, backend: str) -> torch.Tensor:
    """The quintic steps on a batch ``[B, s, l]`` (s ≤ l), already normalised."""
    for a, b, c in schedule:
        A = gram(X, backend)                            # X Xᵀ
        B = symmetric_polynomial(A, b, c, backend)      # b A + c A²
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return X


#: Gram Newton–Schulz restarts (``X ← Q X``, ``R ← X Xᵀ``) before every step k with k % 2 == 0,
#: k > 0. Measured in fp32 against float64 (max error relative to the largest entry): on a
#: 64×128 input of condition number 1e3, no restart 6.2e-4, one at step 2 1.6e-5, every second
#: step 5.5e-6, the standard form 6.7e-6.
GRAM_RESTART_EVERY = 2


def _gram_restarts(steps: int) -> set[int]:
    return {k for k in range(GRAM_RESTART_EVERY, steps, GRAM_RESTART_EVERY)}


def _iterate_gram(X: torch.Tensor, schedule, backend: str) -> torch.Tensor:
    """The same steps as :func:`_iterate` on the Gram ``R = X Xᵀ`` (see the module docstring)."""
    n, restarts = len(schedule), _gram_restarts(len(schedule))
    R, Q = gram(X, backend), None
    for k, (a, b, c) in enumerate(schedule):
        if k in restarts:
            X = torch.bmm(Q, X)
            R, Q = gram(X, backend), None
        P = symmetric_polynomial(R, b, c, backend)      # b R + c R²
        P.diagonal(dim1=-2, dim2=-1).add_(a)            # + a I
        Q = P if Q is None else torch.bmm(P, Q)
        if k + 1 < n and k + 1 not in restarts:
            R = torch.bmm(torch.bmm(P, R), P)           # X_{k+1} X_{k+1}ᵀ = P R P
    return X if Q is None else torch.bmm(Q, X)


def _standard_flops(s: int, l: int, steps: int) -> int:
    return steps * (4 * s * s * l + 2 * s**3)


def _gram_flops(s: int, l: int, steps: int) -> int:
    """Flops of :func:`_iterate_gram`, counted op by op as it runs them."""
    restarts = _gram_restarts(steps)
    rect = 2 * s * s * l                                 # an s×l GEMM against s×s or itself
    total = rect if steps else 0                         # R = X Xᵀ
    fresh = True                                         # Q is None
    for k in range(steps):
        if k in restarts:
            total += 2 * rect                            # X ← Q X, R ← X Xᵀ
            fresh = True
        total += 2 * s**3                                # R²
        total += 0 if fresh else 2 * s**3                # Q ← P Q
        fresh = False
        if k + 1 < steps and k + 1 not in restarts:
            total += 4 * s**3                            # P R P
    return total + (rect if steps else 0)                # Q X


def _gram_saves(s: int, l: int, steps: int) -> bool:
    return _gram_flops(s, l, steps) < _standard_flops(s, l, steps)


def check_form(form: str) -> None:
    """``ValueError`` unless ``form`` is one :func:`polar` knows."""
    if form not in ("standard", "gram"):
        raise ValueError(f"polar: form must be 'standard' or 'gram', got {form!r}")


def polar_flops(m: int, n: int, steps: int, form: str = "standard") -> int:
    r"""Flops of :func:`polar` on one ``m×n`` matrix.

    With ``s = min(m, n)`` and ``l = max(m, n)``, the standard form costs ``steps · (4 s² l + 2 s³)``:
    ``X Xᵀ`` and ``B X`` are ``2 s² l`` each, ``A A`` is ``2 s³`` (multiply-adds counted as 2). The
    Gram form costs ``2 s² l`` per pass over ``X`` (forming ``R``, each restart's ``Q X`` and
    ``X Xᵀ``, the final ``Q X``) plus ``2 s³`` per s×s product; 5 steps: ``12 s² l + 22 s³``
    against ``20 s² l + 10 s³``, used only where smaller. Normalisation and the scalar parts are
    not counted.

    Args:
        m (int): rows.
        n (int): columns.
        steps (int): quintic steps.
        form (str): ``"standard"`` or ``"gram"`` (default: ``"standard"``).

    Returns:
        int: flop count for one matrix (multiply by the batch size for a batch).
    """
    check_form(form)
    s, l = min(m, n), max(m, n)
    standard = _standard_flops(s, l, steps)
    return min(standard, _gram_flops(s, l, steps)) if form == "gram" else standard


def muon_scale(m: int, n: int, kind: str = "spectral", input_parts: int = 1) -> float:
    r"""Muon's output scale for an ``m×n`` update (m = rows = output dim, n = columns).

    .. math::
        \text{spectral: } \Big(\frac{\max(m, n)}{p\,n}\Big)^{1/2} \qquad
        \text{rms (Moonlight): } 0.2\,\sqrt{\max(m, n)} \qquad \text{none: } 1

    ``"spectral"`` keeps ``‖U‖_{RMS→RMS}`` at ``√(m/n)`` for tall matrices; with ``p = 1`` it is
    ``max(1, m/n)^½``. ``"rms"`` gives the update an RMS of about 0.2, matching AdamW's, so AdamW
    learning rates carry over.

    ``p`` (``input_parts``) is for a block that is one of ``p`` equal blocks splitting a matrix's
    input side, the heads of a per-head attention output ``o`` (``d × H·hd`` as ``H`` blocks
    ``d × hd``). The heads' outputs add into the same ``d`` features, so each block takes the whole
    matrix's input width ``p·n``: ``polar`` of an ``m×n`` block has RMS ``1/√max(m, n)``, and
    ``(max(m, n)/(p·n))^½`` of it is ``1/√(p·n)``, the RMS of Muon on the whole ``m × p·n`` matrix
    (``max(1, m/(p·n))^½ / √max(m, p·n)``). Splitting into heads then changes the update's
    direction, not its size. The block's own ``√(m/n)`` would give the stacked heads ``√p`` times
    the whole matrix's RMS, a factor that grows with width at a fixed head size. ``"rms"`` already
    has the whole matrix's RMS per block; ``"none"`` is the paper's unscaled rule; neither uses ``p``.

    Args:
        m (int): rows (output features).
        n (int): columns (input features).
        kind (str): ``"spectral"``, ``"rms"`` or ``"none"`` (default: ``"spectral"``).
        input_parts (int): equal blocks splitting the matrix's input side, this one included
            (default: 1, a whole matrix).

    Returns:
        float: the factor that multiplies ``polar(M)``.
    """
    if isinstance(input_parts, bool) or not isinstance(input_parts, int) or input_parts < 1:
        raise ValueError(f"muon_scale: input_parts={input_parts!r}; it counts the blocks splitting the matrix's "
                         "input side, an integer >= 1 (1 for a whole matrix)")
    if kind == "spectral":
        return math.sqrt(max(m, n) / (input_parts * n))
    if kind == "rms":
        return 0.2 * math.sqrt(max(m, n))
    if kind == "none":
        return 1.0
    raise ValueError(f"muon_scale: unknown kind {kind!r}; use 'spectral', 'rms' or 'none'")
