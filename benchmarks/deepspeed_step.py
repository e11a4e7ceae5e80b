"""Whole training iterations under DeepSpeed ZeRO-2/3 on CPU: dist_spectral vs DeepSpeed's Muon vs AdamW.

    python benchmarks/deepspeed_step.py              # W = 2, ZeRO-2 and 3, writes benchmarks/results/deepspeed.md

The MoE model of benchmarks/step.py (OLMoE architecture, 4 layers, width 256, 8 experts), W gloo
processes with one thread each, one fixed batch per rank. Kinds, all engines alive in one process
group and timed interleaved, repeat by repeat:

    ours_muon       dist_spectral.deepspeed.initialize, recipe `muon` (Muon on attention, MLP and
                    experts, AdamW elsewhere) with whole-matrix attention (per_head off) and each
                    expert's fused gate/up as one matrix (split_gate_up off), Gram Newton-Schulz
                    where it saves flops (polar_form gram): the same matrices and iteration form
                    as DeepSpeed's Muon
    ours_symmetric  the same, recipe `symmetric` (row-norm, left-spectral router, per-head Muon, ...)
    ds_muon         "optimizer": {"type": "Muon"}: DeepSpeed tags 2-D+ params not named embed/lm_head
                    with use_muon (so also the router); Gram Newton-Schulz, 5 steps; at ZeRO-1/2 it
                    orthogonalises every Muon param a rank's gradient partition touches while
                    partitioning gradients (duplicated on both ranks for a param cut by the partition
                    boundary, whose gradient is all-reduced instead of reduced); at ZeRO-3 (needs
                    reduce_scatter: false) it all-gathers the Muon gradients and momenta, each rank
                    orthogonalises a round-robin share, and all-gathers updates and momenta back
    ds_adamw        "optimizer": {"type": "AdamW", "params": {"torch_adam": true}}: the baseline

An iteration is forward + backward + engine.step(), between barriers; its wall time is the slowest
rank's, its CPU time (process_time) the largest rank's: on a shared machine CPU time is the steadier
measure. "Extra over AdamW" is computed per repeat (paired: same round, same machine load), then
summarised. A last table extends the flop comparison to W = 4, 8, 16 from the partition rules alone
(no processes): DeepSpeed's placement of Newton-Schulz work (read off its ZeRO metadata here, then
re-cut) against an LPT assignment of our units (what the planner does). Bytes are counted by
wrapping torch.distributed's collectives for one extra iteration
(per rank, sent, ring accounting: all_reduce 2(W-1)/W·S, reduce_scatter and all_gather (W-1)/W·S,
all_to_all_single what goes to other ranks). Polar flops: ours from SpectralOptimizer's count;
DeepSpeed's by wrapping its Newton-Schulz functions (calls and shapes), each distinct call then
measured with torch.utils.flop_counter (matmul flops, as ours).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import machine_lines, summary, write_results  # noqa: E402
from step import MODEL, build_model, floor_jobs, grad_for  # noqa: E402

KINDS = ("ours_muon", "ours_symmetric", "ds_muon", "ds_adamw")
RECIPES = {"ours_muon": ("muon", {"attention": {"per_head": False, "polar_form": "gram"},
                                  "mlp": {"split_gate_up": False, "polar_form": "gram"}}),
           "ours_symmetric": ("symmetric", {})}
MUON_LR, ADAM_LR, WD = 5e-3, 1e-2, 1e-3  # the `muon` recipe's values


# ------------------------------------------------------------------------------ counting hooks
class CommCounter:
    """Wraps torch.distributed collectives (before DeepSpeed binds them) and sums bytes per op while on."""

    OPS = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single", "broadcast",
           "reduce", "all_gather", "reduce_scatter", "all_reduce_coalesced", "_all_gather_base",
           "_reduce_scatter_base")

    def __init__(self):
        self.on = False
        self.bytes: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        import torch.distributed as dist

        for op in self.OPS:
            if hasattr(dist, op):
                setattr(dist, op, self._wrap(op, getattr(dist, op)))

    def _wrap(self, op, fn):
        import torch.distributed as dist

        def counted(*args, **kwargs):
            if self.on:
                self.bytes[op] += self._sent(op, args, kwargs, dist)
            return fn(*args, **kwargs)

        return counted

    @staticmethod
    def _sent(op, args, kwargs, dist) -> int:
        group = kwargs.get("group")
        w = dist.get_world_size(group=group)
        rank = dist.get_rank(group=group)

        def nbytes(t):
            return t.numel() * t.element_size()

        first = args[0] if args else next(iter(kwargs.values()))
        if op in ("all_reduce",):
            t = kwargs.get("tensor", first)
            return 2 * (w - 1) * nbytes(t) // w
        if op in ("all_reduce_coalesced",):
            ts = kwargs.get("tensors", first)
            return 2 * (w - 1) * sum(nbytes(t) for t in ts) // w
        if op in ("reduce_scatter_tensor", "_reduce_scatter_base"):
            t = kwargs.get("input", args[1] if len(args) > 1 else None)
            return (w - 1) * nbytes(t) // w
        if op in ("all_gather_into_tensor", "_all_gather_base"):
            t = kwargs.get("output_tensor", first)
            return (w - 1) * nbytes(t) // w
        if op == "all_gather":
            t = kwargs.get("tensor", args[1] if len(args) > 1 else None)
            return (w - 1) * nbytes(t)
        if op == "reduce_scatter":
            ts = kwargs.get("input_list", args[1] if len(args) > 1 else [])
            return sum(nbytes(t) for i, t in enumerate(ts) if i != rank)
        if op == "all_to_all_single":
            t = kwargs.get("input", args[1] if len(args) > 1 else None)
            splits = kwargs.get("input_split_sizes", args[3] if len(args) > 3 else None)
            row = nbytes(t) // max(1, t.shape[0]) if t.dim() else t.element_size()
            if not splits:
                return (w - 1) * nbytes(t) // w
            return sum(s for i, s in enumerate(splits) if i != rank) * row
        if op == "broadcast":
            t = kwargs.get("tensor", first)
            src = kwargs.get("src", args[1] if len(args) > 1 else 0)
            return nbytes(t) * (w - 1) if dist.get_rank() == src else 0
        if op == "reduce":
            t = kwargs.get("tensor", first)
            dst = kwargs.get("dst", args[1] if len(args) > 1 else 0)
            return 0 if dist.get_rank() == dst else nbytes(t)
        return 0


class NSCounter:
    """Wraps DeepSpeed's Newton-Schulz functions: calls (name, shape, steps) and time inside them."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, int]] = []
        self.seconds = 0.0
        self.originals = {}

    def install(self) -> None:
        from deepspeed.runtime.zero.muon import original_muon as om

        for name in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"):
            fn = getattr(om, name)
            self.originals[name] = fn
            setattr(om, name, self._wrap(name, fn))  # muon_update looks them up at call time

    def _wrap(self, name, fn):
        def counted(G, steps):
            t0 = time.perf_counter()
            out = fn(G, steps)
            self.seconds += time.perf_counter() - t0
            self.calls.append((name, tuple(G.shape), int(steps)))
            return out

        return counted

    def flops(self, calls) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        cache, total = {}, 0
        for key in calls:
            if key not in cache:
                name, shape, steps = key
                counter = FlopCounterMode(display=False)
                with counter:
                    self.originals[name](torch.randn(shape), steps)
                cache[key] = counter.get_total_flops()
            total += cache[key]
        return total


