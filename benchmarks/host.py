"""Host (Python) cost of an optimizer step: models with many units at tiny dimensions.

    python benchmarks/host.py                       # one process, writes benchmarks/results/host.md
    python benchmarks/host.py --world 2             # also W = 2 (gloo, one thread per rank)

OLMoE architecture from `transformers`, width 16, experts of width 16, 4 heads of 4, in
series of about 1k, 4k and 16k `muon` units (a head block or one expert's gate, up or down;
Qwen3-30B-A3B has about 18k): ``layers`` stacks 3, 10 and 40 layers of 128 experts (more
parameters, the same shapes); ``experts`` keeps 3 layers and gives them 128, 440 and 1,760 experts
(the same parameters and (rule, shape) batches, only more units in each); ``layers4`` and
``width4`` are the same at width 4 (experts of 4×4, 2 heads of 2), where the math and the
element-wise passes are negligible beside the Python: the host model's constants
(``fixed + per parameter × parameters + per unit × units``, ``dist_spectral/predict.py``) are the
least-squares fit over their one-process rows. At width 16 the polar products of 16×16 matrices
are real work on a CPU.
Gradients are synthetic and fixed. Columns: ``torch.optim.AdamW(foreach=True)`` on the same
parameters, and ``build_optimizer`` with the ``adamw``, ``muon`` and ``symmetric`` recipes: median
ms per step (min–max over repeats), µs per unit above AdamW(foreach), and the optimizer's own
``last_stats.host_seconds`` (the step outside the exchange's collectives and the whole-matrix
compute), and per series the Python calls of one step and the step without its batched products.
Targets (issue 15): ≤ 5 µs per unit for muon and symmetric, and 16k
units in the same shapes ≤ 2× the 1k step.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import machine_lines, run_world, summary, write_results  # noqa: E402

from dist_spectral import build_optimizer  # noqa: E402

#: layers for about 1k, 4k and 16k muon units (397 per layer: 3 per expert, 13 head blocks)
SIZES = {"1k": 3, "4k": 10, "16k": 40}
#: the other series: 3 layers, experts for about 1k, 4k and 16k units (3 × (3 E + 13)), so every
#: size has the same parameters in the same (rule, shape) batches, only with more experts in them
EXPERTS = {"1k": 128, "4k": 440, "16k": 1760}
#: series name -> (layers, experts, width) of a size; ``width4`` is ``experts`` at width 4 (heads of
#: 2), where the polar math is 64× fewer FLOPs per unit than at width 16
SERIES = {"layers": lambda size: (SIZES[size], 128, 16), "experts": lambda size: (3, EXPERTS[size], 16),
          "layers4": lambda size: (SIZES[size], 128, 4), "width4": lambda size: (3, EXPERTS[size], 4)}
#: what a step's time is read from: ``wall`` (perf_counter) or ``cpu`` (the stepping thread's CPU
#: time, thread_time: the host work itself, not the waits for a busy machine's cores or for a peer)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
CLOCK = CLOCKS["wall"]
_COMPUTE = [0.0]  # seconds of the current step in the whole-matrix compute, on CLOCK
_GEMM = [0.0]  # seconds of the current step in torch.bmm / torch.baddbmm (the polar products), on CLOCK


def _count_gemms() -> None:
    """Time ``torch.bmm`` and ``torch.baddbmm`` on CLOCK (polar and the Gram kernels call them
    through the module, so the wrapper sees every batched product; two Python calls each)."""
    if getattr(torch.bmm, "_counted", False):
        return
    for name in ("bmm", "baddbmm"):
        def timed(*args, _original=getattr(torch, name), **kwargs):
            t0 = CLOCK()
            out = _original(*args, **kwargs)
            _GEMM[0] += CLOCK() - t0
            return out
        timed._counted = True
        setattr(torch, name, timed)


def python_calls(step) -> int:
    """Python and C function calls made by one ``step()`` (``sys.setprofile`` events): what grows
    with the units if the step loops over them in Python."""
    calls = [0]

    def count(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1
    sys.setprofile(count)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls[0]


def _count_compute() -> None:
    """Time the exchange's compute phases on CLOCK, so a step's host part is read on the same
    clock as the step (``last_stats`` times it on the wall clock, which a loaded machine inflates)."""
    from dist_spectral.exchange import _Run

    if getattr(_Run.compute, "_counted", False):
        return
    original = _Run.compute

    def compute(self, work, replicated=False):
        t0 = CLOCK()
        original(self, work, replicated)
        _COMPUTE[0] += CLOCK() - t0
    compute._counted = True
    _Run.compute = compute
RECIPES = ("adamw", "muon", "symmetric")


def build_model(layers: int, experts: int = 128, width: int = 16):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    heads = 4 if width >= 16 else 2
    cfg = OlmoeConfig(vocab_size=64, hidden_size=width, intermediate_size=width, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, num_experts=experts, num_experts_per_tok=2,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = OlmoeForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    return model


def units_of(opt) -> int:
    return len(opt.plan().units)


def time_steps(step, repeats: int, warmup: int = 2, opt=None) -> tuple[list[float], list[float], list[float]]:
    """Seconds of ``repeats`` steps after ``warmup`` on CLOCK; of each its host part (with ``opt``:
    on the wall clock ``opt.last_stats.host_seconds``, the step outside the exchange's collectives
    and the whole-matrix compute; on the CPU clock the step's CPU time outside the whole-matrix
    compute, as waits for collectives take none); and of each its time in the batched products."""
    _count_compute()
    _count_gemms()
    for _ in range(warmup):
        step()
    out, host, gemm = [], [], []
    for _ in range(repeats):
        _COMPUTE[0] = _GEMM[0] = 0.0
        t0 = CLOCK()
        step()
        out.append(CLOCK() - t0)
        gemm.append(_GEMM[0])
        if opt is not None:
            host.append(opt.last_stats.host_seconds if CLOCK is CLOCKS["wall"] else out[-1] - _COMPUTE[0])
    return out, host, gemm


def measure(size: str, repeats: int, series: str = "layers") -> dict:
    """ms per step of every column on the model of ``size`` in ``series``, one process."""
    model = build_model(*SERIES[series](size))
    res = {"size": size, "times": {}, "host": {}, "outside_gemm": {}, "calls": {}}
    base = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    res["times"]["AdamW(foreach)"], _, _ = time_steps(base.step, repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for recipe in RECIPES:
            opt = build_optimizer(model, recipe)
            if recipe == "muon":
                res["units"] = units_of(opt)
                res["params"] = sum(len(g["params"]) for g in opt.param_groups)
            res["times"][recipe], res["host"][recipe], gemm = time_steps(opt.step, repeats, opt=opt)
            res["outside_gemm"][recipe] = [t - g for t, g in zip(res["times"][recipe], gemm)]
            res["calls"][recipe] = python_calls(opt.step)
    return res


def worker(rank: int, world_size: int, size: str, repeats: int, clock: str = "wall",
           series: str = "layers") -> dict:
    """One rank of W: the model whole on every rank (DDP-like), owners split the units; every
    step starts and ends at a barrier, so each rank's time includes waiting for the other."""
    import torch.distributed as dist

    global CLOCK
    CLOCK = CLOCKS[clock]
    model = build_model(*SERIES[series](size))
    out = {"times": {}, "host": {}}
    base = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    out["times"]["AdamW(foreach)"], _, _ = time_steps(base.step, repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for recipe in RECIPES:
            opt = build_optimizer(model, recipe)

            def step():
                dist.barrier()
                opt.step()
                dist.barrier()
            out["times"][recipe], out["host"][recipe], _ = time_steps(step, repeats, opt=opt)
    return out


def host_fit(rows: list[dict], recipe: str, terms: tuple[str, ...] = ("units",)) -> tuple[float, ...]:
    """Least squares ``host seconds = fixed + Σ coefficient × row[term]`` over the rows (medians):
    ``(fixed, *coefficients)``."""
    import numpy as np

    a = np.array([[1.0, *(r[t] for t in terms)] for r in rows], dtype=np.float64)
    y = np.array([statistics.median(r["host"][recipe]) for r in rows])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return tuple(float(c) for c in coef)


def table(rows: list[dict]) -> list[str]:
    cols = ["AdamW(foreach)", *RECIPES]
    polar = ("muon", "symmetric")
    lines = ["| units (muon) | " + " | ".join(f"{c} ms" for c in cols) + " | "
             + " | ".join(f"{c} µs/unit" for c in polar) + " | " + " | ".join(f"{c} host ms" for c in polar)
             + " | " + " | ".join(f"{c} host µs/unit" for c in polar) + " |",
             "|" + "---|" * (1 + len(cols) + 6)]
    for r in rows:
        base = statistics.median(r["times"]["AdamW(foreach)"])
        per_unit = [(statistics.median(r["times"][c]) - base) / r["units"] * 1e6 for c in polar]
        host_per_unit = [(statistics.median(r["host"][c]) - base) / r["units"] * 1e6 for c in polar]
        label = f"{r['units']} ({r['size']})" + (f", rank {r['rank']}" if "rank" in r else "")
        lines.append(f"| {label} | " + " | ".join(summary([t * 1e3 for t in r["times"][c]], ".1f") for c in cols)
                     + " | " + " | ".join(f"{x:.1f}" for x in per_unit)
                     + " | " + " | ".join(summary([t * 1e3 for t in r["host"][c]], ".1f") for c in polar)
                     + " | " + " | ".join(f"{x:.2f}" for x in host_per_unit) + " |")
    return lines


SERIES_TITLES = {
    "layers": "More layers (128 experts each; 3, 10 and 40 layers)",
    "experts": "More experts in the same shapes (3 layers; 128, 440 and 1,760 experts)",
    "layers4": "More layers at width 4 (128 experts of 4×4 each; 3, 10 and 40 layers)",
    "width4": "More experts in the same shapes at width 4 (3 layers; 128, 440 and 1,760 experts of 4×4)",
}
#: the series whose host time is (almost) all Python: the host model's constants are fitted on them
PYTHON_BOUND = ("layers4", "width4")


def series_section(series: str, args, fitted: list | None = None) -> list[str]:
    """The tables of one series: one process, then each W in ``args.world``; its one-process rows
    are appended to ``fitted`` when given."""
    lines = [f"## {SERIES_TITLES[series]}", "", "### One process", ""]
    rows = []
    for size in args.sizes:
        rows.append({**measure(size, args.repeats, series), "series": series})
        if fitted is not None:
            fitted.append(rows[-1])
        print(series, rows[-1]["size"], {c: f"{statistics.median(t) * 1e3:.1f} ms"
                                         for c, t in rows[-1]["times"].items()}, flush=True)
    lines += table(rows)
    if len(rows) > 1:
        ratio = {c: statistics.median(rows[-1]["times"][c]) / statistics.median(rows[0]["times"][c])
                 for c in ("AdamW(foreach)", "muon", "symmetric")}
        lines += ["", f"{rows[-1]['size']} / {rows[0]['size']} step time: "
                  + ", ".join(f"{c} {x:.2f}×" for c, x in ratio.items())]
        lines += ["", "What grows with the units: Python calls per step (`sys.setprofile` events, one step) and "
                  "the step without its batched products (`torch.bmm` / `torch.baddbmm`, timed on the same "
                  "clock), ms:", "",
                  "| units (muon) | muon Python calls | symmetric Python calls | muon ms without the products "
                  "| symmetric ms without the products |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['units']} ({r['size']}) | {r['calls']['muon']:,} | {r['calls']['symmetric']:,} | "
                         + " | ".join(summary([t * 1e3 for t in r["outside_gemm"][c]], ".1f")
                                      for c in ("muon", "symmetric")) + " |")
        outside = {c: statistics.median(rows[-1]["outside_gemm"][c]) / statistics.median(rows[0]["outside_gemm"][c])
                   for c in ("muon", "symmetric")}
        lines += ["", f"{rows[-1]['size']} / {rows[0]['size']} without the products: "
                  + ", ".join(f"{c} {x:.2f}×" for c, x in outside.items())]
        lines += ["", "Host model (`host ms` = the step outside the exchange's collectives and the whole-matrix "
                  "compute, on the same clock, median; least squares over the rows): "
                  + ", ".join(f"{c} {f * 1e3:.2f} ms + {u * 1e6:.2f} µs × units"
                              for c, (f, u) in ((c, host_fit(rows, c)) for c in ("muon", "symmetric")))]
    for world in args.world:
        lines += ["", f"### W = {world} (gloo, every rank holds the whole model, owners split the units; each rank's "
                  "times, a barrier before and after every step)", ""]
        wrows = []
        for r in rows:
            for rank, res in enumerate(run_world(world, worker, r["size"], args.repeats, args.clock, series)):
                wrows.append({"size": r["size"], "units": r["units"], "rank": rank, **res})
        lines += table(wrows)
    return lines + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--series", nargs="+", default=list(SERIES), choices=list(SERIES),
                    help="layers: more layers of 128 experts; experts: 3 layers, more experts (same shapes); "
                         "layers4, width4: the same at width 4")
    ap.add_argument("--world", type=int, nargs="*", default=[], help="also run at these W (gloo)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall time, or the stepping thread's CPU time (on a loaded machine)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "host.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    lines = ["# Host cost of an optimizer step", "",
             f"Command: `python benchmarks/host.py {shlex.join(argv if argv is not None else sys.argv[1:])}`", "",
             *machine_lines(), f"- {args.threads} thread(s), {args.repeats} timed repeats after 2 warm-up steps, {args.clock} clock"
             + (" (the stepping thread's CPU time)" if args.clock == "cpu" else ""), "",
             "Median ms per step (min–max); µs per unit = (median − AdamW(foreach) median) / muon units; "
             "host µs per unit = (host median − AdamW(foreach) median) / muon units: the same without the "
             "whole-matrix math (polar, the spectral rules' inverse square roots).", ""]
    fitted = []
    for series in args.series:
        lines += series_section(series, args, fitted if series in PYTHON_BOUND else None)
    if len({r["series"] for r in fitted}) > 1:
        lines += ["## Host model", "",
                  f"Least squares over the one-process rows of {' and '.join(PYTHON_BOUND)} (host ms, median), the "
                  "constants of `dist_spectral/predict.py`:", ""]
        for recipe in ("muon", "symmetric"):
            fixed, per_param, per_unit = host_fit(fitted, recipe, ("params", "units"))
            lines.append(f"- {recipe}: {fixed * 1e3:.2f} ms + {per_param * 1e6:.1f} µs × parameters + "
                         f"{per_unit * 1e6:.3f} µs × units")
        lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
