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


def common_prefix(rows: list[list[int]]) -> int:
    n = 0
    while all(len(r) > n and r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, right padded."""
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    return ids, mask


def whole(model, rows: list[list[int]], pad_id: int, prefix: int) -> torch.Tensor:
    """Final hidden states of every row past the prefix, each row run whole: (B, L - prefix, D)."""
    ids, mask = right_padded(rows, pad_id)
    return model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, prefix:]


def shared(model, rows: list[list[int]], pad_id: int, prefix: int) -> torch.Tensor:
    """The same with the prefix run once and its KV cache repeated over the rows."""
    cache = model.model(input_ids=torch.tensor([rows[0][:prefix]]), use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(rows))
    ids, mask = right_padded([r[prefix:] for r in rows], pad_id)
    mask = torch.cat([torch.ones(len(rows), prefix, dtype=torch.long), mask], 1)
    return model.model(input_ids=ids, attention_mask=mask, past_key_values=cache).last_hidden_state


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
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    y = [torch.randint(0, len(tokenizer), (48,)).tolist() for _ in problems]  # stand-in rollouts
    student = [ids(prompts.render(tokenizer, prompts.student_messages(p), cfg.student_thinking)) + y_
               for p, y_ in zip(problems, y)]
    teacher = [ids(prompts.render(tokenizer, prompts.teacher_messages(p, "refsol", p.reference_solution, "repeat",
                                                                      tokenizer.decode(y_)), cfg.teacher_thinking))
               + y_ for p, y_ in zip(problems, y)]
    prefix = common_prefix(student + teacher)
    pad = tokenizer.pad_token_id
    print(f"{len(problems)} rows; shared prefix {prefix} tokens; student rows {min(map(len, student))}-"
          f"{max(map(len, student))} tokens, teacher rows {min(map(len, teacher))}-{max(map(len, teacher))}")

    def student_step(run):
        h = run(model, student, pad, prefix)
        h.pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    def teacher_pass(run):
        with torch.no_grad(), lora.adapters_disabled(model):
            run(model, teacher, pad, prefix)

    with torch.no_grad():
        for name, rows in (("student", student), ("teacher", teacher)):
            a, b = whole(model, rows, pad, prefix), shared(model, rows, pad, prefix)
            _, mask = right_padded([r[prefix:] for r in rows], pad)
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
