"""One kernel choice per polar shape, the same on every rank.

Left to itself, :func:`~dist_spectral.kernels.syrk` picks torch or the one-triangle kernel for each
shape by timing both on the running GPU. Timings differ between ranks (and runs), so two ranks
could orthogonalise the same shape with different kernels, whose bf16 results differ in the last
bits, and the update would depend on which rank owns a matrix. The optimizer therefore decides
once, after building its plan::

    keys   = polar_keys(plan, groups, device)     every (product, s, l, dtype) its polar will run
    table  = agree(keys, device, collectives)     rank 0 times them; every rank gets rank 0's table
    install(table)                                syrk reads it; shapes outside it run torch

A key is ``(op, s, l, dtype)``: ``op`` is ``"gram"`` (``X Xᵀ`` of an ``s×l`` batch),
``"square"`` (``b A + c A²`` of an ``s×s`` batch) or ``"syrk"`` (:func:`syrk` with ``c``), and
the batch size is left out, so an owner with 3 experts and one with 5 run the same kernel. A
choice is ``"torch"`` or ``"triton:i"`` (tile configuration ``i``). This module imports no
``torch.distributed``: ``agree`` takes anything with ``rank`` and ``all_gather_object``.
"""
from __future__ import annotations

from collections import defaultdict

import torch

Key = tuple[str, int, int, str]

_TABLE: dict[Key, str] = {}
_STRICT = [False]  # whether a table was installed: then shapes outside it run torch

#: Largest batch (bytes of the ``s×l`` input) timed for one key: enough to fill the GPU, small
#: beside the memory a model and its optimizer hold.
MEASURE_BYTES = 256 << 20


def key(op: str, s: int, l: int, dtype: torch.dtype) -> Key:
    """The table key of one symmetric product (see the module docstring)."""
    return (op, int(s), int(l), str(dtype).removeprefix("torch."))


def lookup(op: str, s: int, l: int, dtype: torch.dtype) -> str | None:
    """The installed choice for this product and shape, or None."""
    return _TABLE.get(key(op, s, l, dtype))


def strict() -> bool:
    """Whether a table is installed (then a shape outside it runs torch, never a local timing)."""
    return _STRICT[0]


def install(table: dict) -> None:
    """Add ``table`` (key → ``"torch"`` / ``"triton:i"``) to the choices :func:`syrk` reads; from
    now on shapes outside the table run torch.

    Args:
        table (dict): choices, as :func:`agree` returns them.
    """
    from .triton_gram import decode

    for k, choice in table.items():
        decode(choice)  # a bad entry raises here, before anything is installed
        if not (isinstance(k, tuple) and len(k) == 4):
            raise ValueError(f"kernel choice key {k!r}: expected (op, s, l, dtype), e.g. ('gram', 128, 512, 'bfloat16')")
    _TABLE.update({tuple(k): str(v) for k, v in table.items()})
    _STRICT[0] = True


def installed() -> dict[Key, str]:
    """A copy of the installed choices."""
    return dict(_TABLE)


def clear() -> None:
    """Forget the installed choices (back to per-process timing)."""
    _TABLE.clear()
    _STRICT[0] = False


def polar_keys(plan, groups: list[dict], device: torch.device) -> dict[Key, int]:
    """The products polar will run for ``plan``, each with the largest batch one owner runs.

    Args:
        plan (Plan): the optimizer's plan (units, their blocks and owners).
        groups (list[dict]): the param group of each of ``plan.params``, in order.
        device (torch.device): where polar runs (its default dtype is bf16 on CUDA, fp32 elsewhere).

    Returns:
        dict: key → batch size; ``("gram", s, l, dt)`` and ``("square", s, s, dt)`` for every block
        shape of a unit with polar flops (both forms of polar run these two products).
    """
    counts: dict[tuple, int] = defaultdict(int)
    for unit in plan.units:
        if unit.polar_flops <= 0:
            continue
        group = groups[unit.param]
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}.get(
            group.get("polar_dtype"), torch.bfloat16 if device.type == "cuda" else torch.float32)
        for block in unit.spec.blocks:
            m, n = block.shape
            s, l = min(m, n), max(m, n)
            for op, width in (("gram", l), ("square", s)):
                counts[(key(op, s, width, dtype), unit.owner)] += 1
    out: dict[Key, int] = {}
    for (k, _), count in counts.items():
        out[k] = max(out.get(k, 0), count)
    return out


