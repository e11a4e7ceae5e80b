"""DeepSpeed's CPU shared-memory all-reduce buffers in ``/dev/shm``: this rank's, and dead processes'.

On CPU, DeepSpeed's communication op (``deepspeed/ops/csrc/cpu/comm/shm.cpp``) gives every local
rank a buffer of about 70 MB, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``,
which the other local ranks map, and never deletes it. A run that ends normally deletes its own
(:func:`remove_own_buffer`); a process killed (SIGKILL, OOM, an elastic agent's stop) leaves it, and
a restart on the same address and port would map the dead run's buffer, state flags included.

The name holds no process id, so a buffer's owners are found through ``/proc``: a buffer that no
live process maps (``/proc/<pid>/maps``) or holds open (``/proc/<pid>/fd``) belongs to processes
that no longer exist and is deleted by :func:`remove_stale_buffers`, which the training entry runs
on each node's local rank 0 before DeepSpeed creates this run's buffers (all ranks wait for it).
"""
from __future__ import annotations

import os
from pathlib import Path

SHM = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"


def _ours(shm: Path) -> list[Path]:
    uid = os.getuid()
    out = []
    for path in shm.glob(f"{PREFIX}{uid}_*"):
        try:
            if path.is_file() and path.stat().st_uid == uid:
                out.append(path)
        except FileNotFoundError:  # deleted meanwhile by its run
            pass
    return out


def held_files(proc: Path = Path("/proc")) -> set[str]:
    """Paths under ``/dev/shm`` that some live process maps or holds open (of the processes we may read)."""
    held = set()
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            for line in (pid / "maps").read_text().splitlines():
                at = line.find(f"{SHM}/")
                if at >= 0:
                    held.add(line[at:].removesuffix(" (deleted)"))
            for fd in (pid / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(f"{SHM}/"):
                    held.add(target)
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue  # exited meanwhile, or not ours to read
    return held


def stale_buffers(shm: Path = SHM) -> list[Path]:
    """This user's DeepSpeed buffers in ``shm`` that no live process maps or holds open."""
    candidates = _ours(shm)
    if not candidates:
        return []
    held = held_files()
    return [p for p in candidates if str(p) not in held]


def remove_stale_buffers(shm: Path = SHM) -> list[tuple[str, int]]:
    """Delete :func:`stale_buffers`; returns ``(name, bytes)`` of each removed."""
    gone = []
    for path in stale_buffers(shm):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        gone.append((path.name, size))
    return gone


def remove_own_buffer() -> None:
    """Remove this rank's buffer at the end of a run (other ranks' mappings of it stay valid)."""
    addr, port, rank = (os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"))
    for path in SHM.glob(f"{PREFIX}*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


__all__ = ["held_files", "stale_buffers", "remove_stale_buffers", "remove_own_buffer"]
