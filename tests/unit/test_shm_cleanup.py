"""Stale DeepSpeed shared-memory buffers: removed only when no live process maps or holds them.

Two fake buffers named as DeepSpeed's CPU op names them: one mapped by a process that has exited
(its pages stay in /dev/shm, as a SIGKILLed rank's do), one mapped by a process still running.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_spectral.training.shm import PREFIX, SHM, held_files, remove_stale_buffers, stale_buffers

pytestmark = pytest.mark.skipif(not (SHM.is_dir() and Path("/proc/self/maps").is_file()),
                                reason="needs /dev/shm and /proc")

# Create and map a buffer of 64 KiB, say so, then hold it until stdin closes.
HOLD = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o600)
os.write(fd, bytes(65536))
buf = mmap.mmap(fd, 65536)
os.close(fd)  # held by the mapping alone, as DeepSpeed's peers hold each other's
print("mapped", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def buffers():
    name = f"{PREFIX}{os.getuid()}_127.0.0.9_{os.getpid()}_"
    dead, live, other = SHM / f"{name}0", SHM / f"{name}1", SHM / f"not_deepspeed_{os.getpid()}"
    done = subprocess.run([sys.executable, "-c", HOLD, str(dead)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout == "mapped\n"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "mapped\n"
    other.write_bytes(b"x")
    try:
        yield dead, live, other
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        for path in (dead, live, other):
            path.unlink(missing_ok=True)


def test_only_buffers_of_dead_processes_are_removed(buffers):
    dead, live, other = buffers
    assert str(live) in held_files() and str(dead) not in held_files()
    stale = stale_buffers()
    assert dead in stale and live not in stale and other not in stale
    gone = remove_stale_buffers()
    assert (dead.name, 65536) in gone
    assert not dead.exists() and live.exists() and other.exists()
    assert all(name != live.name for name, _ in gone)
