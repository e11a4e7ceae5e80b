"""Deterministic process kills for fault tests: ``DIST_SPECTRAL_TEST_KILL=<point>:<rank>:<n>[@<attempt>],...``.

A test sets the variable for a run; the process of global rank ``<rank>`` then SIGKILLs itself
(no cleanup, no exception handlers: as the kernel's OOM killer or a lost node would) at::

    step:<rank>:<n>    after training step n (between checkpoints)
    save:<rank>:<n>    inside the process's n-th checkpoint save, once this rank's first shard file
                       is written and before the checkpoint is complete

``@<attempt>`` picks the elastic attempt (``TORCHELASTIC_RESTART_COUNT``, 0 for the first or outside
torchrun; default 0), so that restarted workers, which inherit the variable, run on or are killed at
another point. Unset, every hook is one dict lookup.
"""
from __future__ import annotations

import os
import re
import signal

ENV = "DIST_SPECTRAL_TEST_KILL"
_SPEC = re.compile(r"(step|save):(\d+):(\d+)(?:@(\d+))?")


def armed() -> list[tuple[str, int, int]]:
    """The ``(point, rank, n)`` kills asked for in this attempt (empty when none)."""
    spec = os.environ.get(ENV)
    if not spec:
        return []
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    out = []
    for item in spec.split(","):
        match = _SPEC.fullmatch(item.strip())
        if not match:
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not <point>:<rank>:<n>[@<attempt>] with point step or "
                             "save, e.g. save:1:2 or step:0:5@1")
        if int(match.group(4) or 0) == attempt:
            out.append((match.group(1), int(match.group(2)), int(match.group(3))))
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def kill_point(point: str, n: int) -> None:
    """SIGKILL this process if ``DIST_SPECTRAL_TEST_KILL`` names ``point``, this rank and ``n`` in this attempt."""
    if os.environ.get(ENV) and (point, _rank(), n) in armed():
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "armed", "kill_point"]
