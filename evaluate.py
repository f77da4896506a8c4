"""Grading, Pass/Maj/Avg@k, the paper's results table, and the pieces of the per-token advantage figure.

Grading: `extract_answer(response)` takes the last well-formed \\boxed{...} (or \\fbox{...}); `grade(response,
gold)` compares it with the gold answer, first by a fast exact path (identical strings, or two plain integers),
otherwise with math-verify (`verify(gold, pred)`, gold first: it is not symmetric). math-verify's own time
limits use SIGALRM, which fails outside the main thread and cannot interrupt a long C-level computation
(e.g. a huge power), so we switch them off and run math-verify in a persistent worker process owned by an
`AnswerChecker`: each check has a deadline; on expiry the worker is killed (and restarted for the next check)
and the check counts as incorrect and is counted in `AnswerChecker.failures`. This works from any thread
(checks are serialized by a lock) and from worker processes (the worker is a `subprocess`, not a
multiprocessing child, so daemonic pool workers may own one). For bulk grading create one checker and reuse
it (`with AnswerChecker() as checker: checker.grade(response, gold)`); `grade(response, gold)` without a
checker starts a one-shot worker (~0.5 s) only when the fast path cannot decide.

Metrics (`evaluate_samples`), per problem over its n samples, then averaged over problems:
    Avg@k   mean correctness c / n;
    Pass@k  the unbiased estimator of Chen et al. (2021), 1 − C(n−c, k) / C(n, k) (`pass_at_k`);
    Maj@k   the majority answer among the first k samples is correct;
    length  mean number of generated tokens.

Results table: the training loop appends one JSON object per evaluation to RUN_DIR/eval.jsonl,
    {"step": int, "feedback": str, "k": int, "pass@k": float, "maj@k": float, "avg@k": float, "length": float}
with the metrics as fractions in [0, 1] (the table prints percentages), and
    python evaluate.py RUN_DIR [RUN_DIR ...] [--out DIR]
(each RUN_DIR a run, or a parent directory whose subdirectories are runs) prints and writes DIR/results.md,
for each feedback form the best value of each metric and the step where it was reached, then Avg@k at every
evaluated step (`steps_table`), and one PNG per metric over steps with one line per feedback form.

Mechanism figure (the paper's per-token advantage analysis): `mechanism(model, tokenizer, problems, ...)` samples
rollouts from the student prompt, critiques them (default: critic.ExactArithmeticCritic), keeps the erroneous ones
whose wrong claim the critic located (Critique.wrong_span, characters, mapped to the rollout's own token ids by
`token_char_spans` + `error_marks_from_spans`), and scores the SAME ids y under the student prompt and under each
teacher context with rollout.score_positions / final_hidden / token_logprobs_from_hidden, giving per context
A_t = log π(y_t | x, c, y<t) − log π(y_t | x, y<t) (sd_loss.token_advantage). Contexts are a mapping
name -> (problem, response, critique) -> teacher messages (MECHANISM_CONTEXTS: stepalign, refsol, verdict); a new
feedback form is one more entry. The pure pieces: `localization_scores`, `advantage_by_position` +
`plot_advantage_by_position`, `render_advantage_html`. On the demo model:
    python evaluate.py mechanism --out docs/mechanism [--n-problems 20] [--seed 0]
writes DIR/advantage.html, DIR/advantage_by_position.png, DIR/localization.json and prints the localization table
(a results directory literally named "mechanism" must be passed as ./mechanism).

Run the tests:  python -m pytest tests/test_evaluate.py -q

Departures from the paper (which does not specify these details):
1. Only the last \\boxed{} answer of a response is graded (not any expression math-verify could find in the
   text); a response without one is unanswered and incorrect.
2. A grade whose check exceeds the time limit (default 5 s) or crashes the worker counts as incorrect.
3. Maj@k ties: among the answer groups with the most votes, the one whose first member comes earliest in
   sample order wins. Unanswered samples do not vote; with no answered sample Maj@k is 0 for the problem.
   Answers are grouped by math-verify equivalence against each group's first answer.
4. Pass@k uses all n samples (unbiased for any k <= n); Avg@k uses all n; Maj@k uses the first k samples.
5. Table: best value per metric over every evaluated step, step 0 (the base policy) included, ties going to
   the earliest step. "Length" has no better direction; the table reports it at the step of the best Avg@k.
6. The localization scores (top-1, negative-mass share, AUROC) are our quantification of the paper's
   qualitative per-token figure. The table also prints their chance level (A_t blind to the error).
7. Mechanism figure: the model is scored as it is, as both self-teacher and student, i.e. at initialization
   (π_θ = π_base); the paper's figure is not tied to a training step. "The erroneous step" is the line of the
   critic's pivotal step that holds the wrong claim (the demo model often numbers its lines "1.", "2." without
   "Step i:" markers, which makes the whole response one step); the earlier correct steps are the step text
   before that line. Rollouts whose critique locates no wrong claim (correct ones, and errors without an
   equation to pin) are counted and left out.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

# ============================================================================================ answers
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INTEGER = re.compile(r"[+-]?\d{1,100}")


def _brace_pairs(text: str) -> dict[int, int]:
    """Position of each '{' -> position of its matching '}', in one pass (escaped \\{ \\} \\\\ are skipped)."""
    pairs, open_at, i = {}, [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character (\{, \}, \\) never opens or closes a group
            i += 2
            continue
        if ch == "{":
            open_at.append(i)
        elif ch == "}" and open_at:
            pairs[open_at.pop()] = i
        i += 1
    return pairs


def extract_answer(response: str) -> str | None:
    """The content of the last well-formed \\boxed{...} or \\fbox{...} of `response`, stripped.

    Accepted: `\\boxed{...}`, `\\boxed {...}`, `\\fbox{...}`, with nested braces and escaped braces (\\{ \\}).
    Not accepted: `\\boxed 5` (no braces). An unclosed box (a truncated response) and an empty box are skipped,
    so the last complete, non-empty box wins; None when there is none. Linear in len(response): the braces are
    matched once for the whole text, not once per box (with many unclosed boxes that was quadratic).
    """
    opens = [m.end() - 1 for m in _BOX_OPEN.finditer(response)]  # the '{' of each box
    if not opens:
        return None
    pairs = _brace_pairs(response)
    for start in reversed(opens):
        end = pairs.get(start)
        # a box that strips to nothing holds only whitespace, so such boxes are disjoint: O(len) in total
        if end is not None and response[start + 1:end].strip():
            return response[start + 1:end].strip()
    return None


def _normalize(answer: str) -> str:
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    return s


def fast_equivalent(gold: str, pred: str) -> bool | None:
    """Decide without math-verify when it is trivial: identical strings, or two plain integers; else None."""
    g, p = _normalize(gold), _normalize(pred)
    if g == p:
        return True
    if _INTEGER.fullmatch(g) and _INTEGER.fullmatch(p):
        return int(g) == int(p)
    return None


# ============================================================================================ checker
_WORKER_MAIN = ("import importlib.util, sys\n"
                "spec = importlib.util.spec_from_file_location('_evaluate_checker_worker', sys.argv[1])\n"
                "module = importlib.util.module_from_spec(spec)\n"
                "sys.modules[spec.name] = module\n"
                "spec.loader.exec_module(module)\n"
                "module._checker_worker_loop(int(sys.argv[2]))\n")


def _as_boxed(answer: str) -> str:
    return f"\\boxed{{{_normalize(answer)}}}"


def _checker_worker_loop(memory_limit_mb: int) -> None:
    """Worker process: JSON lines {"id", "gold", "pred", "reference"} on stdin -> {"id", "ok"} or {"id", "error"} on stdout."""
    import logging
    import resource

    from math_verify import parse, verify

    if memory_limit_mb > 0:  # a pathological answer must not eat the machine before the deadline kills us
        limit = memory_limit_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # our parent enforces the time limit; math-verify warns once that its own is off
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = os.fdopen(os.dup(1), "w")  # the protocol channel; anything a library prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(json.dumps({"id": -1, "ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        gold = parse(_as_boxed(req["gold"]), parsing_timeout=None)
        if not gold and not req["reference"]:  # comparing two model answers: unparsable -> not equivalent
            reply = {"id": req["id"], "ok": False}
        elif not gold:
            reply = {"id": req["id"], "error": f"math-verify cannot parse the gold answer {req['gold']!r}"}
        else:
            pred = parse(_as_boxed(req["pred"]), parsing_timeout=None)
            # verify(gold, pred): gold first, it is not symmetric
            reply = {"id": req["id"], "ok": bool(verify(gold, pred, timeout_seconds=None))}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class AnswerChecker:
    """math-verify in a persistent worker process, with a deadline per check. Thread-safe; use as a context manager.

    `equivalent(gold, pred)` -> True / False; a check that times out or crashes the worker returns False and is
    counted in `failures` ("timeout" / "crashed"); the worker is then restarted on the next check.
    A reference gold answer that math-verify cannot parse raises ValueError (a data error, not a wrong answer);
    with reference=False (two model answers compared, as in Maj@k) it is simply not equivalent.
    """

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 60.0, memory_limit_mb: int = 4096):
        self.timeout_s, self.startup_timeout_s, self.memory_limit_mb = timeout_s, startup_timeout_s, memory_limit_mb
        self.failures: Counter[str] = Counter()
        self.n_checks = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] | None = None
        self._next_id = 0

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._stop_worker()

    def _start_worker(self) -> None:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, os.path.abspath(__file__),
                                 str(self.memory_limit_mb)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:  # reads the worker's replies so that the caller can wait with a deadline
            with proc.stdout:
                for line in proc.stdout:
                    lines.put(line)
            lines.put(None)  # end of stream: the worker exited

        threading.Thread(target=pump, daemon=True).start()
        self._proc, self._lines = proc, lines
        reply = self._read(self.startup_timeout_s)
        if reply is None or not reply.get("ready"):
            self._stop_worker()
            what = f"did not start within {self.startup_timeout_s} s" if reply is None else "exited at startup"
            raise RuntimeError(f"the math-verify worker ({sys.executable}) {what}; its error, if any, is on stderr")

    def _stop_worker(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            try:  # stdout is closed by the reader thread when it sees the end of stream
                self._proc.stdin.close()
            except BrokenPipeError:  # a line left unflushed to the killed worker: nothing to deliver
                pass
        self._proc, self._lines = None, None

    def _read(self, timeout_s: float) -> dict | None:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return {"id": -2, "crashed": True} if line is None else json.loads(line)

    def equivalent(self, gold: str, pred: str, reference: bool = True) -> bool:
        fast = fast_equivalent(gold, pred)
        if fast is not None:
            return fast
        with self._lock:
            self.n_checks += 1
            if self._proc is None:
                self._start_worker()
            self._next_id += 1
            req_id = self._next_id
            try:
                self._proc.stdin.write(json.dumps({"id": req_id, "gold": gold, "pred": pred, "reference": reference}) + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                reply = {"id": -2, "crashed": True}
            else:
                reply = self._read(self.timeout_s)
            if reply is None or reply.get("crashed"):
                self.failures["timeout" if reply is None else "crashed"] += 1
                self._stop_worker()
                return False
            if reply["id"] != req_id:
                raise RuntimeError(f"math-verify worker answered request {reply['id']}, expected {req_id}")
            if "error" in reply:
                raise ValueError(reply["error"])
            return reply["ok"]

    def grade(self, response: str, gold: str) -> bool:
        """Is the last boxed answer of `response` equivalent to `gold`? Unanswered -> False."""
        answer = extract_answer(response)
        return answer is not None and self.equivalent(gold, answer)


def grade(response: str, gold: str, checker: AnswerChecker | None = None) -> bool:
    """Is the last boxed answer of `response` equivalent to `gold`? Safe in any thread or process.

    Without `checker`, a one-shot worker is started only when the fast path cannot decide; pass a checker
    (or use `AnswerChecker.grade`) when grading many responses.
    """
    answer = extract_answer(response)
    if answer is None:
        return False
    if checker is not None:
        return checker.equivalent(gold, answer)
    fast = fast_equivalent(gold, answer)
    if fast is not None:
        return fast
    with AnswerChecker() as one_shot:
        return one_shot.equivalent(gold, answer)


# ============================================================================================ metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021, Codex paper, Fig. 3)."""
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # 1 − C(n−c, k)/C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)   (product form, no huge binomials)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None], checker: AnswerChecker) -> int | None:
    """Index (into `answers`) of the first member of the winning answer group; None if nothing was answered.

    Groups: each answer joins the first existing group whose first answer is equivalent to it
    (checker.equivalent(first, answer, reference=False)). Winner: the most votes; ties go to the group whose first member
    comes earliest. None entries (unanswered) do not vote.
    """
    firsts: list[int] = []  # index of each group's first member
    votes: list[int] = []
    group_of: dict[str, int] = {}  # identical strings share a group without another check
    for i, a in enumerate(answers):
        if a is None:
            continue
        key = _normalize(a)
        if key not in group_of:
            matches = (g for g, f in enumerate(firsts) if checker.equivalent(answers[f], a, reference=False))
            group_of[key] = next(matches, None)
            if group_of[key] is None:  # a new answer: it opens a group
                group_of[key] = len(firsts)
                firsts.append(i)
                votes.append(0)
        votes[group_of[key]] += 1
    if not firsts:
        return None
    best = max(votes)
    return firsts[votes.index(best)]  # groups are in order of first appearance: ties -> earliest


