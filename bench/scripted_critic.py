"""A stand-in for QwQ-32B in the rehearsal (bench/rehearse.sh): a tiny Qwen3 whose weights are set so that it answers
every prompt with one fixed critique, in QwQ-32B's output shape, through a QwQ-format chat template.

    python bench/scripted_critic.py --out /tmp/critic      # then `vllm serve /tmp/critic ...` serves it

Why not a random model: a random critic's answers never follow the critique schema nor hold a \\boxed{} answer, so
the difficulty filter would keep nothing and every critique would be a counted failure: the rehearsal would show
the failure paths only. This model gives the server a real answer of the shape the paper's critic gives:

- Its chat template is bench/qwen3_chat_template.jinja with QwQ-32B's generation prompt, which opens the thought:
  `<|im_start|>assistant\\n<think>\\n` (train.py's default --critic-think-in-prompt is then right, as for QwQ).
- Its greedy answer, whatever the prompt, is TRACE `</think>` CRITIQUE `<|im_end|>`: a thought that the prompt
  opened and the answer closes, then a critique in prompts.critic_messages' schema for a one-step solution
  (case D, pivotal step 1, a corrected solution ending in \\boxed{7}). vLLM without a reasoning parser returns it
  all as `content`; with `--reasoning-parser deepseek_r1`, TRACE as `reasoning` and the rest as `content`.
- How: TRACE and CRITIQUE are each one added token of the tokenizer; every attention and MLP output projection is
  zero, so the last position's hidden state is its own token's embedding, and the (untied) LM head maps the
  prompt's last token "\\n" to TRACE, TRACE to </think>, </think> to CRITIQUE and CRITIQUE to <|im_end|> with a
  margin of ~SCALE·sqrt(D)·(1 - cos) nats, so that sampling at QwQ's temperature 0.6, top-p 0.95 writes the same.

What it stands in for is the server, the wire format and the client: not a critic's judgement. The critique says
the same of every rollout; a rollout of more than one step gets a critique that fails the schema (counted).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_qwen3  # noqa: E402  (bench/ is not a package)

TRACE = "The student's single step gives the wrong total; the answer is 7."
CRITIQUE = ("\n\nCase: D\nPivotal step: 1\nSummary:\nStep 1: Incorrect -- the total is 7\n"
            "Corrected solution:\nStep 1: The total is 7.\n\\boxed{7}")
SCALE = 10.0  # logit margin per unit of RMS-normalized hidden state: ~SCALE * sqrt(128) ≈ 113 nats here
GENERATION_PROMPT = "{{- '<|im_start|>assistant\\n' }}"  # in bench/qwen3_chat_template.jinja


def qwq_format_template() -> str:
    """bench/qwen3_chat_template.jinja with QwQ-32B's generation prompt, which opens the thought."""
    text = random_qwen3.TEMPLATE.read_text()
    if text.count(GENERATION_PROMPT) != 1:
        raise RuntimeError(f"{random_qwen3.TEMPLATE}: expected one generation prompt {GENERATION_PROMPT!r}")
    return text.replace(GENERATION_PROMPT, "{{- '<|im_start|>assistant\\n<think>\\n' }}")


def save_scripted_critic(out: str, seed: int = 0) -> None:
    from tokenizers import AddedToken
    from transformers import GenerationConfig, Qwen3ForCausalLM

    tok = random_qwen3.qwen3_format_tokenizer()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (TRACE, CRITIQUE)])
    tok.chat_template = qwq_format_template()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("trace", TRACE), ("critique", CRITIQUE), ("close", "</think>"), ("eos", "<|im_end|>"))}
    [newline] = tok.encode("\n", add_special_tokens=False)
    # the generation prompt's last token is "\n" after <think>: the chain starts there
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    assert prompt[-1] == newline, tok.convert_ids_to_tokens(prompt[-3:])
    chain = [(newline, ids["trace"]), (ids["trace"], ids["close"]), (ids["close"], ids["critique"]),
             (ids["critique"], ids["eos"])]

    cfg = random_qwen3.qwen3_config(tiny=True, vocab_size=len(tok))
    cfg.tie_word_embeddings = False  # the head maps each token to its successor, not to itself
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = None, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float()
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream keeps the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        emb = model.model.embed_tokens.weight  # (V, D)
        for prev, nxt in chain:
            h = emb[prev] / emb[prev].pow(2).mean().sqrt()  # the final RMSNorm's output (its weight is 1)
            model.lm_head.weight[nxt] = SCALE * h / h.norm()
    model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    check(model, tok, prompt)
    print(f"{out}: scripted critic (tiny Qwen3, vocab {len(tok)}): answers {TRACE!r}</think>{CRITIQUE!r}", flush=True)


def check(model, tok, prompt: list[int]) -> None:
    """The greedy answer to a prompt is the script, or this raises."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
    if text != TRACE + "</think>" + CRITIQUE:
        raise RuntimeError(f"the scripted critic answers {text!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write the model and tokenizer to")
    save_scripted_critic(ap.parse_args().out)


if __name__ == "__main__":
    main()
