"""What both end-to-end modules read from a run's output directory, and the settings a resumed run
may change without changing a number."""
from __future__ import annotations

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
