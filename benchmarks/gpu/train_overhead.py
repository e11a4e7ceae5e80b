"""The optimizer's share of a training step on one GPU, beside AdamW's; host vs GPU time; CUDA graphs.

    python benchmarks/gpu/train_overhead.py --out overhead_gpu.md                  # on a CUDA machine
    python benchmarks/gpu/train_overhead.py --device cpu --quick --out x.md        # dry run, tiny presets

Models (randomly initialised presets, fp32 parameters, bf16 autocast): ``gemma3-1b`` (dense,
1.09 B) and ``olmoe-1b-7b`` (MoE, 2.8 B total, 1.0 B active), ``--batch`` × ``--seq`` tokens. For each
optimizer (torch AdamW fused; dist_spectral ``symmetric`` and ``muon``) ``--warmup`` untimed steps (the
first builds the plan and times the kernels), then ``--steps`` timed ones, each
``forward+backward → step() → zero_grad()``:

- GPU time of forward+backward and of ``step()``: CUDA events around each;
- host time of ``step()``: wall time from the call to its return (Python, launches, the syncs the
  step makes); where it exceeds the GPU time the step is bound by the host;
- the share ``step / (forward+backward + step)`` per step, and ours minus AdamW's.

Then, per optimizer, whether ``step()`` captures in a CUDA graph (``torch.cuda.graph``): "yes", or
the first line of the error.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import machine_lines, summary  # noqa: E402

from dist_spectral import build_optimizer  # noqa: E402
from dist_spectral.models import build_model, count_parameters  # noqa: E402

PRESETS = ("gemma3-1b", "olmoe-1b-7b")
QUICK_PRESETS = ("tiny-llama", "tiny-olmoe")
KINDS = ("adamw", "symmetric", "muon")
TARGET = 0.03  # optimizer step as a share of the training step


def make_optimizer(model, kind: str):
    if kind == "adamw":
        fused = next(model.parameters()).is_cuda
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    return build_optimizer(model, kind)


class Clock:
    """CUDA events on the GPU, wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def between(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


def run(model, ids, kind: str, warmup: int, steps: int, clock: Clock) -> dict:
    opt = make_optimizer(model, kind)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if clock.cuda else torch.autocast("cpu", enabled=False)
    out = {"fwd_bwd": [], "step_gpu": [], "step_host": []}
    for i in range(warmup + steps):
        a = clock.mark()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        b = clock.mark()
        h0 = time.perf_counter()
        opt.step()
        host = time.perf_counter() - h0
        c = clock.mark()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            out["fwd_bwd"].append(clock.between(a, b))
            out["step_gpu"].append(clock.between(b, c))
            out["step_host"].append(host)
    out["share"] = [s / (f + s) for f, s in zip(out["fwd_bwd"], out["step_gpu"])]
    out["choices"] = {str(k): v for k, v in getattr(opt, "kernel_choices", {}).items()}
    del opt
    return out


def graph_capture(model, ids, kind: str) -> str:
    """Whether one ``step()`` captures in a CUDA graph (after warm-up steps on a side stream).

    Ours in the configuration meant for it: ``nonfinite="off"`` and 0-d tensor lrs on the device.
    After a replay, every lr is filled with 0 and the graph replayed again: the weights must not
    move (the lr is read by the graph, not baked into it), reported as "lr live"."""
    if kind == "adamw":
        opt = make_optimizer(model, kind)
    else:
        opt = build_optimizer(model, kind, nonfinite="off")
        device = next(model.parameters()).device
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(2):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        graph.replay()
        torch.cuda.synchronize()
        if kind == "adamw":
            return "yes"
        for group in opt.param_groups:
            group["lr"].fill_(0.0)
        before = [p.detach().clone() for p in model.parameters()]
        graph.replay()
        torch.cuda.synchronize()
        still = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        return "yes, lr live" if still else "yes, but lr baked in (weights moved at lr 0)"
    except Exception as e:  # the finding is the error itself
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"no: {type(e).__name__}: {first[:160]}"
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
        torch.cuda.synchronize()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny presets, short sequences (a check of the script)")
    parser.add_argument("--presets", default=None, help=f"comma-separated (default: {','.join(PRESETS)})")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA graph capture")
    parser.add_argument("--out", required=True)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    presets = args.presets.split(",") if args.presets else (QUICK_PRESETS if args.quick else PRESETS)
    seq = 32 if args.quick else args.seq
    clock = Clock(device)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    results = {}
    for preset in presets:
        model = build_model(preset, device=device, seed=0)
        count = count_parameters(model)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, seq), device=device,
                            generator=torch.Generator(device).manual_seed(0))
        res = {"total": count.total, "active": count.active}
        for kind in KINDS:
            t0 = time.perf_counter()
            res[kind] = run(model, ids, kind, args.warmup, args.steps, clock)
            print(json.dumps({"preset": preset, "kind": kind, "seconds": time.perf_counter() - t0,
                              **{k: statistics.median(v) for k, v in res[kind].items() if isinstance(v, list)}}),
                  flush=True)
        if clock.cuda and not args.no_graph:
            res["graph"] = {kind: graph_capture(model, ids, kind) for kind in KINDS}
            print(json.dumps({"preset": preset, "graph": res["graph"]}), flush=True)
        results[preset] = res
        del model
        if clock.cuda:
            torch.cuda.empty_cache()

    ms = lambda v: summary([x * 1e3 for x in v], ".1f")  # noqa: E731
    lines = ["# Optimizer step in a training step on one GPU, vs AdamW", "",
             f"Command: `python benchmarks/gpu/train_overhead.py {argv_text}`", "", f"Date: {started}", "",
             "Machine:", "", *machine_lines([device]), ""]
    if clock.cuda:
        lines += [f"- CUDA {torch.version.cuda}; driver in the run's summary (nvidia-smi)", ""]
    lines += [f"{args.batch} × {seq} tokens, bf16 autocast, fp32 parameters; {args.warmup} warm-up steps, "
              f"median (min–max) of {args.steps}. Times in ms.", "",
              "| model | optimizer | fwd+bwd GPU | step GPU | step host | step share | over AdamW | CUDA graph |",
              "|---|---|---|---|---|---|---|---|"]
    for preset, res in results.items():
        base = statistics.median(res["adamw"]["share"])
        for kind in KINDS:
            r = res[kind]
            share = statistics.median(r["share"])
            over = "—" if kind == "adamw" else f"{100 * (share - base):+.2f} pp"
            lines.append(f"| {preset} ({res['total'] / 1e9:.2f} B, {res['active'] / 1e9:.2f} B active) | {kind} | "
                         f"{ms(r['fwd_bwd'])} | {ms(r['step_gpu'])} | {ms(r['step_host'])} | {100 * share:.2f} % | "
                         f"{over} | {res.get('graph', {}).get(kind, 'n/a')} |")
    lines += ["", f"Target: the spectral step ≤ {TARGET:.0%} of the training step (published peers: 1–3.8 % over AdamW).",
              ""]
    for preset, res in results.items():
        for kind in ("symmetric", "muon"):
            if res[kind]["choices"]:
                lines.append(f"- {preset} {kind}: kernel choices {res[kind]['choices']}")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
