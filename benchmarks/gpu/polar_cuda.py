"""Batched polar on one GPU: TFLOP/s against the measured matmul peak, on real model shapes.

    python benchmarks/gpu/polar_cuda.py --out polar_gpu.md              # on a CUDA machine
    python benchmarks/gpu/polar_cuda.py --device cpu --quick --out x.md # the same code path, tiny, on CPU

Shapes: 4096×4096, and every block shape polar runs for the presets' models (OLMoE-1B-7B,
Qwen3-30B-A3B, DeepSeek-V3: experts' gate/up and down, per-head attention blocks, dense MLPs,
DeepSeek's low-rank projections), read off the plan ``dist-spectral plan`` builds on ``meta``
tensors (``symmetric`` recipe). Each is timed at the batch one owner runs at ``--world`` ranks
with ``--ep``-way expert parallelism (the blocks of that shape / world), capped at ``--max-mb`` of input.

Per shape, all on the same batch: ``polar`` TFLOP/s (by ``polar_flops``) with torch's GEMMs and
with the one-triangle kernel, as a share of the peak (``torch.matmul`` bf16 8192³ and 4096³, the
larger); the same GEMMs alone through ``torch.matmul`` (the ceiling polar's shapes allow); the
Triton Gram ``X Xᵀ`` and ``b A + c A²`` against cuBLAS (speed-up = cuBLAS time / best kernel
configuration time); and the choice the optimizer's rank 0 would install for the shape.
Median (min–max) of ``--repeats`` timings after a warm-up, CUDA events on the GPU.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import machine_lines, summary  # noqa: E402

from dist_spectral.functional import polar, polar_flops  # noqa: E402
from dist_spectral.kernels import choice, triton_available  # noqa: E402
from dist_spectral.kernels.triton_gram import _CONFIGS, _square_torch, syrk_torch, syrk_triton  # noqa: E402

PRESETS = ("olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v3")
QUICK_PRESETS = ("tiny-olmoe", "tiny-qwen3-moe", "tiny-deepseek-v3")
TARGET = 0.60  # of the measured matmul peak, at 4096²


def model_shapes(preset: str, world: int, ep: int) -> list[tuple[str, int, int, int]]:
    """(label, count, m, n) of every block shape with polar flops in the preset's plan."""
    from dist_spectral.models import build_model
    from dist_spectral.planner import Parallel, simulate_step

    sim = simulate_step(build_model(preset, device="meta"), Parallel(world, expert_parallel=ep), "symmetric")
    counts: dict[tuple, int] = collections.Counter()
    for unit in sim.plan.units:
        if unit.polar_flops <= 0:
            continue
        name = sim.plan.params[unit.param].name
        label = ".".join(p for p in name.split(".")[-2:] if not p.isdigit())
        for block in unit.spec.blocks:
            counts[(label, *block.shape)] += 1
    return [(label, count, m, n) for (label, m, n), count in sorted(counts.items(), key=lambda kv: -kv[1])]


def timer(device: torch.device, repeats: int):
    def run(fn) -> list[float]:
        fn()  # warm-up: compiles kernels, fills the allocator
        out = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return out

    return run


def matmul_peak(device, dtype, timed, quick: bool) -> dict[int, list[float]]:
    out = {}
    for n in ((256, 512) if quick else (4096, 8192)):
        a = torch.randn(n, n, device=device).to(dtype)
        out[n] = [2 * n**3 / t for t in timed(lambda: a @ a)]
        del a
    return out


