"""Learning-rate transfer across widths: where each group family's best lr sits at widths 64, 128, 256.

    python benchmarks/transfer.py                    # sweep, report (resumes: finished runs are reused)
    python benchmarks/transfer.py --report-only      # rebuild the report from finished runs
    python benchmarks/transfer.py --steps 300 --widths 64 128 256 --workers 2

Every run is one process (``parallel=none``, one thread) training the default job's model
(``tiny-olmoe``, two of its four layers) and a dense one (``tiny-qwen3``) at a width ``d`` (hidden
size ``d``, heads of a fixed size, intermediate sizes ``d`` (experts) or ``2d`` (dense)) on the
built-in corpus with the
``symmetric`` recipe, one group family's lr swept on a ×2 grid around the recipe's value (×½, 1, 2, and
further out, one ×2 step at a time up to ×8 either way, while the best sits on an edge) with the
others at the recipe's. ``train.seed`` fixes the initial weights and the batch order, so the runs of one
width are paired: they differ only in the lr.

With the width-aware scale (``scale: rms``) the direction of a row rule is ``0.2·√n · R(M)`` and of
a spectral rule ``0.2·√max(m, n) · ν^α · …``. Without it (``scale: none``, the paper's rule) the
direction is the same matrix divided by that factor, so a run at lr ``η`` with the scale *is* the
paper's rule at lr ``η · 0.2·√L``: whichever scale the recipe ships for a family, the report gives
both lr axes from one set of runs, exactly, rather than training every run twice. The families
swept are those of the rules the scale applies to (embedding, LM head, router); the hidden matrices'
Muon has its own shape-aware scale (``scale: spectral``) and the same lr in the ``muon`` and
``symmetric`` recipes (``Run.family = "hidden"`` sweeps it). At each width, the default ``muon`` and
the default ``symmetric`` recipes run side by side.

Writes ``benchmarks/results/transfer.md`` and ``benchmarks/results/transfer.png``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import machine_lines, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "transfer"
RESULTS = ROOT / "benchmarks" / "results"

MODELS = {"moe": "tiny-olmoe", "dense": "tiny-qwen3"}
HEAD_DIM = 16
#: Group families swept per model.
FAMILIES = {"moe": ("embedding", "lm_head", "router"), "dense": ("embedding", "lm_head")}
FACTORS = (0.5, 1.0, 2.0)  # the grid, × the recipe's lr; extended past an edge where the best sits on it


def width_config(model: str, width: int) -> dict:
    """``model.config`` of a model at ``width``: heads of a fixed size, intermediate sizes ∝ width."""
    if model == "moe":  # two layers, not the preset's four: the widest runs stay a few minutes on 2 cores
        return {"hidden_size": width, "intermediate_size": width, "num_attention_heads": width // HEAD_DIM,
                "num_key_value_heads": width // HEAD_DIM, "num_hidden_layers": 2}
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": width // HEAD_DIM,
            "num_key_value_heads": width // (2 * HEAD_DIM), "head_dim": 2 * HEAD_DIM}


@dataclass(frozen=True)
class Run:
    """One training run: model, width, recipe, with one family's lr × ``factor`` (the recipe exactly
    as it ships at ``factor`` 1)."""

    model: str
    width: int
    recipe: str = "symmetric"
    family: str = ""
    factor: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.factor == 1.0:  # the recipe itself: one run, whichever family "swept" it
            object.__setattr__(self, "family", "")

    @property
    def run_id(self) -> str:
        """Names the groups' content too, so a changed recipe never reuses an old run."""
        digest = hashlib.sha1(json.dumps(recipe_groups(self.recipe), sort_keys=True, default=str).encode()).hexdigest()[:8]
        tail = f"__{self.family}x{self.factor:g}" if self.family else ""
        tail += f"__seed{self.seed}" if self.seed else ""
        return f"{self.model}__w{self.width}__{self.recipe}-{digest}{tail}"

    def overrides(self) -> dict:
        """``optim.overrides``: this run's family's lr × ``factor`` (hidden = attention and mlp)."""
        groups = recipe_groups(self.recipe)
        if not self.family:
            return {}
        return {name: {"lr": groups[name]["lr"] * self.factor}
                for name in (("attention", "mlp") if self.family == "hidden" else (self.family,))}


def sweep(model: str, width: int, family: str, factor: float) -> Run:
    """A run of the sweep: the ``symmetric`` recipe with ``family``'s lr × ``factor``."""
    return Run(model, width, "symmetric", family, factor)


@dataclass
class Settings:
    steps: int = 200
    eval_every: int = 50
    eval_batches: int = 16
    seq_len: int = 128
    batch_size: int = 4
    warmup: int = 30


