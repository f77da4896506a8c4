"""A Qwen3-shaped model with random weights and a Qwen3-format tokenizer, built here: nothing is downloaded.

    python bench/random_qwen3.py --out /tmp/qwen3                 # Qwen3-1.7B's shape, the built-in tokenizer
    python bench/random_qwen3.py --out /tmp/q --tiny              # a CPU smoke
    python bench/random_qwen3.py --out /tmp/q --tokenizer DIR     # another tokenizer's files (a real Qwen3's)

The model of bench/gpu_check.sh's train.py steps; bench/bench_sd_step.py builds the same shapes in memory
(`qwen3_config`). Departures from Qwen3-1.7B:
1. The built-in tokenizer (`qwen3_format_tokenizer`) has Qwen3's format, not its vocabulary: Qwen3's
   pre-tokenizer rule and byte-level BPE, but merges learned from the few lines of MERGE_TEXT (a few hundred ids,
   not 151,643), so a text takes more tokens than in Qwen3; Qwen3's <|endoftext|> (padding), <|im_start|> and
   <|im_end|> (end of turn, the eos) as special tokens and <think>, </think> as added tokens that are not special
   (a decode that skips special tokens keeps them, as Qwen3's does); and bench/qwen3_chat_template.jinja, a
   template in Qwen3's format written for this project (enable_thinking; history turns lose their thought).
   It needs only the `tokenizers` package (a dependency of transformers), no tokenizer files.
2. The embedding keeps Qwen3's 151,936 rows, so shapes, memory and speed are Qwen3-1.7B's. A random model then
   samples mostly ids past the tokenizer's vocabulary: they decode to nothing, which changes no shape and no code
   path (with --tokenizer, e.g. the demo model's 49,152 ids, fewer of them).
3. --tiny: 2 layers of width 128 and the tokenizer's vocabulary, for a CPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

TEMPLATE = Path(__file__).resolve().parent / "qwen3_chat_template.jinja"
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen3's: special (skipped by a decode that skips them)
THINK = ("<think>", "</think>")  # Qwen3's: added tokens, not special
# Qwen3's pre-tokenizer rule (as Qwen2's): contractions, letter runs, single digits, punctuation runs, newlines
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
# The text the built-in tokenizer learns its merges from: the kind of text the project's prompts and answers hold
MERGE_TEXT = """\
Start with 17. Add 25, then multiply the result by 3, then subtract 4. What is the final number?

Solve the problem step by step. Write each step on its own line, numbered as "Step 1:", "Step 2:" and so on,
and give the final answer as \\boxed{answer} on the last line.

Step 1: 17 + 25 = 42
Step 2: 42 * 3 = 126
Step 3: 126 - 4 = 122
\\boxed{122}

An expert reviewed an earlier attempt at this problem. The review below judges each step of that attempt by its
number and then gives a corrected solution that keeps the correct steps and continues to the answer.

Now write your own fresh, self-contained solution to the problem. Do not mention the review or the earlier attempt.

Here is a reference solution to this problem. With the reference solution in mind, solve the problem yourself,
in your own words. The earlier attempt's final answer was 132. This answer is incorrect.

Case: D
Pivotal step: 2
Summary:
Step 1: Correct
Step 2: Incorrect -- 42 * 3 = 126, not 136
Corrected solution:

Let x be the number of apples. Then the total is the sum of the numbers, and the answer is the value of x.
The function f(x) = x^2 + 2x + 1 has its minimum where the derivative is zero, so the solution is x = -1.
"""


def qwen3_format_tokenizer(vocab_size: int = 1024):
    """The built-in tokenizer (departure 1): a byte-level BPE with Qwen3's pre-tokenizer, special tokens and thinking
    tags, merges learned from MERGE_TEXT (at most `vocab_size` - 256 of them, each pair seen at least twice), and the
    chat template of qwen3_chat_template.jinja. Returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())  # byte-level: every byte has an id, so no unknown token
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([MERGE_TEXT], trainer)
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=TEMPLATE.read_text(), clean_up_tokenization_spaces=False,
                                   model_max_length=40960)


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


def save_random_qwen3(tokenizer_dir: str | None, out: str, tiny: bool, device: str = "cpu", seed: int = 0) -> None:
    """Write a random-weight Qwen3-shaped model (bf16 at full size, fp32 tiny) and a tokenizer to `out`: the files in
    `tokenizer_dir`, or the built-in Qwen3-format one when it is None."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen3ForCausalLM
    tokenizer = qwen3_format_tokenizer() if tokenizer_dir is None else AutoTokenizer.from_pretrained(tokenizer_dir)
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
    source = "built in, Qwen3's format" if tokenizer_dir is None else f"from {tokenizer_dir}"
    print(f"{out}: random Qwen3-shaped model, {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, "
          f"vocab {cfg.vocab_size}, tokenizer {source} ({len(tokenizer)} ids)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=None, help="folder with a tokenizer's files (default: the built-in "
                                                      "Qwen3-format tokenizer, departure 1)")
    ap.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    ap.add_argument("--tiny", action="store_true", help="2 layers of width 128, the tokenizer's vocabulary (CPU)")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is faster)")
    a = ap.parse_args()
    save_random_qwen3(a.tokenizer, a.out, a.tiny, a.device)


if __name__ == "__main__":
    main()
