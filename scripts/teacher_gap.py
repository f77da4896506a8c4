"""The self-teacher's gap: Avg@k of samples from each teacher prompt (x + c, adapter off) beside Avg@k of the student
prompt x, on the same problems, with c built from the student's own rollouts exactly as train.py builds it.

    python -m scripts.teacher_gap --preset demo                          # the demo's held-out problems, k = 4
    python -m scripts.teacher_gap --preset demo --split train --k 8 --json gap.json   # choose settings on these
    python -m scripts.teacher_gap --preset demo --adapter runs/demo/stepalign/checkpoints/step_000005

Every train.py option is accepted and means what it means there (python train.py --help): the model, the data, the
critic, --temperature (student and teacher are sampled at the training temperature), --max-new-tokens,
--teacher-thinking, --objective (pbsd renders the teacher prompt in the student's thinking mode), --seed, and any
option that shapes the teacher prompt. The steps:
  1. problems: the config's held-out problems (--split test; --eval-problems applies) or its training problems
     (--split train: SD settings are chosen there, never on the held-out results), the first --n-problems.
  2. k rollouts per problem from the student prompt: feedback.collect_rollouts, seeded as training step
     --sample-step of run --seed (another --sample-step gives fresh samples of the same problems).
  3. per feedback form (--forms, names of feedback.FORMS), steps 3-4 of a training step with teacher samples on: c
     from each rollout as that form builds it (feedback.feedback_contexts; stepalign: the critic's critique of it;
     refsol: the reference solution; refsol_steps: the format control; verdict: the verdict on its answer), the
     teacher prompt rendered by the same function (feedback.with_teacher_prompts), and one sample
     y_T ~ π_base(·|x, c) per rollout, graded (feedback.with_teacher_samples).
  4. Avg@k (per problem the share of its k samples that are correct, averaged over problems), the answered rate
     (samples with a \\boxed{} answer), and the gap = teacher Avg@k − student Avg@k in points.
A rollout whose critique failed has no teacher sample: it is counted (skipped) and left out of that form's means.
`--adapter DIR` (a checkpoint of train.py) makes the student the trained policy; the teacher stays the base policy.

Departures: none from training; the gap itself is ours, the number that says whether SD can help:
SD moves the student toward the teacher, so a teacher below the student can only pull it down.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import data
import feedback
import grading
import lora
import rollout
from config import Config, ConfigError, check_inputs, load_problems, make_critic, parse_command
from feedback import FORMS
from infra import report
from infra.dist import setup_distributed
from infra.logs import Timer
from policy import build_model, make_vllm_engine, sampling

DEFAULT_FORMS = ("stepalign", "refsol", "verdict")  # --forms: any form of feedback.FORMS with a teacher


def avg_at_k(correct: list[list[float]]) -> float:
    """Mean over problems of the share of a problem's samples that are correct (problems without one left out)."""
    rows = [np.mean(c) for c in correct if len(c)]
    return float(np.mean(rows)) if rows else float("nan")


def summarize(texts: list[list[str]], rewards: list[list[float]]) -> dict:
    """Avg@k and answered rate of samples grouped by problem: texts and rewards, one list per problem."""
    flat = [t for ts in texts for t in ts]
    return {"avg@k": avg_at_k(rewards), "answered": float(np.mean([grading.extract_answer(t) is not None
                                                                    for t in flat])) if flat else float("nan"),
            "n_samples": len(flat)}


def teacher_gap(cfg: Config, model, engine, tokenizer, checker, critic_backend, problems: list[data.Problem],
                k: int, context: int, forms=DEFAULT_FORMS, sample_step: int = 0) -> dict:
    """Student Avg@k and, per form, teacher Avg@k from contexts built on the same k rollouts per problem.
    model: the policy with its adapter; the student samples inside policy.sampling, as in training (the transformers
    engine samples from this module, its adapter merged in fp32; vLLM holds its own weights). context: the model's
    context length (a teacher prompt and its sample that exceed it are skipped, as in train.py).

    Returns {"student": summary, form: summary | {"gap": points, "skipped": n}, "samples": per-rollout records}."""
    cfg = dataclasses.replace(feedback.with_form(cfg, forms[0]), sd_samples=k, teacher_samples=True)
    timer = Timer()
    draws = list(enumerate(problems))
    with sampling(cfg, model):  # the student policy
        rollouts = feedback.collect_rollouts(cfg, engine, tokenizer, checker, draws, sample_step, timer)

    def by_problem(items: list[feedback.Item], value) -> list[list]:
        return [[value(it) for it in items if it.draw == i] for i in range(len(problems))]

    out = {"student": summarize(by_problem(rollouts, lambda it: it.completion.text),
                                by_problem(rollouts, lambda it: it.reward))}
    samples = [{"problem_id": it.problem.id, "sample": it.sample, "rollout": it.completion.text, "reward": it.reward,
                "teacher": {}} for it in rollouts]
    for form in forms:
        form_cfg = feedback.with_form(cfg, form)
        backend = critic_backend if FORMS[form].needs_critic else None
        contexts, _, _ = feedback.feedback_contexts(form_cfg, backend, rollouts, timer)
        items, too_long = feedback.with_teacher_prompts(form_cfg, tokenizer, rollouts, contexts, context)
        if too_long:
            print(f"{form}: {too_long} rollouts skipped: teacher prompt and sample exceed the model's context",
                  file=sys.stderr, flush=True)
        items = feedback.with_teacher_samples(form_cfg, engine, checker, items, sample_step, timer)
        kept = [it for it in items if not it.skipped]
        summary = summarize(by_problem(kept, lambda it: it.teacher_sample.text),
                            by_problem(kept, lambda it: it.teacher_reward))
        summary["gap"] = 100.0 * (summary["avg@k"] - out["student"]["avg@k"])
        summary["skipped"] = len(items) - len(kept)
        out[form] = summary
        for record, it in zip(samples, items):
            record["teacher"][form] = None if it.skipped else {"text": it.teacher_sample.text,
                                                               "reward": it.teacher_reward}
    out["samples"] = samples
    out["seconds"] = dict(timer.seconds)
    return out


