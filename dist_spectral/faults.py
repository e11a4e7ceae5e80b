"""Deterministic process kills for fault tests: ``DIST_SPECTRAL_TEST_KILL=<point>:<rank>:<n>``.

A test sets the variable for a run; the process of global rank ``<rank>`` then SIGKILLs itself
(no cleanup, no exception handlers: as the kernel's OOM killer or a lost node would) at::

    step:<rank>:<n>    after training step n (between checkpoints)
    save:<rank>:<n>    inside the process's n-th checkpoint save, once this rank's first shard file
                       is written and before the checkpoint is complete

Only the first attempt of an elastic run is killed (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so
the restarted workers, which inherit the variable, run to the end. Unset, every hook is a dict lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "DIST_SPECTRAL_TEST_KILL"
POINTS = ("step", "save")


def armed() -> tuple[str, int, int] | None:
    """``(point, rank, n)`` when a kill is asked for in this attempt, else ``None``."""
    spec = os.environ.get(ENV)
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return None
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in POINTS or not (parts[1].isdigit() and parts[2].isdigit()):
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<rank>:<n> with point one of {POINTS}, e.g. save:1:2")
    return parts[0], int(parts[1]), int(parts[2])


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def kill_point(point: str, n: int) -> None:
    """SIGKILL this process if ``DIST_SPECTRAL_TEST_KILL`` names ``point``, this rank and ``n``."""
    want = armed()
    if want is not None and want == (point, _rank(), n):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["ENV", "armed", "kill_point"]
