"""Optimizer-step time under FSDP2 and FSDP2 × TP on CPU: dist_spectral vs an all-gather baseline vs AdamW.

    python benchmarks/step.py                       # FSDP2 at W = 2 and 4, dp 2 × tp 2 at W = 4;
                                                    # writes benchmarks/results/step.md

One MoE model (OLMoE architecture from `transformers`, sized so orthogonalisation dominates),
FSDP2-wrapped per layer, gloo, one thread per rank; gradients are synthetic and fixed. For each W,
in one process group and interleaved repeat by repeat:

    (a) dist_spectral `symmetric`: owners, one all_to_all per bucket each way, batched polar
    (b) all-gather baseline: every rank all-gathers every whole-matrix input and orthogonalises
        all of it, keeping its rows (what Moonlight / DeepSpeed's Muon do); same batched math
    (c) torch.optim.AdamW (foreach)

The dp × tp rows (``--tp-worlds``) tensor-parallelise the same model over a ``tp`` mesh dim of 2 as
torchtitan does (q/k/v column-parallel, o row-parallel, the embedding row- and the LM head
column-parallel, each expert's gate/up cut on its rows and down on its columns) and FSDP2-shard it
over ``dp`` (strided shards on column-parallel weights); (b) reads one contiguous piece per rank
and is left out there.

The compute floor is the single-process time of all the orthogonalisation (the same batched jobs,
one thread, rank 0 alone in every round) divided by the cores the ranks share: min(W, cores).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import machine_lines, run_world, summary, timed_across_ranks, write_results  # noqa: E402

from dist_spectral import build_optimizer  # noqa: E402
from dist_spectral.blocks import group_unit_specs, permuted_axis, view_2d_shape  # noqa: E402
from dist_spectral.compute import MatrixJob, run_jobs  # noqa: E402
from dist_spectral.rules import get_rule  # noqa: E402

MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_model(seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    return OlmoeForCausalLM(OlmoeConfig(**MODEL))


def grad_for(name: str, shape) -> torch.Tensor:
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(name)) % (2 ** 31)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def tensor_parallel(model, tp_mesh) -> None:
    """Attention, embedding and LM head with torch's plans, experts cut over ``tp`` by hand (see the module docstring)."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"model.embed_tokens": RowwiseParallel(), "lm_head": ColwiseParallel()}
    for i, layer in enumerate(model.model.layers):
        plan.update({f"model.layers.{i}.self_attn.{proj}": ColwiseParallel() for proj in ("q_proj", "k_proj", "v_proj")})
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        for name, dim in (("gate_up_proj", 1), ("down_proj", 2)):
            p = getattr(layer.mlp.experts, name)
            setattr(layer.mlp.experts, name, nn.Parameter(distribute_tensor(p.detach(), tp_mesh, [Shard(dim)],
                                                                            src_data_rank=None)))
    parallelize_module(model, tp_mesh, plan)


