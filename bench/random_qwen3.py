"""A Qwen3-shaped model with random weights, saved with a tokenizer from local files: nothing is downloaded.

    python bench/random_qwen3.py --tokenizer ~/.cache/sdcf/smollm2-135m-instruct --out /tmp/qwen3   # Qwen3-1.7B
    python bench/random_qwen3.py --tokenizer ~/.cache/sdcf/smollm2-135m-instruct --out /tmp/q --tiny  # a CPU smoke

The model of bench/gpu_check.sh's train.py steps; bench/bench_sd_step.py builds the same shapes in memory
(`qwen3_config`). Departures from Qwen3-1.7B:
1. The tokenizer is the demo model's (SmolLM2-135M-Instruct, ChatML like Qwen3's template, 49,152 ids), the one
   a setup.sh machine has without a model hub; the embedding keeps Qwen3's 151,936 rows, so shapes, memory and
   speed are Qwen3-1.7B's. A random model also samples ids past the tokenizer's vocabulary: they decode to
   nothing, which changes no shape and no code path.
2. --tiny: 2 layers of width 128 and the tokenizer's vocabulary, for a CPU.
"""
from __future__ import annotations

import argparse

import torch


def qwen3_config(tiny: bool, vocab_size: int | None = None):
    """Qwen3-1.7B's shape (DESIGN.md: hidden 2048, 28 layers, 16 heads, 8 KV heads, head_dim 128, vocab 151,936,
    tied embeddings), or a tiny one of the same architecture; `vocab_size` overrides the vocabulary."""
    from transformers import Qwen3Config
    if tiny:
        cfg = Qwen3Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    else:
        cfg = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                          max_position_embeddings=40960, rope_theta=1e6)
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    return cfg


def save_random_qwen3(tokenizer_dir: str, out: str, tiny: bool, device: str = "cpu", seed: int = 0) -> None:
    """Write a random-weight Qwen3-shaped model (bf16 at full size, fp32 tiny) and the tokenizer to `out`."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3ForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = qwen3_config(tiny, vocab_size=len(tokenizer) if tiny else None)
    if cfg.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} ids, more than the model's "
                         f"{cfg.vocab_size} embedding rows")
    cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(torch.float32 if tiny else torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{out}: random Qwen3-shaped model, {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, "
          f"vocab {cfg.vocab_size}, tokenizer from {tokenizer_dir} ({len(tokenizer)} ids)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with the tokenizer's files (the demo model's)")
    ap.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    ap.add_argument("--tiny", action="store_true", help="2 layers of width 128, the tokenizer's vocabulary (CPU)")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is faster)")
    a = ap.parse_args()
    save_random_qwen3(a.tokenizer, a.out, a.tiny, a.device)


if __name__ == "__main__":
    main()
