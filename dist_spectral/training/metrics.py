"""What a run leaves behind: ``metrics.jsonl`` (one JSON object per line) and ``loss.png``.

Records (written by rank 0; times are means over ranks)::

    {"kind": "train", "step": 12, "loss": 3.91, "lr": {...}, "tokens": 24576, "tokens_per_s": 8100.0,
     "step_s": 0.25, "opt_s": 0.05, "exchange_s": 0.01, "compute_s": 0.03, "skipped": 0}
    {"kind": "eval", "step": 25, "val_loss": 3.42}
    {"kind": "summary", ...}

``step`` counts completed optimizer steps: the eval at ``step`` 0 is the initial model.
"""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends records to ``path``. On resume, records after the resumed step are dropped first, so
    the file reads as one run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                    and json.loads(line).get("kind") != "summary"]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path | str, png_path: Path | str, title: str = "") -> Path:
    """Training loss (raw and smoothed) and validation loss against steps, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train")
        smooth, ema = [], losses[0]
        for x in losses:
            ema = 0.9 * ema + 0.1 * x
            smooth.append(ema)
        ax.plot(steps, smooth, color="tab:blue", lw=1.6, label="train (EMA 0.9)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=1.6, ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


__all__ = ["MetricsLog", "read_metrics", "plot_losses"]
