"""Parameter roles on real transformers model classes built from tiny configs (no downloads).

Every test asserts the full ``name -> (role, layout fields)`` mapping, so a parameter that changes role
fails the test. Layout numbers are written out literally from the tiny configs below.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from dist_spectral.roles import FallbackRoleWarning, ParamInfo, classify, format_table, module_type_name  # noqa: E402

# Special-token ids outside a 100-token vocabulary make transformers warn (or fail, for padding_idx).
TOKENS = dict(vocab_size=100, bos_token_id=None, eos_token_id=None, pad_token_id=None)
SKIP = ("name", "shape", "role", "module_type")


def R(role: str, **fields) -> tuple:
    """Expected role plus every layout field that differs from its default."""
    return (role, tuple(sorted(fields.items())))


def summary(info: ParamInfo) -> tuple:
    """The same summary, computed from a ``ParamInfo``."""
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)
              if f.name not in SKIP and getattr(info, f.name) != f.default}
    return R(info.role, **fields)


def check(model: nn.Module, expected: dict[str, tuple], warns: str | None = None) -> list[ParamInfo]:
    """Assert names/order/shapes follow ``named_parameters`` and roles match ``expected`` exactly, and
    that classification warns about fallbacks exactly when ``warns`` (a regex of the message) is given."""
    if warns is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackRoleWarning)
            infos = classify(model)
    else:
        with pytest.warns(FallbackRoleWarning, match=warns) as caught:
            infos = classify(model)
        assert len([w for w in caught if w.category is FallbackRoleWarning]) == 1  # once per call
    params = list(model.named_parameters())
    assert [i.name for i in infos] == [n for n, _ in params]
    assert [i.shape for i in infos] == [tuple(p.shape) for _, p in params]
    assert {i.name: summary(i) for i in infos} == expected
    return infos


V = R("vector")


def norms(prefix: str, *names: str) -> dict:
    """1-D norm weights under ``prefix``."""
    return {f"{prefix}.{n}.weight": V for n in names}


def attention(prefix: str, heads: int, kv_heads: int, head_dim: int, bias: str = "", qk_norm: bool = False) -> dict:
    """q/k/v/o projections (``bias``: which of "qkvo" carry a bias), optional q/k RMSNorm."""
    out = {}
    for part, n in (("q", heads), ("k", kv_heads), ("v", kv_heads), ("o", heads)):
        out[f"{prefix}.{part}_proj.weight"] = R(f"attention.{part}", num_heads=n, head_dim=head_dim)
        if part in bias:
            out[f"{prefix}.{part}_proj.bias"] = V
        if qk_norm and part in "qk":
            out[f"{prefix}.{part}_norm.weight"] = V
    return out


def swiglu(prefix: str) -> dict:
    """Dense SwiGLU (or shared expert) gate/up/down."""
    return {f"{prefix}.gate_proj.weight": R("mlp.gate"), f"{prefix}.up_proj.weight": R("mlp.up"),
            f"{prefix}.down_proj.weight": R("mlp.down")}


def experts_3d(prefix: str, num_experts: int) -> dict:
    """transformers 5.x ``[E, 2r, d]`` gate_up (halves) and ``[E, d, r]`` down."""
    return {f"{prefix}.gate_up_proj": R("expert.gate_up", num_experts=num_experts, fused="halves"),
            f"{prefix}.down_proj": R("expert.down", num_experts=num_experts)}


def ends(tied: bool = False) -> dict:
    """Embedding, final norm and (untied) LM head."""
    out = {"model.embed_tokens.weight": R("embedding", tied=True) if tied else R("embedding"),
           "model.norm.weight": V}
    if not tied:
        out["lm_head.weight"] = R("lm_head")
    return out


def decoder_norms(layer: int) -> dict:
    return norms(f"model.layers.{layer}", "input_layernorm", "post_attention_layernorm")


# ---------------------------------------------------------------------------------------------------
# Dense models


@pytest.mark.parametrize("tied", [False, True])
def test_llama(tied):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=tied, **TOKENS)
    model = transformers.LlamaForCausalLM(config)
    expected = ends(tied)
    for i in range(2):
        expected |= attention(f"model.layers.{i}.self_attn", 4, 2, 8)
        expected |= swiglu(f"model.layers.{i}.mlp") | decoder_norms(i)
    infos = check(model, expected)
    assert infos[0].module_type == "Embedding"
    assert ("lm_head.weight" in {i.name for i in infos}) is not tied


def test_qwen3_head_dim_decoupled_from_width():
    # head_dim 16 with 4 heads: q_proj is 64 x 32, so head_dim must not be inferred as width / heads.
    config = transformers.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=False, **TOKENS)
    expected = ends()
    for i in range(2):
        expected |= attention(f"model.layers.{i}.self_attn", 4, 2, 16, qk_norm=True)
        expected |= swiglu(f"model.layers.{i}.mlp") | decoder_norms(i)
    check(transformers.Qwen3ForCausalLM(config), expected)


def test_gemma3_text_tied_by_default():
    config = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                           sliding_window=16, **TOKENS)
    assert config.tie_word_embeddings
    expected = ends(tied=True)
    for i in range(2):
        expected |= attention(f"model.layers.{i}.self_attn", 4, 1, 16, qk_norm=True)
        expected |= swiglu(f"model.layers.{i}.mlp")
        expected |= norms(f"model.layers.{i}", "input_layernorm", "post_attention_layernorm",
                          "pre_feedforward_layernorm", "post_feedforward_layernorm")
    infos = check(transformers.Gemma3ForCausalLM(config), expected)
    assert infos[0].module_type == "Gemma3TextScaledWordEmbedding"


def test_phi3_fused_qkv_and_gate_up():
    config = transformers.Phi3Config(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, **TOKENS)
    expected = ends()
    for i in range(2):
        p = f"model.layers.{i}"
        expected |= {
            f"{p}.self_attn.o_proj.weight": R("attention.o", num_heads=4, head_dim=8),
            f"{p}.self_attn.qkv_proj.weight": R("attention.qkv", num_heads=4, head_dim=8, qkv_split=(32, 16, 16),
                                                qkv_layout="stacked"),
            f"{p}.mlp.gate_up_proj.weight": R("mlp.gate_up", fused="halves"),
            f"{p}.mlp.down_proj.weight": R("mlp.down"),
        } | decoder_norms(i)
    check(transformers.Phi3ForCausalLM(config), expected)


def _fused(prefix: str, heads: int, kv_heads: int, head_dim: int, layout: str, bias: bool) -> dict:
    """GPT-NeoX / Falcon attention: fused ``query_key_value`` and output ``dense``."""
    out = {f"{prefix}.query_key_value.weight": R("attention.qkv", num_heads=heads, head_dim=head_dim,
                                                 qkv_split=(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim),
                                                 qkv_layout=layout),
           f"{prefix}.dense.weight": R("attention.o", num_heads=heads, head_dim=head_dim)}
    if bias:
        out |= {f"{prefix}.query_key_value.bias": V, f"{prefix}.dense.bias": V}
    return out


def _plain_mlp(prefix: str, bias: bool) -> dict:
    out = {f"{prefix}.dense_h_to_4h.weight": R("mlp.up"), f"{prefix}.dense_4h_to_h.weight": R("mlp.down")}
    if bias:
        out |= {f"{prefix}.dense_h_to_4h.bias": V, f"{prefix}.dense_4h_to_h.bias": V}
    return out


def test_gpt_neox_fused_qkv_interleaved_per_head():
    # query_key_value rows are [heads, 3, head_dim]: "grouped" with one group per head
    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, **TOKENS)
    expected = {"gpt_neox.embed_in.weight": R("embedding"), "lm_head.weight": R("lm_head")}
    expected |= {f"gpt_neox.final_layer_norm.{k}": V for k in ("weight", "bias")}
    for i in range(2):
        p = f"gpt_neox.layers.{i}"
        expected |= _fused(f"{p}.attention", 4, 4, 8, "grouped", bias=True) | _plain_mlp(f"{p}.mlp", bias=True)
        expected |= {f"{p}.{n}.{k}": V for n in ("input_layernorm", "post_attention_layernorm") for k in ("weight", "bias")}
    check(transformers.GPTNeoXForCausalLM(config), expected)


@pytest.mark.parametrize("arch,kv_heads,layout", [
    (dict(new_decoder_architecture=True, num_kv_heads=2), 2, "grouped"),  # [kv, q/kv + 2, hd]
    (dict(multi_query=True), 1, "stacked"),  # [q heads; k; v]
    (dict(multi_query=False, num_kv_heads=2), 4, "grouped"),  # [heads, 3, hd]; num_kv_heads unused
])
def test_falcon_fused_qkv_layouts(arch, kv_heads, layout):
    config = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **arch, **TOKENS)
    model = transformers.FalconForCausalLM(config)
    expected = {"transformer.word_embeddings.weight": R("embedding", tied=True)}
    expected |= {f"transformer.ln_f.{k}": V for k in ("weight", "bias")}
    norms_ = ("ln_attn", "ln_mlp") if arch.get("new_decoder_architecture") else ("input_layernorm",)
    for i in range(2):
        p = f"transformer.h.{i}"
        expected |= _fused(f"{p}.self_attention", 4, kv_heads, 8, layout, bias=False) | _plain_mlp(f"{p}.mlp", bias=False)
        expected |= {f"{p}.{n}.{k}": V for n in norms_ for k in ("weight", "bias")}
    check(model, expected)


class MHABlock(nn.Module):
    def __init__(self, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, kdim=kdim, vdim=kdim, add_bias_kv=True)
        self.up = nn.Linear(32, 64)


def test_multihead_attention():
    expected = {"attn.in_proj_weight": R("attention.qkv", num_heads=4, head_dim=8, qkv_split=(32, 32, 32),
                                        qkv_layout="stacked"),
                "attn.in_proj_bias": V, "attn.bias_k": V, "attn.bias_v": V,  # bias_k/v are [1, 1, E]
                "attn.out_proj.weight": R("attention.o", num_heads=4, head_dim=8), "attn.out_proj.bias": V,
                "up.weight": R("hidden"), "up.bias": V}  # a plain Linear outside attention: silent
    check(MHABlock(), expected)
    separate = {n: v for n, v in expected.items() if not n.startswith("attn.in_proj")} | {
        "attn.q_proj_weight": R("attention.q", num_heads=4, head_dim=8),  # [E, E]
        "attn.k_proj_weight": R("attention.k", num_heads=4, head_dim=8),  # [E, kdim]
        "attn.v_proj_weight": R("attention.v", num_heads=4, head_dim=8),  # [E, vdim]
        "attn.in_proj_bias": V}
    check(MHABlock(kdim=16), separate)


class NanoAttention(nn.Module):
    """nanoGPT-style attention: fused ``c_attn`` and ``c_proj``, names the classifier does not know."""

    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(16, 48)
        self.c_proj = nn.Linear(16, 16)


def test_fallback_warning_names_unknown_matrices_once():
    model = nn.ModuleDict({"h": nn.ModuleList(NanoAttention() for _ in range(3)), "mlp": nn.Linear(16, 16)})
    expected = {f"h.{i}.{n}.{k}": R("hidden") if k == "weight" else V
                for i in range(3) for n in ("c_attn", "c_proj") for k in ("weight", "bias")}
    # six matrices inside attention modules: four named, the rest counted; the plain mlp is not named
    check(model, expected | {"mlp.weight": R("hidden"), "mlp.bias": V},
          warns=r"^dist_spectral.classify: 6 matrices .*: h\.0\.c_attn\.weight 48x16 \(Linear\), "
                r"h\.0\.c_proj\.weight 16x16 \(Linear\), h\.1\.c_attn\.weight 48x16 \(Linear\), "
                r"h\.1\.c_proj\.weight 16x16 \(Linear\) and 2 more\. .*category=dist_spectral\.roles\.FallbackRoleWarning")


# ---------------------------------------------------------------------------------------------------
# MoE models with 3-D expert tensors


def test_olmoe():
    config = transformers.OlmoeConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, num_experts=4,
                                      num_experts_per_tok=2, **TOKENS)
    expected = ends()
    for i in range(2):
        p = f"model.layers.{i}"
        expected |= attention(f"{p}.self_attn", 4, 4, 8, qk_norm=True) | decoder_norms(i)
        expected |= {f"{p}.mlp.gate.weight": R("router")} | experts_3d(f"{p}.mlp.experts", 4)
    infos = check(transformers.OlmoeForCausalLM(config), expected)
    by_name = {i.name: i for i in infos}
    assert by_name["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 48, 32)
    assert by_name["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 24)
    assert by_name["model.layers.0.mlp.experts.down_proj"].module_type == "OlmoeExperts"
    assert by_name["model.layers.0.mlp.gate.weight"].module_type == "OlmoeTopKRouter"


def test_qwen3_moe_with_a_dense_layer():
    config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                         num_hidden_layers=2, mlp_only_layers=[0], num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, num_experts=5,
                                         num_experts_per_tok=2, **TOKENS)
    expected = ends()
    for i in range(2):
        expected |= attention(f"model.layers.{i}.self_attn", 4, 2, 8, qk_norm=True) | decoder_norms(i)
    expected |= swiglu("model.layers.0.mlp")
    expected |= experts_3d("model.layers.1.mlp.experts", 5) | {"model.layers.1.mlp.gate.weight": R("router")}
    check(transformers.Qwen3MoeForCausalLM(config), expected)


def test_qwen2_moe_shared_expert():
    config = transformers.Qwen2MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2, **TOKENS)
    expected = ends()
    for i in range(2):
        p = f"model.layers.{i}"
        expected |= attention(f"{p}.self_attn", 4, 2, 8, bias="qkv") | decoder_norms(i)
        expected |= {f"{p}.mlp.gate.weight": R("router")} | experts_3d(f"{p}.mlp.experts", 4)
        expected |= swiglu(f"{p}.mlp.shared_expert")
        # sigmoid gate of the shared expert, [1, d]: not a router over experts, a plain matrix
        expected |= {f"{p}.mlp.shared_expert_gate.weight": R("hidden")}
    check(transformers.Qwen2MoeForCausalLM(config), expected,
          warns=r"^dist_spectral.classify: 2 matrices .*: model\.layers\.0\.mlp\.shared_expert_gate\.weight 1x32 "
                r"\(Linear\), model\.layers\.1\.mlp\.shared_expert_gate\.weight 1x32 \(Linear\)\. ")


def test_mixtral():
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                        num_experts_per_tok=2, **TOKENS)
    expected = ends()
    for i in range(2):
        p = f"model.layers.{i}"
        expected |= attention(f"{p}.self_attn", 4, 2, 8) | decoder_norms(i)
        expected |= {f"{p}.mlp.gate.weight": R("router")} | experts_3d(f"{p}.mlp.experts", 3)
    check(transformers.MixtralForCausalLM(config), expected)


def test_gpt_oss_interleaved_transposed_experts():
    config = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       num_local_experts=4, num_experts_per_tok=2, sliding_window=16, **TOKENS)
    expected = ends()
    for i in range(2):
        p = f"model.layers.{i}"
        expected |= {f"{p}.self_attn.sinks": V} | attention(f"{p}.self_attn", 4, 2, 8, bias="qkvo")
        expected |= decoder_norms(i) | {f"{p}.mlp.router.weight": R("router"), f"{p}.mlp.router.bias": V}
        expected |= {
            f"{p}.mlp.experts.gate_up_proj": R("expert.gate_up", num_experts=4, fused="interleaved", transposed=True),
            f"{p}.mlp.experts.gate_up_proj_bias": V,  # [E, 2r]
            f"{p}.mlp.experts.down_proj": R("expert.down", num_experts=4, transposed=True),
            f"{p}.mlp.experts.down_proj_bias": V,  # [E, d]
        }
    infos = check(transformers.GptOssForCausalLM(config), expected)
    by_name = {i.name: i for i in infos}
    assert by_name["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 48)
    assert by_name["model.layers.0.mlp.experts.gate_up_proj_bias"].shape == (4, 48)


def test_deepseek_v3_mla_dense_shared_and_routed():
    config = transformers.DeepseekV3Config(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, **TOKENS)
    expected = ends()
    for i in range(2):
        a = f"model.layers.{i}.self_attn"
        expected |= decoder_norms(i) | norms(a, "q_a_layernorm", "kv_a_layernorm") | {
            f"{a}.q_a_proj.weight": R("attention.latent"),
            # rows are [H, qk_nope + qk_rope]; head info is informative, the rule stays whole-matrix
            f"{a}.q_b_proj.weight": R("attention.latent", num_heads=4, head_dim=12),
            f"{a}.kv_a_proj_with_mqa.weight": R("attention.latent"),
            f"{a}.kv_b_proj.weight": R("attention.latent"),
            f"{a}.o_proj.weight": R("attention.o", num_heads=4, head_dim=6),  # v_head_dim, not qk
        }
    expected |= swiglu("model.layers.0.mlp")
    expected |= experts_3d("model.layers.1.mlp.experts", 4) | {"model.layers.1.mlp.gate.weight": R("router")}
    expected |= swiglu("model.layers.1.mlp.shared_experts")
    infos = check(transformers.DeepseekV3ForCausalLM(config), expected)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in {i.name for i in infos}  # a buffer


def test_llama4_experts_without_layout_attributes():
    # Llama4TextExperts has no is_transposed attribute and stores [E, d, 2r] / [E, r, d]; with
    # 2r == d the gate_up shape alone is ambiguous, the down shape decides.
    config = transformers.Llama4TextConfig(
        hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=3,
        num_experts_per_tok=1, interleave_moe_layer_step=1, **TOKENS)
    model = transformers.Llama4ForCausalLM(config)
    assert not hasattr(model.model.layers[0].feed_forward.experts, "is_transposed")
    p = "model.layers.0"
    expected = ends() | decoder_norms(0) | attention(f"{p}.self_attn", 4, 2, 8) | {
        f"{p}.feed_forward.experts.gate_up_proj": R("expert.gate_up", num_experts=3, fused="halves", transposed=True),
        f"{p}.feed_forward.experts.down_proj": R("expert.down", num_experts=3, transposed=True),
        f"{p}.feed_forward.router.weight": R("router"),
    } | swiglu(f"{p}.feed_forward.shared_expert")
    check(model, expected)


# ---------------------------------------------------------------------------------------------------
# Plain modules


class TinyLM(nn.Module):
    """Embedding + Linear stack + vocabulary head, no transformers."""

    def __init__(self, vocab=100, d=16, tie=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(8, d)
        self.body = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d), nn.LayerNorm(d))
        self.head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight


@pytest.mark.parametrize("tie", [False, True])
def test_plain_module(tie):
    expected = {
        "emb.weight": R("embedding", tied=True) if tie else R("embedding"),
        "pos.weight": R("embedding"),  # another lookup table, never the tied one
        "body.0.weight": R("hidden"), "body.0.bias": V,
        "body.2.weight": R("hidden"), "body.2.bias": V,
        "body.3.weight": V, "body.3.bias": V,
    }
    if not tie:
        expected["head.weight"] = R("lm_head")
    check(TinyLM(tie=tie), expected)


class ExpertMLP(nn.Module):
    def __init__(self, d, r):
        super().__init__()
        self.gate_proj = nn.Linear(d, r, bias=False)
        self.up_proj = nn.Linear(d, r, bias=False)
        self.down_proj = nn.Linear(r, d, bias=False)


class ListMoE(nn.Module):
    """An MoE block with one nn.Linear MLP per expert (the pre-transformers-5 layout)."""

    def __init__(self, d=16, r=8, num_experts=3):
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(d, r) for _ in range(num_experts))
        self.shared_expert = ExpertMLP(d, r)


class ListMoEModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([ListMoE(), ListMoE()])
        self.norm = nn.RMSNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)


def test_per_expert_linear_list():
    expected = {"embed.weight": R("embedding"), "norm.weight": V, "lm_head.weight": R("lm_head")}
    for i in range(2):
        expected[f"layers.{i}.gate.weight"] = R("router")
        for e in range(3):
            expected |= {f"layers.{i}.experts.{e}.gate_proj.weight": R("expert.gate"),
                         f"layers.{i}.experts.{e}.up_proj.weight": R("expert.up"),
                         f"layers.{i}.experts.{e}.down_proj.weight": R("expert.down")}
        expected |= swiglu(f"layers.{i}.shared_expert")
    check(ListMoEModel(), expected)


class BatchedExperts(nn.Module):
    """3-D experts without transformers' layout attributes, stored ``x @ W`` with 2r == d."""

    def __init__(self, d=16, num_experts=3):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, d, d))  # [E, d, 2r], r = d / 2
        self.down_proj = nn.Parameter(torch.zeros(num_experts, d // 2, d))  # [E, r, d]


class BatchedMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(16, 3, bias=True)
        self.experts = BatchedExperts()


def test_batched_experts_layout_inferred_from_shapes():
    expected = {"router.weight": R("router"), "router.bias": V,
                "experts.gate_up_proj": R("expert.gate_up", num_experts=3, fused="halves", transposed=True),
                "experts.down_proj": R("expert.down", num_experts=3, transposed=True)}
    check(BatchedMoE(), expected)


def test_unknown_expert_tensor_is_an_error():
    moe = BatchedMoE()
    moe.experts.mystery = nn.Parameter(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="experts.mystery"):
        classify(moe)


def test_fsdp_prefix_stripped_only_for_fsdp_modules():
    class FSDPModule:  # the marker fully_shard puts in the MRO, by name
        pass

    class Experts(nn.Module):
        pass

    class FSDPBlock(nn.Module):  # a user class that merely starts with FSDP
        pass

    wrapped = type("FSDPExperts", (FSDPModule, Experts), {})()
    assert module_type_name(wrapped) == "Experts"
    assert module_type_name(FSDPBlock()) == "FSDPBlock"


# ---------------------------------------------------------------------------------------------------
# Wrapped models: DDP and FSDP2 in a one-process gloo group


def _tiny_olmoe():
    config = transformers.OlmoeConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, **TOKENS)
    torch.manual_seed(0)
    return transformers.OlmoeForCausalLM(config)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist
    if created:
        dist.destroy_process_group()


def _layouts(infos):
    return [(i.shape, summary(i), i.module_type) for i in infos]


def test_ddp_wrapped(process_group):
    plain = classify(_tiny_olmoe())
    wrapped = classify(nn.parallel.DistributedDataParallel(_tiny_olmoe()))
    assert [i.name for i in wrapped] == ["module." + i.name for i in plain]
    assert _layouts(wrapped) == _layouts(plain)


def test_fsdp2_wrapped(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    plain = classify(_tiny_olmoe())
    model = _tiny_olmoe()
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer.mlp.experts, mesh=mesh)
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model.model.layers[0].mlp.experts).__name__ == "FSDPOlmoeExperts"
    assert all(isinstance(p, DTensor) for p in model.parameters())
    wrapped = classify(model)
    assert [i.name for i in wrapped] == [i.name for i in plain]
    assert _layouts(wrapped) == _layouts(plain)  # module types with FSDP stripped, global shapes


# ---------------------------------------------------------------------------------------------------


def test_format_table_lists_every_parameter_aligned():
    with pytest.warns(FallbackRoleWarning):  # the shared-expert gate; see test_qwen2_moe_shared_expert
        infos = classify(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, **TOKENS)))
    lines = format_table(infos).splitlines()
    assert lines[0].split() == ["name", "shape", "role", "module", "layout"]
    rows = lines[2:2 + len(infos)]
    assert [r.split()[0] for r in rows] == [i.name for i in infos]
    role_col = lines[0].index("role")
    assert all(r[role_col:].split()[0] == i.role for r, i in zip(rows, infos))
    gate_up = next(r for r in rows if r.startswith("model.layers.0.mlp.experts.gate_up_proj"))
    assert gate_up.split()[1] == "4x48x32" and "E=4" in gate_up and "fused=halves" in gate_up
    shared_gate = next(r for r in rows if r.startswith("model.layers.0.mlp.shared_expert_gate.weight"))
    assert "hidden *" in shared_gate and lines[-1].startswith("* hidden")
