"""Fused q/k/v weights in their three row layouts: the blocks of ``dist_spectral/blocks.py`` are
exactly the rows the module itself splits into each head's query, key and value, and the update
is Muon on those split tensors, in the reference and in the optimizer.

The layouts: GPT-NeoX ``[heads, 3, head_dim]``, Falcon's new decoder architecture
``[kv_heads, q/kv + 2, head_dim]``, Falcon multi-query ``[q heads; k; v]``, Falcon classic like
GPT-NeoX, and ``nn.MultiheadAttention``'s ``[q; k; v]``. Models are built from tiny configs with
random weights (no downloads).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import dist_spectral  # noqa: E402
from dist_spectral import functional as F  # noqa: E402
from dist_spectral.blocks import read_block, unit_specs  # noqa: E402
from dist_spectral.build import resolve_groups  # noqa: E402
from dist_spectral.reference import ReferenceOptimizer, _polar_args, matrix_direction  # noqa: E402
from dist_spectral.rules import get_rule  # noqa: E402
from dist_spectral.roles import classify  # noqa: E402
from tests.tiny import synthetic_grad  # noqa: E402

TOKENS = dict(vocab_size=100, bos_token_id=None, eos_token_id=None, pad_token_id=None)
D, HEADS = 32, 4

# name -> (build the model, path of the attention module, fused weight name, modeling module)
FALCON = dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, bias=False, **TOKENS)
CASES = {
    "gpt-neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=D, intermediate_size=48, num_hidden_layers=1, num_attention_heads=HEADS,
        attention_bias=False, **TOKENS)), "gpt_neox.layers.0.attention", "gpt_neox"),
    "falcon-new-decoder": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        new_decoder_architecture=True, num_kv_heads=2, **FALCON)), "transformer.h.0.self_attention", "falcon"),
    "falcon-multi-query": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        multi_query=True, **FALCON)), "transformer.h.0.self_attention", "falcon"),
    "falcon-per-head": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
        multi_query=False, **FALCON)), "transformer.h.0.self_attention", "falcon"),
}


def _module_split(case: str, monkeypatch) -> tuple[nn.Module, dict[str, list[list[int]]]]:
    """The model and, per q/k/v, the fused weight's row indices of each head, as the module's own
    forward splits them: row r of the fused weight outputs r for the input e_0, and the q/k/v
    tensors reaching the attention function are captured (rotary at position 0 is the identity)."""
    build, attn_path, family = CASES[case]
    torch.manual_seed(0)
    model = build()
    model.config._attn_implementation = "eager"
    attn = model.get_submodule(attn_path)
    weight = attn.query_key_value.weight
    with torch.no_grad():
        weight.zero_()
        weight[:, 0] = torch.arange(weight.shape[0], dtype=weight.dtype)
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured.update(q=query, k=key, v=value)
        return torch.zeros_like(query).transpose(1, 2), None

    modeling = getattr(transformers.models, family)
    monkeypatch.setattr(getattr(modeling, f"modeling_{family}"), "eager_attention_forward", capture)
    x = torch.zeros(1, 1, D)
    x[..., 0] = 1
    rotary = model.gpt_neox.rotary_emb if family == "gpt_neox" else model.transformer.rotary_emb
    cos_sin = rotary(x, torch.zeros(1, 1, dtype=torch.long))
    with torch.no_grad():
        attn(x, attention_mask=None, position_embeddings=cos_sin)
    # [batch, heads, seq, head_dim] -> per head, the row indices it was computed from
    rows = {p: [[round(float(r)) for r in head] for head in captured[p][0, :, 0]] for p in "qkv"}
    return model, rows


def _info(model, name):
    return next(i for i in classify(model) if i.name == name)


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_are_the_modules_own_head_split(case, monkeypatch):
    model, rows = _module_split(case, monkeypatch)
    info = _info(model, f"{CASES[case][1]}.query_key_value.weight")
    hd = D // HEADS
    assert info.role == "attention.qkv" and info.head_dim == hd
    assert all(len(head) == hd for p in "qkv" for head in rows[p])
    # per head: every unit is one head of q, k or v, and every head is one unit
    units = unit_specs(info, per_head=True)
    assert sorted(list(range(u.row_start, u.row_stop)) for u in units) == sorted(rows["q"] + rows["k"] + rows["v"])
    # whole q, k and v: the blocks read the module's heads, in its head order
    index = torch.arange(info.shape[0]).unsqueeze(1).expand(info.shape).contiguous()
    matrices = [read_block(index[u.row_start:u.row_stop], b)[:, 0].tolist()
                for u in unit_specs(info, per_head=False) for b in u.blocks]
    assert matrices == [sum(rows[p], []) for p in "qkv"]


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("case", ["gpt-neox", "falcon-new-decoder"])
def test_reference_update_is_muon_on_the_split_tensors(case, per_head, monkeypatch):
    model, rows = _module_split(case, monkeypatch)
    info = _info(model, f"{CASES[case][1]}.query_key_value.weight")
    g = synthetic_grad(info.name, info.shape, 0)
    group = {**get_rule("muon").defaults, "per_head": per_head}
    out = matrix_direction("muon", g, info, group)
    matrices = [head for p in "qkv" for head in rows[p]] if per_head else [sum(rows[p], []) for p in "qkv"]
    for r in matrices:
        want = F.polar(g[r], **_polar_args(group)) * F.muon_scale(len(r), D, group["scale"])
        torch.testing.assert_close(out[r], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_head", [True, False])
def test_optimizer_equals_reference_on_grouped_qkv(per_head):
    """The optimizer's batched path (blocks of several row runs read and written in place) against
    the reference, 3 steps of the muon recipe on Falcon's new decoder architecture."""
    def build():
        torch.manual_seed(1)
        return CASES["falcon-new-decoder"][0]()

    model = build()
    opt = dist_spectral.build_optimizer(model, "muon", attention={"per_head": per_head})
    groups, _, infos = resolve_groups(build(), "muon", attention={"per_head": per_head})
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = ReferenceOptimizer([{"params": [(i.name, ref_params[i.name]) for i in g.members], "rule": g.rule, **g.hyper}
                              for g in groups], {i.name: i for i in infos})
    for step in range(3):
        grads = {n: synthetic_grad(n, tuple(p.shape), step) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        ref.step(grads)
    qkv = "transformer.h.0.self_attention.query_key_value.weight"
    assert next(g.name for g in groups if any(i.name == qkv for i in g.members)) == "attention"
    units = unit_specs(next(i for i in infos if i.name == qkv), per_head=per_head)
    assert len(units) == (8 if per_head else 1)  # per head: 4 q, 2 k, 2 v
    for n, p in model.named_parameters():
        # the same bound as test_optimizer's step-for-step comparison (batched vs looped fp32 polar)
        assert (ref_params[n] - p.detach()).abs().max() <= 5e-6 * max(float(ref_params[n].abs().max()), 1.0), n
    assert not torch.equal(ref_params[qkv], build().get_parameter(qkv).detach())  # it moved


def test_multihead_attention_in_proj_is_stacked_qkv():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, bias=False, batch_first=True)
    info = _info(nn.ModuleDict({"attn": mha}), "attn.in_proj_weight")
    # torch splits in_proj_weight with chunk(3): q, k, v rows of E each, heads of E / H rows inside
    q, k, v = mha.in_proj_weight.detach().chunk(3)
    blocks = [mha.in_proj_weight.detach()[u.row_start:u.row_stop] for u in unit_specs(info, per_head=False)]
    assert all(torch.equal(a, b) for a, b in zip(blocks, (q, k, v))) and len(blocks) == 3
    x = torch.randn(1, 3, D)
    with torch.no_grad():
        expected, _ = mha(x, x, x)
        hd = D // HEADS
        heads = [mha.in_proj_weight[u.row_start:u.row_stop] for u in unit_specs(info, per_head=True)]
        qh, kh, vh = ([x[0] @ w.T for w in heads[i * HEADS:(i + 1) * HEADS]] for i in range(3))
        att = [torch.softmax(a @ b.T / hd ** 0.5, -1) @ c for a, b, c in zip(qh, kh, vh)]
        got = torch.cat(att, -1) @ mha.out_proj.weight.T
    torch.testing.assert_close(got, expected[0])
