"""Random-weight models with the exact Mistral-7B-v0.1 architecture, for benchmarks and tests.

The speed of training and generation depends on the shapes, not on the weights, so a random model
of the real shape, saved as safetensors with the real tokenizer, stands in for the 14 GB download.
"""

from __future__ import annotations

from pathlib import Path

MISTRAL_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
)
# The same architecture and the real 32000-token vocabulary, a few thousand times smaller: what
# the CPU tests and the benchmark's --tiny check use.
TINY_MISTRAL = dict(MISTRAL_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def save_random_mistral(folder: Path, tiny: bool, seed: int, device: str = "cpu", dtype=None) -> int:
    """Build the random model on `device` and save it into `folder`; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(**(TINY_MISTRAL if tiny else MISTRAL_7B))
    torch.manual_seed(seed)
    # On a GPU, the normal_ init of 7.24B bf16 values takes well under a second.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(folder), max_shard_size="5GB")
    return n_params