def fsdp_model_with_grads(mesh):
    """The benchmark model, FSDP2-wrapped per layer on ``mesh`` (a 2-D ``(dp, tp)`` mesh: tensor
    parallel over ``tp`` first), with its fixed gradients set."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    model = build_model()
    if mesh.ndim == 2:
        tensor_parallel(model, mesh["tp"])
    dp = mesh["dp"] if mesh.ndim == 2 else mesh
    for layer in model.model.layers:
        fully_shard(layer, mesh=dp)
    fully_shard(model, mesh=dp)
    for name, p in model.named_parameters():
        p.grad = distribute_tensor(grad_for(name, tuple(p.shape)), p.device_mesh, p.placements, src_data_rank=None)
    return model


class AllGatherBaseline:
    """Whole-matrix rules by all-gather: every rank rebuilds every matrix and runs every unit."""

    def __init__(self, opt):
        self.opt = opt
        self.bytes_received = 0
        self.polar_flops = 0

    @torch.no_grad()
    def step(self):
        from torch.distributed.tensor import DTensor

        opt = self.opt
        topo = opt.topology
        jobs, targets = [], []
        self.bytes_received = 0
        for g in opt.param_groups:
            rule = get_rule(g["rule"])
            for name, p in zip(g["param_names"], g["params"]):
                state = opt.state[p]
                local_state = {k: topo.local(v) for k, v in state.items() if k != "step"}
                state["step"] += 1
                x = rule.direction_input(local_state, topo.local(p.grad), g, step=int(state["step"]))
                if rule.locality == "element":
                    topo.local(p).add_(x, alpha=-g["lr"])
                    continue
                full = DTensor.from_local(x, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
                self.bytes_received += (full.numel() - x.numel()) * 4
                info = opt.infos[name]
                rows, n = view_2d_shape(tuple(p.shape))
                full2d = full.reshape(rows, n)
                out = torch.empty_like(full2d)
                for spec in group_unit_specs(info, g):
                    jobs.append(MatrixJob(full2d[spec.row_start:spec.row_stop], spec, rule, g, permuted_axis(info),
                                          info.transposed))
                    targets.append((out, spec))
                targets.append(("apply", p, out, g, x.shape))
        results, self.polar_flops = run_jobs(jobs)
        ti = 0
        for t in targets:
            if t[0] == "apply":
                _, p, out, g, local_shape = t
                local = topo.local(p)
                layout = topo.layout(p)
                (a, b), = layout.holdings[topo.rank] or ((0, 0),)
                local.add_(out.reshape(-1)[a:b].reshape(local_shape), alpha=-g["lr"])
            else:
                out, spec = t
                out[spec.row_start:spec.row_stop] = results[ti]
                ti += 1


def floor_jobs(recipe: str = "symmetric", **overrides) -> list[MatrixJob]:
    """All whole-matrix jobs of the model under ``recipe``, whole and batched as the optimizer batches them."""
    model = build_model()
    opt = build_optimizer(model, recipe, **overrides)
    jobs = []
    for g in opt.param_groups:
        rule = get_rule(g["rule"])
        if rule.locality != "matrix":
            continue
        for name, p in zip(g["param_names"], g["params"]):
            info = opt.infos[name]
            rows, n = view_2d_shape(tuple(p.shape))
            x = grad_for(name, tuple(p.shape)).reshape(rows, n)
            for spec in group_unit_specs(info, g):
                jobs.append(MatrixJob(x[spec.row_start:spec.row_stop], spec, rule, g, permuted_axis(info), info.transposed))
    return jobs


def share_of(jobs: list[MatrixJob], rank: int, world_size: int) -> list[MatrixJob]:
    """This rank's jobs when the jobs are dealt longest-first to the least-loaded rank (as the
    planner deals units)."""
    costs = [sum(j.rule.polar_flops(*b.shape, j.group) for b in j.spec.blocks) for j in jobs]
    loads = [0] * world_size
    mine = []
    for cost, job in sorted(zip(costs, jobs), key=lambda cj: -cj[0]):
        r = loads.index(min(loads))
        loads[r] += cost
        if r == rank:
            mine.append(job)
    return mine


def worker(rank: int, world_size: int, repeats: int, tp: int = 1) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if tp > 1:
        mesh = init_device_mesh("cpu", (world_size // tp, tp), mesh_dim_names=("dp", "tp"))
    else:
        mesh = init_device_mesh("cpu", (world_size,))
    models, opts = {}, {}
    for kind in ("dist_spectral", "allgather", "adamw") if tp == 1 else ("dist_spectral", "adamw"):
        model = models[kind] = fsdp_model_with_grads(mesh)
        if kind == "adamw":
            opts[kind] = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        elif kind == "dist_spectral":
            opts[kind] = build_optimizer(model, "symmetric")
        else:
            opts[kind] = AllGatherBaseline(build_optimizer(model, "symmetric"))
    # The floor is measured here, in the same rounds: rank 0 alone runs every job while the
    # other ranks block in a barrier. A shared machine's speed drifts by 10-20 % over minutes,
    # so a floor taken minutes apart from the steps would move the ratio by as much.
    jobs = floor_jobs()  # on every rank: building an optimizer under a process group talks to the others
    run_floor = rank == 0
    share = share_of(jobs, rank, world_size)
    times = {k: [] for k in ("floor", "parallel", *opts)}
    flops = 0
    for r in range(repeats + 1):  # the first round warms up (plans, allocations)
        dist.barrier()
        t0 = time.perf_counter()
        if run_floor:
            _, flops = run_jobs(jobs)
        elapsed = time.perf_counter() - t0
        dist.barrier()
        if r:
            times["floor"].append(elapsed)
        elapsed = timed_across_ranks(lambda: run_jobs(share))
        if r:
            times["parallel"].append(elapsed)
        for kind, opt in opts.items():
            elapsed = timed_across_ranks(opt.step)
            if r:
                times[kind].append(elapsed)
    ds = opts["dist_spectral"].last_stats
    local_matrix_bytes = sum(opts["dist_spectral"].topology.local(p).numel() * 4
                             for g in opts["dist_spectral"].param_groups if get_rule(g["rule"]).locality == "matrix"
                             for p in g["params"])
    ag = opts.get("allgather")
    return {"times": times, "single_flops": flops, "ds_sent": ds.bytes_sent, "ds_received": ds.bytes_received,
            "ds_flops": ds.polar_flops, "ds_exchange": ds.exchange_seconds, "ds_compute": ds.compute_seconds,
            "ag_received": ag.bytes_received if ag else None, "ag_flops": ag.polar_flops if ag else None,
            "local_matrix_bytes": local_matrix_bytes}


def planned_bytes(world_size: int, tp: int) -> list[int]:
    """Bytes each rank sends to owners per step as ``dist-spectral plan --tp`` predicts them, on ``meta``."""
    from dist_spectral.planner import Parallel, simulate_step

    with torch.device("meta"):
        model = build_model()
    sim = simulate_step(model, Parallel(world_size, tensor_parallel=tp), "symmetric")
    return [sim.bytes_sent(r, "gather") for r in range(world_size)]


def opts_kinds(res) -> list[str]:
    return [k for k in res[0]["times"] if k not in ("floor", "parallel")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4", help="world sizes of the FSDP2 rows")
    parser.add_argument("--tp-worlds", default="4", help="world sizes of the dp × tp 2 rows ('' for none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "step.md"))
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    machine = machine_lines()
    rows = []
    layouts = [(int(w), 1) for w in args.worlds.split(",") if w] + [(int(w), 2) for w in args.tp_worlds.split(",") if w]
    for W, tp in layouts:
        res = run_world(W, worker, args.repeats, tp)
        share = min(W, cores)
        floor_times = res[0]["times"]["floor"]
        floors = [t / share for t in floor_times]
        floor = statistics.median(floors)
        single_flops = res[0]["single_flops"]
        step = {k: [max(r["times"][k][i] for r in res) for i in range(args.repeats)] for k in opts_kinds(res)}
        med = {k: statistics.median(v) for k, v in step.items()}
        paired = {k: [t / f for t, f in zip(step[k], floors)] for k in step if k != "adamw"}
        parallel = [max(r["times"]["parallel"][i] for r in res) for i in range(args.repeats)]
        over_parallel = [t / p for t, p in zip(step["dist_spectral"], parallel)]
        scaling = [p / f for p, f in zip(parallel, floors)]
        sent = [r["ds_sent"]["gather"] for r in res]
        planned = planned_bytes(W, tp)
        local = [r["local_matrix_bytes"] for r in res]
        expected = [2 * (W - 1) / W * b / 2 for b in local]  # one way: (W−1)/W of the local bytes
        rows.append({
            "W": W, "layout": "FSDP2" if tp == 1 else f"dp {W // tp} × tp {tp}", "floor": floor, "floor_times": floor_times, "single_flops": single_flops, "step": step,
            "med": med, "ratio": statistics.median(paired["dist_spectral"]), "paired": paired["dist_spectral"],
            "ratio_ag": statistics.median(paired["allgather"]) if "allgather" in paired else None, "parallel": parallel,
            "over_parallel": over_parallel, "scaling": scaling,
            "flops_ds": sum(r["ds_flops"] for r in res),
            "flops_ag": sum(r["ag_flops"] for r in res) if tp == 1 else None,
            "sent": sent, "planned": planned, "expected": expected, "ag_received": [r["ag_received"] for r in res],
            "colsum": [r["ds_sent"]["colsum"] for r in res],
            "exchange": statistics.median(r["ds_exchange"] for r in res),
            "compute": statistics.median(r["ds_compute"] for r in res),
        })
        row = rows[-1]
        ag = (f"all-gather {summary(step['allgather'], '.3f')} s ({row['ratio_ag']:.2f}×), " if tp == 1 else "")
        print(f"W={W} {row['layout']}: dist_spectral {summary(step['dist_spectral'], '.3f')} s ({row['ratio']:.2f}× floor), "
              f"{ag}AdamW {summary(step['adamw'], '.4f')} s; floor {floor:.3f} s; parallel floor "
              f"{summary(row['parallel'], '.3f')} s, (a) / that {statistics.median(row['over_parallel']):.2f}")
    lines = ["# Optimizer step under FSDP2 and FSDP2 × TP (CPU, gloo)", "",
             f"Command: `python {' '.join(shlex.quote(a) for a in ['benchmarks/step.py'] + (argv or sys.argv[1:]))}`", "",
             f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}", "", "Machine:", "", *machine, "",
             f"Model: OLMoE architecture from `transformers`, {MODEL['num_hidden_layers']} layers, width "
             f"{MODEL['hidden_size']}, {MODEL['num_experts']} experts of {MODEL['intermediate_size']}, vocab "
             f"{MODEL['vocab_size']}; FSDP2 per layer, or dp × tp: tensor parallel over tp = 2 as torchtitan "
             "parallelises it (attention, embedding, LM head, each expert cut over tp) under FSDP2 over dp; recipe `symmetric` (per-head Muon attention, per-expert Muon, "
             "left-spectral router, row-norm embedding, centred row-norm head). One thread per rank.", "",
             f"Repeats: {args.repeats} rounds after one warm-up round. Each round times, one after the other, the "
             "compute floor and the three optimizers; a step's time is the slowest rank's (barrier before and after). "
             "Cells: median (min–max) seconds.", "",
             "Compute floor: the orthogonalisation of the whole model (every whole-matrix job, batched as the optimizer "
             "batches them, one thread) run by rank 0 alone while the other ranks wait in a barrier, divided by "
             f"min(W, {cores} cores). It is measured in every round because this shared machine's speed drifts by "
             "10–20 % over minutes; a (x) / floor cell is the median over rounds of that round's ratio.", "",
             "| W | layout | floor: one process s | GFLOP | floor s | (a) dist_spectral s | (a) / floor | (b) all-gather s | "
             "(b) / floor | (c) AdamW s | exchange s | compute s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ag = (f"{summary(r['step']['allgather'], '.3f')} | {r['ratio_ag']:.2f}" if r["ratio_ag"] is not None else "— | —")
        lines.append(f"| {r['W']} | {r['layout']} | {summary(r['floor_times'], '.3f')} | {r['single_flops'] / 1e9:.2f} | "
                     f"{r['floor']:.3f} | {summary(r['step']['dist_spectral'], '.3f')} | {r['ratio']:.2f} "
                     f"({min(r['paired']):.2f}–{max(r['paired']):.2f}) | {ag} | {summary(r['step']['adamw'], '.4f')} | "
                     f"{r['exchange']:.3f} | {r['compute']:.3f} |")
    lines += ["", "Bytes per rank and step (whole-matrix roles; row-norm roles move only the centring all-reduce):", "",
              "| W | layout | rank | (a) sent to owners | planned (`dist-spectral plan`) | (W−1)/W × local matrix bytes | "
              "(a) / that | (a) centring all-reduce | (b) all-gather received |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for rank, (s, p, e, c, ag) in enumerate(zip(r["sent"], r["planned"], r["expected"], r["colsum"], r["ag_received"])):
            lines.append(f"| {r['W']} | {r['layout']} | {rank} | {s:,} | {p:,} | {int(e):,} | "
                         f"{s / e if e else float('nan'):.3f} | {c:,} | {'—' if ag is None else f'{ag:,}'} |")
    lines += ["", "Polar flops summed over ranks (a: each unit once; b: every rank does all):", "",
              "| W | layout | single process | (a) | (b) |", "|---|---|---|---|---|"]
    for r in rows:
        ag = "—" if r["flops_ag"] is None else f"{r['flops_ag'] / 1e9:.2f} G"
        lines.append(f"| {r['W']} | {r['layout']} | {r['single_flops'] / 1e9:.2f} G | {r['flops_ds'] / 1e9:.2f} G | {ag} |")
    lines += ["", "What the floor assumes: that W processes on min(W, cores) cores run the same math that much "
              "faster. The parallel floor measures it: in every round each rank runs its longest-first share of the "
              "same jobs (balanced as the planner balances units) at the same time as the others, with no "
              "communication and no optimizer. (a) / parallel floor is then the optimizer's own overhead: exchange, "
              "momentum, packing, row rules, waiting.", "",
              "| W | layout | parallel floor s | parallel / floor (the machine's scaling) | (a) / parallel floor |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['W']} | {r['layout']} | {summary(r['parallel'], '.3f')} | {statistics.median(r['scaling']):.2f} "
                     f"({min(r['scaling']):.2f}–{max(r['scaling']):.2f}) | {statistics.median(r['over_parallel']):.2f} "
                     f"({min(r['over_parallel']):.2f}–{max(r['over_parallel']):.2f}) |")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
