"""What a run leaves behind: ``metrics.jsonl`` (one JSON object per line) and ``loss.png``.

Records (written by rank 0; times are means over ranks)::

    {"kind": "segment", "step": 0, "layout": "fsdp x2", "engine": "fsdp", "world_size": 2}
    {"kind": "train", "step": 12, "loss": 3.91, "lr": {...}, "tokens": 24576, "tokens_per_s": 8100.0,
     "step_s": 0.25, "opt_s": 0.05, "exchange_s": 0.01, "compute_s": 0.03, "skipped": 0}
    {"kind": "eval", "step": 25, "val_loss": 3.42}
    {"kind": "summary", ...}

``step`` counts completed optimizer steps: the eval at ``step`` 0 is the initial model. A
``segment`` record opens each launch of the run (the first at step 0, one per resume at the
resumed step), so a run continued under another layout or world size says where it changed.
"""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends records to ``path``. On resume, records after the resumed step are dropped first, so
    the file reads as one run (and a segment that opened at the resumed step, replaced by this one)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                r = json.loads(line) if line.strip() else None
                step, kind = (r or {}).get("step", 0), (r or {}).get("kind")
                if r and step <= resume_step and kind != "summary" and not (kind == "segment" and step == resume_step):
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def ema(values, beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, as Adam's moments: ``m_t = β m_{t−1} + (1 − β) x_t``
    from ``m_0 = 0``, reported as ``m_t / (1 − β^t)``. The first value is ``x_1`` itself and no
    start value weighs on later ones (an EMA started at ``x_1`` instead keeps it at weight ``β^t``,
    well above a loss that falls fast early on).

    Args:
        values: the series.
        beta (float): decay in [0, 1) (default: 0.9).
    """
    if not 0 <= beta < 1:
        raise ValueError(f"ema: beta={beta} must be in [0, 1)")
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** t))
    return out


def plot_data(records: list[dict], layout: str | None = None) -> dict:
    """What :func:`plot_losses` draws, from ``metrics.jsonl`` records.

    Returns a dict: ``train`` (steps, losses), ``train_ema`` (steps, :func:`ema` of the losses), ``val``
    (steps, losses), ``resumes`` (step, label) for every segment after the first, and ``layouts``: the
    segments' layouts in order, repeats of the previous one dropped (``[layout]`` for a file without
    segment records).
    """
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    segments = sorted((r["step"], r["layout"]) for r in records if r.get("kind") == "segment")
    layouts = []
    for _, name in segments:
        if not layouts or layouts[-1] != name:
            layouts.append(name)
    steps, losses = (list(v) for v in zip(*train)) if train else ([], [])
    return {"train": (steps, losses), "train_ema": (steps, ema(losses)),
            "val": tuple(list(v) for v in zip(*val)) if val else ([], []),
            "resumes": [(step, f"resumed: {name}") for step, name in segments[1:]],
            "layouts": layouts or ([layout] if layout else [])}


def plot_losses(metrics_path: Path | str, png_path: Path | str, title: str = "", layout: str | None = None) -> Path:
    """Training loss (raw and bias-corrected EMA) and validation loss against steps, saved as a PNG;
    a dashed vertical line marks each resume. The title is ``title`` and the layouts the run went
    through (``layout`` when the file records none), e.g. ``run: tiny-olmoe, symmetric, fsdp x2 → ep x2``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = plot_data(read_metrics(metrics_path), layout)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if d["train"][0]:
        ax.plot(*d["train"], color="tab:blue", alpha=0.3, lw=0.8, label="train")
        ax.plot(*d["train_ema"], color="tab:blue", lw=1.6, label="train (EMA 0.9, bias-corrected)")
    if d["val"][0]:
        ax.plot(*d["val"], "o-", color="tab:orange", lw=1.6, ms=4, label="validation")
    for step, label in d["resumes"]:
        ax.axvline(step, color="0.4", ls="--", lw=0.9)
        # At the foot of the line: a loss curve and the legend take the top of the axes.
        ax.annotate(label, (step, 0), xycoords=("data", "axes fraction"), xytext=(3, 3),
                    textcoords="offset points", va="bottom", fontsize=8, color="0.3", rotation=90)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(", ".join([t for t in (title, " → ".join(d["layouts"])) if t]))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


__all__ = ["MetricsLog", "read_metrics", "ema", "plot_data", "plot_losses"]