# ------------------------------------------------------------------------------------- worker
def ds_config(kind: str, stage: int, micro: int) -> dict:
    zero = {"stage": stage}
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
           "steps_per_print": 10 ** 9, "zero_optimization": zero}
    if kind == "ds_muon":
        cfg["optimizer"] = {"type": "Muon", "params": {"lr": MUON_LR, "adam_lr": ADAM_LR, "momentum": 0.95,
                                                       "weight_decay": WD, "betas": [0.9, 0.95], "eps": 1e-8,
                                                       "torch_adam": True}}
        if stage == 3:
            zero["reduce_scatter"] = False  # DeepSpeed: "Muon and reduce scatter cannot be used together"
    elif kind == "ds_adamw":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": ADAM_LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                        "weight_decay": WD, "torch_adam": True}}
    return cfg


def worker(out_dir: str, stages: list[int], repeats: int, micro: int, seq: int) -> None:
    comm = CommCounter()
    comm.install()  # before DeepSpeed binds all_gather_into_tensor / reduce_scatter_tensor
    import deepspeed
    import torch.distributed as dist

    import dist_spectral
    import dist_spectral.deepspeed  # noqa: F401  (the submodule; not imported by the package)
    from dist_spectral.stats import StepStats

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(minutes=20))
    rank = dist.get_rank()
    ns = NSCounter()
    ns.install()
    ids = torch.randint(0, MODEL["vocab_size"], (micro, seq), generator=torch.Generator().manual_seed(rank))

    engines, ours = {}, {}
    for stage in stages:
        for kind in KINDS:
            model = build_model(seed=0)
            if kind.startswith("ours"):
                recipe, overrides = RECIPES[kind]
                opt = dist_spectral.build_optimizer(model, recipe, **overrides)
                engine, _, _, _ = dist_spectral.deepspeed.initialize(model=model, optimizer=opt,
                                                                     config=ds_config(kind, stage, micro))
                calls = {"stats": StepStats()}
                opt.register_step_post_hook(lambda o, a, k, _c=calls: _c["stats"].add(o.last_stats))
                ours[(stage, kind)] = (opt, calls)
            else:
                engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                       config=ds_config(kind, stage, micro))
            engines[(stage, kind)] = engine

    def iteration(key):
        engine = engines[key]
        if key in ours:
            ours[key][1]["stats"] = StepStats()
            flops0 = ours[key][0].total_polar_flops
        ns.calls, ns.seconds = [], 0.0
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2, c2 = time.perf_counter(), time.process_time()
        dist.barrier()
        t3 = time.perf_counter()
        rec = {"iter_s": t3 - t0, "engine_step_s": t2 - t1, "fwd_bwd_s": t1 - t0, "cpu_s": c2 - c0, "loss": loss.item()}
        if key in ours:
            s = ours[key][1]["stats"]
            rec.update(opt_s=s.step_seconds, exchange_s=s.exchange_seconds, compute_s=s.compute_seconds,
                       bytes_sent=dict(s.bytes_sent), polar_flops=ours[key][0].total_polar_flops - flops0)
        if key[1] == "ds_muon":
            rec.update(ns_s=ns.seconds, ns_calls=list(ns.calls))
        return rec

    placement = ds_muon_placement(engines, stages, ns) if rank == 0 else None
    times = {f"{s}/{k}": [] for s, k in engines}
    for r in range(repeats + 1):  # round 0 warms up (plans, buffers, first-touch allocations)
        for key in engines:
            rec = iteration(key)
            if r:
                times[f"{key[0]}/{key[1]}"].append(rec)
    counted = {}
    for key in engines:  # one more iteration each, collectives counted
        comm.bytes.clear()
        comm.on = True
        rec = iteration(key)
        comm.on = False
        counted[f"{key[0]}/{key[1]}"] = {"comm": dict(comm.bytes), **rec}
    for rec in counted.values():
        if "ns_calls" in rec:
            rec["ns_flops"] = ns.flops(rec["ns_calls"])
            rec["ns_calls"] = len(rec["ns_calls"])
    for recs in times.values():
        for rec in recs:
            rec.pop("ns_calls", None)
    with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
        json.dump({"times": times, "counted": counted, "placement": placement}, f)
    dist.barrier()
    dist.destroy_process_group()


