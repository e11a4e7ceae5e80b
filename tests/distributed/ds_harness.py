"""Start W DeepSpeed processes (gloo, CPU) running one worker function; collect their files.

DeepSpeed initialises its own process group from environment variables, so workers are plain
subprocesses (not ``torch.multiprocessing``), like the ``deepspeed`` launcher starts them. Its
JIT-built shared-memory op is cached in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/dist_spectral/torch_extensions``): the first build (~1 min) is paid once.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "dist_spectral" / "torch_extensions")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """Run ``module:function(rank, world, out_dir)`` on ``world`` processes; raise with the logs of
    any rank that failed or ran past ``timeout_s``."""
    module, function = target.split(":")
    port = _free_port()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=EXT_DIR, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    Path(EXT_DIR).mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for rank in range(world):
        log = open(out_dir / f"rank{rank}.log", "w")
        logs.append(log)
        code = f"from {module} import {function} as f; f({rank}, {world}, {str(out_dir)!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                      stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO)))
    deadline = time.time() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        # DeepSpeed's CPU shared-memory all-reduce leaves one buffer per rank (~70 MB) in /dev/shm.
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
            path.unlink(missing_ok=True)
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} ---\n" + (out_dir / f"rank{r}.log").read_text()[-4000:] for r in failed)
        raise RuntimeError(f"DeepSpeed ranks {failed} failed:\n{tails}")
