"""The study: does feedback aligned with the student's own steps teach better than a reference solution?

    python -m scripts.study                              # the second study (seeds 201-203), runs/study2
    python -m scripts.study --study first                # the first (seeds 101-103, the prose reference), runs/study
    python -m scripts.study --seeds 20 21 --out runs/dev # any other seeds (e.g. your own, to check the claim)
    python -m scripts.study --report                     # only the table, from the runs already in --out
    python -m scripts.study --report --out docs/demo/study2   # the second study's table from its committed files
    python -m scripts.study --study first --report --out docs/demo/study1   # the first's, from its files

For each seed, the demo preset runs (`python train.py --preset demo`, a process each) once per row of ROWS:
StepAlignFB, RefSol (its reference: the study's, STUDIES) and the format control (RefSol with `--refsol-style
steps`: a correct solution in the student's step format that never copies the student's steps) under the demo's
teacher layout and under the paper's, and GRPO (no teacher, one row for both layouts), one run after the other;
`--jobs` seeds at once. The runs of a seed share its step-0 evaluation (the base policy) through
OUT/seedS/base_eval.json (train.py --base-eval). Each run uses one torch thread, so its numbers do not depend on how
many runs share the machine; a run already finished is not run again, and one cut short continues from its last
checkpoint. Then it writes OUT/study.md and OUT/study.json:
  1. Avg@k at the last step per form, layout and seed; across seeds the mean ± standard error (sample std/√n);
  2. per seed, StepAlignFB minus RefSol and minus the format control (same seed, same layout), mean ± standard error
     of those paired differences;
  3. the answered rate at the last step (samples with a \\boxed{} answer);
  4. the share of the step-1 rollouts' wrong attempts that begin with correct work (the critique copies one or
     more of their true equations verbatim, then corrects a later claim): on these, alignment can matter; and the
     same over all steps;
  5. beside each arm, its teacher's gap over the student measured before the study (the study's gate, written in
     its pre-registration): an arm whose teacher is not above its student is reported as unable to teach, and no
     difference with it is drawn;
  6. the pre-registered goal checked on the runs (goal_lines), for a study whose pre-registration wrote one.

Stopping it (SIGTERM, Ctrl-C, or SIGHUP when its terminal closes) passes the signal on to its train.py runs (each in
a process group of its own, so that Ctrl-C reaches each once, through the study), waits for their checkpoints (at
most STOP_WAIT_S, then kills the rest: their last checkpoints stay intact) and exits 128 + the signal's number; the
same command continues them. Bad options are one `study.py: error:` line (exit 2); so are run files that cannot be
read (a last log line cut by a kill is skipped with a warning). Nothing from outside enters study.md's cells.

Pre-registration: each study's seeds were fixed, with the demo preset, in a commit made before any run on them (the
first: ac0a73d; the second: docs/demo/study2/preregistration.md). A seed whose held-out result has been seen is
spent: report it as seen, never choose a setting on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from config import (Config, ConfigError, OneLineParser, config_problems, load_problems, parse_command, parse_config,
                    total_steps)
from data import DataError
from feedback import FORMS, form_options
from infra.checkpoint import CheckpointError, checkpoint_dirs, load_json
from infra.report import ReportError, read_evals, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
# The pre-registered studies: their evaluation seeds (no run had used them when they were committed), the form of
# their RefSol arm, the gate (each arm's teacher gap on a development seed's training problems, teacher_gap.py) and
# the goal written in the pre-registration (goal_lines), where one was
STUDIES = {
    # ac0a73d; its RefSol reference was the one-line prose one, kept as the stress case --refsol-style prose
    "first": {"seeds": (101, 102, 103), "refsol": "refsol_prose", "out": "runs/study", "gate": None, "goal": None},
    # docs/demo/study2/preregistration.md: the fair reference (a correct solution in a wording of its own)
    "second": {"seeds": (201, 202, 203), "refsol": "refsol", "out": "runs/study2",
               "gate": ROOT / "docs" / "demo" / "study2" / "gate_seed50.json",
               "goal": {"above": ("refsol", "refsol_steps"), "se": 2.0, "over_base": 10.0}},
}
LAYOUTS = ("repeat", "paper")  # the demo preset's teacher layout, then the paper's
ROWS = ("stepalign", "refsol", "refsol_steps", "grpo")  # the rows; refsol_steps is the format control
TRAIN = ROOT / "train.py"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what train.py checkpoints on (infra.signals)
STOP_WAIT_S = 300.0  # how long a stopped study waits for its runs' checkpoints before it kills them
POLL_S = 0.5  # how often the study looks at its runs and at the signals it received
# the options the study sets for each run itself (Config fields): given as further options, they would override it
STUDY_SETS = ("preset", "seed", "out_dir", "base_eval", "resume", "feedback", "teacher_layout", "refsol_style")


def _warn(message: str) -> None:
    print(f"study.py: warning: {message}", file=sys.stderr, flush=True)


def row_forms(study: str) -> dict[str, str]:
    """row -> its form of feedback.FORMS in `study` (the RefSol row's form is the study's reference)."""
    return {row: STUDIES[study]["refsol"] if row == "refsol" else row for row in ROWS}


def display(study: str) -> dict[str, str]:
    return {row: FORMS[form].display + (" (control)" if row == "refsol_steps" else "")
            for row, form in row_forms(study).items()}


def run_dirs(out: Path, seed: int, study: str) -> list[tuple[str, str, Path, list[str]]]:
    """(layout, row, run directory, train.py options) of every run of one seed, in the order they run: the rows with
    a teacher once per layout, GRPO (no teacher) once."""
    runs = []
    for layout in LAYOUTS:
        for row, form in row_forms(study).items():
            if row == "grpo":
                continue
            runs.append((layout, row, out / f"seed{seed}" / layout / row,
                         form_options(form) + ["--teacher-layout", layout]))
        if layout == LAYOUTS[0]:
            runs.append(("-", "grpo", out / f"seed{seed}" / "grpo", ["--feedback", "grpo"]))
    return runs


def last_eval_step(run_dir: Path) -> int:
    """The last step whose evaluation the run logged (-1: none); a last line cut by a kill does not count."""
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return -1
    return max((r.step for r in read_evals(path, _warn)), default=-1)


def run_argv(out: Path, seed: int, run_dir: Path, options: list[str]) -> list[str]:
    """The train.py options the study gives one run (before the further options of its command line)."""
    return ["--preset", "demo", "--seed", str(seed), "--out-dir", str(run_dir), "--no-progress",
            "--base-eval", str(out / f"seed{seed}" / "base_eval.json"), *options]


def train_commands(out: Path, seed: int, extra: list[str], study: str) -> list[tuple[str, list[str]]]:
    """(layout/row, train.py command) of each unfinished run of one seed, in the order they run. A run with a
    checkpoint continues from it (--resume); one cut short before its first checkpoint is removed, to start again; a
    finished run kept without its checkpoints (finished_steps) is left as it is."""
    commands = []
    for layout, row, run_dir, options in run_dirs(out, seed, study):
        argv = [*run_argv(out, seed, run_dir, options), *extra]
        if checkpoint_dirs(run_dir):
            argv.append("--resume")
            if last_eval_step(run_dir) == run_steps(parse_config(argv)):
                print(f"[seed {seed}] {layout}/{row}: done already", flush=True)
                continue
        elif finished_steps(run_dir) is not None:  # run files kept without checkpoints: never removed
            print(f"[seed {seed}] {layout}/{row}: done already (its logs, kept without checkpoints)", flush=True)
            continue
        elif run_dir.exists():
            print(f"[seed {seed}] {layout}/{row}: no checkpoint from an earlier start; starting it again", flush=True)
            shutil.rmtree(run_dir)
        commands.append((f"{layout}/{row}", [sys.executable, str(TRAIN), *argv]))
    return commands


def run_all(out: Path, seeds: list[int], jobs: int, extra: list[str], study: str) -> None:
    """Every unfinished run, as train.py processes with one torch thread (output appended to OUT/seedS.log): the runs
    of a seed one after the other, `jobs` seeds at once. A failed run ends the others (SIGTERM: each checkpoints
    and exits); the same command continues them. A stop signal to the study is passed on to its runs (`stop_runs`),
    and no run outlives the study, whatever ends it."""
    todo = {seed: train_commands(out, seed, extra, study) for seed in seeds}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: dict[int, tuple[subprocess.Popen, str, float]] = {}  # seed -> (its run's process, layout/row, start)
    received: list[int] = []  # the stop signals the study received, in order (the handler only appends)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOP_SIGNALS}
    t0 = time.perf_counter()
    try:
        out.mkdir(parents=True, exist_ok=True)
        while (any(todo.values()) or running) and not received:
            for seed in [s for s in seeds if todo[s] and s not in running][:jobs - len(running)]:
                if received:  # a signal arrived while runs were starting: start no more
                    break
                name, cmd = todo[seed].pop(0)
                with (out / f"seed{seed}.log").open("a") as log:  # the process keeps its own copy of the descriptor
                    # a process group of its own: a terminal's Ctrl-C reaches the run once, passed on by the study
                    running[seed] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                      process_group=0), name, time.perf_counter())
                print(f"[seed {seed}] {name}: started (log {out / f'seed{seed}.log'})", flush=True)
            time.sleep(POLL_S)
            for seed, (proc, name, start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[seed]
                if proc.returncode != 0:
                    stop_runs(running, [signal.SIGTERM], received)
                    raise SystemExit(f"study.py: error: seed {seed}, {name} failed (exit {proc.returncode}); see "
                                     f"{out / f'seed{seed}.log'}; run the same command again to continue")
                print(f"[seed {seed}] {name}: {time.perf_counter() - start:.0f} s", flush=True)
        if received:
            name = signal.Signals(received[0]).name
            print(f"study.py: {name}: stopping {len(running)} runs (each checkpoints its last completed step)",
                  flush=True)
            stop_runs(running, [], received)
            print(f"study.py: {name}: stopped; run the same command again to continue", flush=True)
            raise SystemExit(128 + received[0])
    finally:  # an error of the study itself: its runs checkpoint and stop too
        stop_runs(running, [signal.SIGTERM], received)
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"all runs: {time.perf_counter() - t0:.0f} s", flush=True)


def stop_runs(running: dict[int, tuple[subprocess.Popen, str, float]], send: list[int], received: list[int],
              wait_s: float | None = None) -> None:
    """Send each signal of `send`, then each of `received` (the signals the study gets, appended by its handler, also
    while this waits: a second Ctrl-C reaches the runs too and stops them at once), to every running run, and wait
    for them to exit: at most `wait_s` (default STOP_WAIT_S), then SIGKILL (the last checkpoint written stays
    intact; only the steps since are lost). Empties `running`."""
    deadline = time.monotonic() + (STOP_WAIT_S if wait_s is None else wait_s)
    sent = 0
    pending = list(send)
    while running:
        pending, sent = pending + received[sent:], len(received)
        for signum in pending:
            for proc, _, _ in running.values():
                proc.send_signal(signum)  # (a no-op for a process already waited for)
        pending = []
        for seed, (proc, name, _) in list(running.items()):
            if proc.poll() is not None:
                print(f"[seed {seed}] {name}: stopped (exit {proc.returncode})", flush=True)
                del running[seed]
        if running and time.monotonic() > deadline:
            for seed, (proc, name, _) in list(running.items()):
                proc.kill()
                proc.wait()
                print(f"[seed {seed}] {name}: no exit within {STOP_WAIT_S if wait_s is None else wait_s:.0f} s of "
                      "the signal: killed (its last checkpoint stays)", flush=True)
                del running[seed]
        elif running:
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- the report
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / √n) of per-seed values; the SE is NaN for one seed."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def run_steps(cfg: Config) -> int:
    """The number of steps of a run of `cfg`; ReportError when the options cannot make a run."""
    try:
        return total_steps(cfg, len(load_problems(cfg)[0]))
    except (ValueError, ArithmeticError) as e:  # ConfigError and DataError are ValueErrors; --prompts-per-step 0
        raise ReportError(f"{cfg.out_dir}: its options make no run ({type(e).__name__}: {str(e)[:200]})") from None


def saved_config(path: Path) -> Config:
    """The options a run saved with its checkpoint (config.json), each checked to be an option of this version with
    the type of its field: CheckpointError or ReportError naming the file and the field."""
    saved = load_json(path)
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for name, value in saved.items():
        if name not in types:
            raise ReportError(f"{path}: {name!r:.60} is not an option of train.py")
        if not isinstance(value, kinds[types[name]]) or isinstance(value, bool) != (types[name] == "bool"):
            raise ReportError(f"{path}: field {name!r} must be {types[name]}, got {value!r:.60}")
    return Config(**saved)


def _log_counts(run_dir: Path) -> list[tuple[float, float]]:
    """(wrong attempts, of which begin with correct work) per logged step; each a count >= 0 where present."""
    path = run_dir / "log.jsonl"
    counts = []
    for lineno, row in read_jsonl(path, _warn) if path.is_file() else []:
        pair = tuple(row.get(name, 0.0) for name in ("wrong_attempts", "wrong_correct_prefix"))
        for name, v in zip(("wrong_attempts", "wrong_correct_prefix"), pair):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < math.inf:
                raise ReportError(f"{path}:{lineno}: field {name!r} must be a count >= 0, got {v!r:.60}")
        counts.append((float(pair[0]), float(pair[1])))
    return counts


def finished_steps(run_dir: Path) -> int | None:
    """The run's number of steps when it has logged the evaluation of its last step, else None (not finished). Its
    options are its last checkpoint's config.json, or, for a run kept without its checkpoints (the study's committed
    run files: docs/demo/study2), the config.json beside its logs."""
    checkpoints = checkpoint_dirs(run_dir) if run_dir.is_dir() else []
    saved = checkpoints[-1] / "config.json" if checkpoints else run_dir / "config.json"
    if not saved.is_file():
        return None
    steps = run_steps(saved_config(saved))
    return steps if last_eval_step(run_dir) == steps else None


def gate(study: str) -> dict[str, float]:
    """row -> its teacher's gap (points) over the student in the study's gate file; {} when the study has none."""
    path = STUDIES[study]["gate"]
    if path is None:
        return {}
    measured = json.loads(Path(path).read_text())
    return {row: measured[form]["gap"] for row, form in row_forms(study).items() if form in measured}


def collect(out: Path, seeds: list[int], study: str) -> dict:
    """Per (layout, row) and seed, for the finished runs: Avg@k at step 0 and at the last step, the answered rate,
    and (StepAlignFB) the counts of wrong attempts that begin with correct work; unfinished runs are listed; the
    study's gate."""
    result: dict = {"study": study, "seeds": seeds, "runs": {}, "unfinished": [], "gate": gate(study)}
    for seed in seeds:
        for layout, row, run_dir, _ in run_dirs(out, seed, study):
            if finished_steps(run_dir) is None:
                result["unfinished"].append(f"seed{seed}/{layout}/{row}")
                continue
            evals = read_evals(run_dir / "eval.jsonl", _warn)
            first, last = evals[0], evals[-1]
            entry = {"step0": first.values["avg@k"], "step0_answered": first.answered,
                     "last": last.values["avg@k"], "last_step": last.step,
                     "k": last.k, "answered": last.answered, "pass": last.values["pass@k"],
                     "maj": last.values["maj@k"], "length": last.values["length"]}
            if row == "stepalign":
                counts = _log_counts(run_dir) or [(0.0, 0.0)]
                entry |= {"wrong_step1": counts[0][0], "correct_prefix_step1": counts[0][1],
                          "wrong_all": sum(w for w, _ in counts), "correct_prefix_all": sum(c for _, c in counts)}
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


