"""Shared bits of the benchmark scripts: machine description, summaries, process groups."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def summary(values: list[float], fmt: str) -> str:
    """``median (min–max)``."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines(devices=()) -> list[str]:
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}",
    ]
    if any(getattr(d, "type", d) == "cuda" for d in devices):
        lines.append(f"- GPU: {torch.cuda.get_device_name(0)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"- load average (1 min) at the start: {load:.2f}")
    return lines


def run_world(world_size: int, fn, *args) -> list:
    """Run ``fn(rank, world_size, *args)`` on a fresh gloo group of ``world_size`` spawned processes
    (one thread each); returns each rank's result. The test suite's harness
    (tests/distributed/harness.py), with a timeout for benchmark-sized runs."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.distributed.harness import run_world as harness_run_world

    return harness_run_world(world_size, fn, *args, start="spawn", timeout_s=600.0)


#: Heading of the one section of a results file written by hand; :func:`write_results` keeps it
#: (and any ``## Notes (...by hand...)`` heading, such as "## Notes (added by hand after the run)").
NOTES_HEADING = "## Notes (by hand)"


def _is_notes_heading(line: str) -> bool:
    return line.startswith("## Notes (") and "by hand" in line


def hand_notes(path: str) -> str:
    """The hand-written notes section of an existing results file (from its notes heading to the
    end), or ``""`` when the file or the section does not exist."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return ""
    start = next((i for i, line in enumerate(lines) if _is_notes_heading(line)), None)
    return "" if start is None else "\n".join(lines[start:]) + "\n"


def write_results(path: str, lines: list[str]) -> None:
    """Write a results file (creating its folder) and say where.

    Everything above the notes section is the script's output; a ``## Notes (by hand)`` section
    already in the file is kept, at the end, so rerunning a script never loses prose added by
    hand (and prose outside that section is the script's to overwrite).
    """
    notes = hand_notes(path)
    if any(_is_notes_heading(line) for text in lines for line in text.splitlines()):
        raise ValueError(f"{path}: a script must not write a notes section ({NOTES_HEADING!r}) itself")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = "\n".join(lines).rstrip("\n") + "\n"
    if notes:
        text += "\n" + notes.rstrip("\n") + "\n"
    with open(path, "w") as f:
        f.write(text)
    print("wrote", path)


def timed_across_ranks(fn) -> float:
    """Seconds ``fn()`` takes between two barriers: the slowest rank's time, on every rank."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0
