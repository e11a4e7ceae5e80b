"""Model factories for ``dist-spectral inspect --module`` tests (imported by module path)."""
from __future__ import annotations

import transformers


def tiny_neox(layers: int = 1, heads: int = 4):
    """A randomly initialised GPT-NeoX with ``layers`` layers (no download)."""
    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=heads, vocab_size=100, bos_token_id=None,
                                        eos_token_id=None, pad_token_id=None)
    return transformers.GPTNeoXForCausalLM(config)


def not_a_model():
    """Returns the config instead of a model: a mistake ``inspect`` must name."""
    return {"hidden_size": 32}


NOT_CALLABLE = 3
