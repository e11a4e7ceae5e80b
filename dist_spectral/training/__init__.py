"""Training entry point: ``launch/train.py`` and ``dist-spectral train`` (under ``torchrun``).

    torchrun --standalone --nproc_per_node=2 launch/train.py --config tiny-olmoe-fsdp train.steps=100
    dist-spectral train --config tiny-olmoe-fsdp parallel=none       # one process, no torchrun
    dist-spectral train --dry-run --world-size 256 model=qwen3-235b-a22b parallel=ep   # simulated, on meta

::

    config.py     run config dataclasses, YAML composition, key.sub=value overrides
    data.py       built-in corpus / memmap / text / datasets; deterministic (seed, step, rank) batches
    launchers.py  process group and model wrapping per parallel.engine (none, ddp, fsdp, hsdp, ep)
    names.py      recipe, preset, DeepSpeed config and data paths checked before anything starts
    loop.py       the step, validation, checkpoints
    metrics.py    metrics.jsonl and loss.png
    dryrun.py     --dry-run: plan, memory per rank and predicted step at a simulated world size, on meta

Outputs go to ``runs/<name>/``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``loss.png`` and
``checkpoints/step_NNNNNN`` with a ``checkpoints/latest`` pointer.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from .config import ConfigError, RunConfig, dump, load_config
from .names import check_names

DEFAULT_RUN = "tiny-olmoe-fsdp"


def without_local_rank(argv: list[str]) -> list[str]:
    """``argv`` less the launcher's ``--local_rank=N`` / ``--local_rank N`` (kept in ``LOCAL_RANK``)."""
    out, i = [], 0
    while i < len(argv):
        match = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", argv[i])
        if not match:
            out.append(argv[i])
            i += 1
            continue
        value = match.group(1)
        if value is None and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        os.environ.setdefault("LOCAL_RANK", value)
        i += 1
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train", description="Train a transformers model with a dist_spectral optimizer (run under torchrun).",
        epilog="Overrides are key.sub=value (YAML values), e.g. train.steps=100 optim.recipe=muon parallel=ddp "
               "data.source=memmap data.path=data/train.bin. Unknown keys are errors listing the valid ones.")
    p.add_argument("--config", default=DEFAULT_RUN,
                   help=f"run config: a name in the repository's configs/runs or the package's built-in runs, "
                        f"or a YAML path (default: {DEFAULT_RUN}, built in)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint directory, a run directory, or (no value) this run's latest")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on meta with the run's layout at --world-size ranks, print the optimizer's "
                        "plan, memory per rank and the predicted step time, and exit (no process group, nothing "
                        "allocated)")
    p.add_argument("--world-size", type=int, default=None, metavar="W",
                   help="simulated ranks for --dry-run (default: $WORLD_SIZE, else 1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_intermixed_args(argv)
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume train.steps=600`: a bare --resume followed by an override, not a path.
        before = argv[:argv.index(args.resume)]
        args.overrides.insert(sum(a in args.overrides for a in before), args.resume)
        args.resume = "auto"
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, load the config and train; returns a process exit code."""
    args = parse_args(without_local_rank(list(sys.argv[1:] if argv is None else argv)))
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.print_config:
            check_names(cfg)  # before any process group, model or data: one line, not a traceback per rank
    except (ConfigError, FileNotFoundError) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun the other ranks exit with the same status quietly
            print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    if args.world_size is not None and not args.dry_run:
        print("config error: --world-size simulates ranks for --dry-run; under torchrun the world size is "
              "--nproc_per_node x nodes", file=sys.stderr)
        return 2
    if args.dry_run:
        from .dryrun import main as dry_run

        if os.environ.get("RANK", "0") != "0":
            return 0  # under a launcher: rank 0 prints the simulation, the others have nothing to do
        return dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", 1)))
    from .loop import train

    train(cfg, resume=args.resume)
    return 0


__all__ = ["main", "load_config", "RunConfig", "ConfigError", "DEFAULT_RUN"]
