"""The width-aware scale of the row and spectral rules (``scale: rms``): the update's RMS is 0.2 at
every width, the paper's rule (``scale: none``) is the same direction divided by ``0.2·√L``, the
symmetries each rule claims still hold, and a bad value is refused when the optimizer is built. The
fast path equals the reference with the scale on and off in tests/unit/test_optimizer.py
(``symmetric``, ``symmetric-paper``), tests/distributed/test_properties.py and every parity suite
that runs the ``symmetric`` recipe."""
from __future__ import annotations

import math

import pytest
import torch

from dist_spectral import build_optimizer
from dist_spectral import functional as F
from dist_spectral.rules import LOCAL, get_rule
from tests.tiny import tiny_olmoe

WIDTHS = (64, 128, 256, 2048)
ROW_RULES = ("row_norm", "centered_row_norm")
SPECTRAL_RULES = ("left_spectral", "right_spectral", "hybrid")


def _group(rule: str, **extra) -> dict:
    # norm_eps 0: the row norms exact, so the RMS is 0.2 to rounding rather than to eps/‖row‖
    eps = {"norm_eps": 0.0} if "norm_eps" in get_rule(rule).defaults else {}
    return {**get_rule(rule).defaults, "rule": rule, **eps, **extra}


def _direction(rule: str, x: torch.Tensor, axis: str = "rows", **extra) -> torch.Tensor:
    return get_rule(rule).direction(x.clone(), axis=axis, transposed=False, group=_group(rule, **extra), stats=LOCAL)


def _rms(x: torch.Tensor, dim=None) -> torch.Tensor:
    return x.pow(2).mean(dim=dim).sqrt()


def test_width_scale_values():
    assert F.width_scale(64, "none") == 1.0
    assert F.width_scale(64, "rms") == pytest.approx(0.2 * 8)
    assert F.width_scale(2048, "rms") == pytest.approx(0.2 * math.sqrt(2048))
    with pytest.raises(ValueError, match="unknown scale 'spectral'"):
        F.width_scale(64, "spectral")


@pytest.mark.parametrize("width", WIDTHS)
def test_row_norm_rms_is_the_same_at_every_width(width):
    x = torch.randn(32, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    with_scale = _direction("row_norm", x, scale="rms")
    torch.testing.assert_close(_rms(with_scale, dim=-1), torch.full((32,), 0.2, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    # the paper's rule: unit rows, so each element moves by 1/√width: the dependence the scale removes
    paper = _direction("row_norm", x, scale="none")
    torch.testing.assert_close(_rms(paper, dim=-1), torch.full((32,), width ** -0.5, dtype=torch.float64))
    torch.testing.assert_close(with_scale, paper * 0.2 * math.sqrt(width), rtol=1e-14, atol=0)


def test_zero_rows_stay_zero_with_the_scale():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    x[2] = 0  # a token absent from the batch: its embedding row must not move
    for rule in ROW_RULES[:1]:
        u = get_rule(rule).direction(x.clone(), axis="rows", transposed=False,
                                     group={**get_rule(rule).defaults, "scale": "rms"}, stats=LOCAL)
        assert torch.equal(u[2], torch.zeros(64)) and u.isfinite().all()


@pytest.mark.parametrize("width", WIDTHS)
def test_centered_row_norm_rms_is_the_same_at_every_width(width):
    """C(R(C(M))) rows are unit before the outer centring, which only removes their mean: the
    update's RMS is 0.2 at most and, on rows that share no direction, within 1 % of it at every width;
    its columns sum to zero (shift-free)."""
    m = 32
    x = torch.randn(m, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    u = _direction("centered_row_norm", x, scale="rms")
    rms = _rms(u).item()
    assert 0.198 <= rms <= 0.2 + 1e-12
    torch.testing.assert_close(u.sum(0), torch.zeros(width, dtype=torch.float64), atol=1e-12, rtol=0)
    paper = _direction("centered_row_norm", x, scale="none")
    torch.testing.assert_close(u, paper * 0.2 * math.sqrt(width), rtol=1e-14, atol=1e-16)


@pytest.mark.parametrize("rule", SPECTRAL_RULES)
@pytest.mark.parametrize("width", (64, 256))
def test_spectral_rules_rms_with_alpha_zero(rule, width):
    """With ``alpha = 0`` the spectral rules' direction has unit singular values (the left-spectral
    one on the centred block, one fewer): RMS 0.2 (or 0.2·√((m − 1)/m)) at every width."""
    m = 8
    x = torch.randn(m, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    extra = {"alpha": 0.0, "scale": "rms"}
    polar = {"polar_dtype": "float64", "steps": 12} if rule == "hybrid" else {}  # polar converged
    extra.update(polar)
    u = _direction(rule, x, **extra)
    rank = m - 1 if rule == "left_spectral" else m
    assert _rms(u).item() == pytest.approx(0.2 * math.sqrt(rank / m), rel=1e-6)
    paper = _direction(rule, x, alpha=0.0, scale="none", **polar)
    torch.testing.assert_close(u, paper * 0.2 * math.sqrt(width), rtol=1e-12, atol=1e-15)


def test_column_axis_uses_the_column_length():
    """The column-aware rules (SwiGLU down projection) normalise columns: the length is the row count."""
    x = torch.randn(48, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u = _direction("row_norm", x, axis="cols", scale="rms")
    torch.testing.assert_close(_rms(u, dim=0), torch.full((16,), 0.2, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("rule", ROW_RULES)
def test_equivariance_holds_with_the_scale(rule):
    """R(P X Qᵀ) = P R(X) Qᵀ (row permutation P, right rotation Q): the scale is one number per width."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 20, generator=g, dtype=torch.float64)
    perm = torch.randperm(12, generator=g)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    lhs = _direction(rule, x[perm] @ q.T, scale="rms")
    rhs = _direction(rule, x, scale="rms")[perm] @ q.T
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)
    if rule == "centered_row_norm":  # blind to a shared shift of every row
        shift = torch.randn(1, 20, generator=g, dtype=torch.float64)
        torch.testing.assert_close(_direction(rule, x + shift, scale="rms"), _direction(rule, x, scale="rms"),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ROW_RULES + SPECTRAL_RULES)
def test_bad_scale_is_refused_at_build(rule):
    model = tiny_olmoe(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    group = {"name": "router", "match": {"role": "router"}, "rule": rule, "lr": 1e-2, "scale": "spectral"}
    with pytest.raises(ValueError, match=rf"scale='spectral': rule '{rule}' takes one of none, rms"):
        build_optimizer(model, {"name": "bad", "groups": [group, {"name": "rest", "match": {}, "rule": "adamw",
                                                                     "lr": 1e-3}]})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