def run_key(layout: str, row: str) -> str:
    """The key of a row's runs in result["runs"]: GRPO (no teacher) runs once, under "-"."""
    return "-/grpo" if row == "grpo" else f"{layout}/{row}"


def paired(runs: dict, layout: str, other: str) -> dict[str, float]:
    """Per seed, StepAlignFB minus `other` in points (the same seed, layout and problems), over the seeds where both
    finished."""
    mine, theirs = runs.get(f"{layout}/stepalign", {}), runs.get(run_key(layout, other), {})
    return {s: 100 * (mine[s]["last"] - theirs[s]["last"]) for s in mine if s in theirs}


def drawn(gaps: dict[str, float], other: str) -> bool:
    """The gate's rule: StepAlignFB is compared with `other` only when both teachers are above their students (an
    arm the gate did not measure counts as above)."""
    return gaps.get(other, 1) > 0 and gaps.get("stepalign", 1) > 0


def goal_lines(result: dict) -> list[str]:
    """The study's pre-registered goal checked on its `repeat` runs: StepAlignFB above each arm of goal["above"] by
    goal["se"] standard errors of the paired differences, and at least the base policy + goal["over_base"] points
    (the mean of the paired differences from step 0); [] for a study without one. A comparison with an arm whose
    teacher cannot teach (the gate) is not drawn, and the goal is then not decided."""
    goal = STUDIES[result["study"]]["goal"]
    if goal is None:
        return []
    runs, names, gaps = result["runs"], display(result["study"]), result.get("gate", {})
    mine = runs.get(f"{LAYOUTS[0]}/stepalign", {})
    checks = []
    for other in goal["above"]:
        if not drawn(gaps, other):
            checks.append((f"minus {names[other]}: not drawn (a teacher that cannot teach)", None))
            continue
        diff = list(paired(runs, LAYOUTS[0], other).values())
        m, se = mean_se(diff) if len(diff) > 1 else (float("nan"), float("nan"))
        checks.append((f"minus {names[other]} {m:+.2f}, {goal['se']:g} SE = {goal['se'] * se:.2f}",
                       m > goal["se"] * se))
    gain = [100 * (e["last"] - e["step0"]) for e in mine.values()]
    m = float(np.mean(gain)) if gain else float("nan")
    checks.append((f"minus the base policy {m:+.2f}, at least +{goal['over_base']:g}", m >= goal["over_base"]))
    oks = [ok for _, ok in checks]
    verdict = "missed" if False in oks else "not decided" if None in oks else "met"
    return ["", f"The pre-registered goal, StepAlignFB in the {LAYOUTS[0]} layout over {len(mine)} seeds: **{verdict}**"
            f" (" + "; ".join(text if ok is None else f"{text}: {'yes' if ok else 'no'}" for text, ok in checks) + ")."]