@functools.cache
def recipe_groups(recipe: str) -> dict[str, dict]:
    from dist_spectral.recipes import load_recipe

    return {g["name"]: g for g in load_recipe(recipe)["groups"]}


def run_one(r: Run, cfg: Settings) -> dict:
    """Train one run in this process; returns its summary."""
    from dist_spectral.training.config import load_config, set_key
    from dist_spectral.training.loop import train
    from dist_spectral.training.metrics import read_metrics

    out = run_dir(r, cfg)
    c = load_config("tiny-olmoe-fsdp")
    c.name, c.out_dir = r.run_id, str(out)
    for key, value in {"model.preset": MODELS[r.model], "model.config": width_config(r.model, r.width),
                       "optim.recipe": r.recipe, "optim.overrides": r.overrides(),
                       "optim.warmup": cfg.warmup, "parallel.engine": "none", "parallel.threads": 1,
                       "data.seq_len": cfg.seq_len, "data.batch_size": cfg.batch_size, "train.steps": cfg.steps,
                       "train.seed": r.seed, "train.eval_every": cfg.eval_every, "train.eval_batches": cfg.eval_batches,
                       "train.progress": False, "train.plot": False}.items():
        set_key(c, key, value)
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # an unfinished earlier attempt
    train(c)
    records = read_metrics(out / "metrics.jsonl")
    result = {"run": r.run_id, **{k: v for k, v in records[-1].items() if k in ("val_last", "seconds")}}
    (out / "result.json").write_text(json.dumps(result))
    return result


def run_dir(r: Run, cfg: Settings) -> Path:
    return RUNS / f"{cfg.steps}steps" / r.run_id


def load_result(r: Run, cfg: Settings) -> dict | None:
    path = run_dir(r, cfg) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_all(runs: list[Run], cfg: Settings, workers: int) -> dict[Run, dict]:
    """Run what is not finished yet, ``workers`` processes at a time (a fresh process per run)."""
    todo = [r for r in dict.fromkeys(runs) if load_result(r, cfg) is None]
    # the widest first: the slowest runs do not end up last, alone
    todo.sort(key=lambda r: -r.width)
    if todo:
        print(f"{len(todo)} runs to do ({len(runs) - len(todo)} reused), {workers} at a time", flush=True)
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            jobs = {pool.submit(run_one, r, cfg): r for r in todo}
            for job in futures.as_completed(jobs):
                res = job.result()
                print(f"  {res['run']}: val {res['val_last']:.4f} ({res['seconds']:.0f} s)", flush=True)
    return {r: load_result(r, cfg) for r in runs}


def plan(widths: list[int]) -> list[Run]:
    runs = []
    for model, families in FAMILIES.items():
        for w in widths:
            runs += [Run(model, w), Run(model, w, "muon")]
            runs += [sweep(model, w, f, x) for f in families for x in FACTORS]
    return runs


def extensions(results: dict[Run, dict], widths: list[int]) -> list[Run]:
    """One run past the edge (× or ÷ 2) for every (model, width, family) whose best so far sits on it,
    within [1/8, 8] × the recipe's lr."""
    more = []
    for model, families in FAMILIES.items():
        for w in widths:
            for f in families:
                factors = factors_run(results, model, w, f)
                if not all(results.get(sweep(model, w, f, x)) for x in factors):
                    continue
                best = min(factors, key=lambda x: results[sweep(model, w, f, x)]["val_last"])
                if best == factors[0] and best > 1 / 8:
                    more.append(sweep(model, w, f, best / 2))
                elif best == factors[-1] and best < 8:
                    more.append(sweep(model, w, f, best * 2))
    return more


def factors_run(results: dict[Run, dict], model: str, width: int, family: str) -> list[float]:
    """The grid and the points past its edges that have run."""
    extra = [2.0 ** k for k in range(-3, 4) if 2.0 ** k not in FACTORS]
    return sorted(list(FACTORS) + [x for x in extra if results.get(sweep(model, width, family, x))])


def pooled(results: dict[Run, dict], seeds: dict[Run, dict], n: int) -> dict[Run, dict]:
    """Each seed-0 run's result replaced by the mean over seeds 0 … n − 1 of its configuration, with
    the number of seeds and their range (max − min)."""
    out = {}
    for r, res in results.items():
        if not res:
            out[r] = res
            continue
        vals = [res["val_last"]] + [v["val_last"] for s in range(1, n)
                                    if (v := seeds.get(dataclasses.replace(r, seed=s)))]
        out[r] = {"val_last": statistics.mean(vals), "seeds": len(vals), "range": max(vals) - min(vals)}
    return out


