"""Roles of torchtitan's module names, on a faithful re-declaration of torchtitan 0.3.0's module
tree (its debug Llama 3 and DeepSeek-V3 MoE layers; torchtitan itself is not a test dependency):
``attention.qkv_linear.wqkv`` rows ``[kv_heads, q_per_kv + 2, head_dim]``, ``wo``, MLA
``wq``/``wkv_a``/``wkv_b``, ``feed_forward.w1/w2/w3``, 3-D ``w1_EFD``/``w2_EDF``/``w3_EFD`` experts in
``moe.routed_experts.inner_experts``, ``moe.router.gate``, ``tok_embeddings`` and ``lm_head``."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from dist_spectral.roles import FallbackRoleWarning, classify

D, HEADS, KV, HD, F, E = 32, 4, 2, 8, 48, 3


class FusedQKVLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.wqkv = nn.Linear(D, (HEADS + 2 * KV) * HD, bias=False)
        self.heads_per_kv, self.r_dim, self.head_dim = HEADS // KV, HEADS // KV + 2, HD


class GQAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = HEADS, KV, HD
        self.qkv_linear = FusedQKVLinear()
        self.wo = nn.Linear(HEADS * HD, D, bias=False)


class MLAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_heads = HEADS
        self.wq = nn.Linear(D, HEADS * 12, bias=False)
        self.wkv_a = nn.Linear(D, 20, bias=False)
        self.wkv_b = nn.Linear(16, HEADS * 20, bias=False)
        self.wo = nn.Linear(HEADS * HD, D, bias=False)


class FeedForward(nn.Module):
    def __init__(self, hidden=F):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(D, hidden, bias=False), nn.Linear(hidden, D, bias=False), nn.Linear(D, hidden, bias=False)


class GroupedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1_EFD, self.w2_EDF, self.w3_EFD = (nn.Parameter(torch.randn(E, F, D)), nn.Parameter(torch.randn(E, D, F)),
                                                 nn.Parameter(torch.randn(E, F, D)))


class RoutedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner_experts = GroupedExperts()


class TokenChoiceTopKRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.routed_experts, self.router, self.shared_experts = RoutedExperts(), TokenChoiceTopKRouter(), FeedForward(2 * D)


class Block(nn.Module):
    def __init__(self, moe: bool):
        super().__init__()
        self.attention = MLAttention() if moe else GQAttention()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(D), nn.RMSNorm(D)
        if moe:
            self.moe = MoE()
        else:
            self.feed_forward = FeedForward()


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(97, D)
        self.layers = nn.ModuleDict({"0": Block(moe=False), "1": Block(moe=True)})
        self.norm = nn.RMSNorm(D)
        self.lm_head = nn.Linear(D, 97, bias=False)


def test_torchtitan_names_get_their_roles_and_layouts():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackRoleWarning)  # nothing may fall back to hidden
        infos = {i.name: i for i in classify(Decoder())}
    roles = {n: i.role for n, i in infos.items() if i.role != "vector"}
    assert roles == {
        "tok_embeddings.weight": "embedding", "lm_head.weight": "lm_head",
        "layers.0.attention.qkv_linear.wqkv.weight": "attention.qkv", "layers.0.attention.wo.weight": "attention.o",
        "layers.0.feed_forward.w1.weight": "mlp.gate", "layers.0.feed_forward.w2.weight": "mlp.down",
        "layers.0.feed_forward.w3.weight": "mlp.up",
        "layers.1.attention.wq.weight": "attention.q", "layers.1.attention.wkv_a.weight": "attention.latent",
        "layers.1.attention.wkv_b.weight": "attention.latent", "layers.1.attention.wo.weight": "attention.o",
        "layers.1.moe.routed_experts.inner_experts.w1_EFD": "expert.gate",
        "layers.1.moe.routed_experts.inner_experts.w2_EDF": "expert.down",
        "layers.1.moe.routed_experts.inner_experts.w3_EFD": "expert.up",
        "layers.1.moe.router.gate.weight": "router",
        "layers.1.moe.shared_experts.w1.weight": "mlp.gate", "layers.1.moe.shared_experts.w2.weight": "mlp.down",
        "layers.1.moe.shared_experts.w3.weight": "mlp.up",
    }
    qkv = infos["layers.0.attention.qkv_linear.wqkv.weight"]
    assert (qkv.num_heads, qkv.head_dim, qkv.qkv_split, qkv.qkv_layout) == (HEADS, HD, (HEADS * HD, KV * HD, KV * HD), "grouped")
    assert (infos["layers.0.attention.wo.weight"].num_heads, infos["layers.0.attention.wo.weight"].head_dim) == (HEADS, HD)
    assert (infos["layers.1.attention.wq.weight"].num_heads, infos["layers.1.attention.wq.weight"].head_dim) == (HEADS, 12)
    w1 = infos["layers.1.moe.routed_experts.inner_experts.w1_EFD"]
    assert (w1.num_experts, w1.transposed) == (E, False)
