"""A lever not taken (it changes rounding): the demo's shared prompt prefix computed once per micro-batch.

    OMP_NUM_THREADS=1 python bench/bench_prefix.py --rounds 3

Every student and teacher prompt of the demo preset begins with the same tokens (the system prompt and the worked
example: 99 of SmolLM2's tokens). The scoring forwards of an SD step run it once per row. This script times, on 6
of the demo's training problems with 48-token stand-in rollouts, right padded as rollout.score_positions pads:
  student: forward and backward with the adapter on, as train.sd_micro_batch's student (x + y);
  teacher: forward without gradient, adapter off, as its teacher (x + c + y under the `repeat` layout, with the
           problem's reference solution as c and a stand-in y);
each once as train.py runs it (every row whole) and once with the prefix run once, its KV cache repeated over the
rows and the rest of each row run after it. Rounds interleave the two. It prints the medians, their ratio, and the
largest difference of the final hidden states between the two: not zero (attention and the matrix products sum in
another order), which is why train.py does not do this without a decision (docs/speed.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import lora  # noqa: E402
import prompts  # noqa: E402
import rollout  # noqa: E402


def whole(model, prompt_ids: list[list[int]], ys: list[list[int]], pad_id: int, prefix: int) -> torch.Tensor:
    """Final hidden states of every row (prompt + y, padded as rollout.score_positions pads) past the prefix, each
    row run whole: (B, L - prefix, D)."""
    batch = rollout.score_positions(prompt_ids, ys, pad_id)
    return model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[:, prefix:]


def shared(model, prompt_ids: list[list[int]], ys: list[list[int]], pad_id: int, prefix: int) -> torch.Tensor:
    """The same with the prefix run once and its KV cache repeated over the rows."""
    cache = model.model(input_ids=torch.tensor([prompt_ids[0][:prefix]]), use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(prompt_ids))
    batch = rollout.score_positions([p[prefix:] for p in prompt_ids], ys, pad_id)
    mask = torch.cat([torch.ones(len(prompt_ids), prefix, dtype=torch.long), batch.attention_mask], 1)
    return model.model(input_ids=batch.input_ids, attention_mask=mask, past_key_values=cache).last_hidden_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = config.parse_config(["--preset", "demo", "--seed", "50"])
    model, tokenizer = rollout.load_model(cfg.model)
    lora.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha)
    for layer in lora.lora_layers(model).values():  # a trained adapter is not zero
        torch.nn.init.normal_(layer.lora_B.weight, std=1e-3)
    problems = config.load_problems(cfg)[0][:cfg.prompts_per_step]
    y = [torch.randint(0, len(tokenizer), (48,)).tolist() for _ in problems]  # stand-in rollouts
    student = [prompts.encode(tokenizer, prompts.student_messages(p), cfg.student_thinking) for p in problems]
    teacher = [prompts.encode(tokenizer, prompts.teacher_messages(p, "refsol", p.reference_solution, "repeat",
                                                                  tokenizer.decode(y_)), cfg.teacher_thinking)
               for p, y_ in zip(problems, y)]
    prefix = len(os.path.commonprefix(student + teacher))
    pad = tokenizer.pad_token_id
    rows = lambda prompt_ids: [len(p) + len(y_) for p, y_ in zip(prompt_ids, y)]  # noqa: E731
    print(f"{len(problems)} rows; shared prefix {prefix} tokens; student rows {min(rows(student))}-"
          f"{max(rows(student))} tokens, teacher rows {min(rows(teacher))}-{max(rows(teacher))}")

    def student_step(run):
        h = run(model, student, y, pad, prefix)
        h.pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    def teacher_pass(run):
        with torch.no_grad(), lora.adapters_disabled(model):
            run(model, teacher, y, pad, prefix)

    with torch.no_grad():
        for name, prompt_ids in (("student", student), ("teacher", teacher)):
            a, b = whole(model, prompt_ids, y, pad, prefix), shared(model, prompt_ids, y, pad, prefix)
            mask = rollout.score_positions([p[prefix:] for p in prompt_ids], y, pad).attention_mask  # (B, L - prefix)
            diff = ((a - b).abs() * mask[..., None]).max().item()
            print(f"{name}: max |h_whole − h_shared| {diff:.2e} (largest |h| {a.abs().max().item():.1f})")
    times = {(part, way): [] for part in ("student", "teacher") for way in ("whole", "shared")}
    for _ in range(args.rounds):
        for way, run in (("whole", whole), ("shared", shared)):
            for part, f in (("student", student_step), ("teacher", teacher_pass)):
                t0 = time.perf_counter()
                f(run)
                times[part, way].append(time.perf_counter() - t0)
    for part in ("student", "teacher"):
        w, s = statistics.median(times[part, "whole"]), statistics.median(times[part, "shared"])
        print(f"{part}: whole {w:.2f} s, shared prefix {s:.2f} s, ratio {s / w:.2f}")


if __name__ == "__main__":
    main()