def gap_table(result: dict, forms=DEFAULT_FORMS, k: int | None = None) -> str:
    """Markdown: one row for the student prompt, one per teacher prompt, Avg@k in percent and the gap in points."""
    label = f"Avg@{k}" if k else "Avg@k"
    lines = [f"| prompt | {label} | answered | gap (points) | samples | skipped |", "|---|---|---|---|---|---|"]
    s = result["student"]
    lines.append(f"| student (x) | {100 * s['avg@k']:.1f} | {s['answered']:.2f} | | {s['n_samples']} | |")
    for form in forms:
        t = result[form]
        lines.append(f"| {report.DISPLAY[form]} teacher (x + c) | {100 * t['avg@k']:.1f} | "
                     f"{t['answered']:.2f} | {t['gap']:+.1f} | {t['n_samples']} | {t['skipped']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Config]:
    """This script's options and every train.py option (config.parse_command)."""
    teacher_forms = [name for name, f in FORMS.items() if f.context is not None]

    def own(ap):
        ap.add_argument("--split", default="test", choices=("test", "train"),
                        help="the config's held-out problems, or its training problems (choose settings on these)")
        ap.add_argument("--k", type=int, default=4, help="student rollouts per problem (one teacher sample per "
                        "rollout)")
        ap.add_argument("--n-problems", type=int, default=0, help="the first N problems of the split (0 = all)")
        ap.add_argument("--forms", default=",".join(DEFAULT_FORMS), help="comma-separated feedback forms: "
                        + ", ".join(teacher_forms))
        ap.add_argument("--sample-step", type=int, default=0, help="the rollouts and teacher samples are seeded as "
                        "those of this training step (with --seed): another value gives fresh samples of the same "
                        "problems")
        ap.add_argument("--adapter", default=None, help="a train.py checkpoint directory: the student is that "
                        "policy (default: the base policy, as at step 0)")
        ap.add_argument("--json", default=None, help="also write the result, with every sample, to this JSON file")

    cfg, args = parse_command(argv, prog="teacher_gap.py", own=own,
                              description="Avg@k of each teacher prompt's samples beside the student prompt's.")
    forms = tuple(f.strip() for f in args.forms.split(","))
    if not forms or any(f not in teacher_forms for f in forms):
        raise SystemExit(f"teacher_gap.py: error: --forms {args.forms}: each must be one of "
                         f"{', '.join(teacher_forms)}")
    if args.k < 1 or args.n_problems < 0:
        raise SystemExit(f"teacher_gap.py: error: --k {args.k} must be >= 1 and --n-problems {args.n_problems} >= 0")
    args.forms = forms
    return args, cfg


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(sys.argv[1:] if argv is None else list(argv))
    cfg = feedback.with_form(cfg, args.forms[0])
    try:
        check_inputs(cfg)
        train_set, test_set = load_problems(cfg)
    except (ConfigError, data.DataError) as e:
        raise SystemExit(f"teacher_gap.py: error: {e}") from None
    problems = test_set if args.split == "test" else train_set
    problems = problems[:args.n_problems] if args.n_problems else problems
    if "refsol" in args.forms and any(not p.reference_solution for p in problems):
        raise SystemExit("teacher_gap.py: error: --forms refsol: some problems have no reference solution")
    d = setup_distributed()
    model, tokenizer = build_model(cfg, d)
    model.eval()
    if args.adapter:
        lora.load_adapter(model, args.adapter)
    backend = make_critic(cfg) if any(FORMS[form].needs_critic for form in args.forms) else None
    with contextlib.ExitStack() as stack:
        if cfg.engine == "vllm":  # the engine of training, given the student's adapter as at a training step
            engine = make_vllm_engine(cfg, d)
            stack.callback(engine.close)
            adapter_dir = args.adapter
            if not adapter_dir:  # the base policy: the fresh adapter (B = 0), as train.py pushes at step 0
                adapter_dir = stack.enter_context(tempfile.TemporaryDirectory())
                lora.save_adapter(model, adapter_dir, base_model_name_or_path=cfg.model)
            engine.set_adapter(adapter_dir)
        else:
            engine = rollout.make_engine("transformers", cfg.model, model, tokenizer, stop_at_boxed=cfg.stop_at_boxed)
        checker = stack.enter_context(grading.AnswerChecker())
        result = teacher_gap(cfg, model, engine, tokenizer, checker, backend, problems, args.k,
                             model.config.max_position_embeddings, args.forms, args.sample_step)
    table = gap_table(result, args.forms, args.k)
    print(f"{len(problems)} {args.split} problems x {args.k} rollouts, temperature {cfg.temperature}, "
          f"teacher thinking {cfg.teacher_thinking if cfg.objective == 'sd' else cfg.student_thinking}, "
          f"student {'adapter ' + args.adapter if args.adapter else 'base policy'}\n")
    print(table)
    if args.json:
        record = {"config": dataclasses.asdict(cfg), "split": args.split, "k": args.k, "n_problems": len(problems),
                  "sample_step": args.sample_step, "adapter": args.adapter, **result}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
