"""The paper's comparison at laptop scale: adamw vs muon vs symmetric (and router variants).

    python benchmarks/convergence.py                  # sweep, seeds, report (about an hour on 2 cores)
    python benchmarks/convergence.py --report-only    # rebuild the report from finished runs

Every run is one process (``parallel=none``, one thread) training a tiny model from
``dist_spectral/configs/models`` on the built-in corpus with a recipe from ``dist_spectral/configs/recipes`` plus overrides;
``train.seed`` fixes both the initial weights and the batch order, so two runs with the same seed
differ only in the optimizer and the comparison is *paired*. Runs go to
``runs/convergence/<steps>steps/<id>/``
and are reused when their summary is there, so an interrupted sweep resumes where it stopped.

Stages (each picks from the previous one's final validation loss):

1. sweeps (seed 0), one learning rate at a time with the others at a shared centre: ``adamw``'s
   lr; ``muon``'s hidden lr and the AdamW lr of its embedding + head (+ router); ``symmetric``'s
   hidden lr, embedding lr and head lr *separately* (the paper's ratio is about 100:1); on the MoE
   model the router rules (centred row-norm, AdamW; left-spectral is the recipe's) with their lr.
   A best value on the edge of a grid extends the grid one step past it (once).
2. the chosen configurations, each coordinate at its best: adamw, muon, symmetric, symmetric with
   each router rule, and (MoE) two ablations on the best ``muon``: only the embedding switched to
   row-norm (``emb-only``), only the head switched to centred row-norm (``head-only``), at the
   best symmetric lrs; all of them at seeds 0, 1, 2, ...; the report gives mean and spread and the
   per-seed (paired) differences against ``muon``.

The dense model reuses the MoE model's chosen learning rates (``--sweep-dense`` sweeps its own).
On the MoE model the rules from neighbouring papers (recipes ``spectra``, ``auon``, ``conda``,
``aro``) get a two-point sweep of their hidden-matrix lr (the recipe's value and half or twice it, no
extension), then seeds.

Writes ``benchmarks/results/convergence.md`` and ``benchmarks/results/convergence.png``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import machine_lines, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "convergence"
RESULTS = ROOT / "benchmarks" / "results"

MODELS = {"moe": "tiny-olmoe", "dense": "tiny-qwen3"}


@dataclass(frozen=True)
class Spec:
    """One training run: model, recipe, ``build_optimizer`` overrides, seed."""

    model: str                      # key of MODELS
    recipe: str
    overrides: tuple = ()           # ((group, ((field, value), ...)), ...)
    seed: int = 0

    @property
    def config_id(self) -> str:
        """Everything but the seed: runs with equal ``config_id`` are seeds of one configuration."""
        parts = [self.model, self.recipe]
        for group, fields in self.overrides:
            parts.append(group + "." + ".".join(f"{k}={v}" for k, v in fields))
        return "__".join(parts)

    @property
    def run_id(self) -> str:
        return f"{self.config_id}__seed{self.seed}"

    def with_seed(self, seed: int) -> "Spec":
        return Spec(self.model, self.recipe, self.overrides, seed)

    def override_dict(self) -> dict:
        return {group: dict(fields) for group, fields in self.overrides}


def spec(model: str, recipe: str, seed: int = 0, **groups: dict) -> Spec:
    overrides = tuple(sorted((g, tuple(sorted(f.items()))) for g, f in groups.items()))
    return Spec(model, recipe, overrides, seed)


# ----- running -----
@dataclass
class Settings:
    steps: int = 2000
    eval_every: int = 250
    eval_batches: int = 24
    seq_len: int = 128
    batch_size: int = 4
    warmup: int = 100


def run_one(s: Spec, cfg: Settings) -> dict:
    """Train one spec in this process; returns its summary (with the validation curve)."""
    from dist_spectral.training.config import load_config, set_key
    from dist_spectral.training.loop import train
    from dist_spectral.training.metrics import read_metrics

    out = run_dir(s, cfg)
    c = load_config("tiny-olmoe-fsdp")
    c.name, c.out_dir = s.run_id, str(out)
    for key, value in {"model.preset": MODELS[s.model], "optim.recipe": s.recipe, "optim.overrides": s.override_dict(),
                       "optim.warmup": cfg.warmup, "parallel.engine": "none", "parallel.threads": 1,
                       "data.seq_len": cfg.seq_len, "data.batch_size": cfg.batch_size, "train.steps": cfg.steps,
                       "train.seed": s.seed, "train.eval_every": cfg.eval_every,
                       "train.eval_batches": cfg.eval_batches, "train.progress": False, "train.plot": False}.items():
        set_key(c, key, value)
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # an unfinished earlier attempt
    train(c)
    records = read_metrics(out / "metrics.jsonl")
    result = {"spec": s.run_id, "val": [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"],
              **{k: v for k, v in records[-1].items() if k in ("final_loss", "val_last", "seconds", "opt_s", "step_s")}}
    (out / "result.json").write_text(json.dumps(result))
    return result


def run_dir(s: Spec, cfg: Settings) -> Path:
    return RUNS / f"{cfg.steps}steps" / s.run_id


def load_result(s: Spec, cfg: Settings) -> dict | None:
    path = run_dir(s, cfg) / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_all(specs: list[Spec], cfg: Settings, workers: int) -> dict[Spec, dict]:
    """Run what is not finished yet, ``workers`` processes at a time (a fresh process per run)."""
    todo = [s for s in dict.fromkeys(specs) if load_result(s, cfg) is None]
    if todo:
        print(f"{len(todo)} runs to do ({len(specs) - len(todo)} reused), {workers} at a time", flush=True)
        ctx = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=ctx, max_tasks_per_child=1) as pool:
            jobs = {pool.submit(run_one, s, cfg): s for s in todo}
            for job in futures.as_completed(jobs):
                r = job.result()
                print(f"  {r['spec']}: val {r['val_last']:.4f} ({r['seconds']:.0f} s)", flush=True)
    return {s: load_result(s, cfg) for s in specs}


def final(results: dict, s: Spec) -> float:
    return results[s]["val_last"]


# ----- the experiment -----
ADAMW_LRS = (1e-3, 3e-3, 1e-2)
HIDDEN_LRS = (2.5e-3, 5e-3, 1e-2)        # Muon on attention, MLP, experts (muon and symmetric)
MUON_ADAM_LRS = (3e-3, 1e-2, 3e-2)       # muon's AdamW on embedding + head (+ router)
EMBEDDING_LRS = (0.1, 0.3, 1.0)          # symmetric: row-norm embedding
HEAD_LRS = (5e-3, 2e-2, 8e-2)            # symmetric: centred row-norm head
ROUTERS = {"centered_row_norm": (7.5e-4, 7.5e-3), "adamw": (1e-3, 1e-2)}  # left-spectral 7.5e-4 is the recipe's
# Rules from neighbouring papers (MoE model): the hidden-matrix lr at each recipe's own value and one
# neighbour (two points: they came last and got the smallest budget),
# everything else as the recipe has it. Conda refreshes its basis every 200 steps here (its
# default, 2000, would mean once in the whole run).
NEIGHBOURS = {"spectra": ((1e-3, 2e-3), {}), "auon": ((0.04, 0.08), {}),
              "conda": ((5e-3, 1e-2), {"update_proj_gap": 200}), "aro": ((2.5e-3, 5e-3), {})}
CENTRE = {"hidden": 5e-3, "adam": 1e-2, "embedding": 0.3, "lm_head": 2e-2}  # the middle of each sweep


def muon_spec(model: str, hidden_lr: float, adam_lr: float, seed: int = 0, **extra: dict) -> Spec:
    groups = {"attention": {"lr": hidden_lr}, "mlp": {"lr": hidden_lr}, "embedding": {"lr": adam_lr},
              "lm_head": {"lr": adam_lr}}
    if model == "moe":
        groups["router"] = {"lr": adam_lr}
    for g, fields in extra.items():
        groups[g] = {**groups.get(g, {}), **fields}
    return spec(model, "muon", seed, **groups)


def symmetric_spec(model: str, hidden_lr: float, embedding_lr: float, head_lr: float, seed: int = 0,
                   **extra: dict) -> Spec:
    groups = {"attention": {"lr": hidden_lr}, "mlp": {"lr": hidden_lr}, "embedding": {"lr": embedding_lr},
              "lm_head": {"lr": head_lr}, **extra}
    return spec(model, "symmetric", seed, **groups)


@dataclass(frozen=True)
class Coordinate:
    """One learning rate swept with everything else at the centre: ``make(lr)`` is the run."""

    family: str                     # adamw, muon, symmetric, router=<rule>
    name: str                       # which lr: lr, hidden, adam, embedding, lm_head
    grid: tuple
    make: typing.Callable[[float], Spec]
    extend: bool = True             # run one value past the grid's edge when the best sits on it

    def values(self, results: dict) -> list[float]:
        """The grid plus the extensions past its edges (see :func:`pending`) that have run."""
        vals = list(self.grid)
        for _ in range(MAX_EXTENSIONS if self.extend else 0):
            nxt = _beyond_edge(vals, results, self)
            if nxt is None or not results.get(self.make(nxt)):
                break
            vals.append(nxt)
        return sorted(vals)

    def best(self, results: dict) -> float:
        return min((v for v in self.values(results) if results.get(self.make(v))),
                   key=lambda v: final(results, self.make(v)))


MAX_EXTENSIONS = 1  # a best value on the edge of the grid extends it, at most this many times


def _beyond_edge(vals: list[float], results: dict, coord: Coordinate) -> float | None:
    """The next value past the grid's edge when the best so far sits on that edge, else None."""
    vals = sorted(vals)
    if not all(results.get(coord.make(v)) for v in vals):
        return None
    b = min(vals, key=lambda v: final(results, coord.make(v)))
    if b == vals[0]:
        return float(f"{vals[0] * vals[0] / vals[1]:.3g}")
    if b == vals[-1]:
        return float(f"{vals[-1] * vals[-1] / vals[-2]:.3g}")
    return None


