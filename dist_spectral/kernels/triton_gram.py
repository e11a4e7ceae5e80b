"""Symmetric products of the polar iteration, computing one triangle: ``α X Xᵀ + β C``.

Each quintic step of :func:`dist_spectral.functional.polar` forms two symmetric matrices::

    A = X Xᵀ                   syrk(X)
    B = b A + c A A            syrk(A, alpha=c, beta=b, c=A)     (A A = A Aᵀ since A is symmetric)

A general GEMM computes every tile of these; the kernel here computes only the tiles on and below
the diagonal and writes each off-diagonal tile twice (as itself and transposed), so it does about
half the multiply-adds for an ``s × s`` result (``(T+1)/2T`` of them with ``T`` tiles per side).
Published measurements put such kernels at up to 1.5× a cuBLAS GEMM on square matrices, less on
small or very rectangular ones, which is why :func:`syrk` uses the kernel only where a one-time
micro-benchmark on the running GPU says it is faster (per shape, dtype and device), and torch
everywhere else.

Dispatch (:func:`syrk`):

- no Triton, or a CPU tensor: ``torch.baddbmm`` / ``torch.bmm`` (unless ``backend="triton"``,
  which runs the kernel anyway: on CPU tensors with ``TRITON_INTERPRET=1`` set before the first
  call, which is how the tests check it);
- a choice table installed by :mod:`dist_spectral.kernels.choice` (the optimizer installs one,
  decided on rank 0 and the same on every rank): its entry for the product and ``(s, l, dtype)``,
  and torch for a shape it lacks;
- otherwise, on CUDA: the first call for a given (batch, s, l, dtype, device) times torch and two
  kernel tile configurations (median of 5 after a warm-up) and remembers the fastest, on this
  process alone;
- ``DIST_SPECTRAL_TRITON=0`` / ``=1`` forces torch / the kernel.

The two variables (``DIST_SPECTRAL_TRITON``, ``TRITON_INTERPRET``) are read once, on first use, and
again whenever an optimizer is built (:func:`reload_environment`), not on every product: a polar
call resolves its backend once (:func:`resolve`) and its iterations only look that up. Set them
before building the optimizer, or call :func:`reload_environment` after changing them.

The kernel accumulates in fp32 and rounds once to the output dtype (bf16 on GPU). ``C`` must be
symmetric: the mirrored tiles are the transposes of the computed ones.
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import torch
from torch import Tensor

from . import choice as _choice

_CONFIGS = (  # (BLOCK_M, BLOCK_K, num_warps, num_stages)
    (64, 64, 4, 3),
    (128, 64, 8, 3),
)
_CHOICE: dict[tuple, object] = {}  # (B, s, l, dtype, device) -> "torch" or a config


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports (the kernels run on CUDA, or on CPU under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401  (fails on some installs without a driver)
    except Exception:  # ImportError, or a broken install without a driver
        return False
    return True


@functools.lru_cache(maxsize=1)
def environment() -> tuple[str, bool]:
    """``(backend forced by DIST_SPECTRAL_TRITON: "auto", "torch" or "triton", TRITON_INTERPRET set)``,
    read on first use and kept until :func:`reload_environment`."""
    forced = {"0": "torch", "1": "triton"}.get(os.environ.get("DIST_SPECTRAL_TRITON", ""), "auto")
    return forced, os.environ.get("TRITON_INTERPRET", "0") == "1"


def reload_environment() -> None:
    """Read ``DIST_SPECTRAL_TRITON`` and ``TRITON_INTERPRET`` again (the optimizer does at build)."""
    environment.cache_clear()


def resolve(backend: str, device: torch.device) -> str:
    """The backend every product of one polar call on ``device`` can be given: ``"torch"`` where
    the auto choice could only be torch (a CPU without the interpreter, no Triton), the forced one
    under ``DIST_SPECTRAL_TRITON``, else ``backend`` as given (then :func:`syrk` looks the shape up)."""
    if backend != "auto":
        return backend
    forced, interpret = environment()
    if forced != "auto":
        return forced
    return "auto" if (device.type == "cuda" or interpret) and triton_available() else "torch"


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel, defined on first use: Triton decides at definition time whether a kernel
    is compiled or interpreted (``TRITON_INTERPRET``), so it must not be defined at import."""
    import triton
    import triton.language as tl

    @triton.jit
    def syrk_kernel(X, C, OUT, s, l, tiles,
                    sxb, sxm, sxk, scb, scm, scn, sob, som, son,
                    alpha, beta,
                    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)  # one flat grid: CUDA caps the y and z grid dimensions at 65535
        b = pid // (tiles * tiles)
        i = (pid // tiles) % tiles
        j = pid % tiles
        if j > i:  # upper tiles: written by their mirror
            return
        rm = i * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = j * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        x = X + b.to(tl.int64) * sxb
        acc = tl.full((BLOCK_M, BLOCK_M), 0.0, tl.float32)  # a builtin: tl.zeros is a jit function, which
        # the interpreter cannot call when triton was imported before TRITON_INTERPRET was set
        for k0 in range(0, l, BLOCK_K):
            k = k0 + rk
            a = tl.load(x + rm[:, None] * sxm + k[None, :] * sxk, mask=(rm[:, None] < s) & (k[None, :] < l), other=0.0)
            bt = tl.load(x + rn[:, None] * sxm + k[None, :] * sxk, mask=(rn[:, None] < s) & (k[None, :] < l), other=0.0)
            acc += tl.dot(a, tl.trans(bt))
        acc = acc * alpha
        mask = (rm[:, None] < s) & (rn[None, :] < s)
        if HAS_C:
            c = tl.load(C + b.to(tl.int64) * scb + rm[:, None] * scm + rn[None, :] * scn, mask=mask, other=0.0)
            acc += beta * c.to(tl.float32)
        out = OUT + b.to(tl.int64) * sob
        value = acc.to(OUT.dtype.element_ty)
        tl.store(out + rm[:, None] * som + rn[None, :] * son, value, mask=mask)
        if i != j:
            mirror = (rn[:, None] < s) & (rm[None, :] < s)
            tl.store(out + rn[:, None] * som + rm[None, :] * son, tl.trans(value), mask=mirror)

    return syrk_kernel


def syrk_triton(x: Tensor, alpha: float = 1.0, beta: float = 0.0, c: Tensor | None = None,
                config: tuple = _CONFIGS[0]) -> Tensor:
    """``alpha · x xᵀ + beta · c`` with the one-triangle kernel (no dispatch; see :func:`syrk`)."""
    B, s, l = x.shape
    block_m, block_k, warps, stages = config
    out = torch.empty(B, s, s, dtype=x.dtype, device=x.device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (x.is_cuda or interpret):
        raise RuntimeError("syrk_triton: the kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before the first "
                           "call to run on CPU tensors (slowly, for testing)")
    kernel = _kernel(interpret)
    tiles = -(-s // block_m)
    cc = c if c is not None else out  # unused when HAS_C is false
    kwargs = {} if interpret else {"num_warps": warps, "num_stages": stages}
    kernel[(B * tiles * tiles,)](x, cc, out, s, l, tiles, *x.stride(), *cc.stride(), *out.stride(), float(alpha),
                                 float(beta), HAS_C=c is not None, BLOCK_M=block_m, BLOCK_K=block_k, **kwargs)
    return out


def syrk_torch(x: Tensor, alpha: float = 1.0, beta: float = 0.0, c: Tensor | None = None) -> Tensor:
    """The same with torch (full GEMM): the fallback and the reference."""
    if c is None:
        out = torch.bmm(x, x.mT)
        return out if alpha == 1.0 else out.mul_(alpha)
    return torch.baddbmm(c, x, x.mT, beta=beta, alpha=alpha)


def _timed(fn, device) -> float:
    fn()  # warm-up (compiles the kernel on first use)
    times = []
    for _ in range(5):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_candidate(name: str, fn, device) -> float:
    """Seconds of one candidate (``"torch"`` or ``"triton:i"``); a seam the tests replace to give
    ranks different local timings."""
    return _timed(fn, device)


def _fastest(x: Tensor, alpha: float, beta: float, c: Tensor | None, fallback) -> str:
    """``"torch"`` or ``"triton:i"`` (``_CONFIGS[i]``): the fastest on this device, measured now."""
    candidates = {"torch": lambda: fallback(x, alpha, beta, c)}
    for i, cfg in enumerate(_CONFIGS):
        candidates[f"triton:{i}"] = functools.partial(syrk_triton, x, alpha, beta, c, cfg)
    times = {}
    for name, fn in candidates.items():
        try:
            times[name] = _time_candidate(name, fn, x.device)
        except Exception:  # a configuration that does not compile on this GPU: skip it
            continue
    return min(times, key=times.get)


def decode(choice: str):
    """``"torch"``, or the kernel configuration that ``"triton:i"`` names."""
    if choice == "torch":
        return "torch"
    kind, _, index = choice.partition(":")
    if kind != "triton" or not index.isdigit() or int(index) >= len(_CONFIGS):
        raise ValueError(f"kernel choice {choice!r}: use 'torch' or 'triton:i' with i < {len(_CONFIGS)}")
    return _CONFIGS[int(index)]


def _backend(x: Tensor, alpha: float, beta: float, c: Tensor | None, backend: str, fallback, op: str):
    """``"torch"`` or the kernel configuration to use."""
    if backend == "torch":  # what polar passes on a CPU (resolve): no further look-up
        return "torch"
    forced, interpret = environment()
    if backend == "auto":
        backend = forced
    if backend == "torch":
        return "torch"
    if backend == "triton":
        return _CONFIGS[0]
    if backend != "auto":
        raise ValueError(f"syrk: backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if (x.is_cuda or interpret) and triton_available():
        agreed = _choice.lookup(op, x.shape[1], x.shape[2], x.dtype)
        if agreed is not None:  # decided once for every rank (see dist_spectral.kernels.choice)
            return decode(agreed)
    if not (x.is_cuda and triton_available()) or _choice.strict():
        return "torch"  # strict: an optimizer installed a table; a shape outside it never times locally
    key = (*x.shape, x.dtype, x.device, c is not None, fallback)
    if key not in _CHOICE:
        _CHOICE[key] = decode(_fastest(x, alpha, beta, c, fallback))
    return _CHOICE[key]


def syrk(x: Tensor, alpha: float = 1.0, beta: float = 0.0, c: Tensor | None = None, backend: str = "auto") -> Tensor:
    r"""``alpha · x xᵀ + beta · c`` for a batch ``x`` of shape ``[B, s, l]`` (``c``: symmetric ``[B, s, s]``).

    .. math::
        \mathrm{out}_b = \alpha\, X_b X_b^\top + \beta\, C_b

    Args:
        x (Tensor): ``[B, s, l]``.
        alpha (float): scale of the product (default: 1.0).
        beta (float): scale of ``c`` (default: 0.0).
        c (Tensor, optional): symmetric ``[B, s, s]`` added after scaling (default: None).
        backend (str): ``"auto"`` (kernel on CUDA where measured faster), ``"torch"`` or
            ``"triton"`` (default: ``"auto"``; ``DIST_SPECTRAL_TRITON=0/1`` overrides ``"auto"``).

    Returns:
        Tensor: ``[B, s, s]`` in ``x``'s dtype.
    """
    return _syrk(x, alpha, beta, c, backend, syrk_torch, "syrk" if c is not None else "gram")


def _syrk(x, alpha, beta, c, backend, fallback, op) -> Tensor:
    if x.ndim != 3 or (c is not None and tuple(c.shape) != (x.shape[0], x.shape[1], x.shape[1])):
        raise ValueError(f"syrk: x must be [B, s, l] and c [B, s, s]; got {tuple(x.shape)} and "
                         f"{None if c is None else tuple(c.shape)}")
    choice = _backend(x, alpha, beta, c, backend, fallback, op)
    return fallback(x, alpha, beta, c) if choice == "torch" else syrk_triton(x, alpha, beta, c, choice)


def _square_torch(a: Tensor, alpha: float, beta: float, c: Tensor) -> Tensor:
    return torch.baddbmm(c, a, a, beta=beta, alpha=alpha)  # exactly polar's current op (a a, not a aᵀ)


def gram(x: Tensor, backend: str = "auto") -> Tensor:
    """``x xᵀ`` for a batch ``[B, s, l]``: the ``A`` of a quintic step (torch: ``bmm(x, x.mT)``)."""
    return _syrk(x, 1.0, 0.0, None, backend, syrk_torch, "gram")


def symmetric_polynomial(a: Tensor, b: float, c: float, backend: str = "auto") -> Tensor:
    """``b · a + c · a a`` for a batch of symmetric ``a``: the ``B`` of a quintic step (``a a = a aᵀ``;
    torch: ``baddbmm(a, a, a, beta=b, alpha=c)``, bit for bit what polar runs today)."""
    return _syrk(a, c, b, a, backend, _square_torch, "square")


__all__ = ["environment", "gram", "reload_environment", "resolve", "symmetric_polynomial", "syrk", "syrk_torch", "syrk_triton", "triton_available"]