def measure(keys: dict[Key, int], device: torch.device) -> dict[Key, str]:
    """Time torch and the kernel on this process for each key (batch as given, capped at
    :data:`MEASURE_BYTES`) and return the fastest of each."""
    from .triton_gram import _fastest, _square_torch, syrk_torch, triton_available

    if not triton_available():
        return {k: "torch" for k in keys}
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for k, batch in sorted(keys.items()):
        op, s, l, dtype_name = k
        dtype = getattr(torch, dtype_name)
        batch = max(1, min(batch, MEASURE_BYTES // max(1, s * l * torch.finfo(dtype).bits // 8)))
        x = torch.randn(batch, s, l, generator=gen, device=device, dtype=torch.float32).to(dtype)
        if op == "gram":
            out[k] = _fastest(x, 1.0, 0.0, None, syrk_torch)
        elif op == "square":
            a = torch.bmm(x, x.mT) / l  # a symmetric s×s batch of the size polar forms
            out[k] = _fastest(a, 0.5, -1.5, a, _square_torch)
        else:
            c = torch.bmm(x, x.mT)
            out[k] = _fastest(x, 1.0, 1.0, c, syrk_torch)
        del x
    return out


def agree(keys: dict[Key, int], device: torch.device, collectives) -> dict[Key, str]:
    """Rank 0's choices for ``keys``, on every rank (one ``all_gather_object``): its installed
    entry where it has one (a plan built earlier in this process), else its :func:`measure`.

    Args:
        keys (dict): key → batch, the same on every rank (from :func:`polar_keys` of the shared plan).
        device (torch.device): where to time.
        collectives: ``rank`` and ``all_gather_object`` over the optimizer's ranks
            (:class:`~dist_spectral.engines.Collectives`).

    Returns:
        dict: key → ``"torch"`` or ``"triton:i"``, identical on every rank.
    """
    mine = None
    if collectives.rank == 0:  # a key decided before (an earlier plan) keeps its choice
        mine = {k: _TABLE[k] for k in keys if k in _TABLE}
        mine.update(measure({k: b for k, b in keys.items() if k not in _TABLE}, device))
    return collectives.all_gather_object(mine)[0]


def _wanted(device: torch.device) -> bool:
    """Whether ``syrk``'s auto backend could pick the kernel on ``device`` (else it is torch anyway)."""
    from .triton_gram import environment, triton_available

    return device.type == "cuda" and triton_available() and environment()[0] == "auto"


def reload_environment() -> None:
    """Read the kernel variables again (:func:`~dist_spectral.kernels.triton_gram.reload_environment`)."""
    from .triton_gram import reload_environment as reload

    reload()


def decide(plan, groups: list[dict], device: torch.device, collectives) -> dict[Key, str]:
    """What the optimizer calls after building a plan: on CUDA with Triton (and no
    ``DIST_SPECTRAL_TRITON`` override), :func:`agree` on the plan's :func:`polar_keys` and
    :func:`install` the result; elsewhere nothing (torch everywhere, no collective).

    Returns:
        dict: the choices installed (empty where none were needed).
    """
    if not _wanted(device):
        return {}
    table = agree(polar_keys(plan, groups, device), device, collectives)
    install(table)
    return table


__all__ = ["MEASURE_BYTES", "agree", "clear", "decide", "install", "installed", "key", "lookup", "measure", "polar_keys",
           "reload_environment", "strict"]