def ds_muon_placement(engines, stages, ns) -> dict:
    """DeepSpeed Muon's flats: for each, whether it is the Muon group, its params in flat order with
    numel and the flops of one Newton-Schulz call on the param (what muon_update runs on it)."""
    from dist_spectral.engines.zero_map import build_zero_map

    out, flops = {}, {}
    for stage in stages:
        engine = engines[(stage, "ds_muon")]
        zmap = build_zero_map(engine, list(engine.module.named_parameters()))
        groups = engine.optimizer.optimizer.param_groups  # MuonWithAuxAdam's, in DeepSpeed's group order
        flats = []
        for f in zmap.flats:
            muon = bool(groups[f.group_index].get("use_muon", False))
            params = []
            for i in f.param_indices:
                shape = zmap.shapes[i]
                if muon and shape not in flops:
                    flops[shape] = ns.flops([("zeropower_via_gram_newtonschulz", shape, 5)])
                params.append([zmap.names[i], math.prod(shape), flops[shape] if muon else 0])
            flats.append({"muon": muon, "params": params})
        out[str(stage)] = flats
    return out


def simulate(placement: dict, stage: int, W: int) -> list[int]:
    """Per-rank Newton-Schulz flops of DeepSpeed's Muon at W ranks. ZeRO-1/2: a rank orthogonalises
    every Muon param its flat partition touches (buffer padded to 2W, cut in W). ZeRO-3: in each
    sub-group, rank r takes params r, r+W, r+2W, ..."""
    from dist_spectral.engines.zero_map import flat_buffer_partitions

    per = [0] * W
    for flat in placement[str(stage)]:
        if not flat["muon"]:
            continue
        params = flat["params"]
        if stage == 3:
            for j, (_, _, f) in enumerate(params):
                per[j % W] += f
            continue
        entries, off = [], 0
        for j, (name, n, _) in enumerate(params):
            entries.append((name, j, off, n))
            off += n
        parts = flat_buffer_partitions(entries, -(-off // (2 * W)) * 2 * W, W)
        for r, part in enumerate(parts):
            per[r] += sum(params[j][2] for j in {seg.param_index for seg in part.segments})
    return per


def our_units(kind: str) -> list[tuple[int, int]]:
    """(estimated cost, polar flops) of each unit of work (a matrix, an expert, a head block) of ours."""
    import dist_spectral
    from dist_spectral.route import plan_param
    from dist_spectral.rules import get_rule

    recipe, overrides = RECIPES[kind]
    opt = dist_spectral.build_optimizer(build_model(seed=0), recipe, **overrides)
    units = []
    for g in opt.param_groups:
        if get_rule(g["rule"]).locality != "matrix":
            continue
        for pos, name in enumerate(g["param_names"]):
            pp = plan_param(pos, name, opt.infos[name], g, None)
            units += list(zip(pp.unit_costs, pp.unit_polar_flops))
    return units


def lpt(units: list[tuple[int, int]], W: int) -> list[int]:
    """Flops per rank when units go, costliest first, to the least-loaded rank (by cost)."""
    cost, flops = [0] * W, [0] * W
    for c, f in sorted(units, reverse=True):
        r = cost.index(min(cost))
        cost[r] += c
        flops[r] += f
    return flops


# ------------------------------------------------------------------------------------- parent
def single_process_floors(muon_names: set[str], repeats: int) -> dict[str, list[float]]:
    """One thread, one process, nothing else running: the orthogonalisation each optimizer does per
    iteration, whole. DeepSpeed's Muon: its own Gram Newton-Schulz, once per Muon param (as it calls
    it); ours: every whole-matrix job of the recipe, batched as our optimizer batches them.
    Interleaved repeat by repeat (seconds per repeat)."""
    from deepspeed.runtime.zero.muon.original_muon import zeropower_via_gram_newtonschulz

    from dist_spectral.compute import run_jobs

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    grads = [grad_for(n, tuple(p.shape)) for n, p in build_model(seed=0).named_parameters() if n in muon_names]
    work = {"ds_muon": lambda: [zeropower_via_gram_newtonschulz(g, 5) for g in grads]}
    for kind, (recipe, overrides) in RECIPES.items():
        jobs = floor_jobs(recipe, **overrides)
        work[kind] = lambda jobs=jobs: run_jobs(jobs)
    times = {k: [] for k in work}
    for r in range(repeats + 1):
        for kind, fn in work.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[kind].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], out_dir: str, timeout_s: float) -> list[dict]:
    bindir = Path(sys.executable).parent
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "dist_spectral" / "torch_extensions")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=ext, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))
    procs = []
    for rank in range(world):
        log = open(Path(out_dir) / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", out_dir, *args],
                                       env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=log,
                                       stderr=subprocess.STDOUT), log))
    deadline = time.time() + timeout_s
    for p, log in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    failed = [r for r, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} ---\n" + (Path(out_dir) / f"rank{r}.log").read_text()[-4000:] for r in failed)
        raise RuntimeError(f"ranks {failed} failed:\n{tails}")
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]


