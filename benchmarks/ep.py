"""Token-routed expert parallel vs FSDP-sharded experts: training-step time and bytes on CPU (gloo).

    python benchmarks/ep.py          # W = 2 and 4, writes benchmarks/results/ep.md

Both settings are the training entry's ``parallel=ep`` wrapping (``training/launchers.py``) of one MoE,
built on meta and initialised the same way, with the ``symmetric`` recipe:

    all_gather   experts ``Shard(0)`` under FSDP2, gathered for every forward (and again in backward:
                 reshard_after_forward), every rank computing all of its own tokens' experts
    all_to_all   experts stay where they are; each (token, expert) pair travels to the expert's rank
                 and back (``parallel.expert_dispatch=all_to_all``, ``training/expert_parallel.py``)

For each W, in one process group, the two settings are timed interleaved step by step on the same
batches (forward, backward, optimizer step; the order alternates). A step's time is the slowest
rank's (barrier before and after); the optimizer's share is the slowest rank's ``step()`` over the
step. Expert bytes per rank and step: for all_to_all the rows the dispatch sends to other ranks
(measured, forward and backward, plus the counts' all_to_all); for all_gather the expert weights
FSDP2 gathers and the expert gradients it reduce-scatters, ``(W-1)/W`` of their size per collective
(computed from the sizes: ring algorithms). The attention's FSDP2 traffic, the same in both, is left
out; the optimizer's own bytes (``last_stats``) are reported apart.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_lines, run_world, summary, timed_across_ranks, write_results  # noqa: E402

PRESET = "tiny-olmoe"
MODEL = {"hidden_size": 128, "intermediate_size": 256, "num_experts": 16, "num_experts_per_tok": 2,
         "num_hidden_layers": 4}
SETTINGS = ("all_gather", "all_to_all")


def _count_dispatch_bytes(counter: list) -> None:
    """Wrap ``expert_parallel``'s exchange so ``counter[0]`` adds the bytes each rank sends to the other
    ranks: rows in forward (``send_sizes`` less its own), gradients in backward (``recv_sizes`` less
    its own: the exchange reversed), and with each dispatch the per-expert counts (``E`` int64, of
    which ``(W-1)/W`` leave the rank)."""
    import torch.distributed as dist

    from dist_spectral.training import expert_parallel

    exchange = expert_parallel._exchange

    class Counted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, back):
            ctx.back = back
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            counter[0] += ctx.back
            return grad, None

    def counted(x, recv_sizes, send_sizes, group):
        me = dist.get_rank(group)
        row = math.prod(x.shape[1:]) * x.element_size()
        counter[0] += (sum(send_sizes) - send_sizes[me]) * row
        return Counted.apply(exchange(x, recv_sizes, send_sizes, group), (sum(recv_sizes) - recv_sizes[me]) * row)

    dispatch = expert_parallel.TokenDispatch.__call__

    def call(self, *args):
        counter[0] += self.num_experts * 8 * (self.world - 1) // self.world
        return dispatch(self, *args)

    expert_parallel._exchange = counted
    expert_parallel.TokenDispatch.__call__ = call


def worker(rank: int, world_size: int, repeats: int, batch: int, seq: int) -> dict:
    from dist_spectral import build_optimizer
    from dist_spectral.models import build_model
    from dist_spectral.training.config import ParallelConfig
    from dist_spectral.training.launchers import DistEnv, wrap_model

    counter = [0]
    _count_dispatch_bytes(counter)
    env = DistEnv(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    runs = {}
    for setting in SETTINGS:
        model = wrap_model(build_model(PRESET, device="meta", **MODEL),
                           ParallelConfig(engine="ep", expert_dispatch=setting), env, seed=0)
        runs[setting] = (model, build_optimizer(model, "symmetric"))
    expert_bytes = sum(p.numel() * p.element_size() for n, p in runs["all_gather"][0].named_parameters()
                       if ".experts." in n)
    out = {s: {"step": [], "opt": [], "sent": [], "opt_sent": []} for s in SETTINGS}
    for r in range(repeats + 1):  # the first round warms up
        x = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1000 * r + rank))
        for setting in (SETTINGS if r % 2 else SETTINGS[::-1]):
            model, opt = runs[setting]
            counter[0] = 0
            box = {}

            def step():
                model(input_ids=x, labels=x).loss.backward()
                t = time.perf_counter()
                opt.step()
                box["opt"] = time.perf_counter() - t
                opt.zero_grad()

            elapsed = timed_across_ranks(step)
            if r:
                out[setting]["step"].append(elapsed)
                out[setting]["opt"].append(box["opt"])
                out[setting]["sent"].append(counter[0])
                out[setting]["opt_sent"].append(sum(opt.last_stats.bytes_sent.values()))
    return {"runs": out, "expert_bytes": expert_bytes}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ep.md"))
    args = parser.parse_args(argv)
    machine = machine_lines()
    load_start = os.getloadavg()
    rows = []
    for W in [int(w) for w in args.worlds.split(",")]:
        res = run_world(W, worker, args.repeats, args.batch, args.seq)
        row = {"W": W}
        for s in SETTINGS:
            step = [max(r["runs"][s]["step"][i] for r in res) for i in range(args.repeats)]
            share = [max(r["runs"][s]["opt"][i] for r in res) / step[i] for i in range(args.repeats)]
            if s == "all_to_all":
                sent = max(statistics.median(r["runs"][s]["sent"]) for r in res)
            else:  # gathered twice (forward, backward after resharding), gradients reduce-scattered once
                sent = 3 * res[0]["expert_bytes"] * (W - 1) / W
            opt_sent = max(statistics.median(r["runs"][s]["opt_sent"]) for r in res)
            row[s] = dict(step=step, share=share, sent=sent, opt_sent=opt_sent)
            print(f"W={W} {s}: step {summary([t * 1e3 for t in step], '.1f')} ms, optimizer share "
                  f"{statistics.median(share):.2f}, experts {sent / 2 ** 20:.3f} MiB, optimizer {opt_sent / 2 ** 20:.3f} MiB "
                  "per rank and step", flush=True)
        # ratios per repeat: the two settings ran back to back on the same batch
        row["ratio"] = [b / a for a, b in zip(row["all_gather"]["step"], row["all_to_all"]["step"])]
        rows.append(row)
    load_end = os.getloadavg()
    cmd = " ".join(shlex.quote(a) for a in ["benchmarks/ep.py"] + (argv if argv is not None else sys.argv[1:]))
    tokens = args.batch * args.seq
    lines = ["# Expert parallel: token routing (all_to_all) vs FSDP-sharded experts (all_gather), CPU, gloo", "",
             f"Command: `python {cmd}`", "", f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             "Machine:", "", *machine,
             f"- load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_start)} at the start; "
             f"{', '.join(f'{x:.2f}' for x in load_end)} at the end (the cores are shared with other jobs: compare "
             "the two settings within a row, they ran interleaved on the same batches)", "",
             f"Model: `{PRESET}` with {', '.join(f'{k}={v}' for k, v in MODEL.items())}; recipe `symmetric`; "
             f"{args.batch}×{args.seq} = {tokens} tokens per rank and step. One thread per rank; at W = 4 two "
             f"ranks share each of the {os.cpu_count()} cores.", "",
             f"Repeats: {args.repeats} timed training steps (forward, backward, optimizer) after one warm-up, the "
             "settings interleaved (order alternating); a step's time is the slowest rank's; `a2a / gather` is the "
             "median of the per-step ratios. Expert bytes per rank and step: all_to_all measured (rows and counts "
             "sent to other ranks by the dispatch, forward and backward), all_gather computed (two all-gathers and "
             "one reduce-scatter of the expert weights, (W-1)/W of their size each). Optimizer bytes: "
             "`last_stats.bytes_sent`, all collectives. Cells: median (min–max).", "",
             "| W | gather step ms | a2a step ms | a2a / gather | optimizer share gather / a2a | "
             "expert bytes per rank and step, gather / a2a | optimizer bytes per rank, gather / a2a |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        g, a = r["all_gather"], r["all_to_all"]
        lines.append(f"| {r['W']} | {summary([t * 1e3 for t in g['step']], '.1f')} | "
                     f"{summary([t * 1e3 for t in a['step']], '.1f')} | {statistics.median(r['ratio']):.3f} | "
                     f"{statistics.median(g['share']):.2f} / {statistics.median(a['share']):.2f} | "
                     f"{g['sent']:,.0f} / {a['sent']:,.0f} ({a['sent'] / g['sent']:.3f}) | "
                     f"{g['opt_sent']:,.0f} / {a['opt_sent']:,.0f} |")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
