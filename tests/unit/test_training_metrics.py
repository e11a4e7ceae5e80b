"""What a run leaves behind (``dist_spectral/training/metrics.py``): the smoothed training loss,
the plot's data for runs resumed under other layouts, and the optimizer time line."""
from __future__ import annotations

import json
import math

import pytest

from dist_spectral.training.loop import optimizer_times
from dist_spectral.training.metrics import MetricsLog, ema, plot_data, read_metrics


def test_ema_is_bias_corrected():
    assert ema([4.0]) == [4.0]
    assert ema([3.0] * 5) == pytest.approx([3.0] * 5, rel=1e-15)
    # m_t = 0.9 m_{t-1} + 0.1 x_t from 0, divided by 1 - 0.9^t.
    xs = [5.5, 4.0, 3.0, 2.5]
    m, want = 0.0, []
    for t, x in enumerate(xs, start=1):
        m = 0.9 * m + 0.1 * x
        want.append(m / (1 - 0.9 ** t))
    assert ema(xs) == pytest.approx(want, rel=1e-12)


def test_ema_follows_a_falling_loss_instead_of_its_first_value():
    # A loss that falls fast, then is flat at 3.0 (a short run's curve): after 20 steps the EMA
    # started at the first value is still 0.35 above it (the start keeps weight 0.9^t), the
    # bias-corrected one 0.06 (the first two values' weights, 0.1·0.9^18 and 0.1·0.9^19, over 1 − 0.9^20).
    xs = [5.5, 4.0] + [3.0] * 18
    started_at_first = xs[0]
    for x in xs:
        started_at_first = 0.9 * started_at_first + 0.1 * x
    assert started_at_first - 3.0 == pytest.approx(0.9 ** 20 * 2.5 + 0.1 * 0.9 ** 19 * 2.5 + 0.1 * 0.9 ** 18 * 1.0)
    assert started_at_first - 3.0 > 0.3
    want = (0.1 * 0.9 ** 19 * 2.5 + 0.1 * 0.9 ** 18 * 1.0) / (1 - 0.9 ** 20)
    assert ema(xs)[-1] - 3.0 == pytest.approx(want, rel=1e-9)
    assert want < 0.07


def test_ema_rejects_a_beta_outside_0_1():
    with pytest.raises(ValueError, match="beta=1"):
        ema([1.0], beta=1)


def records_of_a_resumed_run() -> list[dict]:
    out = [{"kind": "segment", "step": 0, "layout": "fsdp x3", "engine": "fsdp", "world_size": 3},
           {"kind": "eval", "step": 0, "val_loss": 5.5}]
    out += [{"kind": "train", "step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 5)]
    out += [{"kind": "segment", "step": 4, "layout": "ep x2", "engine": "ep", "world_size": 2}]
    out += [{"kind": "train", "step": s, "loss": 5.0 - 0.1 * s} for s in range(5, 7)]
    out += [{"kind": "segment", "step": 6, "layout": "ep x2", "engine": "ep", "world_size": 2}]
    out += [{"kind": "train", "step": 7, "loss": 4.3}, {"kind": "eval", "step": 7, "val_loss": 4.4}]
    return out


def test_plot_data_marks_every_resume_and_names_every_layout():
    d = plot_data(records_of_a_resumed_run())
    assert d["resumes"] == [(4, "resumed: ep x2"), (6, "resumed: ep x2")]
    assert d["layouts"] == ["fsdp x3", "ep x2"]
    assert d["train"][0] == list(range(1, 8)) and d["val"] == ([0, 7], [5.5, 4.4])
    assert d["train_ema"][1] == ema(d["train"][1])


def test_plot_data_of_a_file_without_segments_takes_the_given_layout():
    d = plot_data([r for r in records_of_a_resumed_run() if r["kind"] != "segment"], layout="ddp x2")
    assert d["resumes"] == [] and d["layouts"] == ["ddp x2"]


def test_a_resume_at_the_same_step_replaces_that_steps_segment(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records_of_a_resumed_run()))
    log = MetricsLog(path, resume_step=6)
    log.write({"kind": "segment", "step": 6, "layout": "ddp x4", "engine": "ddp", "world_size": 4})
    segments = [(r["step"], r["layout"]) for r in read_metrics(path) if r["kind"] == "segment"]
    assert segments == [(0, "fsdp x3"), (4, "ep x2"), (6, "ddp x4")]
    assert max(r["step"] for r in read_metrics(path) if r["kind"] == "train") == 6


def test_optimizer_times_name_the_remainder():
    line = optimizer_times({"opt_s": 0.0422, "exchange_s": 0.0007, "compute_s": 0.0223})
    assert line.startswith("optimizer 42.2 ms (exchange 0.7, whole-matrix rules 22.3, other 19.2: ")
    assert "element-wise and row rules" in line