def evaluate_samples(samples: Sequence[tuple[str, Sequence[tuple[str, int]]]], k: int | None = None,
                     checker: AnswerChecker | None = None) -> dict[str, float]:
    """Pass@k, Maj@k, Avg@k (fractions) and mean length over problems.

    samples: one (gold_answer, [(response_text, n_tokens), ...]) per problem, all with the same n samples.
    k defaults to n. Returns {"pass@k", "maj@k", "avg@k", "length", "answered", "k", "n", "n_problems",
    "grade_failures"}; "answered" is the fraction of samples with a boxed answer.
    """
    if not samples:
        raise ValueError("evaluate_samples needs at least one problem")
    ns = {len(responses) for _, responses in samples}
    if len(ns) != 1 or 0 in ns:
        raise ValueError(f"every problem needs the same positive number of samples; got sizes {sorted(ns)}")
    n = ns.pop()
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, n={n}]")
    own = checker is None
    checker = AnswerChecker() if own else checker
    failures_before = sum(checker.failures.values())
    try:
        rows = []
        for p, (gold, responses) in enumerate(samples):
            answers = [extract_answer(text) for text, _ in responses]
            correct = [a is not None and checker.equivalent(gold, a) for a in answers]
            c = sum(correct)
            winner = majority_vote(answers[:k], checker)
            rows.append((c / n,  # Avg@k
                         pass_at_k(n, c, k),  # Pass@k
                         float(winner is not None and correct[winner]),  # Maj@k
                         float(np.mean([n_tok for _, n_tok in responses])),  # length
                         sum(a is not None for a in answers) / n))  # answered
        failures = sum(checker.failures.values()) - failures_before
    finally:
        if own:
            checker.close()
    avg, pas, maj, length, answered = np.mean(np.array(rows), axis=0).tolist()
    return {"pass@k": pas, "maj@k": maj, "avg@k": avg, "length": length, "answered": answered,
            "k": k, "n": n, "n_problems": len(samples), "grade_failures": failures}