def mb(x: float) -> str:
    return f"{x / 2 ** 20:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--micro", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=str(HERE / "results" / "deepspeed.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    stages = [int(s) for s in args.stages.split(",")]
    command = list(argv if argv is not None else sys.argv[1:])
    if args.worker:
        worker(args.worker, stages, args.repeats, args.micro, args.seq)
        return
    machine = machine_lines()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = launch(args.world, ["--stages", args.stages, "--repeats", str(args.repeats), "--micro",
                                  str(args.micro), "--seq", str(args.seq)], tmp, timeout_s=3600)
    wall = time.time() - t_start
    load_end = os.getloadavg()[0]
    W = args.world
    muon_names = {name for flat in res[0]["placement"][str(stages[0])] if flat["muon"] for name, _, _ in flat["params"]}
    floors = single_process_floors(muon_names, args.repeats)

    def series(key, field, reduce=max):  # per repeat, over ranks
        return [reduce(r["times"][key][i][field] for r in res) for i in range(args.repeats)]

    lines = ["# DeepSpeed ZeRO: whole iterations, dist_spectral vs DeepSpeed's Muon vs AdamW (CPU, gloo)", "",
             f"Command: `python {' '.join(shlex.quote(a) for a in ['benchmarks/deepspeed_step.py'] + command)}`",
             "", f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}; wall time {wall:.0f} s", "",
             "Machine:", "", *machine, f"- load average (1 min) at the end: {load_end:.2f}", "",
             f"Model: benchmarks/step.py's OLMoE ({MODEL['num_hidden_layers']} layers, width {MODEL['hidden_size']}, "
             f"{MODEL['num_experts']} experts of {MODEL['intermediate_size']}, vocab {MODEL['vocab_size']}), fp32. "
             f"W = {W} gloo processes, one thread each; {args.micro} × {args.seq} tokens per rank per iteration, "
             "no gradient accumulation, no clipping.", "",
             f"Repeats: {args.repeats} timed iterations after one warm-up, all kinds interleaved in every round; "
             "an iteration's time is the slowest rank's. Cells: median (min–max).", ""]
    import deepspeed

    lines[lines.index("Machine:") + 2:lines.index("Machine:") + 2] = [f"- deepspeed {deepspeed.__version__}"]
    lines += ["| ZeRO | kind | iteration s | forward+backward s | engine.step() s | our optimizer step s "
              "(exchange / compute) | extra over AdamW s |", "|---|---|---|---|---|---|---|"]
    summary_rows = {}
    for stage in stages:
        base = series(f"{stage}/ds_adamw", "iter_s")
        for kind in KINDS:
            key = f"{stage}/{kind}"
            it = series(key, "iter_s")
            fb = series(key, "fwd_bwd_s")
            st = series(key, "engine_step_s")
            extra = [a - b for a, b in zip(it, base)]
            summary_rows[key] = extra
            opt = "–"
            if kind.startswith("ours"):
                o = series(key, "opt_s")
                ex = statistics.median(series(key, "exchange_s"))
                co = statistics.median(series(key, "compute_s"))
                opt = f"{summary(o, '.3f')} ({ex:.3f} / {co:.3f})"
            elif kind == "ds_muon":
                ns = series(key, "ns_s")
                opt = f"(Newton–Schulz inside: {summary(ns, '.3f')})"
            lines.append(f"| {stage} | {kind} | {summary(it, '.3f')} | {summary(fb, '.3f')} | {summary(st, '.3f')} | "
                         f"{opt} | {summary(extra, '.3f') if kind != 'ds_adamw' else '–'} |")
    lines += ["", "Extra time per iteration over AdamW, ours / DeepSpeed's Muon (target ≤ 0.7). The ratio of the "
              "paired medians; in brackets the ratio's range over repeats (repeat i of ours over repeat i of "
              "DeepSpeed's):", "", "| ZeRO | ours `muon` / DS Muon | ours `symmetric` / DS Muon |", "|---|---|---|"]
    ratios = {}
    for stage in stages:
        ds = summary_rows[f"{stage}/ds_muon"]
        cells = []
        for kind in ("ours_muon", "ours_symmetric"):
            mine = summary_rows[f"{stage}/{kind}"]
            ratio = statistics.median(mine) / statistics.median(ds)
            per = [a / b for a, b in zip(mine, ds) if b > 0]
            ratios[(stage, kind)] = ratio
            cells.append(f"{ratio:.2f} ({min(per):.2f}–{max(per):.2f})" if per else f"{ratio:.2f}")
        lines.append(f"| {stage} | {cells[0]} | {cells[1]} |")
    lines += ["", "The same in CPU seconds (`time.process_time()` of each rank over forward + backward + "
              "engine.step(), max over ranks, paired per repeat): on this shared machine it is far less "
              "sensitive to other jobs than wall time, and it is the cost the two optimizers put on a rank.", "",
              "| ZeRO | kind | CPU s per iteration | extra over AdamW CPU s | extra / DS Muon's extra |",
              "|---|---|---|---|---|"]
    cpu_ratios = {}
    for stage in stages:
        base = series(f"{stage}/ds_adamw", "cpu_s")
        ds_extra = [a - b for a, b in zip(series(f"{stage}/ds_muon", "cpu_s"), base)]
        for kind in KINDS:
            cpu = series(f"{stage}/{kind}", "cpu_s")
            extra = [a - b for a, b in zip(cpu, base)]
            ratio = statistics.median(extra) / statistics.median(ds_extra)
            if kind.startswith("ours"):
                cpu_ratios[(stage, kind)] = ratio
            lines.append(f"| {stage} | {kind} | {summary(cpu, '.3f')} | "
                         + (f"{summary(extra, '.3f')} | {ratio:.2f} |" if kind != "ds_adamw" else "– | – |"))
    lines += ["", "Bytes per rank and iteration, all collectives (forward, backward and step), counted on one extra "
              "iteration; MiB sent per rank, max over ranks. \"extra\" is over AdamW at the same stage:", "",
              "| ZeRO | kind | all_reduce | reduce_scatter | all_gather | all_to_all | other | total | extra | "
              "ours: exchange to owners + back, row statistics |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stage in stages:
        base_total = max(sum(r["counted"][f"{stage}/ds_adamw"]["comm"].values()) for r in res)
        for kind in KINDS:
            key = f"{stage}/{kind}"
            per_op = defaultdict(int)
            for r in res:
                for op, b in r["counted"][key]["comm"].items():
                    per_op[op] = max(per_op[op], b)
            groups = {"all_reduce": ("all_reduce", "all_reduce_coalesced"),
                      "reduce_scatter": ("reduce_scatter_tensor", "reduce_scatter", "_reduce_scatter_base"),
                      "all_gather": ("all_gather_into_tensor", "all_gather", "_all_gather_base"),
                      "all_to_all": ("all_to_all_single",)}
            cols = {g: sum(per_op[o] for o in ops) for g, ops in groups.items()}
            other = sum(per_op.values()) - sum(cols.values())
            total = max(sum(r["counted"][key]["comm"].values()) for r in res)
            ours_b = "–"
            if kind.startswith("ours"):
                b = [r["counted"][key]["bytes_sent"] for r in res]
                ours_b = " / ".join(f"r{i}: {(x.get('gather', 0) + x.get('scatter', 0)) / 1024:.1f} KiB + "
                                    f"{x.get('colsum', 0) / 1024:.1f} KiB" for i, x in enumerate(b))
            lines.append(f"| {stage} | {kind} | " + " | ".join(mb(cols[g]) for g in groups) + f" | {mb(other)} | "
                         f"{mb(total)} | {mb(total - base_total) if kind != 'ds_adamw' else '–'} | {ours_b} |")
    muon_elems = sum(n for flat in res[0]["placement"][str(stages[0])] if flat["muon"] for _, n, _ in flat["params"])
    lines += ["", "What DeepSpeed's Muon moves (from its 0.19.8 source; the table above measures it). ZeRO-1/2: no "
              "collective of its own; a Muon param cut by a partition boundary has its gradient all-reduced instead "
              "of reduced to one rank (on CPU/gloo 0.19.8 all-reduces every gradient bucket for every optimizer, so "
              "the bytes equal AdamW's here). ZeRO-3 (`reduce_scatter: false`, required): gradients all-reduced "
              "instead of reduce-scattered, then per sub-group all-gathers of the Muon gradients and momenta, each "
              "rank orthogonalises a round-robin share, and all-gathers of the updates and momenta: 4 all-gathers of "
              f"all Muon params, 4·(W−1)/W·4 B × {muon_elems:,} Muon elements = "
              f"{mb(4 * (W - 1) / W * 4 * muon_elems)} MiB per rank. Ours: one all_to_all_single each way of the "
              "pieces of matrices whose owner is another rank, plus small all-reduces for row statistics.",
              "", "Polar / Newton–Schulz flops per iteration (GFLOP; per rank, and summed over ranks). Ours: Polar "
              "Express, 5 steps, `steps·(4s²l + 2s³)` per matrix; DeepSpeed: Gram Newton–Schulz, 5 steps, counted "
              "with torch.utils.flop_counter (its Gram form needs fewer flops on rectangular matrices):", "",
              "| ZeRO | kind | per rank | sum over ranks | Newton–Schulz calls per rank |", "|---|---|---|---|---|"]
    for stage in stages:
        for kind in ("ours_muon", "ours_symmetric", "ds_muon"):
            key = f"{stage}/{kind}"
            field = "ns_flops" if kind == "ds_muon" else "polar_flops"
            per = [r["counted"][key][field] for r in res]
            calls = " / ".join(str(r["counted"][key]["ns_calls"]) for r in res) if kind == "ds_muon" else "–"
            lines.append(f"| {stage} | {kind} | {' / '.join(f'{f / 1e9:.2f}' for f in per)} | {sum(per) / 1e9:.2f} | "
                         f"{calls} |")
    cores = min(W, os.cpu_count() or 1)
    lines += ["", "Extra over AdamW against each optimizer's own compute floor: its orthogonalisation work per "
              "iteration run whole in one process on one thread (DeepSpeed's Muon: its Gram Newton–Schulz once per "
              "Muon param; ours: every whole-matrix job, batched), measured after the runs with nothing else "
              f"running, interleaved, divided by min(W, cores) = {cores}. The issue that set the 0.7× target assumed "
              "DeepSpeed's Muon adds 1.6× this floor at ZeRO-2; a ratio near 1 means it has little overhead to "
              "beat.", "", "| kind | single process s | floor s | ZeRO | extra / floor (wall) | extra / floor (CPU) |",
              "|---|---|---|---|---|---|"]
    for kind in ("ds_muon", "ours_muon", "ours_symmetric"):
        floor = statistics.median(floors[kind]) / cores
        for stage in stages:
            cpu_extra = [a - b for a, b in zip(series(f"{stage}/{kind}", "cpu_s"), series(f"{stage}/ds_adamw", "cpu_s"))]
            lines.append(f"| {kind} | {summary(floors[kind], '.3f')} | {floor:.3f} | {stage} | "
                         f"{statistics.median(summary_rows[f'{stage}/{kind}']) / floor:.2f} | "
                         f"{statistics.median(cpu_extra) / floor:.2f} |")
    placement = res[0]["placement"]
    measured = {(stage, kind): max(r["counted"][f"{stage}/{kind}"]["ns_flops" if kind == "ds_muon" else "polar_flops"]
                                   for r in res) for stage in stages for kind in ("ours_muon", "ds_muon")}
    units = our_units("ours_muon")
    lines += ["", "Flops at more ranks (computed, not measured: the partition rules above applied to this model; "
              "busiest rank's GFLOP per iteration, Newton–Schulz / polar only). At W = " + str(W) + " the "
              "simulation is checked against the measurement (in brackets). Ours: LPT over our units (recipe "
              "`muon`, whole-matrix attention, fused gate/up whole), which is what the planner does. DeepSpeed ZeRO-1/2: every rank "
              "orthogonalises each Muon param its flat partition touches; ZeRO-3: round-robin by param.", "",
              "| W | ours (LPT) | DS Muon ZeRO-1/2 | ours / DS | DS Muon ZeRO-3 | ours / DS |", "|---|---|---|---|---|---|"]
    for w in sorted({W, 4, 8, 16}):
        ours_max = max(lpt(units, w))
        cells = [f"{ours_max / 1e9:.2f}" + (f" ({measured[(stages[0], 'ours_muon')] / 1e9:.2f})" if w == W else "")]
        for stage in (2, 3):
            if str(stage) not in placement:
                cells += ["–", "–"]
                continue
            ds_max = max(simulate(placement, stage, w))
            check = f" ({measured[(stage, 'ds_muon')] / 1e9:.2f})" if w == W else ""
            cells += [f"{ds_max / 1e9:.2f}{check}", f"{ours_max / ds_max:.2f}"]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    write_results(args.out, lines)  # keeps a "## Notes (by hand)" section
    for (stage, kind), ratio in ratios.items():
        print(f"ZeRO-{stage} {kind}: extra over AdamW = {ratio:.2f} x DeepSpeed Muon's (wall), "
              f"{cpu_ratios[(stage, kind)]:.2f} x (CPU time)")


if __name__ == "__main__":
    main()
