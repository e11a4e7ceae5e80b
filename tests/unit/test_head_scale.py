"""Per-head Muon on the attention output. ``o`` (``d × H·hd``) splits into ``H`` column blocks
``d × hd`` whose outputs add into the same ``d`` features, so each block's spectral scale uses the
whole ``o``'s input width (``Block.input_parts``). The stacked update then has the RMS of Muon on
the whole matrix: splitting into heads changes the direction, not the size. The block's own
``√(d/hd)`` gave ``√H`` times that, which grows with width at a fixed head size and made the
embedding's best lr grow with it (benchmarks/results/transfer.md, "The cause").

The fast path equals the reference with per-head ``o`` blocks in tests/distributed/test_properties.py
and every parity suite that runs the ``muon`` or ``symmetric`` recipe (both are per-head)."""
from __future__ import annotations

import math

import pytest
import torch

from dist_spectral import build_optimizer
from dist_spectral.blocks import unit_specs
from dist_spectral.functional import muon_scale
from dist_spectral.reference import matrix_direction
from dist_spectral.roles import ParamInfo
from dist_spectral.rules import get_rule
from tests.tiny import TOKENS

# Converged polar factors (float64, 12 Polar Express steps: singular values 1 to ~1e-12), so the
# RMS identities hold to rounding rather than to Newton-Schulz's spread.
EXACT = {"steps": 12, "polar_dtype": "float64"}


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def _o(d: int, heads: int, head_dim: int) -> ParamInfo:
    return ParamInfo("o_proj.weight", (d, heads * head_dim), "attention.o", num_heads=heads, head_dim=head_dim)


def test_muon_scale_takes_the_whole_input_width():
    assert muon_scale(64, 16, input_parts=8) == math.sqrt(64 / 128)  # Qwen3-like: H·hd = 2d
    assert muon_scale(64, 16, input_parts=4) == 1.0                   # OLMoE-like: H·hd = d
    assert muon_scale(64, 8, input_parts=2) == 2.0                    # H·hd < d: the whole o is tall
    assert muon_scale(4, 8, input_parts=2) == math.sqrt(8 / 16)       # a head wider than the model
    assert muon_scale(64, 16, "rms", input_parts=8) == muon_scale(64, 16, "rms")
    assert muon_scale(64, 16, "none", input_parts=8) == 1.0
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="input_parts"):
            muon_scale(64, 16, input_parts=bad)


def test_only_the_output_heads_split_the_input_side():
    """The q/k/v heads are row blocks (separate outputs); only ``o``'s column blocks add."""
    o = unit_specs(_o(32, 4, 8))
    assert [b.input_parts for u in o for b in u.blocks] == [4] * 4
    q = ParamInfo("q_proj.weight", (32, 32), "attention.q", num_heads=4, head_dim=8)
    assert {b.input_parts for u in unit_specs(q) for b in u.blocks} == {1}
    assert {b.input_parts for u in unit_specs(_o(32, 4, 8), per_head=False) for b in u.blocks} == {1}


@pytest.mark.parametrize("d, heads, head_dim", [(32, 4, 16), (32, 8, 4), (32, 2, 8), (12, 3, 8), (4, 2, 8)])
def test_stacked_heads_have_the_whole_matrix_rms(d, heads, head_dim):
    """H·hd above, equal to and below d, and a head wider than d: per-head and whole-matrix Muon
    updates of one gradient have equal RMS (the old block scale was √H times off)."""
    info = _o(d, heads, head_dim)
    group = {**get_rule("muon").defaults, **EXACT}
    g = torch.randn(d, heads * head_dim, generator=torch.Generator().manual_seed(d + heads), dtype=torch.float64)
    per_head = matrix_direction("muon", g, info, {**group, "per_head": True})
    whole = matrix_direction("muon", g, info, {**group, "per_head": False})
    assert _rms(per_head) == pytest.approx(_rms(whole), rel=1e-9)
    assert (per_head - whole).abs().max() > 1e-3  # a different direction, so the blocks really ran


def test_the_optimizer_steps_o_by_the_whole_matrix_rms():
    """Through the optimizer's batched path on a Qwen3 model whose heads are twice its width
    (H·hd = 2d, as Qwen3's own configs): one step from zero momentum moves ``o`` by the same RMS
    with and without per-head blocks."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def direction(per_head: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=40,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, **TOKENS))
        opt = build_optimizer(model, "muon", attention={"per_head": per_head, **EXACT})
        o = model.model.layers[0].self_attn.o_proj.weight
        assert o.shape == (32, 64)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        o.grad = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
        group = next(g for g in opt.param_groups if any(p is o for p in g["params"]))
        before = o.detach().clone()
        opt.step()
        return (before * (1 - group["lr"] * group["weight_decay"]) - o.detach()).double() / group["lr"]

    heads, whole = direction(True), direction(False)
    assert _rms(heads) == pytest.approx(_rms(whole), rel=1e-5)
    assert _rms(whole) == pytest.approx(1 / 8, rel=1e-5)  # polar of 32 × 64 at scale 1: 1/√64
