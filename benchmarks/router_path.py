"""Routers on the owner path vs replicated: optimizer-step time under FSDP2 on CPU (gloo).

    python benchmarks/router_path.py          # W = 2 and 4, writes benchmarks/results/router_path.md

A replicated unit (``replicate_below``, see dist_spectral/plan.py) is sent to every rank holding
part of it in the bucket's gather all_to_all and computed on each; an owned one is gathered to one
rank, computed there and its rows scattered back. For each W, in one process group, with fixed
synthetic gradients, the two settings are timed interleaved repeat by repeat:

    moe       the benchmark MoE model of benchmarks/step.py, recipe ``symmetric``: 4 left-spectral
              routers (8×256) in the same bucket as per-head Muon attention and per-expert Muon
    routers   the same model with AdamW attention and experts: the routers are the only
              whole-matrix units, so replicating them removes the scatter all_to_all altogether
    routers-ddp  the same, every tensor whole on every rank (DDP): replicated routers move nothing,
              owned ones are sent from their owner to every other rank
    e×d       routers alone, 4 left-spectral matrices of e×d, ``Shard(0)`` (a router sweep up to
              DeepSeek-V3's 256×7168), to find where the duplicated compute starts to cost

Step time is the slowest rank's ``step()`` (barrier before and after). The machine's cores are
shared: at W = 4 on 2 cores, duplicated compute is paid twice over (two ranks per core), where
on GPUs every rank has its own device.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_lines, run_world, summary, timed_across_ranks, write_results  # noqa: E402
from step import MODEL, fsdp_model_with_grads, grad_for  # noqa: E402

from dist_spectral import build_optimizer  # noqa: E402

SETTINGS = {"owner": 0, "replicated": 1 << 30}  # replicate_below
ROUTERS_ONLY = {"attention": {"rule": "adamw"}, "mlp": {"rule": "adamw"}}
SWEEP = ((8, 256), (16, 512), (32, 512), (32, 1024), (64, 1024), (64, 2048), (128, 4096), (256, 7168))
LAYERS = 4
FAST = 64 * 2048  # sweep cases up to this many elements get --fast-repeats


def routers_alone(mesh, rows: int, cols: int, replicate_below: int):
    """``LAYERS`` left-spectral routers of rows×cols, ``Shard(0)`` over ``mesh``, gradients set."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    from dist_spectral.optimizer import SpectralOptimizer
    from dist_spectral.roles import ParamInfo
    from dist_spectral.rules import get_rule

    params, infos = [], {}
    for layer in range(LAYERS):
        name = f"layers.{layer}.mlp.gate.weight"
        torch.manual_seed(layer)
        p = nn.Parameter(distribute_tensor(torch.randn(rows, cols) / cols ** 0.5, mesh, [Shard(0)], src_data_rank=None))
        p.grad = distribute_tensor(grad_for(name, (rows, cols)), mesh, [Shard(0)], src_data_rank=None)
        params.append((name, p))
        infos[name] = ParamInfo(name, (rows, cols), "router", "Gate")
    group = {"params": params, "rule": "left_spectral", "lr": 7.5e-4, "weight_decay": 0.0,
             **get_rule("left_spectral").defaults}
    return SpectralOptimizer([group], infos, replicate_below=replicate_below)


def cases() -> list[str]:
    return ["moe", "routers", "routers-ddp"] + [f"{e}x{d}" for e, d in SWEEP]


def replicated_model_with_grads():
    """The benchmark model unwrapped, whole on every rank, with its fixed gradients (as under DDP)."""
    from step import build_model

    model = build_model()
    for name, p in model.named_parameters():
        p.grad = grad_for(name, tuple(p.shape))
    return model


def repeats_of(case: str, repeats: int, fast_repeats: int) -> int:
    """More repeats for the sweep's cases of a few ms, whose differences are a fraction of a ms."""
    if case in ("moe", "routers", "routers-ddp"):
        return repeats
    e, d = map(int, case.split("x"))
    return fast_repeats if e * d <= FAST else repeats


def worker(rank: int, world_size: int, repeats: int, fast_repeats: int, only: list[str]) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for case in only:
        opts = {}
        for setting, threshold in SETTINGS.items():
            if case in ("moe", "routers", "routers-ddp"):
                model = replicated_model_with_grads() if case == "routers-ddp" else fsdp_model_with_grads(mesh)
                opts[setting] = build_optimizer(model, "symmetric", replicate_below=threshold,
                                                **({} if case == "moe" else ROUTERS_ONLY))
            else:
                e, d = map(int, case.split("x"))
                opts[setting] = routers_alone(mesh, e, d, threshold)
        times = {k: [] for k in opts}
        inner = {k: [] for k in opts}
        for r in range(repeats_of(case, repeats, fast_repeats) + 1):  # the first round warms up
            for setting, opt in opts.items():
                elapsed = timed_across_ranks(opt.step)
                if r:
                    times[setting].append(elapsed)
                    s = opt.last_stats
                    inner[setting].append(s.exchange_seconds + s.compute_seconds)
        out[case] = {"times": times, "inner": inner,
                     "stats": {k: opt.last_stats for k, opt in opts.items()},
                     "replicated": {k: int(opt.plan().replicated.sum()) for k, opt in opts.items()}}
    return out


