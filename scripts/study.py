"""The study: does feedback aligned with the student's own steps teach better than a reference solution?

    python -m scripts.study                                     # the pre-registered seeds (SEEDS), runs/study
    python -m scripts.study --seeds 20 21 --out runs/study-dev  # any other seeds (e.g. your own, to check the claim)
    python -m scripts.study --report                            # only the table, from the runs already in --out

For each seed, the demo preset runs (`python train.py --preset demo`, a process each) once per row of RUNS:
StepAlignFB, RefSol and the format control (RefSol with `--refsol-style steps`: a correct solution in the student's
step format that never copies the student's steps) under the demo's teacher layout and under the paper's, and GRPO
(no teacher, one row for both layouts), one run after the other; `--jobs` seeds at once. The runs of a seed share its
step-0 evaluation (the base policy) through OUT/seedS/base_eval.json (train.py --base-eval). Each run uses one torch
thread, so its numbers do not depend on how many runs share the machine; a run already finished is not run again,
and one cut short continues from its last checkpoint. Then it writes OUT/study.md and OUT/study.json:
  1. Avg@k at the last step per form, layout and seed; across seeds the mean ± standard error (sample std/√n);
  2. per seed, StepAlignFB minus RefSol and minus the format control (same seed, same layout), mean ± standard error
     of those paired differences;
  3. the answered rate at the last step (samples with a \\boxed{} answer);
  4. the share of the step-1 rollouts' wrong attempts that begin with correct work (the critique copies one or
     more of their true equations verbatim, then corrects a later claim): on these, alignment can matter; and the
     same over all steps.

Pre-registration: SEEDS were fixed, with the demo preset, in a commit made before any run on them (git log --follow scripts/study.py).
A seed whose held-out result has been seen is spent: report it as seen, never choose a setting on it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from config import Config, load_problems, parse_config, total_steps
from feedback import FORMS, form_options
from infra.checkpoint import checkpoint_dirs

SEEDS = (101, 102, 103)  # pre-registered evaluation seeds: no run had used them when this line was committed
LAYOUTS = ("repeat", "paper")  # the demo preset's teacher layout, then the paper's
ROWS = ("stepalign", "refsol", "refsol_steps", "grpo")  # forms of feedback.FORMS; refsol_steps is the format control
# (row name, train.py options) of the forms with a teacher, run once per layout; GRPO has no teacher and runs once
RUNS = tuple((row, form_options(row)) for row in ROWS if row != "grpo")
DISPLAY = {row: FORMS[row].display + (" (control)" if row == "refsol_steps" else "") for row in ROWS}
TRAIN = Path(__file__).resolve().parent.parent / "train.py"


def run_dirs(out: Path, seed: int) -> list[tuple[str, str, Path, list[str]]]:
    """(layout, row, run directory, train.py options) of every run of one seed, in the order they run."""
    runs = []
    for layout in LAYOUTS:
        for row, options in RUNS:
            runs.append((layout, row, out / f"seed{seed}" / layout / row, options + ["--teacher-layout", layout]))
        if layout == LAYOUTS[0]:
            runs.append(("-", "grpo", out / f"seed{seed}" / "grpo", ["--feedback", "grpo"]))
    return runs


def last_eval_step(run_dir: Path) -> int:
    """The last step whose evaluation the run logged (-1: none)."""
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return -1
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()), default=-1)


def train_commands(out: Path, seed: int, extra: list[str]) -> list[tuple[str, list[str]]]:
    """(layout/row, train.py command) of each unfinished run of one seed, in the order they run. A run with a
    checkpoint continues from it (--resume); one cut short before its first checkpoint is removed, to start again."""
    commands = []
    for layout, row, run_dir, options in run_dirs(out, seed):
        argv = ["--preset", "demo", "--seed", str(seed), "--out-dir", str(run_dir), "--no-progress",
                "--base-eval", str(out / f"seed{seed}" / "base_eval.json"), *options, *extra]
        if checkpoint_dirs(run_dir):
            argv.append("--resume")
            cfg = parse_config(argv)
            if last_eval_step(run_dir) == total_steps(cfg, len(load_problems(cfg)[0])):
                print(f"[seed {seed}] {layout}/{row}: done already", flush=True)
                continue
        elif run_dir.exists():
            print(f"[seed {seed}] {layout}/{row}: no checkpoint from an earlier start; starting it again", flush=True)
            shutil.rmtree(run_dir)
        commands.append((f"{layout}/{row}", [sys.executable, str(TRAIN), *argv]))
    return commands


def run_all(out: Path, seeds: list[int], jobs: int, extra: list[str]) -> None:
    """Every unfinished run, as train.py processes with one torch thread (output appended to OUT/seedS.log): the runs
    of a seed one after the other, `jobs` seeds at once. A failed run ends the others (SIGTERM: each checkpoints
    and exits); the same command continues them."""
    todo = {seed: train_commands(out, seed, extra) for seed in seeds}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: dict[int, tuple[subprocess.Popen, str, float]] = {}  # seed -> (its run's process, layout/row, start)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    while any(todo.values()) or running:
        for seed in [s for s in seeds if todo[s] and s not in running][:jobs - len(running)]:
            name, cmd = todo[seed].pop(0)
            with (out / f"seed{seed}.log").open("a") as log:  # the process keeps its own copy of the descriptor
                running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), name,
                                 time.perf_counter())
            print(f"[seed {seed}] {name}: started (log {out / f'seed{seed}.log'})", flush=True)
        time.sleep(5)
        for seed, (proc, name, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[seed]
            if proc.returncode != 0:
                for other, _, _ in running.values():
                    other.terminate()
                raise SystemExit(f"study.py: error: seed {seed}, {name} failed (exit {proc.returncode}); see "
                                 f"{out / f'seed{seed}.log'}; run the same command again to continue")
            print(f"[seed {seed}] {name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"all runs: {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------- the report
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / √n) of per-seed values; the SE is NaN for one seed."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def _evals(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]


def _logs(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def finished_steps(run_dir: Path) -> int | None:
    """The run's number of steps when it has logged the evaluation of its last step, else None (not finished)."""
    checkpoints = checkpoint_dirs(run_dir) if run_dir.is_dir() else []
    if not checkpoints:
        return None
    cfg = Config(**json.loads((checkpoints[-1] / "config.json").read_text()))
    steps = total_steps(cfg, len(load_problems(cfg)[0]))
    return steps if last_eval_step(run_dir) == steps else None


