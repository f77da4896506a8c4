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
for each feedback form the best value of each metric and the step where it was reached, and one PNG per
metric over steps with one line per feedback form.

Mechanism figure (pure pieces; A_t comes from sd_loss.token_advantage): `localization_scores`,
`advantage_by_position` + `plot_advantage_by_position`, `render_advantage_html`.

Run the tests:  python -m pytest tests/test_evaluate.py -q

Departures from the paper (which does not specify these details):
1. Only the last \\boxed{} answer of a response is graded (not any expression math-verify could find in the
   text); a response without one is unanswered and incorrect.
2. A grade whose check exceeds the time limit (default 5 s) or crashes the worker counts as incorrect.
3. Maj@k ties: among the answer groups with the most votes, the one whose first member comes earliest in
   sample order wins. Unanswered samples do not vote; with no answered sample Maj@k is 0 for the problem.
   Answers are grouped by math-verify equivalence against each group's first answer.
4. Pass@k uses all n samples (unbiased for any k <= n); Avg@k uses all n; Maj@k uses the first k samples.
5. Table: best value per metric, ties going to the earliest step. "Length" has no better direction; the
   table reports it at the step of the best Avg@k.
6. The localization scores (top-1, negative-mass share, AUROC) are our quantification of the paper's
   qualitative per-token figure.
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
from typing import Mapping, Sequence

import numpy as np

# ============================================================================================ answers
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INTEGER = re.compile(r"[+-]?\d{1,100}")


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{', nested braces and \\{ \\} handled; None if unclosed."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character (\{, \}, \\) never opens or closes a group
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def extract_answer(response: str) -> str | None:
    """The content of the last well-formed \\boxed{...} or \\fbox{...} of `response`, stripped.

    Accepted: `\\boxed{...}`, `\\boxed {...}`, `\\fbox{...}`, with nested braces and escaped braces (\\{ \\}).
    Not accepted: `\\boxed 5` (no braces). An unclosed box (a truncated response) and an empty box are skipped,
    so the last complete, non-empty box wins; None when there is none.
    """
    for m in reversed(list(_BOX_OPEN.finditer(response))):
        content = _braced(response, m.end() - 1)
        if content is not None and content.strip():
            return content.strip()
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
DISPLAY = {"grpo": "GRPO", "refsol": "RefSol", "stepalign": "StepAlignFB", "verdict": "Verdict"}


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


def results_table(records: Sequence[EvalRecord]) -> str:
    """The paper-style markdown table: best value (%) per metric and, in brackets, the step it was reached."""
    ks = sorted({r.k for r in records})
    kk = str(ks[0]) if len(ks) == 1 else "k"
    lines = [f"| Feedback | Pass@{kk} | Maj@{kk} | Avg@{kk} | Length |", "|---|---|---|---|---|"]
    for label, row in best_by_metric(records).items():
        cells = [f"{100 * v:.2f} ({s})" for v, s in (row[m] for m in METRICS)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['length'][0]:.0f} ({row['length'][1]}) |")
    if len(ks) > 1:
        lines.append("")
        lines.append("k per run: " + ", ".join(f"{label}: {next(r.k for r in records if r.run == run)}"
                                               for run, label in _labels(records).items()))
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
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.8; }
.tok { border-radius: 2px; }
.step { border-bottom: 2px solid #555; }
.claim { outline: 2px solid #000; }
.marker { color: #b00; font-weight: bold; font-size: 0.8em; }
.ws { color: #888; }
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
                          scale: float | None = None) -> str:
    """A standalone HTML page: each rollout shown once per context, side by side, tokens coloured by A_t.

    tokens[i]: the decoded tokens of rollout i; advantages[context][i]: its A_t under that context
    (e.g. {"StepAlignFB": ..., "RefSol": ...}); marks[i]: its first error (or None). The erroneous step is
    underlined, the wrong claim boxed, and a ▶ marks where the step starts. Hovering a token shows t and A_t.
    One colour scale for the whole page (default: the 98th percentile of |A_t|), so contexts compare.
    scores: optional context -> {score name: value}, shown as a table on top.
    """
    if not advantages:
        raise ValueError("render_advantage_html needs at least one context")
    if len(marks) != len(tokens):
        raise ValueError(f"{len(tokens)} rollouts but {len(marks)} marks")
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
        parts.append(f'<section><h2>Rollout {i}</h2><div class="grid" '
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


# ============================================================================================ command line
def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description="The paper-style results table from the evaluations a run logged.")
    ap.add_argument("runs", nargs="+", help="run directories (each with eval.jsonl) or parents of run directories")
    ap.add_argument("--out", default=None, help="where to write results.md and the PNGs (default: the first path)")
    args = ap.parse_args(argv)
    records = load_evals(args.runs)
    out = Path(args.out or args.runs[0])
    table = results_table(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    pngs = plot_metrics(records, out)
    print(table)
    print(f"wrote {out / 'results.md'} and " + ", ".join(str(p) for p in pngs))
    return table


if __name__ == "__main__":
    main()
