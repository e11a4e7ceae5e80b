"""Model presets: every preset builds, tiny ones run forward on CPU, large ones build on meta and match
their published parameter counts."""
from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("transformers")

from dist_spectral.models import (  # noqa: E402
    build_model, count_parameters, enable_activation_checkpointing, list_presets, load_model_config, load_preset,
    presets_dir,
)
from dist_spectral.roles import classify  # noqa: E402

PRESETS = list_presets()
TINY = [p for p in PRESETS if p.startswith("tiny-")]
LARGE = [p for p in PRESETS if not p.startswith("tiny-")]
PUBLISHED = [p for p in PRESETS if "published" in load_preset(p)]


def test_expected_presets_exist():
    assert {"tiny-llama", "tiny-qwen3", "tiny-olmoe", "tiny-qwen3-moe", "tiny-gpt-oss", "tiny-deepseek-v3",
            "qwen3-0.6b", "gemma3-1b", "olmoe-1b-7b", "gpt-oss-downsized",
            "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3"} <= set(PRESETS)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_trains_one_step_on_cpu(name):
    model = build_model(name, seed=0)
    config = model.config
    assert config.vocab_size == 256 and not config.tie_word_embeddings
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    # random init: the loss is near ln(256) = 5.55 (measured 5.50..5.56 over these presets)
    assert abs(loss.item() - math.log(256)) < 0.3
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    roles = {i.role for i in classify(model)}
    assert {"embedding", "lm_head", "vector"} <= roles
    assert "hidden" not in roles  # every matrix of the presets has a specific role


def test_seed_makes_builds_reproducible():
    a, b = build_model("tiny-llama", seed=3), build_model("tiny-llama", seed=3)
    c = build_model("tiny-llama", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def _one_backward(name: str, checkpointing: bool):
    """Loss, gradients, and how often each decoder layer's MLP ran, over one forward and backward."""
    model = build_model(name, seed=0)
    if checkpointing:
        enable_activation_checkpointing(model)
    runs = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, runs


@pytest.mark.parametrize("name", ["tiny-olmoe", "tiny-qwen3"])
def test_activation_checkpointing_recomputes_every_layer_with_the_same_numbers(name):
    loss, grads, runs = _one_backward(name, checkpointing=False)
    loss_ac, grads_ac, runs_ac = _one_backward(name, checkpointing=True)
    assert runs == [1] * len(runs) and runs_ac == [2] * len(runs)  # each layer again in backward
    assert torch.equal(loss, loss_ac)
    assert all(torch.equal(grads[n], grads_ac[n]) for n in grads)


def test_activation_checkpointing_refuses_a_module_without_it():
    with pytest.raises(ValueError, match=r"model\.activation_checkpointing: Linear .* set it to false"):
        enable_activation_checkpointing(nn.Linear(4, 4))


def test_tiny_olmoe_default_shape():
    config = load_model_config("tiny-olmoe")
    assert (config.model_type, config.hidden_size, config.num_experts, config.num_experts_per_tok,
            config.intermediate_size) == ("olmoe", 64, 8, 2, 64)


def _kept_in_fp32(model, name: str, dtype: torch.dtype) -> bool:
    """Whether transformers keeps ``name`` in fp32 when loading in ``dtype``: the strict list under
    fp16 and bf16, the other one under fp16 too; its patterns are searched in the name."""
    patterns = list(model._keep_in_fp32_modules_strict or []) if dtype in (torch.float16, torch.bfloat16) else []
    if dtype == torch.float16:
        patterns += list(model._keep_in_fp32_modules or [])
    return any(re.search(p.replace("*", ".*"), name) for p in patterns)


@pytest.mark.parametrize("name", LARGE)
def test_large_preset_builds_on_meta(name):
    model = build_model(name, device="meta", dtype="bfloat16")
    assert all(p.is_meta for p in model.parameters())
    # bf16, except what transformers keeps in fp32 (DeepSeek-V3's router gate)
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if _kept_in_fp32(model, n, torch.bfloat16) else torch.bfloat16), n
    assert not model.config.tie_word_embeddings
    assert "hidden" not in {i.role for i in classify(model)}


