"""Pass@k, Maj@k, Avg@k of sampled solutions, a policy's evaluation during training, and the command line of the results
table.

Metrics (`evaluate_samples`), per problem over its n samples, then averaged over problems:
    Avg@k   mean correctness c / n;
    Pass@k  the unbiased estimator of Chen et al. (2021), 1 − C(n−c, k) / C(n, k) (`pass_at_k`);
    Maj@k   the majority answer among the first k samples is correct;
    length  mean number of generated tokens.
A sample is correct when grading.grade accepts its last \\boxed{} answer.

    python evaluate.py RUN_DIR [RUN_DIR ...] [--out DIR]     # the results table and plots (infra/report.py)

Departures from the paper (which does not specify these details):
1. Maj@k ties: among the answer groups with the most votes, the one whose first member comes earliest in
   sample order wins. Unanswered samples do not vote; with no answered sample Maj@k is 0 for the problem.
   Answers are grouped by math-verify equivalence against each group's first answer.
2. Pass@k uses all n samples (unbiased for any k <= n); Avg@k uses all n; Maj@k uses the first k samples.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.distributed as dist

import grading
import prompts
import rollout
from config import OneLineParser, run_name
from infra import fingerprint, report
from infra.dist import Dist
from infra.signals import StopFlag, Stopped
from policy import sampling


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021, Codex paper, Fig. 3)."""
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # 1 − C(n−c, k)/C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)   (product form, no huge binomials)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None], checker: grading.AnswerChecker) -> int | None:
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
        key = grading.normalize_answer(a)
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
                     checker: grading.AnswerChecker | None = None) -> dict[str, float]:
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
    checker = grading.AnswerChecker() if own else checker
    failures_before = sum(checker.failures.values())
    try:
        rows = []
        for p, (gold, responses) in enumerate(samples):
            answers = [grading.extract_answer(text) for text, _ in responses]
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


# ---------------------------------------------------------------------------------------------- a policy, in training
def evaluate_policy(cfg, engine, tokenizer, checker, test, step, d: Dist) -> dict | None:
    """Pass/Maj/Avg@k and length on the held-out problems; each rank samples a slice, rank 0 aggregates."""
    mine = test[d.rank::d.world]
    x = [prompts.encode(tokenizer, prompts.student_messages(p), cfg.student_thinking) for p in mine]
    seeds = [rollout.sample_seed(cfg.seed, "eval", step, p.id) for p in mine]
    # called on every rank, also one with no held-out problem (fewer than ranks): vLLM's generate is a collective
    outs = engine.generate(x, seeds, n=cfg.eval_samples, temperature=cfg.eval_temperature,
                           max_new_tokens=cfg.max_new_tokens)
    local = [(p.answer, [(c.text, len(c.token_ids)) for c in samples]) for p, samples in zip(mine, outs)]
    gathered = [local]
    if d.world > 1:
        gathered = [None] * d.world
        dist.all_gather_object(gathered, local)
    if not d.master:
        return None
    samples = [s for part in gathered for s in part]
    return {"step": step, "feedback": run_name(cfg),
            **evaluate_samples(samples, k=cfg.eval_samples, checker=checker)}


def load_base_eval(cfg, d: Dist) -> dict:
    """The step-0 evaluation an earlier run wrote to --base-eval, as {"result": ...} (None on ranks other than 0, as
    evaluate_policy returns it there), or {} when there is none: then the first run evaluates the base policy.
    config.preflight checked the file before (infra.checks.base_eval_problems: the same model, seed, held-out set and
    evaluation options)."""
    if not cfg.base_eval or not Path(cfg.base_eval).is_file():
        return {}
    return {"result": json.loads(Path(cfg.base_eval).read_text())["result"] if d.master else None}


def save_base_eval(cfg, result: dict | None, test) -> None:
    """Writes the step-0 evaluation to --base-eval (rank 0; none without the option) with what it was made of
    (infra.fingerprint.base_eval_fingerprint of the held-out problems `test`), atomically: a run stopped mid-write
    leaves no partial file. Never through a symbolic link: the temporary file is created anew (O_EXCL | O_NOFOLLOW)
    and renamed over the path (a link there is replaced, its target untouched)."""
    if cfg.base_eval and result is not None:
        path = Path(cfg.base_eval)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)  # (a stale one, or a link: unlink removes the link, not its target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": fingerprint.base_eval_fingerprint(cfg, test), "result": result}) + "\n")
        tmp.replace(path)


def evaluate_in_training(cfg, model, engine, tokenizer, checker, test, step: int, d: Dist, log,
                         stop: StopFlag) -> None:
    """The policy after `step` steps evaluated (evaluate_policy, sampled from the merged adapter) and logged. A signal
    during it (infra.signals.Stopped) ends the run: train.py wrote the checkpoint of `step` before, and --resume runs this
    evaluation first (infra.stop_rules.evaluation_pending)."""
    try:
        with sampling(cfg, model):
            result = evaluate_policy(cfg, engine, tokenizer, checker, test, step, d)
    except Stopped:
        stop.exit(Path(cfg.out_dir), step, d)
    log_eval(cfg, log, result)


def log_eval(cfg, log, result: dict | None) -> None:
    """One evaluation: a line of eval.jsonl (infra.logs.Logger) and a line on stdout; none on ranks other than 0."""
    if result is not None:
        log.write("eval.jsonl", result)
        print(f"[{run_name(cfg)}] eval step {result['step']}: " + "  ".join(
            f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)), flush=True)


# ---------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> str:
    """`python evaluate.py RUN_DIR ... [--out DIR]`: a bad run directory or eval.jsonl line is one `error:` line
    naming it, exit 2; a last line cut by a kill is skipped with a warning line (infra.report.read_jsonl)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = OneLineParser(prog="evaluate.py", description="The paper-style results table from the evaluations a run "
                                                       "logged.")
    ap.add_argument("runs", nargs="+", help="run directories (each with eval.jsonl) or parents of run directories")
    ap.add_argument("--out", default=None, help="where to write results.md and the PNGs (default: the first path)")
    args = ap.parse_args(argv)
    out = Path(args.out or args.runs[0])
    try:
        records = report.load_evals(args.runs, on_torn=lambda line: print(f"evaluate.py: warning: {line}",
                                                                          file=sys.stderr, flush=True))
        if out.exists() and not out.is_dir():
            raise report.ReportError(f"--out {out}: is a file; it must be a directory")
        table = report.results_table(records) + "\n" + report.steps_table(records)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table)
        pngs = report.plot_metrics(records, out)
    except (report.ReportError, OSError) as e:  # OSError: --out cannot be made or written
        print(f"evaluate.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(table)
    print(f"wrote {out / 'results.md'} and " + ", ".join(str(p) for p in pngs))
    return table


if __name__ == "__main__":
    main()