def coordinates(model: str) -> list[Coordinate]:
    """Stage 1: every coordinate sweep (seed 0); the centre is shared by the sweeps of a recipe."""
    c = CENTRE
    cs = [Coordinate("adamw", "lr", ADAMW_LRS, lambda lr: spec(model, "adamw", matrix={"lr": lr}, vector={"lr": lr})),
          Coordinate("muon", "hidden", HIDDEN_LRS, lambda lr: muon_spec(model, lr, c["adam"])),
          Coordinate("muon", "adam", MUON_ADAM_LRS, lambda lr: muon_spec(model, c["hidden"], lr)),
          Coordinate("symmetric", "hidden", HIDDEN_LRS,
                     lambda lr: symmetric_spec(model, lr, c["embedding"], c["lm_head"])),
          Coordinate("symmetric", "embedding", EMBEDDING_LRS,
                     lambda lr: symmetric_spec(model, c["hidden"], lr, c["lm_head"])),
          Coordinate("symmetric", "lm_head", HEAD_LRS,
                     lambda lr: symmetric_spec(model, c["hidden"], c["embedding"], lr))]
    if model == "moe":
        for recipe, (lrs, extra) in NEIGHBOURS.items():
            cs.append(Coordinate(recipe, "hidden", lrs, lambda lr, recipe=recipe, extra=extra: spec(
                model, recipe, attention={"lr": lr, **extra}, mlp={"lr": lr, **extra}), extend=False))
        for rule, lrs in ROUTERS.items():
            cs.append(Coordinate(f"router={rule}", "lr", lrs, lambda lr, rule=rule: symmetric_spec(
                model, c["hidden"], c["embedding"], c["lm_head"], router={"rule": rule, "lr": lr})))
    return cs


