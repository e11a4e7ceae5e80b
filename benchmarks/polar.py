"""Batched polar (Polar Express) throughput against plain batched matmul of the same products.

For each shape ``B×m×n`` both sides are timed in the same run, interleaved repeat by repeat (so
both see the same machine load), and reported as GFLOP/s with the flop count of
:func:`dist_spectral.functional.polar_flops`:

* ``polar``: ``polar(X, steps)``, everything included (normalisation, transposes, scalars);
* ``matmul``: per step ``A = X Xᵀ; A2 = A A; Y = A2 X`` with ``torch.matmul`` on the same shapes and
  dtype, nothing else: the GEMM-only ceiling that polar's fused ops should approach.

The ratio polar/matmul is computed per repeat, then summarised (median, min–max). Target: ≥ 80 %
for matrices of 512 and up. A last column times ``polar(X, steps, form="gram")`` (Gram
Newton–Schulz) in the same repeats, as a fraction of the standard form's time.

    python benchmarks/polar.py                       # CPU fp32 (+ CUDA bf16 when present)
    python benchmarks/polar.py --shapes 2x2048x2048 --repeats 5 --out /tmp/polar.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from dist_spectral.functional import polar, polar_flops

from common import machine_lines, summary, write_results

DEFAULT_SHAPES = "8x256x256,4x512x512,2x1024x1024,1x512x1536,8x256x1024,32x64x256"
TARGET = 0.80


@dataclass
class Row:
    device: str
    dtype: str
    threads: int
    shape: tuple[int, int, int]
    polar_gflops: list[float]
    matmul_gflops: list[float]
    ratios: list[float]
    gram_ratios: list[float]   # time of polar(form="gram") / time of polar(), per repeat
    gram_flops: float          # polar_flops(gram) / polar_flops(standard)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        b, m, n = (int(v) for v in item.lower().split("x"))
        shapes.append((b, m, n))
    return shapes


def timer(device: torch.device):
    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def bench_shape(shape, device, dtype, steps, repeats, warmup) -> Row:
    b, m, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, m, n, generator=gen).to(device=device, dtype=dtype)
    # The matmul side works on the wide orientation, like polar, with ‖X‖_F = 1 so no step
    # overflows; it does not chain steps (same shapes, same work, values stay bounded).
    w = x.mT if m > n else x
    w = w / torch.linalg.vector_norm(w.float(), dim=(-2, -1), keepdim=True).to(dtype)

    def run_polar():
        polar(x, steps=steps)

    def run_gram():
        polar(x, steps=steps, form="gram")

    def run_matmul():
        for _ in range(steps):
            a = torch.matmul(w, w.mT)
            a2 = torch.matmul(a, a)
            torch.matmul(a2, w)

    timed = timer(device)
    for _ in range(warmup):
        timed(run_polar)
        timed(run_matmul)
        timed(run_gram)
    flops = b * polar_flops(m, n, steps)
    p_rates, m_rates, ratios, gram_ratios = [], [], [], []
    order = [("polar", run_polar), ("matmul", run_matmul), ("gram", run_gram)]
    for r in range(repeats):
        # rotate the order so no side always runs right after another's cache state
        t = {name: timed(fn) for name, fn in order[r % 3:] + order[:r % 3]}
        p_rates.append(flops / t["polar"] / 1e9)
        m_rates.append(flops / t["matmul"] / 1e9)
        ratios.append(t["matmul"] / t["polar"])
        gram_ratios.append(t["gram"] / t["polar"])
    dtype_name = str(dtype).replace("torch.", "")
    return Row(device.type, dtype_name, torch.get_num_threads(), shape, p_rates, m_rates, ratios, gram_ratios,
               polar_flops(m, n, steps, "gram") / polar_flops(m, n, steps))


def table(rows: list[Row]) -> list[str]:
    out = [
        "| device | dtype | threads | shape (B×m×n) | polar GFLOP/s | matmul GFLOP/s | polar/matmul "
        "| ≥ 80 % | gram form: time / standard (flops) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, m, n = r.shape
        ok = statistics.median(r.ratios) >= TARGET
        verdict_cell = ("yes" if ok else "NO") if min(m, n) >= 512 else "n/a (< 512)"
        out.append(
            f"| {r.device} | {r.dtype} | {r.threads} | {b}×{m}×{n} | "
            f"{summary(r.polar_gflops, '.1f')} | "
            f"{summary(r.matmul_gflops, '.1f')} | {summary(r.ratios, '.2f')} | {verdict_cell} | "
            f"{summary(r.gram_ratios, '.2f')} ({r.gram_flops:.2f}) |")
    return out


def verdict(rows: list[Row]) -> str:
    big = [r for r in rows if min(r.shape[1:]) >= 512]
    missed = [r for r in big if statistics.median(r.ratios) < TARGET]
    if not big:
        return "No shape of 512 or larger was measured; the 80 % target is not assessed."
    if not missed:
        return ("Target met: for every shape with min(m, n) ≥ 512 the median polar/matmul ratio is "
                "≥ 0.80.")
    names = ", ".join(f"{r.device} {r.dtype} {r.threads} threads {r.shape[0]}×{r.shape[1]}×{r.shape[2]} "
                      f"(median {statistics.median(r.ratios):.2f})" for r in missed)
    return f"Target NOT met for: {names}."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated BxMxN (default: {DEFAULT_SHAPES})")
    parser.add_argument("--steps", type=int, default=5, help="polar steps (default: 5)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (default: 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats (default: 1)")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated CPU thread counts to run (default: torch's default, "
                             f"here {torch.get_num_threads()})")
    parser.add_argument("--devices", default="auto",
                        help="'auto' (cpu, plus cuda when available), 'cpu' or 'cuda'")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "polar.md"),
                        help="markdown results file (default: benchmarks/results/polar.md)")
    args = parser.parse_args(argv)

    if args.devices == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.devices)]
    shapes = parse_shapes(args.shapes)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows = []
    thread_counts = [int(t) for t in args.threads.split(",")]
    for device in devices:
        # polar's own default iteration dtype on that device: fp32 on CPU, bf16 on CUDA
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for threads in thread_counts if device.type == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            for shape in shapes:
                row = bench_shape(shape, device, dtype, args.steps, args.repeats, args.warmup)
                rows.append(row)
                print("\n".join(table([row])[2:]), flush=True)

    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    command = "python " + shlex.join(["benchmarks/polar.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# Batched polar (Polar Express) vs plain batched matmul",
        "",
        f"Command: `{command}`",
        "",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        "Machine:",
        "",
        *machine_lines(devices),
        f"- load average (1 min) before / after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}" if load_before else "- load average: n/a",
        "",
        f"Method: {args.steps} Polar Express steps (safety 1.01); {args.repeats} timed repeats after "
        f"{args.warmup} warm-up, polar and matmul interleaved within each repeat. GFLOP/s use "
        "`B · polar_flops(m, n, steps)` = `B · steps · (4 s² l + 2 s³)` for both columns; the "
        "matmul column runs exactly those GEMMs (`X Xᵀ`, `A A`, `A2 X` per step, `torch.matmul`). "
        "Cells: median (min–max); the ratio is taken per repeat. Last column: `polar(form=\"gram\")` "
        "(Gram Newton–Schulz, restarted every second step; the standard form where it would not save), "
        "timed in the same repeats, over the standard form's time; in brackets its flop count over the "
        "standard form's.",
        "",
        *table(rows),
        "",
        verdict(rows),
        "",
    ]
    write_results(os.path.abspath(args.out), lines)  # keeps a "## Notes (by hand)" section
    print(verdict(rows))


if __name__ == "__main__":
    main()
