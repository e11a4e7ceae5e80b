"""Spawn a gloo process group once and run a function on every rank; results come back per rank.

``run_world(W, fn, *args)`` starts W processes (``spawn``), initialises ``torch.distributed``
with gloo through a file store (no ports to race for), calls ``fn(rank, W, *args)`` and returns
the list of what each rank returned. A failure on any rank fails the call with that rank's
traceback; collectives time out instead of hanging.
"""
from __future__ import annotations

import datetime
import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def run_world(world_size: int, fn, *args, timeout_s: float = 120.0) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(_entry, args=(world_size, store, tmp, fn, args, timeout_s), nprocs=world_size,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