def pending(model: str, results: dict) -> list[Spec]:
    """Stage 1 runs still to do: the grids, then one step past an edge where the best sits on it."""
    todo = []
    for coord in coordinates(model):
        missing = [coord.make(v) for v in coord.grid if not results.get(coord.make(v))]
        if missing:
            todo += missing
            continue
        vals = coord.values(results)
        nxt = _beyond_edge(vals, results, coord)
        if coord.extend and nxt is not None and len(vals) - len(coord.grid) < MAX_EXTENSIONS:
            todo.append(coord.make(nxt))
    return list(dict.fromkeys(todo))


def choose(model: str, results: dict, lrs_from: str | None = None) -> dict[str, Spec]:
    """From stage 1: each family's best configuration, one coordinate at a time (the best value of
    each learning rate with the others at the centre, then combined). ``lrs_from``: take the
    learning rates from another model's sweep instead (the dense model reuses the MoE's)."""
    best = {(k.family, k.name): k.best(results) for k in coordinates(lrs_from or model)}
    hidden_lr, adam_lr = best["muon", "hidden"], best["muon", "adam"]
    s_hidden, s_emb, s_head = best["symmetric", "hidden"], best["symmetric", "embedding"], best["symmetric", "lm_head"]
    lr = best["adamw", "lr"]
    chosen = {"adamw": spec(model, "adamw", matrix={"lr": lr}, vector={"lr": lr}),
              "muon": muon_spec(model, hidden_lr, adam_lr),
              "symmetric": symmetric_spec(model, s_hidden, s_emb, s_head)}
    if model == "moe":
        for rule in ROUTERS:
            chosen[f"router={rule}"] = symmetric_spec(model, s_hidden, s_emb, s_head,
                                                      router={"rule": rule, "lr": best[f"router={rule}", "lr"]})
        for recipe, (_, extra) in NEIGHBOURS.items():
            lr = best[recipe, "hidden"]
            chosen[recipe] = spec(model, recipe, attention={"lr": lr, **extra}, mlp={"lr": lr, **extra})
        # the ablations, on the MoE model only (the question the first look left open)
        chosen["emb-only"] = muon_spec(model, hidden_lr, adam_lr, embedding={"rule": "row_norm", "lr": s_emb})
        chosen["head-only"] = muon_spec(model, hidden_lr, adam_lr, lm_head={"rule": "centered_row_norm", "lr": s_head})
    return chosen


