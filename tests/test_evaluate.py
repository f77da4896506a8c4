"""Tests of evaluate.py: Pass/Maj/Avg@k against enumeration and hand counts, and its command line."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from conftest import fp64_rounding
from evaluate import evaluate_samples, majority_vote, pass_at_k
from grading import AnswerChecker


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=5.0) as c:
        yield c


def pass_at_k_rounding(n: int, c: int, k: int) -> float:
    """How far pass_at_k's float64 product 1 − Π_{i=n−c+1}^{n} (1 − k/i) may be from another float64 evaluation of
    1 − C(n−c, k)/C(n, k) that rounds once (a count over a count): pass_at_k rounds c quotients a_i = k/i, c
    differences 1 − a_i, c − 1 products and the final 1 − P, 3c roundings, the other side one. A relative rounding
    of a_i moves the result by P·a_i/(1 − a_i) = P·k/(i − k), one of a difference or a product by P, the last
    difference and the other side's division by r = 1 − P: the sum of those is fp64_rounding's scale. With
    n − c < k or c = 0 pass_at_k does no arithmetic (1.0, or 1 − 1 = 0) and neither does a count over a count."""
    if n - c < k:
        return 0.0
    P = math.prod(1 - k / i for i in range(n - c + 1, n + 1))
    scale = P * (sum(k / (i - k) for i in range(n - c + 1, n + 1)) + c + max(c - 1, 0)) + 2 * (1 - P)
    return fp64_rounding(3 * c + 1, scale)


def test_pass_at_k_matches_enumeration_of_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                direct = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
                assert abs(pass_at_k(n, c, k) - direct) <= pass_at_k_rounding(n, c, k), (n, c, k)


def test_pass_at_k_large_n_is_stable_and_rejects_bad_arguments():
    assert abs(pass_at_k(1000, 1, 1) - 1 / 1000) <= pass_at_k_rounding(1000, 1, 1)
    assert pass_at_k(1000, 0, 500) == 0.0
    assert 0.0 < pass_at_k(10_000, 3, 50) < 1.0
    for bad in [(0, 0, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_vote_groups_by_equivalence_and_breaks_ties_by_first_appearance(checker):
    # by string "3" would win (2 votes); by equivalence {0.5, \frac12, 1/2} wins with 3
    assert majority_vote(["0.5", r"\frac12", "3", "3", "1/2"], checker) == 0
    assert majority_vote(["3", "5", "5", "3"], checker) == 0  # tie: the group that appeared first
    assert majority_vote(["5", "3", "3", "5"], checker) == 0
    assert majority_vote([None, None, "7", "8", None], checker) == 2  # unanswered do not vote
    assert majority_vote([None, None], checker) is None


def test_evaluate_samples_by_hand(checker):
    def box(a):
        return (f"Step 1: ... \\boxed{{{a}}}", 10)
    samples = [
        # gold 5: answers 3, 3, 5, 5 -> tie, 3 appeared first -> Maj wrong; c = 2
        ("5", [box(3), box(3), box(5), box(5)]),
        # gold 1/2: three equivalent answers beat "3", one unanswered; c = 3
        (r"\frac{1}{2}", [box("0.5"), ("no answer", 30), box("1/2"), box(r"\dfrac{1}{2}")]),
        # gold 9: all unanswered -> Maj 0, c = 0
        ("9", [("none", 2)] * 4),
    ]
    got = evaluate_samples(samples, k=2, checker=checker)
    # Avg over all n=4; Pass@2 unbiased over n=4; Maj@2 over the first 2 samples. Exact: each per-problem value is a
    # count over 4 (a dyadic fraction, exact), a mean of integer lengths over 4 (exact) or pass_at_k called as here;
    # the three add up exactly in any order (dyadic fractions and integers; pass@k's hold a 0, so any order rounds
    # the one sum pass_at_k(4, 2, 2) + 1.0), then one division by 3, here as in numpy's mean
    assert got["avg@k"] == (2 / 4 + 3 / 4 + 0) / 3
    assert got["pass@k"] == (pass_at_k(4, 2, 2) + pass_at_k(4, 3, 2) + 0) / 3
    assert got["maj@k"] == (0 + 1 + 0) / 3  # problem 2: first 2 = ["0.5", None] -> 0.5
    assert got["length"] == (10 + (10 * 3 + 30) / 4 + 2) / 3
    assert got["answered"] == (1 + 3 / 4 + 0) / 3
    assert (got["k"], got["n"], got["n_problems"], got["grade_failures"]) == (2, 4, 3, 0)
    full = evaluate_samples(samples, checker=checker)
    assert full["k"] == 4 and full["maj@k"] == (0 + 1 + 0) / 3
    with pytest.raises(ValueError, match="same positive number"):
        evaluate_samples([("1", [box(1)]), ("2", [box(2), box(2)])], checker=checker)


# ---------------------------------------------------------------------------------------------- command line
ROW = {"step": 0, "feedback": "grpo", "k": 4, "pass@k": 0.5, "maj@k": 0.5, "avg@k": 0.25, "length": 3.0}


def _run_dir(tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.jsonl").write_text(text)
    return run


def _refused(capsys, argv):
    """main(argv) ends with exit 2 and one `evaluate.py: error:` line, nothing else on stderr."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("evaluate.py: error: ") and err.count("\n") == 1, err
    return err


def test_a_killed_runs_cut_last_line_is_skipped_with_one_warning(tmp_path, capsys):
    run = _run_dir(tmp_path, json.dumps(ROW) + "\n" + json.dumps({**ROW, "step": 1}) + "\n"
                   + json.dumps({**ROW, "step": 2})[:25])
    table = evaluate.main([str(run), "--out", str(tmp_path / "out")])
    assert "| base policy (step 0) | 50.00 |" in table and "| GRPO | 50.00 (1) |" in table
    err = capsys.readouterr().err
    assert err == f"evaluate.py: warning: {run / 'eval.jsonl'}:3: the last line was cut mid-write (a killed run): " \
                  "skipped\n"


def test_bad_inputs_and_options_are_one_error_line(tmp_path, capsys):
    """Before, each was a traceback: a missing run directory, a line that is not JSON before the last, a line
    that is not an object, a field of the wrong type; and an --out that is a file."""
    assert "nowhere: no such run directory" in _refused(capsys, [str(tmp_path / "nowhere")])
    run = _run_dir(tmp_path, '{"step": 0,\n' + json.dumps(ROW) + "\n")
    assert f"{run / 'eval.jsonl'}:1: not a JSON line" in _refused(capsys, [str(run)])
    (run / "eval.jsonl").write_text('"text"\n')
    assert f"{run / 'eval.jsonl'}:1: a JSON str, not an object" in _refused(capsys, [str(run)])
    (run / "eval.jsonl").write_text(json.dumps({**ROW, "k": "4"}) + "\n")
    assert "field 'k' must be an integer >= 1, got '4'" in _refused(capsys, [str(run)])
    (run / "eval.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "file").write_text("")
    assert "--out " in _refused(capsys, [str(run), "--out", str(tmp_path / "file")])
    assert "the following arguments are required: runs" in _refused(capsys, [])


def test_the_command_prints_no_traceback(tmp_path):
    """The real command on a run directory that does not exist: one line on stderr, exit 2."""
    r = subprocess.run([sys.executable, str(Path(evaluate.__file__)), str(tmp_path / "nowhere")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == f"evaluate.py: error: {tmp_path / 'nowhere'}: no such run directory\n"