@functools.cache
def scale_factor(family: str, model: str, width: int) -> float | None:
    """``0.2·√L``, the factor between a family's rule with ``scale: rms`` and without (``none``, the
    paper's rule), at this width (the library's ``width_scale``: L = the row length for row rules,
    the longer side for spectral rules); None for the hidden matrices, whose Muon has its own scale.
    Cached: the report asks once per table cell, and each answer builds the model on ``meta``."""
    from dist_spectral.functional import width_scale
    from dist_spectral.models import build_model
    from dist_spectral.roles import classify
    from dist_spectral.rules import get_rule

    if family == "hidden":
        return None
    model_ = build_model(MODELS[model], device="meta", **width_config(model, width))
    info = next(i for i in classify(model_) if i.role == family)
    m, n = info.shape[-2:]
    length = n if get_rule(_group(family)["rule"]).locality == "rows" else max(m, n)
    return width_scale(length, "rms")


def in_both_scales(family: str, model: str, width: int, lr: float) -> tuple[float, float] | None:
    """A run's lr for ``family`` as the same update's lr with ``scale: rms`` and with ``scale: none``:
    the direction with the scale is the one without it times 0.2·√L, so the run at lr η under one is
    exactly the other's run at η·0.2·√L (or η / 0.2·√L)."""
    factor = scale_factor(family, model, width)
    if factor is None:
        return None
    if _group(family).get("scale", "none") == "rms":
        return lr, lr * factor
    return lr / factor, lr


# ----- report -----
def best_lrs(results: dict[Run, dict], model: str, family: str, widths: list[int]) -> list[tuple | None]:
    """Per width, the lowest-loss run's lr as (rms lr, none lr), or None where nothing ran."""
    out = []
    for w in widths:
        done = {x: v["val_last"] for x in factors_run(results, model, w, family)
                if (v := results.get(sweep(model, w, family, x)))}
        if not done:
            out.append(None)
            continue
        x = min(done, key=done.get)
        out.append(in_both_scales(family, model, w, _family_lr(family) * x))
    return out


def report(results: dict[Run, dict], widths: list[int], cfg: Settings, command: str, wall: float) -> list[str]:
    lines = ["# Learning-rate transfer across widths", "", f"Command: `{command}`", "",
             f"Date: {time.strftime('%Y-%m-%dT%H:%M:%S')}; wall time {wall / 60:.0f} min", "", "Machine:", "",
             *machine_lines(), "",
             f"Every run: one process, one thread, {cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len} byte tokens "
             f"from the built-in corpus, the default job's schedule (warmup {cfg.warmup}), the same seeds for every "
             f"configuration (at a width: the same initial weights and batches), final validation loss on {cfg.eval_batches} held-out "
             "batches. Widths change the hidden size with heads of a fixed size (16; Qwen3: 32, GQA 2:1) and the "
             "intermediate sizes in proportion; vocabulary 256; OLMoE with 2 layers (8 experts, top-2), Qwen3 with "
             "its 2. One lr family swept at a time on a ×2 grid around the `symmetric` recipe's lr, the others at "
             "the recipe's; the recipe's own run is the sweeps' centre (factor 1).", "",
             "Each run's lr is given with the width-aware scale (`scale: rms`) and without it (`scale: none`, the "
             "paper's rule), whichever the recipe ships: the direction with the scale is the one without it times "
             "0.2·√L, so a run at lr η under one is exactly the other's run at η·0.2·√L (or η / 0.2·√L), with "
             "L = the row length for the row rules, the longer side for the router's left-spectral rule. Both "
             "columns come from the same runs.", ""]
    ranges = [v["range"] for v in results.values() if v and v.get("seeds", 1) > 1]
    if ranges:
        lines += [f"Every configuration at {max(v.get('seeds', 1) for v in results.values() if v)} seeds (initial "
                  "weights and batch order), the values below their mean; the range between seeds at one point is "
                  f"{statistics.median(ranges):.3f} nats at the median, {max(ranges):.3f} at most: lr differences "
                  "smaller than that are noise.", ""]
    summary = ["## Best lr per width (×2 grid; the grid step is one factor of 2)", "",
               "| model | family | rule (the recipe's scale) | "
               + " | ".join(f"best lr, d={w}: rms / none" for w in widths)
               + " | moves (grid steps), `rms` | moves, `none` |", "|---|---|---|" + "---|" * len(widths) + "---|---|"]
    detail = []
    for model, families in FAMILIES.items():
        for family in families:
            detail += [f"### {model} (`{MODELS[model]}`): {family}", "",
                       "| factor × recipe lr | " + " | ".join(f"d={w}: rms lr / none lr / val" for w in widths) + " |",
                       "|---|" + "---|" * len(widths)]
            grid = sorted(set().union(*(factors_run(results, model, w, family) for w in widths)))
            for x in grid:
                cells = []
                for w in widths:
                    res = results.get(sweep(model, w, family, x))
                    rms, none = in_both_scales(family, model, w, _family_lr(family) * x)
                    cells.append(f"{rms:.3g} / {none:.3g} / " + (f"{res['val_last']:.4f}" if res else "(not run)"))
                detail.append(f"| {x:g} | " + " | ".join(cells) + " |")
            detail.append("")
            best = best_lrs(results, model, family, widths)
            summary.append(f"| {model} | {family} | {_rule(family)} | "
                           + " | ".join(f"{b[0]:.3g} / {b[1]:.3g}" if b else "-" for b in best)
                           + f" | {_moves([b and b[0] for b in best])} | {_moves([b and b[1] for b in best])} |")
    defaults = ["## Out of the box: the default recipes at each width (final validation loss)", "",
                "| model | d | `symmetric` default | best of the sweeps | gap to it | `muon` default | "
                "symmetric − muon |", "|---|---|---|---|---|---|---|"]
    for model, families in FAMILIES.items():
        for w in widths:
            sym, muon = results.get(Run(model, w)), results.get(Run(model, w, "muon"))
            swept = [results.get(sweep(model, w, f, x)) for f in families
                     for x in factors_run(results, model, w, f)]
            vals = [v["val_last"] for v in swept + [sym] if v]
            if not sym or not muon:
                continue
            best = min(vals)
            defaults.append(f"| {model} | {w} | {sym['val_last']:.4f} | {best:.4f} | {sym['val_last'] - best:+.4f} | "
                            f"{muon['val_last']:.4f} | {sym['val_last'] - muon['val_last']:+.4f} |")
    return lines + summary + [""] + defaults + ["", "## Every run", ""] + detail


