"""What both end-to-end modules read from a run's output directory, and the settings a resumed run
may change without changing a number."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from dist_spectral.training.metrics import read_metrics

#: Resumed as saved, and with every decoder layer recomputed in backward (activation checkpointing
#: keeps the engines' module hooks outside the checkpoint and must not move a loss).
RESUME_MODEL_SETTINGS = {"as-saved": {}, "activation-checkpointing": {"activation_checkpointing": True}}


def records(out: Path, kind: str) -> list[dict]:
    """The run's metrics records of one kind (``train``, ``eval``, ``summary``)."""
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == kind]


def model_overrides(settings: dict) -> list[str]:
    """``model.key=value`` command-line overrides for ``settings``."""
    return [f"model.{key}={str(value).lower()}" for key, value in settings.items()]


def saved_model_settings(out: Path, settings: dict) -> dict:
    """The values the run's resolved ``config.yaml`` holds for the keys of ``settings``."""
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    return {key: saved[key] for key in settings}


def planned_lrs(recipe: str, total: int, warmup: int, constant_fraction: float = 0.6,
                preset: str = "tiny-olmoe") -> dict[int, dict[str, float]]:
    """Each group's lr at every step of a run planned for ``total`` steps from the start, keyed like
    the ``train`` records (``step`` k runs at schedule step k − 1), by ``LambdaLR``'s own formula."""
    from dist_spectral import build_optimizer, paper_schedule
    from dist_spectral.models import build_model

    opt = build_optimizer(build_model(preset), recipe)
    sched = paper_schedule(opt, total, warmup=warmup, constant_fraction=constant_fraction)
    names = [g["name"] for g in opt.param_groups]
    return {k: {n: base * f(k - 1) for n, base, f in zip(names, sched.base_lrs, sched.lr_lambdas)}
            for k in range(1, total + 1)}


_WORDS = ("the", "a", "small", "large", "red", "quiet", "expert", "router", "token", "matrix", "row", "column",
          "gradient", "step", "rank", "shard", "moves", "keeps", "sends", "reads", "writes", "holds", "every",
          "each", "one", "two", "three", "four", "before", "after", "and", "or", "not", "with")


def golden_corpus() -> Path:
    """A fixed 200 kB text the golden-loss runs train on (``data.source=text``), the same bytes on
    every machine and Python (the built-in corpus is the interpreter's own source, which changes
    between Python versions): sentences and assignments drawn by a 32-bit linear congruential
    generator, with enough structure (a grammar, arithmetic that repeats) to be learnt."""
    path = Path(tempfile.gettempdir()) / "dist_spectral_golden_corpus_v1.txt"
    if path.is_file():
        return path
    x, lines, size = 12345, [], 0
    def draw(n: int) -> int:
        nonlocal x
        x = (1664525 * x + 1013904223) % 2 ** 32
        return (x >> 8) % n
    while size < 200_000:
        if draw(3) == 0:
            i, j = draw(20), draw(20)
            line = f"x{i} = x{j} + {(i * j) % 10}"
        else:
            words = [_WORDS[draw(len(_WORDS))] for _ in range(4 + draw(5))]
            line = " ".join(words).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # concurrent writers write the same bytes
    return path


def golden_data() -> list[str]:
    """The ``data.*`` overrides that train on :func:`golden_corpus`."""
    return ["data.source=text", f"data.path={golden_corpus()}"]