def evaluate_checkpoint(engine, tokenizer, problems, n: int, temperature: float, max_new_tokens: int,
                        seed: int, k: int | None = None, checker: AnswerChecker | None = None) -> dict[str, float]:
    """Sample n solutions per problem with `engine.generate` (rollout.py) from the student prompt, then score them.

    The seed of problem i is derived from (seed, problem id), so results do not depend on problem order.
    """
    from critic import render, student_messages  # the solver prompt lives in critic.py (imports models' code)

    prompts = [render(tokenizer, student_messages(p), thinking=False) for p in problems]
    seeds = [zlib.crc32(f"{seed}:{p.id}".encode()) for p in problems]
    outs = engine.generate(prompts, seeds, n=n, temperature=temperature, max_new_tokens=max_new_tokens)
    samples = [(p.answer, [(c.text, len(c.token_ids)) for c in comps]) for p, comps in zip(problems, outs)]
    return evaluate_samples(samples, k=k, checker=checker)


# ============================================================================================ results table
METRICS = ("pass@k", "maj@k", "avg@k")
DISPLAY = {"grpo": "GRPO", "refsol": "RefSol", "stepalign": "StepAlignFB", "verdict": "Verdict",
           "pbsd-refsol": "PBSD (RefSol)", "pbsd-stepalign": "PBSD (StepAlignFB)", "pbsd-verdict": "PBSD (Verdict)"}


@dataclass
class EvalRecord:
    run: str  # the run directory
    step: int
    feedback: str
    k: int
    values: dict[str, float]  # "pass@k", "maj@k", "avg@k" as fractions, "length" in tokens