def collect(out: Path, seeds: list[int]) -> dict:
    """Per (layout, row) and seed, for the finished runs: Avg@k at step 0 and at the last step, the answered rate,
    and (StepAlignFB) the counts of wrong attempts that begin with correct work; unfinished runs are listed."""
    result: dict = {"seeds": seeds, "runs": {}, "unfinished": []}
    for seed in seeds:
        for layout, row, run_dir, _ in run_dirs(out, seed):
            if finished_steps(run_dir) is None:
                result["unfinished"].append(f"seed{seed}/{layout}/{row}")
                continue
            evals, logs = _evals(run_dir), _logs(run_dir)
            first, last = evals[0], evals[-1]
            entry = {"step0": first["avg@k"], "last": last["avg@k"], "last_step": last["step"], "k": last["k"],
                     "answered": last.get("answered"), "pass": last["pass@k"], "maj": last["maj@k"],
                     "length": last["length"]}
            if row == "stepalign":
                wrong = [r.get("wrong_attempts", 0.0) for r in logs]
                ok = [r.get("wrong_correct_prefix", 0.0) for r in logs]
                entry |= {"wrong_step1": wrong[0], "correct_prefix_step1": ok[0],
                          "wrong_all": float(sum(wrong)), "correct_prefix_all": float(sum(ok))}
            result["runs"].setdefault(f"{layout}/{row}", {})[str(seed)] = entry
    return result


def _cells(values: dict[str, float], seeds: list[str], fmt: str) -> str:
    return " | ".join(format(values[s], fmt) if s in values else "–" for s in seeds)


def _mean_cell(values: dict[str, float], fmt: str) -> str:
    """mean ± SE over the seeds present; (n = …) when some are missing."""
    if not values:
        return "–"
    m, se = mean_se(list(values.values()))
    return f"{m:{fmt}} ± {se:.2f}" + ("" if len(values) >= 3 else f" (n = {len(values)})")