def _group(family: str) -> dict:
    """The ``symmetric`` recipe's group a family's sweep varies (hidden: attention's, as mlp's)."""
    return recipe_groups("symmetric")["attention" if family == "hidden" else family]


def _family_lr(family: str) -> float:
    """The recipe's lr for a family: its sweep's centre."""
    return _group(family)["lr"]


def _rule(family: str) -> str:
    g = _group(family)
    return f"{g['rule']} ({g.get('scale', 'none')})"


def _moves(best: list) -> str:
    if any(b is None for b in best):
        return "-"
    steps = math.log2(max(best) / min(best))
    return f"{steps:.1f}"


def plot(results: dict[Run, dict], widths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, f) for m, fs in FAMILIES.items() for f in fs]
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6), squeeze=False)
    for col, (model, family) in enumerate(panels):
        for row, scale in enumerate(("rms", "none")):
            ax = axes[row][col]
            for w in widths:
                xs, ys = [], []
                for x in factors_run(results, model, w, family):
                    res = results.get(sweep(model, w, family, x))
                    if res:
                        xs.append(in_both_scales(family, model, w, _family_lr(family) * x)[row])
                        ys.append(res["val_last"])
                ax.plot(xs, ys, marker="o", label=f"d={w}")
            ax.set_xscale("log")
            ships = " (the recipe's)" if _group(family).get("scale", "none") == scale else ""
            ax.set_title(f"{model} {family}\nlr, scale: {scale}{ships}", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("final val loss")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--seeds", type=int, default=1,
                    help="run every configuration at this many seeds and report the mean (the sweep's edges "
                         "are found at seed 0)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    cfg = Settings(steps=args.steps)
    start = time.time()
    runs = plan(args.widths)
    results = ({r: load_result(r, cfg) for r in runs} if args.report_only else run_all(runs, cfg, args.workers))
    # points past the grid's edges that earlier sweeps ran count too
    beyond = [sweep(m, w, f, 2.0 ** k) for m, fs in FAMILIES.items() for w in args.widths for f in fs
              for k in range(-3, 4) if 2.0 ** k not in FACTORS]
    results.update({r: res for r in beyond if (res := load_result(r, cfg))})
    for _ in range(3):  # the grid's edges, moved while the best sits on them
        more = [r for r in extensions(results, args.widths) if r not in results]
        if not more:
            break
        results.update({r: load_result(r, cfg) for r in more} if args.report_only else
                       run_all(more, cfg, args.workers))
    if args.seeds > 1:  # every configuration seed 0 ran, again at seeds 1 … n − 1, then averaged
        more = [dataclasses.replace(r, seed=s) for s in range(1, args.seeds) for r, v in results.items() if v]
        seeds = ({r: load_result(r, cfg) for r in more} if args.report_only else run_all(more, cfg, args.workers))
        results = pooled(results, seeds, args.seeds)
    command = "python benchmarks/transfer.py " + shlex.join(sys.argv[1:])
    lines = report(results, args.widths, cfg, command.strip(), time.time() - start)
    print("\n".join(lines))
    write_results(str(RESULTS / "transfer.md"), lines)
    plot(results, args.widths, RESULTS / "transfer.png")


if __name__ == "__main__":
    main()
