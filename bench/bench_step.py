"""One SD training step, phase by phase: seconds, peak memory, and the operators that take the time.

    python bench/bench_step.py                         # the demo preset (SmolLM2-135M, fp32), 3 steps of RefSol
    python bench/bench_step.py --feedback stepalign    # any form of the demo
    python bench/bench_step.py --paper-tiny            # the paper's defaults on a random 2-layer Qwen3 (CPU-sized)
    python bench/bench_step.py --profile 15            # also the top 15 operators of each phase (torch.profiler)

A step is train.py's steps 1-7, called through the same functions train.train calls, with a clock and a memory
watch around each phase:
  generation  — `collect_rollouts` (step 2), with the adapter merged for sampling (`policy.sampling`; the merge
                and the unmerge are their own phase, "merge")
  feedback    — the context c and the teacher prompt (steps 3-4)
  teacher     — the self-teacher's forward, adapter off, no gradient (train.sd_micro_batch)
  student     — the student's forward
  loss        — Eq. 3, chunked, from the two hidden states
  backward, optimizer (all-reduce, clip, AdamW, the finite check), push (step 7)
Peak memory: the process's resident set (RSS), sampled every 2 ms by a thread, its maximum within each phase;
"rise" is that peak minus the RSS when the phase began. Ratios are shares of the step measured in this run; the
first step is a warm-up and is left out of the medians. Speed against TRL's SDFTTrainer: bench/bench_vs_trl.py.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import feedback  # noqa: E402
import grading  # noqa: E402
import random_qwen3  # noqa: E402  (bench/, this script's folder)
import rollout  # noqa: E402
import train  # noqa: E402
import policy  # noqa: E402
from infra import dist, logs, stop_rules  # noqa: E402

PHASES = ("merge", "generation", "feedback", "teacher", "student", "loss", "backward", "optimizer", "push")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Watch:
    """Seconds and peak RSS per named phase; a sampling thread keeps the running maximum of the RSS."""

    def __init__(self, profile: int):
        self.seconds: dict[str, float] = {}
        self.rise: dict[str, int] = {}
        self.peak, self.profile, self.tables = 0, profile, {}
        self._max, self._stop = 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop.wait(0.002):
            self._max = max(self._max, rss())

    def close(self):
        """Ends the sampling thread."""
        self._stop.set()

    @contextlib.contextmanager
    def __call__(self, name: str):
        start_rss = self._max = rss()
        prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if self.profile
                else contextlib.nullcontext())
        t0 = time.perf_counter()
        with prof:
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        top = max(self._max, rss())
        self.rise[name] = max(self.rise.get(name, 0), top - start_rss)
        self.peak = max(self.peak, top)
        if self.profile:
            self.tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.profile)


class PhaseTimer:
    """The Timer interface that train.sd_micro_batch and feedback's steps take, forwarding their phase names to the
    Watch; the names they use map onto PHASES ("rollout" is the generation)."""

    def __init__(self, watch: Watch):
        self.watch = watch

    def __call__(self, name: str):
        return self.watch({"rollout": "generation"}.get(name, name))


def one_step(cfg, model, tokenizer, optimizer, params, engine, checker, critic_backend, train_set, step, watch,
             max_positions, probe: dict):
    """train.train's steps 1-7 for one SD step of one rank, each phase under the watch. probe: the divergence
    probe's ids (train.py's: the first training problem's student prompt) and the policy on it after the last step."""
    timer = PhaseTimer(watch)
    drawn = feedback.step_problems(train_set, cfg, step)
    draws = list(enumerate(drawn))
    sampling = policy.sampling(cfg, model)
    with watch("merge"):  # the adapter merged for sampling: its time and memory, apart from the generation's
        sampling.__enter__()
    items = feedback.collect_rollouts(cfg, engine, tokenizer, checker, draws, step, timer)
    with watch("merge"):
        sampling.__exit__(None, None, None)
    with watch("feedback"):
        contexts, _, _ = feedback.feedback_contexts(cfg, critic_backend, items, logs.Timer())
        items, _ = feedback.with_teacher_prompts(cfg, tokenizer, items, contexts, max_positions)
    d = dist.Dist()
    normalizer = train.step_normalizer(cfg, items, d)
    model.train()
    for i in range(0, len(items), cfg.micro_batch):
        loss, _, _ = train.sd_micro_batch(cfg, model, items[i:i + cfg.micro_batch], tokenizer.pad_token_id,
                                          normalizer, timer)
        with watch("backward"):
            loss.backward()
    with watch("optimizer"):  # (the first step also computes the probe's "before"; train.py does so once per run)
        _, _, probe["on_probe"] = train.optimizer_step(cfg, model, params, optimizer, 0.0, normalizer, probe["ids"],
                                                       probe.get("on_probe"), d)
    with watch("push"):
        policy.push_adapter(cfg, d, model, engine, step + 1)
    return sum(len(it.completion.token_ids) for it in items)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--feedback", default="refsol", help="an SD form of the demo (not grpo)")
    ap.add_argument("--steps", type=int, default=3, help="steps; the first is a warm-up, left out of the medians")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--paper-tiny", action="store_true",
                    help="the paper's defaults on a tiny random Qwen3 (bench/random_qwen3)")
    ap.add_argument("--profile", type=int, default=0, help="print the top N operators of each phase (last step)")
    ap.add_argument("option", nargs="*", help="more train.py options, after --, e.g. -- --micro-batch 3")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    argv = ["--preset", "demo", "--feedback", a.feedback, "--seed", "50", *a.option]
    if a.paper_tiny:  # the paper's defaults (bf16, LoRA r 64, checkpointing, micro-batch 4, ...) on CPU-sized parts
        model_dir = os.path.join(tempfile.mkdtemp(), "qwen3_tiny")
        random_qwen3.save_random_qwen3(str(rollout.smollm2_path()), model_dir, tiny=True)
        argv = ["--feedback", a.feedback, "--seed", "50", "--model", model_dir, "--data", "arithmetic",
                "--critic", "exact", "--engine", "transformers", "--prompts-per-step", "8", "--max-new-tokens", "128",
                *a.option]
    cfg = config.parse_config(argv)
    d = dist.Dist()
    train_set, _ = config.load_problems(cfg)
    model, tokenizer, params, optimizer = policy.start_policy(cfg, d)
    engine = rollout.make_engine("transformers", cfg.model, model, tokenizer, stop_at_boxed=cfg.stop_at_boxed)
    critic_backend = config.make_critic(cfg) if feedback.FORMS[feedback.form_name(cfg)].needs_critic else None
    checker = grading.AnswerChecker()
    rows, peak = [], 0
    probe = {"ids": stop_rules.divergence_probe(tokenizer, train_set[0], cfg.student_thinking)}
    for step in range(a.steps):
        watch = Watch(a.profile if step == a.steps - 1 else 0)
        t0 = time.perf_counter()
        tokens = one_step(cfg, model, tokenizer, optimizer, params, engine, checker, critic_backend, train_set, step,
                          watch, model.config.max_position_embeddings, probe)
        watch.close()
        rows.append((time.perf_counter() - t0, watch, tokens))
        peak = max(peak, watch.peak)
        print(f"step {step + 1}: {rows[-1][0]:.2f} s, {tokens} rollout tokens, peak RSS {peak / 2**30:.2f} GiB",
              flush=True)
    kept = rows[1:] or rows
    total = statistics.median(r[0] for r in kept)
    print(f"\n{' '.join(['python bench/bench_step.py'] + sys.argv[1:])}  (torch threads {a.threads}; medians of "
          f"steps 2-{a.steps})\n")
    print("| phase | seconds | share of the step | RSS rise (GiB) |\n|---|---|---|---|")
    for name in PHASES:
        s = statistics.median(r[1].seconds.get(name, 0.0) for r in kept)
        rise = max(r[1].rise.get(name, 0) for r in kept)
        print(f"| {name} | {s:.2f} | {s / total:.2f} | {rise / 2**30:.3f} |")
    print(f"| step | {total:.2f} | 1.00 | peak {peak / 2**30:.2f} |")
    for name, table in rows[-1][1].tables.items():
        print(f"\n## {name}: top operators (self CPU time)\n{table}")


if __name__ == "__main__":
    main()
