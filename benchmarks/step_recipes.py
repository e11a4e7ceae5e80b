"""Optimizer-step time of the rules from neighbouring papers against Muon, under FSDP2 on CPU.

    python benchmarks/step_recipes.py                  # W = 2, writes benchmarks/results/step_recipes.md

The model and fixed gradients of ``benchmarks/step.py`` (OLMoE architecture, FSDP2 per layer,
gloo, one thread per rank). Each recipe gets its own model copy; in every round each optimizer
steps once, interleaved, a step timed as the slowest rank's (barriers before and after). Recipes
(``dist_spectral/configs/recipes``): ``muon`` (the baseline), ``symmetric``, ``spectra`` (soft spectral clipping
of the AdamW update), ``auon`` (cosh-normalised momentum: two scalar all-reduces per matrix, no
gather), ``conda`` (Adam in the momentum's singular basis: the basis is refreshed at step 1 and
then every ``update_proj_gap`` steps, so the first step is reported apart) and ``aro`` (a rotation
by QR each step).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import machine_lines, run_world, summary, timed_across_ranks, write_results  # noqa: E402
from step import MODEL, fsdp_model_with_grads  # noqa: E402

from dist_spectral import build_optimizer  # noqa: E402

RECIPES = ("muon", "symmetric", "spectra", "auon", "conda", "aro")


def worker(rank: int, world_size: int, recipes: tuple, repeats: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    opts = {r: build_optimizer(fsdp_model_with_grads(mesh), r) for r in recipes}
    first, times, stats = {}, {r: [] for r in recipes}, {}
    for i in range(repeats + 1):
        for r, opt in opts.items():
            with torch.no_grad():
                elapsed = timed_across_ranks(opt.step)
            if i:
                times[r].append(elapsed)
            else:
                first[r] = elapsed
            stats[r] = opt.last_stats
    return {"first": first, "times": times,
            "sent": {r: sum(s.bytes_sent.values()) for r, s in stats.items()},
            "flops": {r: s.polar_flops for r, s in stats.items()},
            "exchange": {r: s.exchange_seconds for r, s in stats.items()},
            "compute": {r: s.compute_seconds for r, s in stats.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "step_recipes.md"))
    args = p.parse_args(argv)
    recipes = tuple(args.recipes.split(","))
    machine = machine_lines()
    res = run_world(args.world, worker, recipes, args.repeats)
    W = args.world
    step = {r: [max(x["times"][r][i] for x in res) for i in range(args.repeats)] for r in recipes}
    first = {r: max(x["first"][r] for x in res) for r in recipes}
    base = statistics.median(step["muon"]) if "muon" in step else None
    lines = ["# Optimizer step of the neighbouring rules vs Muon (FSDP2, CPU, gloo)", "",
             f"Command: `python {shlex.join(['benchmarks/step_recipes.py'] + list(argv or sys.argv[1:]))}`", "",
             f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}", "", "Machine:", "", *machine, "",
             f"Model: `benchmarks/step.py`'s OLMoE ({MODEL['num_hidden_layers']} layers, width {MODEL['hidden_size']}, "
             f"{MODEL['num_experts']} experts of {MODEL['intermediate_size']}, vocab {MODEL['vocab_size']}), FSDP2 per "
             f"layer, W = {W}, one thread per rank, fixed synthetic gradients. {args.repeats} timed steps after the "
             "first, recipes interleaved; a step is the slowest rank's. Cells: median (min–max) seconds.", "",
             "| recipe | step s | / muon | first step s | exchange s | compute s | bytes sent / rank | "
             "polar + clip GFLOP / rank |", "|---|---|---|---|---|---|---|---|"]
    for r in recipes:
        med = statistics.median(step[r])
        sent = max(x["sent"][r] for x in res)
        flops = max(x["flops"][r] for x in res)
        lines.append(f"| `{r}` | {summary(step[r], '.3f')} | {med / base:.2f} | {first[r]:.3f} | "
                     f"{statistics.median(x['exchange'][r] for x in res):.3f} | "
                     f"{statistics.median(x['compute'][r] for x in res):.3f} | {sent:,} | {flops / 1e9:.2f} |")
        print(lines[-1])
    lines += ["", "`first step` includes the one-time plan and, for `conda`, the basis refresh (an SVD per block); "
              "`compute` is whole-matrix rule time on the busiest rank's owners, `exchange` the packing and "
              "collectives. Bytes are everything the step sent (owner exchange and statistics all-reduces)."]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
