"""Tests of evaluate.py: Pass/Maj/Avg@k against enumeration and hand counts, and its command line."""
import itertools

import pytest

import evaluate
from evaluate import evaluate_samples, majority_vote, pass_at_k
from grading import AnswerChecker


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=5.0) as c:
        yield c


def test_pass_at_k_matches_enumeration_of_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                direct = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(direct, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable_and_rejects_bad_arguments():
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3)
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
    # Avg over all n=4; Pass@2 unbiased over n=4; Maj@2 over the first 2 samples
    assert got["avg@k"] == pytest.approx((2 / 4 + 3 / 4 + 0) / 3)
    assert got["pass@k"] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 3, 2) + 0) / 3)
    assert got["maj@k"] == pytest.approx((0 + 1 + 0) / 3)  # problem 2: first 2 = ["0.5", None] -> 0.5
    assert got["length"] == pytest.approx((10 + (10 * 3 + 30) / 4 + 2) / 3)
    assert got["answered"] == pytest.approx((1 + 3 / 4 + 0) / 3)
    assert (got["k"], got["n"], got["n_problems"], got["grade_failures"]) == (2, 4, 3, 0)
    full = evaluate_samples(samples, checker=checker)
    assert full["k"] == 4 and full["maj@k"] == pytest.approx((0 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="same positive number"):
        evaluate_samples([("1", [box(1)]), ("2", [box(2), box(2)])], checker=checker)


def test_command_line_dispatches_on_its_first_argument(monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate.mechanism, "main", lambda argv: calls.append(argv) or {"ok": True})
    assert evaluate.main(["mechanism", "--out", "somewhere"]) == {"ok": True}
    assert calls == [["--out", "somewhere"]]
