"""Tiny real `transformers` models with odd sizes, so shards are uneven and some are empty."""
from __future__ import annotations

import torch

TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_qwen3(seed: int = 0, vocab: int = 97):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, **TOKENS)
    return Qwen3ForCausalLM(cfg)


def tiny_olmoe(seed: int = 0, vocab: int = 97, experts: int = 3):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(vocab_size=vocab, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=experts, num_experts_per_tok=2,
                      tie_word_embeddings=False, **TOKENS)
    return OlmoeForCausalLM(cfg)


MODELS = {"qwen3": tiny_qwen3, "olmoe": tiny_olmoe}


def synthetic_grad(name: str, shape, step: int) -> torch.Tensor:
    """A deterministic gradient for (parameter, step), the same on every rank and in the reference.
    Some rows are zero, so the row rules' zero-row handling is on the path."""
    seed = (sum(ord(c) * (i + 1) for i, c in enumerate(name)) * 7919 + step) % (2 ** 31)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if len(shape) >= 2 and shape[0] > 3:
        g[1] = 0
    return g
