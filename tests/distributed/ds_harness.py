"""DeepSpeed on top of :func:`tests.distributed.harness.launch`: W ranks (gloo, CPU) running one worker.

DeepSpeed initialises its own process group from the launcher's environment variables, so its
workers start as fresh interpreters, as the ``deepspeed`` launcher starts them (harness.launch),
not as ``run_world`` ranks. What this file adds: the cache of DeepSpeed's JIT-built shared-memory
op in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/dist_spectral/torch_extensions``: the first
build, ~1 min, is paid once), removing the op's buffers in ``/dev/shm`` after the run, and
:func:`leave_worker`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.distributed import harness

EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "dist_spectral" / "torch_extensions")


def leave_worker() -> None:
    """End a worker whose results are written: destroy the process groups, flush, and exit at once.

    DeepSpeed engines from earlier cases still hold gloo process groups (reference cycles keep them
    alive past ``destroy_process_group``); destroying them during interpreter finalisation
    occasionally aborts a rank whose work is done ("terminate called without an active exception").
    Collecting the engines first and skipping finalisation removes that race; a failure before this
    point still exits non-zero.
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    print("worker finished", flush=True)
    sys.stderr.flush()
    os._exit(0)


def launch(world: int, target: str, out_dir: Path, timeout_s: float = 600) -> None:
    """Run ``module:function(rank, world, out_dir)`` on ``world`` DeepSpeed ranks; raise with the
    logs of any rank that failed or ran past ``timeout_s``."""
    Path(EXT_DIR).mkdir(parents=True, exist_ok=True)
    port = harness.free_port()
    try:
        harness.launch(world, target, out_dir, timeout_s,
                       env={"TORCH_EXTENSIONS_DIR": EXT_DIR, "MASTER_PORT": str(port)})
    finally:
        # DeepSpeed's CPU shared-memory all-reduce leaves one buffer per rank (~70 MB) in /dev/shm.
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
            path.unlink(missing_ok=True)