def report(result: dict) -> str:
    """The markdown tables of the study: finished runs only; a missing cell is "–"."""
    seeds = [str(s) for s in result["seeds"]]
    runs = result["runs"]
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"Avg@4 (%) on the held-out problems at the last step; step 0 is the base policy, the same for every "
             f"row of a seed. Mean ± standard error (sample std / √n) across seeds.", "",
             f"| form | layout | {head} | mean ± SE | answered |", "|---|---|" + "---|" * len(seeds) + "---|---|"]
    base = {s: 100 * e[s]["step0"] for e in runs.values() for s in seeds if s in e}
    lines.append(f"| base policy (step 0) | | {_cells(base, seeds, '.2f')} | {_mean_cell(base, '.2f')} | |")
    for layout in LAYOUTS:
        for row in ROWS:
            if row == "grpo" and layout != LAYOUTS[0]:
                continue
            entries = runs.get(f"-/{row}" if row == "grpo" else f"{layout}/{row}", {})
            vals = {s: 100 * e["last"] for s, e in entries.items()}
            answered = [e["answered"] for e in entries.values() if e["answered"] is not None]
            lines.append(f"| {DISPLAY[row]} | {layout if row != 'grpo' else '(none)'} | {_cells(vals, seeds, '.2f')} | "
                         f"{_mean_cell(vals, '.2f')} | {np.mean(answered):.2f} |" if answered else
                         f"| {DISPLAY[row]} | {layout if row != 'grpo' else '(none)'} | {_cells(vals, seeds, '.2f')} | "
                         f"– | – |")
    lines += ["", "StepAlignFB minus each other form, paired by seed (same seed, same layout, same problems):", "",
              f"| difference | layout | {head} | mean ± SE |", "|---|---|" + "---|" * len(seeds) + "---|"]
    for layout in LAYOUTS:
        for other in ("refsol", "refsol_steps", "grpo"):
            mine = runs.get(f"{layout}/stepalign", {})
            theirs = runs.get("-/grpo" if other == "grpo" else f"{layout}/{other}", {})
            diff = {s: 100 * (mine[s]["last"] - theirs[s]["last"]) for s in seeds if s in mine and s in theirs}
            lines.append(f"| StepAlignFB − {DISPLAY[other]} | {layout} | {_cells(diff, seeds, '+.2f')} | "
                         f"{_mean_cell(diff, '+.2f')} |")
    sa = list(runs.get(f"{LAYOUTS[0]}/stepalign", {}).values())
    if sa:
        w1, a1 = sum(e["wrong_step1"] for e in sa), sum(e["correct_prefix_step1"] for e in sa)
        w, a = sum(e["wrong_all"] for e in sa), sum(e["correct_prefix_all"] for e in sa)
        lines += ["", f"Wrong attempts that begin with correct work (the critique copies one or more of their true "
                  f"equations verbatim, then corrects a later claim), StepAlignFB runs, {LAYOUTS[0]} layout: step 1 "
                  f"(the base policy's rollouts) {a1:.0f} of {w1:.0f} ({a1 / max(w1, 1):.2f}); all steps {a:.0f} of "
                  f"{w:.0f} ({a / max(w, 1):.2f})."]
    if result["unfinished"]:
        lines += ["", f"Not finished ({len(result['unfinished'])} runs; `python -m scripts.study` continues them): "
                  + ", ".join(result["unfinished"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="study.py", description=__doc__.split("\n")[0],
                                 epilog="Any further option goes to every run (python train.py --help).")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="run seeds (default: the pre-registered)")
    ap.add_argument("--out", default="runs/study", help="output directory")
    ap.add_argument("--jobs", type=int, default=3, help="seeds run at once, one train.py process and torch thread each")
    ap.add_argument("--report", action="store_true", help="only write the report from the runs in --out")
    args, extra = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if not args.report:
        run_all(out, args.seeds, args.jobs, extra)
    result = collect(out, args.seeds)
    table = report(result)
    (out / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "study.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