def bench(label, count, m, n, batch, device, dtype, steps, timed, kernels: bool) -> dict:
    x = torch.randn(batch, m, n, device=device).to(dtype)
    flops = batch * polar_flops(m, n, steps)
    s, l = min(m, n), max(m, n)
    w = (x.mT if m > n else x).contiguous()
    w = w / torch.linalg.vector_norm(w.float(), dim=(-2, -1), keepdim=True).to(dtype)

    def gemms():
        for _ in range(steps):
            a = torch.matmul(w, w.mT)
            torch.matmul(torch.matmul(a, a), w)

    row = {"label": label, "count": count, "m": m, "n": n, "batch": batch, "flops": flops,
           "polar_torch": [flops / t for t in timed(lambda: polar(x, steps=steps, backend="torch"))],
           "gemms": [flops / t for t in timed(gemms)]}
    if kernels:
        row["polar_triton"] = [flops / t for t in timed(lambda: polar(x, steps=steps, backend="triton"))]
        a = torch.bmm(w, w.mT)
        for name, fallback, args in (("gram", syrk_torch, (w, 1.0, 0.0, None)), ("square", _square_torch, (a, 0.25, -1.5, a))):
            base = statistics.median(timed(lambda: fallback(*args)))
            best = min(statistics.median(timed(lambda: syrk_triton(*args, config=cfg))) for cfg in _CONFIGS)
            row[f"{name}_speedup"] = base / best
        row["choice"] = {"gram": "n/a", "square": "n/a"}
        if device.type == "cuda":  # the timing itself needs CUDA (a CPU dry run checks the rest)
            keys = {choice.key("gram", s, l, dtype): batch, choice.key("square", s, s, dtype): batch}
            row["choice"] = {k[0]: v for k, v in choice.measure(keys, device).items()}
    del x, w
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def report(rows, peak, device, args, started) -> list[str]:
    top = max(statistics.median(v) for v in peak.values())
    unit = 1e12 if device.type == "cuda" else 1e9
    u = "TFLOP/s" if device.type == "cuda" else "GFLOP/s"
    lines = ["# Batched polar on one GPU vs its measured matmul peak", "",
             f"Command: `python benchmarks/gpu/polar_cuda.py {' '.join(args.argv)}`", "",
             f"Date: {started}", "", "Machine:", "", *machine_lines([device]), ""]
    if device.type == "cuda":
        lines += [f"- CUDA {torch.version.cuda}, driver: see the run's summary (nvidia-smi)", ""]
    lines += [f"Peak (`torch.matmul`, {str(rows[0]['dtype']) if rows else ''}): " + ", ".join(
        f"{n}³ {summary([v / unit for v in vals], '.1f')} {u}" for n, vals in peak.items()) + f"; the larger median, "
        f"{top / unit:.1f} {u}, is the 100 %.", "",
        f"{args.steps} Polar Express steps; batch = the blocks of that shape one owner runs at W = {args.world} "
        f"(EP {args.ep}), at most {args.max_mb} MB of input; median (min–max) of {args.repeats}.", "",
        f"| model | block | m×n | blocks | batch | polar torch {u} | % peak | polar kernel {u} | % peak "
        f"| GEMMs alone % peak | Gram kernel speed-up | b A + c A² speed-up | choice (gram, square) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pt = statistics.median(r["polar_torch"])
        cells = [r["model"], r["label"], f"{r['m']}×{r['n']}", str(r["count"]), str(r["batch"]),
                 summary([v / unit for v in r["polar_torch"]], ".1f"), f"{100 * pt / top:.0f}"]
        if "polar_triton" in r:
            pk = statistics.median(r["polar_triton"])
            cells += [summary([v / unit for v in r["polar_triton"]], ".1f"), f"{100 * pk / top:.0f}"]
        else:
            cells += ["n/a", "n/a"]
        cells.append(f"{100 * statistics.median(r['gemms']) / top:.0f}")
        cells += ([f"{r['gram_speedup']:.2f}×", f"{r['square_speedup']:.2f}×",
                   f"{r['choice']['gram']}, {r['choice']['square']}"] if "choice" in r else ["n/a"] * 3)
        lines.append("| " + " | ".join(cells) + " |")
    square = [r for r in rows if r["model"] == "square"]
    if square:
        best = max(statistics.median(square[0].get("polar_triton", [0])), statistics.median(square[0]["polar_torch"]))
        verdict = "met" if best >= TARGET * top else "NOT met"
        lines += ["", f"Target (≥ {TARGET:.0%} of the peak at {square[0]['m']}²): {verdict}, "
                      f"{100 * best / top:.0f} % (the faster of torch and the kernel)."]
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny presets and a 256² square (a check of the script)")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--max-mb", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-shapes", type=int, default=6, help="most frequent block shapes per model (default: 6)")
    parser.add_argument("--out", required=True, help="markdown report")
    parser.add_argument("--json", help="raw timings")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # On CPU the kernel runs only under Triton's interpreter (a dry run of this script: slow, tiny).
    kernels = triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    timed = timer(device, args.repeats)
    peak = matmul_peak(device, dtype, timed, args.quick)
    side = 256 if args.quick else 4096
    todo = [("square", "square", 8 if not args.quick else 2, side, side)]
    for preset in (QUICK_PRESETS if args.quick else PRESETS):
        todo += [(preset, label, count, m, n) for label, count, m, n in model_shapes(preset, args.world, args.ep)[:args.max_shapes]]
    rows = []
    for model, label, count, m, n in todo:
        per_owner = count if model == "square" else math.ceil(count / args.world)
        batch = max(1, min(per_owner, (args.max_mb << 20) // (m * n * (torch.finfo(dtype).bits // 8))))
        t0 = time.perf_counter()
        row = bench(label, count, m, n, batch, device, dtype, args.steps, timed, kernels)
        row.update(model=model, dtype=str(dtype), seconds=time.perf_counter() - t0)
        rows.append(row)
        print(json.dumps({k: (statistics.median(v) if isinstance(v, list) else v) for k, v in row.items()}), flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(report(rows, peak, device, args, started)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak": peak, "rows": rows}, f)
    print(open(args.out).read())


if __name__ == "__main__":
    main()