def test_deepseek_v3_router_stays_fp32_on_every_device():
    for device in ("meta", "cpu"):
        model = build_model("tiny-deepseek-v3", device=device, dtype="bfloat16", seed=0)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        gates = [n for n in dtypes if n.endswith("mlp.gate.weight")]
        assert gates and all(dtypes.pop(n) == torch.float32 for n in gates)
        assert set(dtypes.values()) == {torch.bfloat16}
        biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        assert biases and all(b.dtype == torch.float32 for b in biases)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_keep_in_fp32_follows_transformers_lists(monkeypatch, dtype, device):
    # A model whose modules create their tensors in the requested dtype, yet whose class asks for
    # fp32 (what transformers 5.0 does with DeepSeek-V3's router): the lists decide, on every device.
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["input_layernorm"])
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules", ["mlp.down_proj"])
    model = build_model("tiny-llama", device=device, dtype=dtype, seed=0)
    want = {n: torch.float32 if _kept_in_fp32(model, n, dtype) else dtype for n, _ in model.named_parameters()}
    assert {n: p.dtype for n, p in model.named_parameters()} == want
    kept = {n for n, d in want.items() if d == torch.float32 and dtype != torch.float32}
    strict = {n for n in want if "input_layernorm" in n}
    loose = {n for n in want if "mlp.down_proj" in n}
    assert kept == {torch.bfloat16: strict, torch.float16: strict | loose, torch.float32: set()}[dtype]


@pytest.mark.parametrize("name", PUBLISHED)
def test_counts_match_published(name):
    published = load_preset(name)["published"]
    counts = count_parameters(build_model(name, device="meta"))
    assert counts.total == pytest.approx(published["total"], rel=0.02)
    assert counts.active == pytest.approx(published["active"], rel=0.02)


def test_paper_preset_shapes():
    # layers / width / ffn (per expert) / experts, top-k from the paper's table
    expect = {"qwen3-0.6b": (20, 1024, 3072, None, None), "gemma3-1b": (18, 1152, 6912, None, None),
              "olmoe-1b-7b": (12, 2048, 1024, 32, 8), "gpt-oss-downsized": (12, 2048, 2048, 16, 4)}
    for name, shape in expect.items():
        c = load_model_config(name)
        experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
        topk = getattr(c, "num_experts_per_tok", None) if experts else None
        assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, experts, topk) == shape, name
        assert not c.tie_word_embeddings


def test_count_parameters_exact_on_tiny_olmoe():
    # 4 layers, d=64, r=64, E=8, k=2, vocab 256, untied
    d, r, e, k, v, layers = 64, 64, 8, 2, 256, 4
    attention = 4 * d * d + 2 * d  # q,k,v,o + q/k norms (OLMoE normalises the full q and k)
    experts = e * (2 * r * d + d * r)
    per_layer_dense = attention + e * d + 2 * d  # + router + two norms
    counts = count_parameters(build_model("tiny-olmoe", device="meta"))
    assert counts.embedding == 2 * v * d
    assert counts.expert == layers * experts
    assert counts.total == 2 * v * d + d + layers * (per_layer_dense + experts)
    assert counts.active == 2 * v * d + d + layers * (per_layer_dense + experts * k // e)


class _ListExperts(nn.Module):
    """Per-expert nn.Linear MLPs: active share is top_k of the list's experts."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.gate = nn.Linear(4, 4, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"up_proj": nn.Linear(4, 6), "down_proj": nn.Linear(6, 4)})
                                     for _ in range(4))


def test_count_parameters_per_expert_list():
    model = _ListExperts()
    counts = count_parameters(model, top_k=1)
    per_expert = (4 * 6 + 6) + (6 * 4 + 4)
    assert counts.expert == 4 * per_expert
    assert counts.active == 40 + 16 + per_expert
    with pytest.raises(ValueError, match="top_k"):
        count_parameters(model)


def test_overrides_and_yaml_path(tmp_path):
    assert load_model_config("tiny-llama", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match="hiden_size"):
        load_model_config("tiny-llama", hiden_size=3)
    # a field transformers does not declare but the model reads (Qwen3-MoE head_dim) is accepted
    assert load_model_config("tiny-qwen3-moe", head_dim=8).head_dim == 8
    preset = tmp_path / "mine.yaml"
    preset.write_text(yaml.safe_dump({"family": "llama", "config": {"hidden_size": 32, "num_hidden_layers": 1,
                                                                    "num_attention_heads": 2, "vocab_size": 64}}))
    assert build_model(str(preset)).config.hidden_size == 32
    with pytest.raises(ValueError, match="unknown model preset"):
        load_model_config("no-such-preset")
    preset.write_text(yaml.safe_dump({"family": "llama", "layers": 2}))
    with pytest.raises(ValueError, match="layers"):
        load_preset(preset)


def test_presets_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.yaml").write_text("family: llama\n")
    monkeypatch.setenv("DIST_SPECTRAL_CONFIG_DIR", str(tmp_path))
    assert presets_dir() == tmp_path / "models" and list_presets() == ["x"]
