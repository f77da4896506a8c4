"""This project's SD step against TRL's SDFTTrainer (trl 1.16, trl.experimental.sdft) on the same workload.

    pip install trl==1.16.0 peft       # in your own environment; trl is never a dependency of this project
    OMP_NUM_THREADS=1 python bench/bench_vs_trl.py --rounds 2 --steps 4

Without trl (or peft, datasets, accelerate) the script prints one "skipped" line and exits 0. trl may also come from
PYTHONPATH (e.g. `pip install --target DIR --no-deps trl==1.16.0 datasets ...` then PYTHONPATH=DIR), as long as torch
and transformers come from this project's environment. Each round runs both sides, each a fresh subprocess of
--steps steps, in the order ours, TRL, then TRL, ours (so drift of a shared machine hits both alike); the first step
of every subprocess is a warm-up and is dropped. Ours is the real `python train.py` (OURS below), timed by its
log.jsonl (`seconds`, `time_*`: diagnostics.step_record); TRL's step by a TrainerCallback from on_step_begin to
on_step_end, its phases by wrapping its generate, the teacher forward's adapter context, compute_loss and backward.
Peak RSS: os.wait4's ru_maxrss of each subprocess. Printed: medians per side, ratios ours / TRL from this run.

The workload, both sides: SmolLM2-135M-Instruct in fp32 (the packaged demo model, loaded by rollout.load_model);
LoRA r 16, α 32 on q,k,v,o,gate,up,down, no dropout; the demo preset's RefSol run: 6 problems per step, 1 rollout
each, the same problems in the same order (feedback.step_problems) with the same student prompt ids; 80 new tokens
at temperature 0.5; AdamW lr 2e-4, no weight decay, clip 1.0, constant lr; full-vocabulary forward KL; the teacher =
the base weights (adapter off; TRL teacher_model_kind="base"), prompted with the reference solution. One torch
thread per process (OMP_NUM_THREADS=1 for both; the TRL worker also calls torch.set_num_threads(1)).
TRL's settings: distillation_mode="full_logits" with distillation_alpha=0.0, which is forward KL: loss_utils.
compute_divergence(s, t, 0.0) is F.kl_div(s, t, log_target=True) = Σ_v p_t (log p_t − log p_s) = KL(teacher‖student);
α = 1 gives the reverse. The teacher prompt is OUR prompt token for token (0 tokens of difference, checked on TRL's
own batches): teacher_prompt_template "{prompt}{privileged_context}", prompts given as rendered text, and
privileged_context = our "repeat"-layout teacher prompt minus the student prompt (the reference solution as the
model's earlier answer, then the student prompt again: prompts.py departure 6).

Departures between the two sides that the bench does not remove:
1. Rollouts differ (ours: one seeded generator per sample; TRL: model.generate on the global RNG), so their lengths
   differ: the table shows tokens per rollout. Both stop only at EOS (<|im_end|>) or 80 tokens: ours runs with
   --no-stop-at-boxed (the demo stops after the first \\boxed{}; TRL has no such rule).
2. Implementation, measured rather than removed: ours samples from LoRA merged into the weights, TRL through PEFT's
   unmerged adapter; ours scores from final hidden states in 256-position chunks, TRL holds full (B, T, V) logits.
3. Math at equal cost: TRL divides both models' logits by the temperature (0.5) before the KL, ours does not; TRL
   averages per sequence then over the batch, ours divides by the step's valid tokens; distillation_is_clip=None
   (with one generation per step TRL computes no importance ratio anyway).
4. Our step also grades each rollout (math-verify, in a worker process), computes its diagnostics (the exact
   critic's wrong claims, div_top1_share) and writes log.jsonl: these are in its `other` column.
5. Evaluation: train.py always evaluates at step 0 and at its last step, here on 1 problem × 1 sample (the least
   its options allow), outside the timed steps; TRL evaluates nothing (eval_strategy "no").
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import config  # noqa: E402
import feedback  # noqa: E402
import prompts  # noqa: E402
import rollout  # noqa: E402

NEEDS = ("trl", "peft", "datasets", "accelerate")  # what SDFTTrainer imports beyond this project's environment
INSTALL = "pip install trl==1.16.0 peft"
# Our side: the demo preset's RefSol run, stopping at EOS like TRL, evaluating as little as train.py allows
OURS = ["--preset", "demo", "--feedback", "refsol", "--no-stop-at-boxed", "--eval-every", "1000000",
        "--eval-problems", "1", "--eval-samples", "1", "--epochs", "1000", "--no-progress"]
PHASES = ("rollout", "teacher", "student", "other")
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRL_EXPERIMENTAL_SILENCE": "1"}


def workload(steps: int) -> config.Config:
    """The one Config both sides read: train.py parses OURS, the TRL worker builds its trainer from these fields."""
    return config.parse_config(OURS + ["--max-steps", str(steps)])


def trl_rows(cfg: config.Config, tokenizer, steps: int) -> list[dict]:
    """TRL's dataset, in our step order: per rollout the student prompt x as rendered text, and as privileged context
    the rest of our teacher prompt x + c (so "{prompt}{privileged_context}" is our teacher prompt)."""
    form = feedback.form_name(cfg)
    train, _ = config.load_problems(cfg)
    rows = []
    for step in range(steps):
        for p in feedback.step_problems(train, cfg, step):
            x = prompts.render(tokenizer, prompts.student_messages(p), cfg.student_thinking)
            it = feedback.Item(p, [], rollout.Completion([], "", "stop"))  # refsol's c does not read the attempt
            xc = prompts.render(tokenizer, feedback.form_messages(form, it, None, cfg.teacher_layout),
                                cfg.teacher_thinking)
            if not xc.startswith(x):
                raise ValueError(f"problem {p.id}: the teacher prompt does not start with the student prompt")
            rows.append({"prompt": x, "privileged_context": xc[len(x):]})
    return rows


# ---------------------------------------------------------------------------------------------- the TRL side
def trl_worker(steps: int, out: Path) -> None:
    """Train TRL's SDFTTrainer for `steps` steps on the workload; write per-step times and checks to `out`."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    torch.set_num_threads(1)
    cfg = workload(steps)
    model, tokenizer = rollout.load_model(cfg.model, dtype=rollout.DTYPES[cfg.dtype])
    rows = trl_rows(cfg, tokenizer, steps)
    # as TRL tokenizes its text; on these problems (no special token's string in them) the ids of prompts.encode,
    # feedback.py's (tests/test_special_tokens.py)
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    expected = [(ids(r["prompt"]), ids(r["prompt"] + r["privileged_context"])) for r in rows]
    acc: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - start

    def timed(fn, name: str):
        def wrapper(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return wrapper

    class Steps(TrainerCallback):
        def __init__(self):
            self.records, self.t0, self.matches = [], 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            acc.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seconds = time.perf_counter() - self.t0
            student = acc.get("loss", 0.0) - acc.get("teacher", 0.0) + acc.get("backward", 0.0)
            rec = {"seconds": seconds, "rollout": acc.get("rollout", 0.0), "teacher": acc.get("teacher", 0.0),
                   "student": student}
            rec["other"] = seconds - rec["rollout"] - rec["teacher"] - student
            self.records.append(rec)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and self.records:
                self.records[-1]["response_length"] = logs["completions/mean_length"]

        def on_self_distillation_batch_prepared(self, args, state, control, prompt_ids, completion_ids,
                                                teacher_input_ids, teacher_attention_mask, **kw):
            # TRL's own left-padded batches against our ids: the student prompt x and the teacher prompt x + c
            T = completion_ids.shape[1]
            first = len(self.matches)  # one entry per rollout so far
            for b in range(prompt_ids.shape[0]):
                x_ids, xc_ids = expected[first + b]
                row = prompt_ids[b].tolist()  # left padded
                pad, got_x = row[:len(row) - len(x_ids)], row[len(row) - len(x_ids):]
                got_xc = teacher_input_ids[b, :-T][teacher_attention_mask[b, :-T].bool()].tolist()
                self.matches.append((got_x == x_ids and set(pad) <= {tokenizer.pad_token_id}, got_xc == xc_ids,
                                     len(got_xc) - len(xc_ids)))

    args = SDFTConfig(output_dir=str(out.parent / "trl_out"), max_steps=steps, per_device_train_batch_size=
                      cfg.prompts_per_step // cfg.sd_samples, num_generations=cfg.sd_samples,
                      gradient_accumulation_steps=1, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
                      max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="constant", warmup_steps=0,
                      optim="adamw_torch", temperature=cfg.temperature, max_completion_length=cfg.max_new_tokens,
                      max_prompt_length=None, top_p=1.0, top_k=0, distillation_mode="full_logits",
                      distillation_alpha=0.0, distillation_is_clip=None, teacher_model_kind="base",
                      teacher_prompt_template="{prompt}{privileged_context}", shuffle_dataset=False,
                      gradient_checkpointing=cfg.grad_checkpointing, bf16=False, use_cpu=True, seed=cfg.seed,
                      logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
                      dataloader_pin_memory=False, disable_tqdm=True)
    targets = cfg.lora_targets.split(",")
    peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    callback = Steps()
    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[callback])
    trainer._generate = timed(trainer._generate, "rollout")
    trainer.compute_loss = timed(trainer.compute_loss, "loss")  # student forward + teacher forward + the KL
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward")
    teacher_context = trainer._get_teacher_context_for_self_distillation  # the teacher forward runs inside it

    def timed_teacher_context():
        stack = contextlib.ExitStack()
        stack.enter_context(phase("teacher"))
        stack.enter_context(teacher_context())
        return stack

    trainer._get_teacher_context_for_self_distillation = timed_teacher_context
    trainer.train()
    out.write_text(json.dumps({
        "steps": callback.records, "threads": torch.get_num_threads(),
        "student_ids_match": all(m[0] for m in callback.matches), "teacher_ids_match": all(m[1] for m in callback.matches),
        "teacher_len_diff": sorted({m[2] for m in callback.matches}), "rows_checked": len(callback.matches),
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


# ---------------------------------------------------------------------------------------------- the rounds
def run_child(cmd: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run one side's subprocess; returns (exit code, its peak RSS in MiB from wait4, wall seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **ENV})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def ours_steps(out_dir: Path) -> list[dict]:
    """Per-step times of a train.py run from its log.jsonl (evaluation is logged to eval.jsonl, outside them)."""
    steps = []
    for line in (out_dir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        # student: its forward, Eq. 3 and the backward pass, as TRL's compute_loss (less the teacher) and backward
        student = sum(r.get(f"time_{k}", 0.0) for k in ("student", "loss", "backward"))
        rec = {"seconds": r["seconds"], "rollout": r.get("time_rollout", 0.0), "teacher": r.get("time_teacher", 0.0),
               "student": student, "response_length": r["response_length"]}
        rec["other"] = rec["seconds"] - rec["rollout"] - rec["teacher"] - rec["student"]
        steps.append(rec)
    return steps


def fail(side: str, code: int, log_path: Path) -> None:
    tail = "\n".join(log_path.read_text().splitlines()[-30:])
    raise SystemExit(f"bench_vs_trl.py: error: the {side} run exited {code}; the end of its log:\n{tail}")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(measured: dict[str, dict], warmup: int, rollouts: int) -> str:
    """Medians per side over the kept steps, and the ratio ours / TRL of each column. The two sides' rollouts differ
    in length (departure 1): ms/token, the step's time over its rollout tokens (`rollouts` per step), compares them
    per token of work."""
    cols = ["seconds", *PHASES, "response_length", "ms_per_token"]
    head = ("| side | steps kept | step s | rollout s | teacher s | student s | other s | tokens/rollout | ms/token | "
            "peak RSS MiB |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    med = {}
    for side, m in measured.items():
        kept = [s | {"ms_per_token": 1000 * s["seconds"] / (rollouts * s["response_length"])} for s in m["steps"]]
        med[side] = {c: median([s[c] for s in kept if c in s]) for c in cols} | {"rss": median(m["rss"])}
        cells = [f"{med[side][c]:.2f}" if c != "response_length" else f"{med[side][c]:.1f}" for c in cols]
        lines.append(f"| {side} | {len(kept)} | " + " | ".join(cells) + f" | {med[side]['rss']:.0f} |")
    a, b = med["ours (train.py)"], med["TRL SDFTTrainer"]
    ratio = [f"{a[c] / b[c]:.2f}" if b[c] else "-" for c in cols]
    lines.append("| ours / TRL | | " + " | ".join(ratio) + f" | {a['rss'] / b['rss']:.2f} |")
    return "\n".join(lines) + f"\n(medians over the steps kept: the first {warmup} step(s) of every subprocess dropped)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_vs_trl.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs both sides once, alternating "
                        "which goes first")
    parser.add_argument("--steps", type=int, default=4, help="training steps per subprocess")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of every subprocess left out of the "
                        "medians")
    parser.add_argument("--ours", nargs="*", default=[], metavar="OPTION", help="more train.py options for our "
                        "side, e.g. --ours=--grad-checkpointing (a setting that changes no result: memory against time)")
    parser.add_argument("--trl-worker", type=Path, default=None, help="(internal) run the TRL side in this process "
                        "and write its measurements to this JSON file")
    args = parser.parse_args(argv)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(f"bench_vs_trl.py: skipped: {', '.join(missing)} not installed; `{INSTALL}` to run the comparison")
        return
    if args.trl_worker is not None:
        trl_worker(args.steps, args.trl_worker)
        return
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    ours = " ".join(OURS + args.ours)
    print(f"command: OMP_NUM_THREADS=1 {command}\nours: python train.py {ours} --max-steps {args.steps} "
          f"--out-dir DIR", flush=True)
    measured = {side: {"steps": [], "rss": [], "wall": []} for side in ("ours (train.py)", "TRL SDFTTrainer")}
    checks = []
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        for r in range(args.rounds):
            order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
            for side in order:
                log_path = Path(tmp) / f"{side}_{r}.log"
                if side == "ours":
                    out_dir = Path(tmp) / f"ours_{r}"
                    cmd = [sys.executable, "train.py", *OURS, *args.ours, "--max-steps", str(args.steps),
                           "--out-dir", str(out_dir)]
                    code, rss, wall = run_child(cmd, log_path)
                    if code:
                        fail(side, code, log_path)
                    steps, key = ours_steps(out_dir), "ours (train.py)"
                else:
                    out = Path(tmp) / f"trl_{r}.json"
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps),
                           "--trl-worker", str(out)]
                    code, rss, wall = run_child(cmd, log_path)
                    if code or not out.exists():
                        fail(side, code, log_path)
                    result = json.loads(out.read_text())
                    steps, key = result["steps"], "TRL SDFTTrainer"
                    checks.append(result)
                measured[key]["steps"] += steps[args.warmup:]
                measured[key]["rss"].append(rss)
                measured[key]["wall"].append(wall)
                print(f"round {r + 1}/{args.rounds} {key}: steps (s) " + " ".join(f"{s['seconds']:.2f}" for s in steps)
                      + f"; peak RSS {rss:.0f} MiB; process {wall:.0f} s", flush=True)
    print(table(measured, args.warmup, workload(args.steps).prompts_per_step))
    c = checks[-1]
    print(f"TRL side: torch threads {c['threads']}; student prompt ids identical to ours: "
          f"{all(x['student_ids_match'] for x in checks)}, teacher prompt ids identical: "
          f"{all(x['teacher_ids_match'] for x in checks)} (length differences {c['teacher_len_diff']} tokens, "
          f"{sum(x['rows_checked'] for x in checks)} rollouts checked)")


if __name__ == "__main__":
    main(sys.argv[1:])
