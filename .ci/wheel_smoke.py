"""Smoke test of an installed dist_spectral (a wheel, not the checkout), run from outside the checkout.

    python wheel_smoke.py CHECKOUT

It fails, printing one line per problem and exiting 1, unless:

- ``dist_spectral`` is imported from the install, not from CHECKOUT's sources;
- every config the checkout ships in ``dist_spectral/configs`` (recipes, model presets, parallel
  layouts, DeepSpeed configs, the built-in default run) is in the install and resolves by name;
- every recipe builds an optimizer for the tiny MoE preset (``tiny-olmoe``) and one
  forward/backward/step leaves every parameter finite and moves every one that has a gradient;
- ``dist-spectral inspect`` (the installed console script) prints the parameter table;
- ``dist-spectral train --print-config`` (no ``--config``) resolves the built-in default run, and a
  2-step one-process run of it, shrunk by overrides, exits 0 in an empty folder and writes
  ``runs/smoke/metrics.jsonl`` with finite losses.

Needs torch, transformers and the wheel installed; not deepspeed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = {"recipes": "*.yaml", "models": "*.yaml", "parallel": "*.yaml", "deepspeed": "*.json", "runs": "*.yaml"}
# The built-in default run, as small as a real run gets: one process, one decoder layer, 2 steps.
SMOKE_RUN = ["parallel=none", "train.steps=2", "train.eval_every=2", "train.eval_batches=1",
             "model.config.num_hidden_layers=1", "data.seq_len=32", "data.batch_size=2", "data.max_bytes=100000",
             "optim.warmup=1", "train.progress=false", "train.plot=false", "name=smoke"]


def check_install(checkout: Path) -> list[str]:
    import dist_spectral
    from dist_spectral.recipes import configs_dir

    package = Path(dist_spectral.__file__).resolve().parent
    if checkout == package or checkout in package.parents:
        return [f"dist_spectral was imported from the checkout ({package}), not from the install: run this "
                f"from a folder outside the checkout, with the wheel installed non-editable"]
    problems = []
    if configs_dir() != package / "configs":
        problems.append(f"configs_dir() is {configs_dir()}, not the package's {package / 'configs'} "
                        f"(is DIST_SPECTRAL_CONFIG_DIR set?)")
    for kind, pattern in KINDS.items():
        shipped = {p.name for p in (checkout / "dist_spectral" / "configs" / kind).glob(pattern)}
        installed = {p.name for p in (package / "configs" / kind).glob(pattern)}
        if not shipped:
            problems.append(f"the checkout has no dist_spectral/configs/{kind}/{pattern}: wrong CHECKOUT {checkout}?")
        for name in sorted(shipped - installed):
            problems.append(f"configs/{kind}/{name} is not in the installed package: declare it as package data "
                            f"in pyproject.toml")
    if not (package / "py.typed").is_file():
        problems.append("py.typed is not in the installed package")
    return problems


def check_recipes() -> list[str]:
    import torch

    import dist_spectral
    from dist_spectral.models import build_model
    from dist_spectral.recipes import list_recipes

    problems = []
    for recipe in list_recipes():
        model = build_model("tiny-olmoe", seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        try:
            opt = dist_spectral.build_optimizer(model, recipe)
            ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        except Exception as err:  # report every recipe, not only the first that fails
            problems.append(f"recipe {recipe!r}: {type(err).__name__}: {err}")
            continue
        moved = 0
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                problems.append(f"recipe {recipe!r}: {name} {tuple(p.shape)} is not finite after one step")
            elif p.grad is not None and p.grad.count_nonzero() > 0:
                if torch.equal(p.detach(), before[name]):
                    problems.append(f"recipe {recipe!r}: {name} {tuple(p.shape)} has a gradient but did not change")
                else:
                    moved += 1
        print(f"recipe {recipe}: one step, {moved} parameters moved")
    return problems


def check_configs() -> list[str]:
    from dist_spectral.models import list_presets, load_model_config
    from dist_spectral.recipes import configs_dir
    from dist_spectral.training.config import load_config
    from dist_spectral.training.launchers import deepspeed_json

    problems = []
    checks = [("models", "*.yaml", load_model_config),
              ("parallel", "*.yaml", lambda name: load_config(None, [f"parallel={name}"])),
              ("deepspeed", "*.json", deepspeed_json),
              ("runs", "*.yaml", load_config)]
    for kind, pattern, load in checks:
        for path in sorted((configs_dir() / kind).glob(pattern)):
            try:
                load(path.stem)
            except Exception as err:
                problems.append(f"{kind} config {path.stem!r} does not load by name: {type(err).__name__}: {err}")
    print(f"configs: {len(list_presets())} model presets, layouts, DeepSpeed configs and built-in runs load by name")
    return problems


def console_script() -> str | None:
    exe = Path(sys.executable).parent / "dist-spectral"
    return str(exe) if exe.is_file() else shutil.which("dist-spectral")


def check_inspect() -> list[str]:
    exe = console_script()
    if exe is None:
        return ["the dist-spectral console script is not installed (next to python or on PATH)"]
    out = subprocess.run([exe, "inspect", "--model", "tiny-olmoe", "--recipe", "symmetric"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return [f"dist-spectral inspect exited {out.returncode}: {out.stderr.strip()[-2000:]}"]
    rows = [line.split() for line in out.stdout.splitlines()]
    if not any(r[:1] == ["model.layers.0.mlp.gate.weight"] and "router" in r for r in rows):
        return [f"dist-spectral inspect printed no router row for tiny-olmoe:\n{out.stdout[-2000:]}"]
    print(f"dist-spectral inspect: {len(rows) - 2} rows")
    return []


def check_train() -> list[str]:
    """``dist-spectral train`` on its built-in default, from an empty folder: no repository to read."""
    import yaml

    from dist_spectral.training import DEFAULT_RUN

    exe = console_script()
    if exe is None:
        return ["the dist-spectral console script is not installed (next to python or on PATH)"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "DIST_SPECTRAL_CONFIG_DIR")}
    with tempfile.TemporaryDirectory(prefix="wheel-smoke-train-") as folder:
        start = time.perf_counter()
        out = subprocess.run([exe, "train", "--print-config"], cwd=folder, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            return [f"dist-spectral train --print-config exited {out.returncode} (the built-in default run "
                    f"{DEFAULT_RUN!r} must ship in the package): {out.stderr.strip()[-2000:]}"]
        cfg = yaml.safe_load(out.stdout)
        if (cfg.get("name"), cfg["model"]["preset"], cfg["parallel"]["engine"]) != (DEFAULT_RUN, "tiny-olmoe", "fsdp"):
            return [f"dist-spectral train --print-config did not print the built-in default {DEFAULT_RUN!r}:\n"
                    f"{out.stdout[-2000:]}"]
        print(f"dist-spectral train --print-config: {DEFAULT_RUN} ({time.perf_counter() - start:.1f} s)")

        start = time.perf_counter()
        cmd = [exe, "train", *SMOKE_RUN]
        out = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            return [f"{' '.join(cmd[1:])} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"]
        metrics = Path(folder) / "runs" / "smoke" / "metrics.jsonl"
        if not metrics.is_file():
            return [f"{' '.join(cmd[1:])} wrote no runs/smoke/metrics.jsonl (in {folder}: "
                    f"{sorted(str(p.relative_to(folder)) for p in Path(folder).rglob('*'))})"]
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        problems = []
        if [r["step"] for r in train] != [1, 2]:
            problems.append(f"runs/smoke/metrics.jsonl has train steps {[r['step'] for r in train]}, not [1, 2]")
        if not evals:
            problems.append("runs/smoke/metrics.jsonl has no validation record")
        losses = [r["loss"] for r in train] + [r["val_loss"] for r in evals]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
            problems.append(f"runs/smoke/metrics.jsonl has non-finite losses: {losses}")
        if problems:
            return problems
        print(f"dist-spectral train ({' '.join(SMOKE_RUN)}): losses "
              f"{', '.join(f'{x:.3f}' for x in losses)} ({time.perf_counter() - start:.1f} s)")
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="the repository the wheel was built from")
    checkout = parser.parse_args(argv).checkout.resolve()
    problems = check_install(checkout)
    if not problems or "imported from the checkout" not in problems[0]:
        problems += check_recipes() + check_configs() + check_inspect() + check_train()
    for line in problems:
        print(f"wheel smoke test: {line}", file=sys.stderr)
    if problems:
        print(f"wheel smoke test FAILED: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