def reading(rows: list[dict]) -> list[str]:
    """Per W, where replicating the routers of the sweep stopped being faster (median step time)."""
    from dist_spectral.optimizer import REPLICATE_BELOW

    out = ["Reading (the sweep, median step time replicated / owner):", ""]
    for W in sorted({r["W"] for r in rows}):
        sweep = [r for r in rows if r["W"] == W and "x" in r["case"]]
        if not sweep:
            continue
        cells = ", ".join(f"{r['case']} {r['ratio']:.2f}" for r in sweep)
        slower = next((r["case"] for r in sweep if r["ratio"] > 1), None)
        out.append(f"- W = {W}: {cells}; replicated first slower at {slower or 'no size'}")
    out += ["", f"Default `replicate_below` = {REPLICATE_BELOW:,} elements (`dist_spectral.optimizer.REPLICATE_BELOW`): "
            "routers smaller than that are replicated, larger ones go to one owner."]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--fast-repeats", type=int, default=31, help=f"repeats of sweep cases up to {FAST} elements")
    parser.add_argument("--cases", default=",".join(cases()), help=f"comma-separated, of {', '.join(cases())}")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "router_path.md"))
    args = parser.parse_args(argv)
    only = args.cases.split(",")
    unknown = set(only) - set(cases())
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(cases())}")
    machine = machine_lines()
    load_start = os.getloadavg()
    rows = []
    for W in [int(w) for w in args.worlds.split(",")]:
        res = run_world(W, worker, args.repeats, args.fast_repeats, only)
        for case in only:
            n = repeats_of(case, args.repeats, args.fast_repeats)
            step = {k: [max(r[case]["times"][k][i] for r in res) for i in range(n)] for k in SETTINGS}
            inner = {k: [max(r[case]["inner"][k][i] for r in res) for i in range(n)] for k in SETTINGS}
            received = {k: max(sum(r[case]["stats"][k].bytes_received.get(ph, 0) for ph in ("gather", "replicate",
                                                                                              "scatter")) for r in res)
                        for k in SETTINGS}
            collectives = {k: max(1 if r[case]["stats"][k].bytes_received.get("scatter", 0) or
                                  r[case]["stats"][k].bytes_sent.get("scatter", 0) else 0 for r in res) for k in SETTINGS}
            ratio = statistics.median(step["replicated"]) / statistics.median(step["owner"])
            rows.append(dict(W=W, case=case, step=step, inner=inner, received=received, scatter=collectives,
                             ratio=ratio, replicated=res[0][case]["replicated"]["replicated"]))
            print(f"W={W} {case}: owner {summary(step['owner'], '.4f')} s, replicated {summary(step['replicated'], '.4f')}"
                  f" s, replicated/owner {ratio:.3f}")
    load_end = os.getloadavg()
    lines = ["# Routers: owner path vs replicated (FSDP2, CPU, gloo)", "",
             f"Command: `python {' '.join(shlex.quote(a) for a in ['benchmarks/router_path.py'] + (argv or sys.argv[1:]))}`",
             "", f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}", "", "Machine:", "", *machine,
             f"- load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_start)} at the start; "
             f"{', '.join(f'{x:.2f}' for x in load_end)} at the end (cores shared with other jobs)", "",
             f"Cases: `moe` = the benchmark model of benchmarks/step.py ({MODEL['num_hidden_layers']} layers, width "
             f"{MODEL['hidden_size']}, {MODEL['num_experts']} experts; routers {MODEL['num_experts']}×{MODEL['hidden_size']}), "
             "recipe `symmetric`, FSDP2 per layer; `routers` = the same with AdamW attention and experts (routers the only "
             "whole-matrix units); `routers-ddp` = that, every tensor whole on every rank (DDP); `e×d` = "
             f"{LAYERS} left-spectral routers of e×d alone, `Shard(0)`. Settings: "
             "`owner` = `replicate_below=0`; `replicated` = every router replicated. One thread per rank; at W = 4 "
             f"two ranks share each of the {os.cpu_count()} cores, so duplicated compute is paid twice over.", "",
             f"Repeats: {args.repeats} timed steps after one warm-up ({args.fast_repeats} for the sweep's cases up to "
             f"{FAST:,} elements), the two settings interleaved; a step's time is the "
             "slowest rank's (barrier before and after); `exchange+compute` is the slowest rank's time inside the "
             "whole-matrix exchange (packing, collectives, rule compute). Cells: median (min–max).", "",
             "| W | case | owner step ms | replicated step ms | replicated / owner | owner exchange+compute ms | "
             "replicated exchange+compute ms | max bytes received per rank, owner / replicated | scatter all_to_all "
             "(owner / replicated) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ms(v):
        return summary([x * 1e3 for x in v], ".2f")

    for r in rows:
        lines.append(f"| {r['W']} | {r['case']} | {ms(r['step']['owner'])} | {ms(r['step']['replicated'])} | "
                     f"{r['ratio']:.3f} | {ms(r['inner']['owner'])} | {ms(r['inner']['replicated'])} | "
                     f"{r['received']['owner']:,} / {r['received']['replicated']:,} | "
                     f"{'yes' if r['scatter']['owner'] else 'no'} / {'yes' if r['scatter']['replicated'] else 'no'} |")
    lines += ["", *reading(rows)]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
