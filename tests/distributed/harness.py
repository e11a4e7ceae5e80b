"""The one way distributed tests start ranks: a gloo process group, W processes, results per rank.

Two ways to start the ranks, chosen per call:

``run_world(W, fn, *args, start="spawn")``
    W ``torch.multiprocessing`` processes, each initialising ``torch.distributed`` with gloo through
    a file store (no ports to race for), calling ``fn(rank, W, *args)`` and handing back what it
    returned. ``start="spawn"`` (the default) gives every rank a fresh interpreter: right for a
    module that builds threads, process groups or CUDA state in the parent. ``start="fork"`` forks
    the ranks from the test process, which has already imported torch and transformers: a W=4 group
    starts in 0.2 s instead of 10-20 s. Forking is unsafe with a live process group or other
    threads in the parent; then the call spawns instead.

``launch(W, "module:function", out_dir, env=...)``
    W fresh interpreters started as a launcher (``torchrun``, ``deepspeed``) starts them: the
    rendezvous variables in the environment, no process group made for them. For workers whose
    framework initialises the group itself (DeepSpeed, Accelerate); each writes its own files
    into ``out_dir``. ``ds_harness.py`` adds DeepSpeed's bits on top.

``start_ranks(W, target, args_of_rank, start="fork")`` starts the processes and returns them
unjoined, for fault tests that kill or watch ranks themselves.

A failure on any rank fails the call with that rank's traceback or log, and a rank
that hangs is ended at the timeout instead of hanging the suite.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
START_METHODS = ("spawn", "fork")


def _entry(rank: int, world_size: int, store_path: str, out_dir: str, fn, args, timeout_s: float):
    torch.set_num_threads(1)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = str(rank), str(world_size), str(rank)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        del result
        # Models and optimizers in reference cycles hold process groups (device meshes); free them
        # now, so the groups are not torn down during interpreter finalisation.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def fork_is_safe() -> bool:
    """Forking copies this process's locks and process groups: only safe without either."""
    return not dist.is_initialized() and threading.active_count() == 1


def run_world(world_size: int, fn, *args, start: str = "spawn", timeout_s: float = 120.0) -> list:
    """``fn(rank, world_size, *args)`` on a fresh gloo group of ``world_size`` processes (one thread
    each); returns each rank's result. ``start``: ``"spawn"`` or ``"fork"`` (see the module)."""
    if start not in START_METHODS:
        raise ValueError(f"run_world(start={start!r}): use one of {START_METHODS}")
    if start == "fork" and not fork_is_safe():
        start = "spawn"
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(_entry, args=(world_size, store, tmp, fn, args, timeout_s), nprocs=world_size,
                           join=True, start_method=start)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def start_ranks(world_size: int, target, args_of_rank, start: str = "fork") -> list:
    """Start ``target(*args_of_rank(rank))`` in ``world_size`` processes and return them, unjoined:
    for fault tests that watch ranks die or stall (the target initialises its own process group).
    ``start`` as in :func:`run_world`."""
    if start not in START_METHODS:
        raise ValueError(f"start_ranks(start={start!r}): use one of {START_METHODS}")
    ctx = mp.get_context(start if start == "spawn" or fork_is_safe() else "spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(r)) for r in range(world_size)]
    for p in procs:
        p.start()
    return procs


@contextlib.contextmanager
def single_thread():
    """Tiny matrices in this (parent) process: one thread is 8x faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, target: str, out_dir: Path, timeout_s: float = 600, env: dict | None = None) -> None:
    """Run ``module:function(rank, world, out_dir)`` in ``world`` fresh interpreters with the
    launcher's variables (``MASTER_ADDR``/``MASTER_PORT`` on a free port, ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_SIZE``), then ``env`` on top; each rank's output goes to
    ``out_dir/rank<r>.log``. Raises with the logs of any rank that failed or ran past ``timeout_s``."""
    module, function = target.split(":")
    out_dir = Path(out_dir)
    base = dict(os.environ)
    base.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    base.update(env or {})
    procs, logs = [], []
    try:
        for rank in range(world):
            log = open(out_dir / f"rank{rank}.log", "w")
            logs.append(log)
            code = f"from {module} import {function} as f; f({rank}, {world}, {str(out_dir)!r})"
            procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                          env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)), cwd=str(REPO)))
        deadline = time.time() + timeout_s
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text()[-4000:] for r in failed)
        raise RuntimeError(f"{target}: ranks {failed} failed or ran past {timeout_s:.0f} s:\n{tails}")