def report(result: dict) -> str:
    """The markdown tables of the study: finished runs only; a missing cell is "–"."""
    seeds = [str(s) for s in result["seeds"]]
    runs, names, gaps = result["runs"], display(result["study"]), result["gate"]
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = ["Avg@4 (%) on the held-out problems at the last step; step 0 is the base policy, the same for every "
             "row of a seed. Mean ± standard error (sample std / √n) across seeds. Teacher gap: the arm's teacher "
             "over its student before the study (the gate, in points; – : not measured).", "",
             f"| form | layout | {head} | mean ± SE | answered | teacher gap |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    base = {s: 100 * e[s]["step0"] for e in runs.values() for s in seeds if s in e}
    # the base policy's answered rate per seed (its runs share one step-0 evaluation: any run's)
    base_answered = [a for a in ({s: e[s].get("step0_answered") for e in runs.values() for s in seeds
                                  if s in e}).values() if a is not None]
    lines.append(f"| base policy (step 0) | | {_cells(base, seeds, '.2f')} | {_mean_cell(base, '.2f')} | "
                 + (f"{np.mean(base_answered):.2f} | |" if base_answered else "– | |"))
    for layout in LAYOUTS:
        for row in ROWS:
            if row == "grpo" and layout != LAYOUTS[0]:
                continue
            entries = runs.get(run_key(layout, row), {})
            vals = {s: 100 * e["last"] for s, e in entries.items()}
            answered = [e["answered"] for e in entries.values() if e["answered"] is not None]
            gap = f"{gaps[row]:+.1f}" if row in gaps else "–"
            lines.append(f"| {names[row]} | {layout if row != 'grpo' else '(none)'} | {_cells(vals, seeds, '.2f')} | "
                         + (f"{_mean_cell(vals, '.2f')} | {np.mean(answered):.2f} | {gap} |" if answered else
                            f"– | – | {gap} |"))
    lines += ["", "StepAlignFB minus each other form, paired by seed (same seed, same layout, same problems):", "",
              f"| difference | layout | {head} | mean ± SE |", "|---|---|" + "---|" * len(seeds) + "---|"]
    for layout in LAYOUTS:
        for other in ("refsol", "refsol_steps", "grpo"):
            if not drawn(gaps, other):
                lines.append(f"| StepAlignFB − {names[other]} | {layout} | not drawn: a teacher that cannot teach "
                             f"(gate) |")
                continue
            diff = paired(runs, layout, other)
            lines.append(f"| StepAlignFB − {names[other]} | {layout} | {_cells(diff, seeds, '+.2f')} | "
                         f"{_mean_cell(diff, '+.2f')} |")
    sa = list(runs.get(f"{LAYOUTS[0]}/stepalign", {}).values())
    if sa:
        w1, a1 = sum(e["wrong_step1"] for e in sa), sum(e["correct_prefix_step1"] for e in sa)
        w, a = sum(e["wrong_all"] for e in sa), sum(e["correct_prefix_all"] for e in sa)
        lines += ["", f"Wrong attempts that begin with correct work (the critique copies one or more of their true "
                  f"equations verbatim, then corrects a later claim), StepAlignFB runs, {LAYOUTS[0]} layout: step 1 "
                  f"(the base policy's rollouts) {a1:.0f} of {w1:.0f} ({a1 / max(w1, 1):.2f}); all steps {a:.0f} of "
                  f"{w:.0f} ({a / max(w, 1):.2f})."]
    lines += goal_lines(result)
    if result["unfinished"]:
        lines += ["", f"Not finished ({len(result['unfinished'])} runs; `python -m scripts.study` continues them): "
                  + ", ".join(result["unfinished"]) + "."]
    return "\n".join(lines) + "\n"


def check_options(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """One line per bad option: --jobs and --seeds in range, --out a directory, and the further options, which go to
    every run, as train.py would take them (and none the study sets for each run itself)."""
    bad = []
    if args.jobs < 1:
        bad.append(f"--jobs {args.jobs}: must be >= 1 (seeds run at once)")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        bad.append(f"--seeds {' '.join(map(str, args.seeds))}: must be distinct integers >= 0")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        bad.append(f"--out {args.out}: is a file; it must be a directory")
    elif args.report and not Path(args.out).is_dir():
        bad.append(f"--out {args.out}: no such directory, so no run to report")
    if args.report:
        return bad
    # each run's command through train.py's parser (an unknown option: its one `study.py: error:` line), with and
    # without the further options: those may not change what the study sets (abbreviations such as --see included)
    out, overridden = Path(args.out), set()
    for seed in args.seeds:
        for _, _, run_dir, options in run_dirs(out, seed, args.study):
            base = run_argv(out, seed, run_dir, options)
            cfg, own = (parse_command(argv, prog="study.py")[0] for argv in ([*base, *extra], base))
            overridden |= {name for name in STUDY_SETS if getattr(cfg, name) != getattr(own, name)}
    if overridden:
        bad.append(" ".join("--" + name.replace("_", "-") for name in STUDY_SETS if name in overridden)
                   + ": the study sets this for each run itself (python -m scripts.study --help)")
    return bad + config_problems(cfg)


def main(argv: list[str] | None = None) -> None:
    ap = OneLineParser(prog="study.py", description=__doc__.split("\n")[0], allow_abbrev=False,  # --seed is train.py's
                       epilog="Any further option goes to every run (python train.py --help).")
    ap.add_argument("--study", default="second", choices=tuple(STUDIES), help="which pre-registered study: its seeds, "
                    "its RefSol arm's reference and its gate (STUDIES)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (default: the study's)")
    ap.add_argument("--out", default=None, help="output directory (default: the study's, runs/study2 or runs/study)")
    ap.add_argument("--jobs", type=int, default=3, help="seeds run at once, one train.py process and torch thread each")
    ap.add_argument("--report", action="store_true", help="only write the report from the runs in --out")
    args, extra = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    args.seeds = list(STUDIES[args.study]["seeds"]) if args.seeds is None else args.seeds
    args.out = STUDIES[args.study]["out"] if args.out is None else args.out
    out = Path(args.out)
    bad = check_options(args, extra)
    try:
        if bad:
            raise ConfigError("\n".join(bad))
        if not args.report:
            run_all(out, args.seeds, args.jobs, extra, args.study)
        result = collect(out, args.seeds, args.study)
        table = report(result)
        out.mkdir(parents=True, exist_ok=True)
        (out / "study.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "study.md").write_text(table)
    except (ConfigError, DataError, ReportError, CheckpointError, OSError) as e:  # one line each, no traceback
        for line in str(e).splitlines():
            print(f"study.py: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(table)


if __name__ == "__main__":
    main()