def _read_eval_jsonl(path: Path) -> list[EvalRecord]:
    records: dict[int, tuple[int, EvalRecord]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        for name, kind in (("step", int), ("feedback", str), ("k", int)):
            if not isinstance(row.get(name), kind) or isinstance(row.get(name), bool):
                raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {row.get(name)!r}")
        values = {}
        for name in (*METRICS, "length"):
            v = row.get(name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{where}: field {name!r} must be a finite number, got {v!r}")
            if name in METRICS and not 0.0 <= v <= 1.0:
                raise ValueError(f"{where}: field {name!r} must be a fraction in [0, 1], got {v!r}")
            values[name] = float(v)
        if row["step"] in records:
            raise ValueError(f"{where}: step {row['step']} already logged at line {records[row['step']][0]}")
        records[row["step"]] = (lineno, EvalRecord(str(path.parent), row["step"], row["feedback"], row["k"], values))
    return [r for _, r in sorted(records.values(), key=lambda x: x[1].step)]


def load_evals(paths: Sequence[str | Path]) -> list[EvalRecord]:
    """Records of every run: a path is a run (it holds eval.jsonl) or a parent whose subdirectories are runs."""
    records = []
    for path in map(Path, paths):
        if (path / "eval.jsonl").is_file():
            files = [path / "eval.jsonl"]
        else:
            files = sorted(p / "eval.jsonl" for p in path.iterdir() if (p / "eval.jsonl").is_file()) \
                if path.is_dir() else []
            if not files:
                raise FileNotFoundError(f"{path}: no eval.jsonl in it nor in any of its subdirectories")
        for f in files:
            recs = _read_eval_jsonl(f)
            if not recs:
                raise ValueError(f"{f}: no evaluation logged")
            if len({(r.feedback, r.k) for r in recs}) != 1:
                raise ValueError(f"{f}: one run must log one feedback form and one k, got "
                                 f"{sorted({(r.feedback, r.k) for r in recs})}")
            records += recs
    return records


def _labels(records: Sequence[EvalRecord]) -> dict[str, str]:
    """run -> row label: the feedback form, plus the run's name when several runs share a form."""
    form_of = {r.run: r.feedback for r in records}
    runs_per_form = Counter(form_of.values())
    order = {name: i for i, name in enumerate(DISPLAY)}  # the paper's row order first, then alphabetical
    labels = {}
    for run, form in sorted(form_of.items(), key=lambda x: (order.get(x[1], len(order)), x[1], x[0])):
        name = DISPLAY.get(form, form)
        labels[run] = name if runs_per_form[form] == 1 else f"{name} ({Path(run).name})"
    return labels


def best_by_metric(records: Sequence[EvalRecord]) -> dict[str, dict[str, tuple[float, int]]]:
    """label -> metric -> (best value, step). Max for pass/maj/avg, ties -> earliest step; "length" at best avg@k."""
    labels = _labels(records)
    table = {}
    for run, label in labels.items():
        recs = sorted((r for r in records if r.run == run), key=lambda r: r.step)
        row = {}
        for m in METRICS:
            best = max(recs, key=lambda r: (r.values[m], -r.step))
            row[m] = (best.values[m], best.step)
        at = next(r for r in recs if r.step == row["avg@k"][1])
        row["length"] = (at.values["length"], at.step)
        table[label] = row
    return table


def _k_label(records: Sequence[EvalRecord]) -> str:
    """The k of the column headers: the runs' common k, or "k" when runs differ."""
    ks = {r.k for r in records}
    return str(ks.pop()) if len(ks) == 1 else "k"


def results_table(records: Sequence[EvalRecord]) -> str:
    """The paper-style markdown table: best value (%) per metric and, in brackets, the step it was reached."""
    ks = sorted({r.k for r in records})
    kk = _k_label(records)
    lines = [f"| Feedback | Pass@{kk} | Maj@{kk} | Avg@{kk} | Length |", "|---|---|---|---|---|"]
    for label, row in best_by_metric(records).items():
        cells = [f"{100 * v:.2f} ({s})" for v, s in (row[m] for m in METRICS)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['length'][0]:.0f} ({row['length'][1]}) |")
    if len(ks) > 1:
        lines.append("")
        lines.append("k per run: " + ", ".join(f"{label}: {next(r.k for r in records if r.run == run)}"
                                               for run, label in _labels(records).items()))
    return "\n".join(lines) + "\n"


def steps_table(records: Sequence[EvalRecord], metric: str = "avg@k") -> str:
    """One metric (%) at every evaluated step, a row per run: what the best-per-metric table hides (e.g. a run
    whose best is its step 0 never improved on the base policy). A step a run did not evaluate is "–"."""
    labels = _labels(records)
    steps = sorted({r.step for r in records})
    name = metric.replace("@k", f"@{_k_label(records)}")
    lines = [f"| {name.capitalize()} by step | " + " | ".join(str(s) for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for run, label in labels.items():
        at = {r.step: r.values[metric] for r in records if r.run == run}
        lines.append(f"| {label} | " + " | ".join(f"{100 * at[s]:.2f}" if s in at else "–" for s in steps) + " |")
    return "\n".join(lines) + "\n"


def plot_metrics(records: Sequence[EvalRecord], out_dir: str | Path) -> list[Path]:
    """One PNG per metric over steps, one line per feedback form. Returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _labels(records)
    paths = []
    for m in (*METRICS, "length"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, label in labels.items():
            recs = sorted((r for r in records if r.run == run), key=lambda r: r.step)
            scale = 1.0 if m == "length" else 100.0
            ax.plot([r.step for r in recs], [scale * r.values[m] for r in recs], marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("mean answer length (tokens)" if m == "length" else f"{m.capitalize()} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{m.replace('@', '_at_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ============================================================================================ mechanism figure
@dataclass
class ErrorMarks:
    """Where the first error of one rollout lies, as token positions of y (length T).

    error_start, error_end: the first erroneous step is tokens [error_start, error_end).
    wrong_claim: (T,) bool, the tokens of that step's wrong claim (for arithmetic: the wrong result).
    earlier_correct: (T,) bool, the tokens of the correct steps before it.
    """
    error_start: int
    error_end: int
    wrong_claim: np.ndarray = field(repr=False)  # (T,)
    earlier_correct: np.ndarray = field(repr=False)  # (T,)

    def __post_init__(self):
        self.wrong_claim = np.asarray(self.wrong_claim)
        self.earlier_correct = np.asarray(self.earlier_correct)
        for name in ("wrong_claim", "earlier_correct"):
            a = getattr(self, name)
            if a.dtype != bool or a.ndim != 1:
                raise ValueError(f"ErrorMarks.{name} must be a 1-D bool array, got {a.dtype} {a.shape}")
        T = len(self.wrong_claim)
        if len(self.earlier_correct) != T:
            raise ValueError(f"ErrorMarks: wrong_claim has {T} tokens, earlier_correct {len(self.earlier_correct)}")
        if not 0 <= self.error_start < self.error_end <= T:
            raise ValueError(f"ErrorMarks: need 0 <= error_start < error_end <= T={T}, "
                             f"got [{self.error_start}, {self.error_end})")
        claim = np.flatnonzero(self.wrong_claim)
        if len(claim) == 0 or claim[0] < self.error_start or claim[-1] >= self.error_end:
            raise ValueError(f"ErrorMarks: the wrong claim {claim.tolist()} must be non-empty and inside the "
                             f"erroneous step [{self.error_start}, {self.error_end})")
        if self.earlier_correct[self.error_start:].any():
            raise ValueError("ErrorMarks: earlier_correct tokens must come before error_start")

    @property
    def claim_start(self) -> int:
        return int(np.flatnonzero(self.wrong_claim)[0])


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score_pos > score_neg) + ½ P(equal), by ranks with ties averaged (Mann–Whitney U / (n_pos·n_neg))."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"auroc needs both classes, got {len(pos)} positives and {len(neg)} negatives")
    scores = np.concatenate([pos, neg])  # (P + N,)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average the 1-based ranks over each run of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    # U = Σ rank(pos) − P(P+1)/2;  AUROC = U / (P·N)
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def localization_scores(advantages: Sequence[Sequence[float]], marks: Sequence[ErrorMarks]) -> dict:
    """How well A_t points at the first error, over a set of erroneous rollouts (one context).

    top1: fraction of rollouts where argmin A_t over tokens [0, error_end) is a wrong-claim token
          (ties: the earliest minimum).
    neg_mass_share: mean over rollouts of Σ_{claim} max(−A_t, 0) / Σ_{all t} max(−A_t, 0); rollouts with no
          negative A_t are left out (count in n_neg_mass).
    auroc: mean over rollouts of the AUROC of −A_t, wrong-claim tokens (positives) vs earlier-correct-step
          tokens (negatives); rollouts whose error is in the first step are left out (count in n_auroc).
    auroc_pooled: the same AUROC with the tokens of all rollouts pooled.
    Per-rollout values are returned too (NaN where undefined).
    """
    if len(advantages) != len(marks) or not marks:
        raise ValueError(f"need one ErrorMarks per rollout and at least one: {len(advantages)} vs {len(marks)}")
    top1, share, auc = [], [], []
    pooled_pos, pooled_neg = [], []
    for i, (a, mk) in enumerate(zip(advantages, marks)):
        A = np.asarray(a, dtype=np.float64)  # (T,)
        if A.shape != mk.wrong_claim.shape:
            raise ValueError(f"rollout {i}: {A.shape[0] if A.ndim else A.shape} advantages but "
                             f"{len(mk.wrong_claim)} marked tokens")
        top1.append(float(mk.wrong_claim[int(np.argmin(A[:mk.error_end]))]))
        neg = np.maximum(-A, 0.0)  # (T,) negative advantage mass
        share.append(float(neg[mk.wrong_claim].sum() / neg.sum()) if neg.sum() > 0 else math.nan)
        pos_s, neg_s = -A[mk.wrong_claim], -A[mk.earlier_correct]
        auc.append(auroc(pos_s, neg_s) if len(neg_s) else math.nan)
        pooled_pos.append(pos_s)
        pooled_neg.append(neg_s)
    share_a, auc_a = np.array(share), np.array(auc)
    pooled_neg_all = np.concatenate(pooled_neg)
    return {
        "top1": float(np.mean(top1)),
        "neg_mass_share": float(np.nanmean(share_a)) if (~np.isnan(share_a)).any() else math.nan,
        "auroc": float(np.nanmean(auc_a)) if (~np.isnan(auc_a)).any() else math.nan,
        "auroc_pooled": auroc(np.concatenate(pooled_pos), pooled_neg_all) if len(pooled_neg_all) else math.nan,
        "n_rollouts": len(marks), "n_neg_mass": int((~np.isnan(share_a)).sum()),
        "n_auroc": int((~np.isnan(auc_a)).sum()),
        "per_rollout": {"top1": top1, "neg_mass_share": share, "auroc": auc},
    }


@dataclass
class PositionProfile:
    bin_start: np.ndarray  # (K,) first relative position of each bin (0 = first wrong-claim token); plotted at x
    mean: np.ndarray  # (K,) mean A_t, NaN where no rollout has a token
    n_rollouts: np.ndarray  # (K,) rollouts contributing to each bin


def advantage_by_position(advantages: Sequence[Sequence[float]], marks: Sequence[ErrorMarks], lo: int = -32,
                          hi: int = 32, bin_size: int = 1) -> PositionProfile:
    """Mean A_t by token position relative to the first wrong-claim token, in bins of `bin_size` over [lo, hi).

    Each rollout is averaged within a bin first, then bins are averaged over the rollouts that reach them,
    so every rollout weighs the same.
    """
    if hi <= lo or (hi - lo) % bin_size:
        raise ValueError(f"need lo < hi with (hi - lo) divisible by bin_size; got lo={lo}, hi={hi}, bin={bin_size}")
    K = (hi - lo) // bin_size
    sums, counts = np.zeros(K), np.zeros(K)
    for a, mk in zip(advantages, marks, strict=True):
        A = np.asarray(a, dtype=np.float64)  # (T,)
        rel = np.arange(len(A)) - mk.claim_start  # (T,)
        keep = (rel >= lo) & (rel < hi)
        b = (rel[keep] - lo) // bin_size  # (T',)
        per_bin = np.bincount(b, weights=A[keep], minlength=K) / np.maximum(np.bincount(b, minlength=K), 1)
        present = np.bincount(b, minlength=K) > 0  # (K,)
        sums[present] += per_bin[present]
        counts[present] += 1
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return PositionProfile(lo + bin_size * np.arange(K), mean, counts.astype(int))


def plot_advantage_by_position(profiles: Mapping[str, PositionProfile], path: str | Path,
                               title: str = "Mean A_t around the first error") -> Path:
    """One line per context: mean A_t against position relative to the first wrong-claim token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, prof in profiles.items():
        ax.plot(prof.bin_start, prof.mean, marker=".", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axvline(0, color="black", lw=0.8, ls="--")
    ax.axhline(0, color="gray", lw=0.6)
    ax.set_xlabel("token position relative to the first wrong-claim token")
    ax.set_ylabel("mean A_t (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}
_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
.grid { display: grid; gap: 1em; }
.ctx { border: 1px solid #ccc; padding: 0.5em; }
.ctx h3 { margin: 0 0 0.3em; font-size: 1em; }
section h2 { margin: 1em 0 0.2em; font-size: 1.15em; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.8; }
.tok { border-radius: 2px; }
.step { border-bottom: 2px solid #555; }
.claim { outline: 2px solid #000; }
.marker { color: #b00; font-weight: bold; font-size: 0.8em; }
.ws { color: #888; }
.caption { color: #444; margin: 0.2em 0 0.5em; }
table.scores td, table.scores th { padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; }
"""


def _token_html(tok: str) -> str:
    """Escape a token; render newline, tab and CR as visible symbols (a newline also breaks the line)."""
    if tok == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in tok:
        if ch in _VISIBLE:
            out.append(f'<span class="ws">{_VISIBLE[ch]}</span>' + ("\n" if ch == "\n" else ""))
        else:
            out.append(html.escape(ch))
    return "".join(out)


def _color(a: float, scale: float) -> str:
    """Red for A_t < 0, green for A_t > 0, opacity ∝ |A_t| / scale (capped at 1)."""
    alpha = min(abs(a) / scale, 1.0) * 0.85
    rgb = "220, 38, 38" if a < 0 else "22, 163, 74"
    return f"rgba({rgb}, {alpha:.3f})"


def render_advantage_html(tokens: Sequence[Sequence[str]], advantages: Mapping[str, Sequence[Sequence[float]]],
                          marks: Sequence[ErrorMarks | None], title: str = "Per-token advantage A_t",
                          scores: Mapping[str, Mapping[str, float]] | None = None,
                          scale: float | None = None, captions: Sequence[str] | None = None) -> str:
    """A standalone HTML page: each rollout shown once per context, side by side, tokens coloured by A_t.

    tokens[i]: the decoded tokens of rollout i; advantages[context][i]: its A_t under that context
    (e.g. {"StepAlignFB": ..., "RefSol": ...}); marks[i]: its first error (or None). The erroneous step is
    underlined, the wrong claim boxed, and a ▶ marks where the step starts. Hovering a token shows t and A_t.
    One colour scale for the whole page (default: the 98th percentile of |A_t|), so contexts compare.
    scores: optional context -> {score name: value}, shown as a table on top.
    captions: optional one line of text per rollout (e.g. the problem and the wrong claim), shown under its title.
    """
    if not advantages:
        raise ValueError("render_advantage_html needs at least one context")
    if len(marks) != len(tokens):
        raise ValueError(f"{len(tokens)} rollouts but {len(marks)} marks")
    if captions is not None and len(captions) != len(tokens):
        raise ValueError(f"{len(tokens)} rollouts but {len(captions)} captions")
    for ctx, per in advantages.items():
        if len(per) != len(tokens):
            raise ValueError(f"context {ctx!r}: {len(per)} rollouts of A_t but {len(tokens)} rollouts of tokens")
        for i, a in enumerate(per):
            if len(a) != len(tokens[i]):
                raise ValueError(f"context {ctx!r}, rollout {i}: {len(a)} advantages for {len(tokens[i])} tokens")
    if scale is None:
        mags = np.abs(np.concatenate([np.asarray(a, dtype=np.float64) for per in advantages.values() for a in per]))
        scale = float(np.quantile(mags, 0.98)) if len(mags) else 1.0
    scale = scale if scale > 0 else 1.0
    esc = html.escape
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p>Red: A_t &lt; 0, green: A_t &gt; 0; full colour at |A_t| ≥ {scale:.3g}. Underlined: the first "
             "erroneous step (▶ marks its start); boxed: its wrong claim. Hover a token for its value.</p>"]
    if scores:
        names = list(dict.fromkeys(n for s in scores.values() for n in s))
        parts.append('<table class="scores"><tr><th>context</th>' + "".join(f"<th>{esc(n)}</th>" for n in names)
                     + "</tr>")
        for ctx, s in scores.items():
            cells = "".join(f"<td>{s[n]:.3f}</td>" if isinstance(s.get(n), float)
                            else f"<td>{esc(str(s.get(n, '')))}</td>" for n in names)
            parts.append(f"<tr><td>{esc(ctx)}</td>{cells}</tr>")
        parts.append("</table>")
    for i, toks in enumerate(tokens):
        mk = marks[i]
        caption = f'<p class="caption">{esc(captions[i])}</p>' if captions is not None else ""
        parts.append(f'<section><h2>Rollout {i}</h2>{caption}<div class="grid" '
                     f'style="grid-template-columns: repeat({len(advantages)}, 1fr)">')
        for ctx, per in advantages.items():
            A = np.asarray(per[i], dtype=np.float64)  # (T,)
            spans = []
            for t, (tok, a) in enumerate(zip(toks, A)):
                cls = ["tok"]
                if mk is not None and mk.error_start <= t < mk.error_end:
                    cls.append("step")
                if mk is not None and mk.wrong_claim[t]:
                    cls.append("claim")
                if mk is not None and t == mk.error_start:
                    spans.append('<span class="marker" title="first erroneous step">▶</span>')
                tip = esc(f"t={t}  A_t={a:+.4f}  token={tok!r}", quote=True)
                spans.append(f'<span class="{" ".join(cls)}" style="background: {_color(a, scale)}" '
                             f'title="{tip}">{_token_html(tok)}</span>')
            parts.append(f'<div class="ctx"><h3>{esc(ctx)}</h3><div class="tokens">{"".join(spans)}</div></div>')
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- the driver
# A context builder: (problem, the rollout's text, its critique) -> the self-teacher's chat messages.
# A new feedback form is one more entry in the mapping passed to `mechanism`.
ContextFn = Callable[[object, str, object], list]


def stepalign_context(problem, response: str, critique) -> list[dict]:
    """StepAlignFB: the critic's step-aligned critique of this very rollout."""
    import critic
    return critic.teacher_messages(problem, "stepalign", critique.text)


def refsol_context(problem, response: str, critique) -> list[dict]:
    """RefSol: the problem's reference solution (the same for every rollout of the problem)."""
    import critic
    if problem.reference_solution is None:
        raise ValueError(f"problem {problem.id}: the refsol context needs a reference solution")
    return critic.teacher_messages(problem, "refsol", problem.reference_solution)


def verdict_context(problem, response: str, critique) -> list[dict]:
    """Verdict: the verifier's grade of this rollout's own final answer (as in training), no solution or critique."""
    import critic
    return critic.teacher_messages(problem, "verdict",
                                   critic.verdict_text(response, correct=grade(response, problem.answer)))


MECHANISM_CONTEXTS: dict[str, ContextFn] = {"stepalign": stepalign_context, "refsol": refsol_context,
                                            "verdict": verdict_context}


def token_char_spans(tokenizer, token_ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """[start, end) character span in `text` of each token of y, where text = decode(y, skip_special_tokens=True).

    By decoding prefixes: token t ends where decode(y[:t+1]) ends, so the ids are used as they are (never
    re-tokenized from the text). Special tokens (e.g. the end of turn) get an empty span. A prefix that ends in
    an unfinished multi-byte character decodes to U+FFFD; that character is given to the token completing it.
    """
    spans, prev = [], 0
    for t in range(1, len(token_ids) + 1):
        prefix = tokenizer.decode(list(token_ids[:t]), skip_special_tokens=True)
        if not text.startswith(prefix):
            prefix = prefix.rstrip("\ufffd")  # an unfinished multi-byte character: not emitted yet
        if not text.startswith(prefix) or len(prefix) < prev:
            raise ValueError(f"token {t - 1} (id {token_ids[t - 1]}): decode(y[:{t}]) = {prefix[-40:]!r}... is not "
                             f"a prefix of the rollout text extending the previous one; text starts {text[:60]!r}")
        spans.append((prev, len(prefix)))
        prev = len(prefix)
    if prev != len(text):
        raise ValueError(f"the tokens decode to {prev} characters but the rollout text has {len(text)}")
    return spans


def _overlapping(spans: Sequence[tuple[int, int]], start: int, end: int) -> np.ndarray:
    """(T,) bool: tokens whose non-empty character span meets [start, end)."""
    return np.array([s < e and s < end and e > start for s, e in spans], dtype=bool)


def error_marks_from_spans(token_spans: Sequence[tuple[int, int]], text: str,
                           wrong_span: tuple[int, int]) -> ErrorMarks:
    """ErrorMarks of one rollout from its tokens' character spans and the critic's wrong-claim span.

    The erroneous step is the line (within its "Step i:" step, data.step_spans) that holds the wrong claim;
    the earlier correct steps are the step text before that line (earlier steps, and earlier lines of the
    same step: the critic found no wrong claim before this one). A response without step markers is one step.
    """
    from data import step_spans

    ws, we = wrong_span
    if not 0 <= ws < we <= len(text):
        raise ValueError(f"wrong span {wrong_span} outside the rollout text of {len(text)} characters")
    line_start = text.rfind("\n", 0, ws) + 1
    line_end = text.find("\n", ws)
    line_end = len(text) if line_end == -1 else line_end
    steps = step_spans(text)
    step = next(((s, e) for s, e in steps if s <= ws and we <= e), None)
    if step is not None:  # the line, cut to its step (a step may start mid-line after a preamble)
        line_start, line_end = max(line_start, step[0]), min(line_end, step[1])
    claim = _overlapping(token_spans, ws, we)  # (T,)
    in_step = np.flatnonzero(_overlapping(token_spans, line_start, max(line_end, we)))
    if not claim.any() or len(in_step) == 0:
        raise ValueError(f"no token covers the wrong span {wrong_span} ({text[ws:we]!r})")
    error_start, error_end = int(in_step[0]), int(in_step[-1]) + 1
    earlier = np.zeros(len(token_spans), dtype=bool)  # (T,)
    for s, e in steps:
        if s < line_start:
            earlier |= _overlapping(token_spans, s, min(e, line_start))
    earlier[error_start:] = False
    return ErrorMarks(error_start, error_end, claim, earlier)


def score_rollouts(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   pad_id: int, batch_size: int = 8, chunk_size: int = 256) -> list[np.ndarray]:
    """log π(y_t | prompt, y<t) of every rollout token, one (T_i,) float array per rollout, no gradient."""
    import torch

    import rollout

    out, was_training = [], model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(prompt_ids), batch_size):
                ys = [list(y) for y in completion_ids[b:b + batch_size]]
                logp, _ = rollout.score_sequences(model, [list(p) for p in prompt_ids[b:b + batch_size]], ys,
                                                  pad_id, chunk_size)  # (B, T)
                out += [logp[i, :len(y)].float().cpu().numpy() for i, y in enumerate(ys)]
    finally:
        model.train(was_training)
    return out


@dataclass
class MechanismResult:
    """The erroneous rollouts whose wrong claim was located, and A_t of each under every context."""
    problems: list  # (R,) data.Problem of each kept rollout
    completions: list  # (R,) rollout.Completion
    critiques: list  # (R,) critic.Critique
    marks: list[ErrorMarks]  # (R,)
    advantages: dict[str, list[np.ndarray]]  # context -> (R,) arrays of A_t, each (T_i,)
    counts: dict[str, int]  # rollouts sampled / by critique case / kept / skipped and why


def mechanism(model, tokenizer, problems: Sequence, n_rollouts: int = 4, *, temperature: float = 0.5,
              max_new_tokens: int = 48, seed: int = 0, stop_at_boxed: bool = True,
              contexts: Mapping[str, ContextFn] = MECHANISM_CONTEXTS, critic_backend=None,
              completions: Sequence[Sequence] | None = None, student_thinking: bool = False,
              teacher_thinking: bool = True, batch_size: int = 8) -> MechanismResult:
    """A_t of the base policy's own erroneous rollouts under each teacher context (the paper's per-token figure).

    1. Sample `n_rollouts` per problem from the student prompt (or take `completions`, one list per problem).
    2. Critique each with `critic_backend` (default: the exact arithmetic critic); keep the rollouts whose
       critique locates a wrong claim (Critique.wrong_span) and mark it on the tokens (ErrorMarks).
    3. Score the SAME token ids y under the student prompt and under each context's teacher prompt.
       The model is the base policy: it is both the self-teacher π_base and the student π_θ at
       initialization, so A_t = log π(y_t | x, c, y<t) − log π(y_t | x, y<t) with one set of weights.
    """
    import torch

    import critic
    import rollout
    import sd_loss

    if completions is None:
        engine = rollout.TransformersEngine(model, tokenizer, batch_size=32, stop_at_boxed=stop_at_boxed)
        prompts = [critic.render(tokenizer, critic.student_messages(p), student_thinking) for p in problems]
        seeds = [rollout.sample_seed(seed, "mechanism", p.id) for p in problems]
        completions = engine.generate(prompts, seeds, n=n_rollouts, temperature=temperature,
                                      max_new_tokens=max_new_tokens)
    if len(completions) != len(problems):
        raise ValueError(f"{len(problems)} problems but completions for {len(completions)}")
    critic_backend = critic.ExactArithmeticCritic() if critic_backend is None else critic_backend
    pairs = [(p, c) for p, comps in zip(problems, completions) for c in comps]
    critiques = critic_backend.critique([(p, c.text) for p, c in pairs])
    counts = Counter(sampled=len(pairs))
    kept: list[tuple] = []
    for (p, c), q in zip(pairs, critiques):
        counts[f"case_{q.case}"] += 1
        if q.error is not None:
            counts["skipped_critic_failed"] += 1
        elif q.wrong_span is None:
            counts["no_wrong_claim"] += 1  # correct, or an error the critic could not pin to a span
        else:
            spans = token_char_spans(tokenizer, c.token_ids, c.text)
            kept.append((p, c, q, error_marks_from_spans(spans, c.text, q.wrong_span)))
    counts["kept"] = len(kept)
    if not kept:
        return MechanismResult([], [], [], [], {name: [] for name in contexts}, dict(counts))

    ys = [c.token_ids for _, c, _, _ in kept]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def ids(messages: list[dict], thinking: bool) -> list[int]:
        return tokenizer(critic.render(tokenizer, messages, thinking), add_special_tokens=False).input_ids

    student = score_rollouts(model, [ids(critic.student_messages(p), student_thinking) for p, *_ in kept],
                             ys, pad_id, batch_size)  # log π(y_t | x, y<t)
    advantages = {}
    for name, build in contexts.items():
        teacher = score_rollouts(model, [ids(build(p, c.text, q), teacher_thinking) for p, c, q, _ in kept],
                                 ys, pad_id, batch_size)  # log π(y_t | x, c, y<t)
        # Eq. A_t = log π_base(y_t | x, c, y<t) − log π_θ(y_t | x, y<t)
        advantages[name] = [sd_loss.token_advantage(torch.from_numpy(s), torch.from_numpy(t)).numpy()
                            for s, t in zip(student, teacher)]
    return MechanismResult([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept],
                           [k[3] for k in kept], advantages, dict(counts))


def chance_scores(marks: Sequence[ErrorMarks]) -> dict[str, float]:
    """What the scores would be for A_t that ignores the error: top-1 of a uniformly random token among
    [0, error_end), and the claim's share of the rollout's tokens (the share of a uniform negative mass)."""
    return {"top1": float(np.mean([m.wrong_claim[:m.error_end].sum() / m.error_end for m in marks])),
            "neg_mass_share": float(np.mean([m.wrong_claim.mean() for m in marks])), "auroc": 0.5}


def localization_table(scores: Mapping[str, Mapping], chance: Mapping[str, float]) -> str:
    """The markdown table of the localization scores per context, with the chance level as the last row."""
    lines = ["| context | rollouts | top-1 | neg-mass share | AUROC (rollouts) | pooled AUROC |",
             "|---|---|---|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {DISPLAY.get(name, name)} | {s['n_rollouts']} | {s['top1']:.3f} | "
                     f"{s['neg_mass_share']:.3f} | {s['auroc']:.3f} ({s['n_auroc']}) | {s['auroc_pooled']:.3f} |")
    lines.append(f"| chance | | {chance['top1']:.3f} | {chance['neg_mass_share']:.3f} | 0.500 | 0.500 |")
    return "\n".join(lines) + "\n"


def mechanism_main(argv: Sequence[str] | None = None) -> dict:
    """`python evaluate.py mechanism --out DIR`: the per-token figure on the demo model, written to DIR."""
    ap = argparse.ArgumentParser(prog="evaluate.py mechanism",
                                 description="A_t of the demo model's erroneous rollouts under each feedback form.")
    ap.add_argument("--out", required=True, help="directory for advantage.html, advantage_by_position.png, "
                                                 "localization.json")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model path or the demo model's name")
    ap.add_argument("--n-problems", type=int, default=20, help="arithmetic problems to sample from")
    ap.add_argument("--n-rollouts", type=int, default=4, help="rollouts per problem")
    ap.add_argument("--seed", type=int, default=0, help="seed of the problems and of the sampling")
    ap.add_argument("--temperature", type=float, default=0.5, help="sampling temperature (the demo preset's)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="rollout length limit (the demo preset's)")
    ap.add_argument("--n-ops", type=int, default=1, help="operations per arithmetic problem (the demo preset's)")
    args = ap.parse_args(argv)

    import data
    import rollout

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = rollout.load_model(args.model)
    problems = data.arithmetic_problems(args.n_problems, seed=args.seed, n_ops=args.n_ops, max_operand=20,
                                        ops="+-", worked_example=True)
    res = mechanism(model, tokenizer, problems, args.n_rollouts, temperature=args.temperature,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    if not res.marks:
        raise SystemExit(f"no erroneous rollout with a located wrong claim among {res.counts}; "
                         "use more --n-problems")
    table, record = write_mechanism_report(res, tokenizer, out, model_name=args.model, config=vars(args))
    print(f"{len(res.marks)} erroneous rollouts with a located wrong claim (of {res.counts['sampled']} sampled; "
          f"counts {res.counts})\n")
    print(table)
    print(f"wrote {out / 'advantage.html'}, {out / 'advantage_by_position.png'}, {out / 'localization.json'}")
    return record


def write_mechanism_report(res: MechanismResult, tokenizer, out: str | Path, model_name: str = "the model",
                           config: Mapping | None = None) -> tuple[str, dict]:
    """DIR/advantage.html, DIR/advantage_by_position.png, DIR/localization.json; returns (markdown table, record)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = {name: localization_scores(A, res.marks) for name, A in res.advantages.items()}
    chance = chance_scores(res.marks)
    table = localization_table(scores, chance)
    labels = {name: DISPLAY.get(name, name) for name in res.advantages}
    profiles = {labels[n]: advantage_by_position(A, res.marks, lo=-16, hi=16) for n, A in res.advantages.items()}
    plot_advantage_by_position(profiles, out / "advantage_by_position.png",
                               title=f"Mean A_t around the first wrong claim ({len(res.marks)} rollouts)")
    tokens = [[tokenizer.decode([i]) for i in c.token_ids] for c in res.completions]
    summary = {labels[n]: {k: s[k] for k in ("top1", "neg_mass_share", "auroc", "auroc_pooled", "n_rollouts")}
               for n, s in scores.items()}
    captions = [f"{p.id}: {p.problem.rsplit(chr(10), 1)[-1]} (answer {p.answer}); critique case {q.case}, "
                f"wrong claim {q.wrong_claim!r} -> {q.corrected_claim!r}"
                for p, q in zip(res.problems, res.critiques)]
    page = render_advantage_html(tokens, {labels[n]: A for n, A in res.advantages.items()}, res.marks,
                                 title=f"Per-token advantage A_t of {model_name}'s erroneous rollouts",
                                 scores=summary, captions=captions)
    (out / "advantage.html").write_text(page)
    record = {"config": dict(config or {}), "counts": res.counts, "chance": chance, "scores": scores,
              "rollouts": [{"problem_id": p.id, "text": c.text, "case": q.case, "wrong_claim": q.wrong_claim,
                            "corrected_claim": q.corrected_claim,
                            "advantages": {n: A[i].round(5).tolist() for n, A in res.advantages.items()}}
                           for i, (p, c, q) in enumerate(zip(res.problems, res.completions, res.critiques))]}
    (out / "localization.json").write_text(json.dumps(_json_safe(record), indent=1, allow_nan=False) + "\n")
    return table, record


def _json_safe(x):
    """NaN (an undefined score) becomes null, so that the file is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ============================================================================================ command line
def main(argv: Sequence[str] | None = None) -> str | dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["mechanism"]:  # python evaluate.py mechanism --out DIR
        return mechanism_main(argv[1:])
    ap = argparse.ArgumentParser(description="The paper-style results table from the evaluations a run logged.")
    ap.add_argument("runs", nargs="+", help="run directories (each with eval.jsonl) or parents of run directories")
    ap.add_argument("--out", default=None, help="where to write results.md and the PNGs (default: the first path)")
    args = ap.parse_args(argv)
    records = load_evals(args.runs)
    out = Path(args.out or args.runs[0])
    table = results_table(records) + "\n" + steps_table(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    pngs = plot_metrics(records, out)
    print(table)
    print(f"wrote {out / 'results.md'} and " + ", ".join(str(p) for p in pngs))
    return table


if __name__ == "__main__":
    main()