# ----- report -----
def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def describe(s: Spec) -> str:
    o = s.override_dict()
    return f"`{s.recipe}`" + ("" if not o else " " + ", ".join(
        f"{g}: " + ", ".join(f"{k}={v}" for k, v in f.items()) for g, f in sorted(o.items())))


def report(models: list[str], results: dict, chosen: dict, seeds: list[int], cfg: Settings, command: str,
           started: str, machine: list[str], seconds: float) -> str:
    lines = ["# Convergence at laptop scale: adamw vs muon vs symmetric", "",
             f"Command: `{command}`", "", f"Date: {started}; wall time {seconds / 60:.0f} min", "", "Machine:", "",
             *machine, "",
             f"Every run: one process, one thread, {cfg.steps} steps of {cfg.batch_size}×{cfg.seq_len} byte tokens "
             f"from the built-in corpus (Python standard library source), `paper_schedule` (vector warmup "
             f"{cfg.warmup}, matrix lr constant for 60 % then linear decay), validation on "
             f"{cfg.eval_batches}×{cfg.batch_size}×{cfg.seq_len} held-out tokens. The seed fixes the initial weights "
             "and the batch order, so runs with one seed are paired: they differ only in the optimizer.", ""]
    for model in models:
        rows = []
        for coord in coordinates(model):
            if not all(results.get(coord.make(v)) for v in coord.grid):
                continue  # not swept on this model
            vals = [v for v in coord.values(results) if results.get(coord.make(v))]
            b = coord.best(results)
            for v in vals:
                s_ = coord.make(v)
                rows.append(f"| {coord.family} | {coord.name} = {v:g}{' *' if v == b else ''} | {describe(s_)} | "
                            f"{final(results, s_):.4f} |")
        lines += [f"## {model}: `{MODELS[model]}`", ""]
        if rows:
            lines += ["### Stage 1: learning-rate sweeps (seed 0, final validation loss; one lr at a time, the others "
                      "at the centre; * = best)", "", "| family | lr swept | configuration | val loss |",
                      "|---|---|---|---|", *rows]
        else:
            lines.append("No sweep of its own: the learning rates chosen by the MoE model's sweep.")
        lines += ["", f"### Chosen configurations over seeds {seeds}", "",
                  "| name | configuration | val loss mean ± sd | per seed | Δ vs muon per seed (mean) |",
                  "|---|---|---|---|---|"]
        ch = chosen[model]
        base = [results.get(ch["muon"].with_seed(k)) for k in seeds]
        for name, s in ch.items():
            done = [(k, results.get(s.with_seed(k))) for k in seeds if results.get(s.with_seed(k))]
            if not done:
                continue
            vals = [r["val_last"] for _, r in done]
            delta = ""
            pairs = [(r["val_last"], base[seeds.index(k)]) for k, r in done if base[seeds.index(k)]]
            if name != "muon" and pairs:
                d = [v - b["val_last"] for v, b in pairs]
                delta = ", ".join(f"{x:+.4f}" for x in d) + f" ({statistics.mean(d):+.4f})"
            partial = "" if len(done) == len(seeds) else f" (seeds {[k for k, _ in done]} only)"
            lines.append(f"| {name} | {describe(s)}{partial} | {mean_sd(vals)} | {', '.join(f'{v:.4f}' for v in vals)} | "
                         f"{delta} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(models: list[str], results: dict, chosen: dict, seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.2), dpi=110, squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, (name, s) in enumerate(chosen[model].items()):
            rs = [results.get(s.with_seed(k)) for k in seeds]
            if any(r is None for r in rs):
                continue
            steps = [st for st, _ in rs[0]["val"]]
            mean = [statistics.mean(r["val"][j][1] for r in rs) for j in range(len(steps))]
            keep = [j for j, st in enumerate(steps) if st >= steps[-1] // 4]  # skip the first drop
            ax.plot([steps[j] for j in keep], [mean[j] for j in keep], "o-", ms=3, lw=1.4, label=name,
                    color=plt.cm.tab20(i % 20))  # more configurations than the default cycle's 10 colours
        ax.set_title(f"{model} ({MODELS[model]}), mean of {len(seeds)} seeds")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="moe,dense", help="comma-separated: moe, dense")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--sweep-dense", action="store_true",
                   help="sweep the dense model's learning rates too (default: reuse the MoE model's)")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs already finished")
    args = p.parse_args()
    cfg = Settings(steps=args.steps)
    models = args.models.split(",")
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter()
    machine = machine_lines()
    seeds = list(range(args.seeds))
    results: dict = {}
    chosen: dict = {}
    run = (lambda specs: {s: load_result(s, cfg) for s in specs}) if args.report_only else (
        lambda specs: run_all(specs, cfg, args.workers))
    for m in models:  # one model at a time, so an interrupted run leaves one model complete
        if m == "dense" and not args.sweep_dense and "moe" in chosen:
            chosen[m] = choose(m, results, lrs_from="moe")
            results.update(run([s.with_seed(k) for s in chosen[m].values() for k in seeds]))
            continue
        while todo := pending(m, results):
            results.update(run(todo))
            if not all(results.get(s) for s in todo):
                break  # runs missing (--report-only) or failed: the next stage cannot be chosen
        if pending(m, results):
            continue
        chosen[m] = choose(m, results)
        results.update(run([s.with_seed(k) for s in chosen[m].values() for k in seeds]))
    done = [m for m in models if m in chosen]
    command = "python benchmarks/convergence.py " + shlex.join(sys.argv[1:])
    write_results(str(RESULTS / "convergence.md"),  # keeps a "## Notes (by hand)" section
                  [report(done, results, chosen, seeds, cfg, command.strip(), started, machine,
                          time.perf_counter() - t0).rstrip("\n"), "", "![validation loss](convergence.png)"])
    plot(done, results, chosen, seeds, RESULTS / "convergence.png")
    print((RESULTS / "convergence.md").read_text())


if __name__ == "__main__":
    main()
