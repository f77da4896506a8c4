"""Grading, Pass/Maj/Avg@k against enumeration and hand counts, the grading time limit, the results table,
the pieces of the per-token advantage figure (localization scores, AUROC, position profile, HTML), and its
driver (token/character span mapping, A_t against a direct forward pass on a tiny model)."""
import itertools
import json
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from evaluate import (MECHANISM_CONTEXTS, AnswerChecker, ErrorMarks, advantage_by_position, auroc, best_by_metric,
                      error_marks_from_spans, evaluate_checkpoint, evaluate_samples, extract_answer, fast_equivalent,
                      grade, load_evals, localization_scores, main, majority_vote, mechanism, pass_at_k,
                      plot_advantage_by_position, render_advantage_html, token_char_spans, write_mechanism_report)


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=5.0) as c:
        yield c


# ------------------------------------------------------------------------------------------------ pass@k
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


# ------------------------------------------------------------------------------------------------ answers
def test_extract_answer():
    assert extract_answer(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{3} then \boxed{ 5 }") == "5"  # the last one wins
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces inside
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"\boxed {x^{2}}") == "x^{2}"
    assert extract_answer(r"\boxed{4} and then \boxed{12") == "4"  # a truncated box is skipped
    assert extract_answer(r"\boxed{}") is None
    assert extract_answer("the answer is 4") is None


def _extract_answer_by_rescanning(response):
    """The former extract_answer, kept as the reference: each box scanned to its end, last box first."""
    import re

    def braced(text, start):
        depth, i = 0, start
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + 1:i]
            i += 1
        return None

    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", response))):
        content = braced(response, m.end() - 1)
        if content is not None and content.strip():
            return content.strip()
    return None


def test_extract_answer_equals_the_rescanning_reader_on_random_texts():
    rng = np.random.default_rng(0)
    pieces = ["\\boxed{", "\\fbox{", "\\boxed {", "{", "}", "\\{", "\\}", "\\\\", "\\", " ", "7", "x", "\n"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 14)))
        assert extract_answer(text) == _extract_answer_by_rescanning(text), repr(text)


class CountingStr(str):
    """A str that counts how often it is indexed or sliced (the reader's work, independent of the clock)."""
    reads = 0

    def __getitem__(self, key):
        CountingStr.reads += 1
        return str.__getitem__(self, key)


@pytest.mark.parametrize("unit", ["\\boxed{", "\\boxed{{", "\\boxed{\\{", "{\\boxed{}"])
def test_extract_answer_is_linear_on_pathological_input(unit, checker):
    """100,000 characters of unclosed boxes: the rescanning reader reads ~len²/(2·len(unit)) characters
    (~7e8 for the first unit, minutes in Python); this one reads each character at most once or twice."""
    text = (unit * (100_000 // len(unit) + 1))[:100_000]
    CountingStr.reads = 0
    assert extract_answer(CountingStr(text)) is None
    assert len(text) // 2 <= CountingStr.reads <= 2 * len(text)  # (it does count: every character is read)
    assert extract_answer(text + "\\boxed{12}") == "12"
    assert checker.grade(text, "12") is False and checker.grade(text + "\\boxed{12}", "12") is True


def test_fast_path_decides_integers_without_a_worker():
    assert fast_equivalent("42", " 42 ") is True
    assert fast_equivalent("42", "042") is True
    assert fast_equivalent("42", "41") is False
    assert fast_equivalent("$7$", "7") is True
    assert fast_equivalent("0.5", r"\frac12") is None
    assert grade(r"\boxed{41}", "42") is False and grade(r"\boxed{42}", "42") is True  # no worker needed


@pytest.mark.parametrize("response, gold, expected", [
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"\boxed{\dfrac{3}{4}}", "0.7", False),
    (r"\boxed{\text{42}}", "42", True),
    (r"\boxed{5\text{ cm}}", "5", True),
    (r"\boxed{12 \text{ apples}}", "12", True),
    (r"\boxed{3} no wait \boxed{5}", "5", True),
    (r"\boxed{3} no wait \boxed{5}", "3", False),
    ("the answer is 5", "5", False),
    (r"\boxed{x+1}", "1+x", True),
])
def test_grading_cases(checker, response, gold, expected):
    assert checker.grade(response, gold) is expected
    assert grade(response, gold, checker) is expected


def test_grading_from_worker_threads(checker):
    cases = [(r"\boxed{0.5}", r"\frac{1}{2}", True), (r"\boxed{\dfrac{2}{3}}", "0.5", False),
             (r"\boxed{7}", "7", True)] * 3
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda c: checker.grade(c[0], c[1]), cases))
        one_shot = pool.submit(grade, r"\boxed{\frac{1}{4}}", "0.25").result()  # no checker, off the main thread
    assert got == [c[2] for c in cases]
    assert one_shot is True


def test_pathological_answer_hits_our_time_limit_and_counts_as_incorrect():
    with AnswerChecker(timeout_s=1.0) as c:
        assert c.grade(r"\boxed{1/2}", "0.5") is True  # worker started (not part of the deadline)
        t0 = time.time()
        assert c.grade(r"\boxed{2^{2^{30}}}", "3") is False  # sympy would compare a 10^8-digit integer
        assert time.time() - t0 < 4.0
        assert c.failures["timeout"] == 1
        assert c.grade(r"\boxed{1/2}", "0.5") is True  # a fresh worker takes over


def test_unparsable_gold_is_a_data_error(checker):
    with pytest.raises(ValueError, match="gold answer"):
        checker.equivalent("}{", "3")
    assert checker.equivalent("}{", "3", reference=False) is False  # two model answers: just not equivalent


# ------------------------------------------------------------------------------------------------ metrics
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


def test_evaluate_checkpoint_calls_the_engine_per_the_shared_interface(checker, monkeypatch):
    fake_critic = types.SimpleNamespace(student_messages=lambda p: [{"role": "user", "content": p.problem}],
                                        render=lambda tok, messages, thinking: "PROMPT:" + messages[0]["content"])
    monkeypatch.setitem(sys.modules, "critic", fake_critic)
    calls = []

    class Engine:
        def generate(self, prompts, seeds, n, temperature, max_new_tokens):
            calls.append((prompts, seeds, n, temperature, max_new_tokens))
            completion = types.SimpleNamespace
            return [[completion(token_ids=[1] * 3, text=r"\boxed{4}", finish_reason="stop")] * n for _ in prompts]

    problems = [types.SimpleNamespace(id=f"p{i}", problem=f"q{i}", answer=str(4 + i)) for i in range(2)]
    got = evaluate_checkpoint(Engine(), None, problems, n=3, temperature=0.7, max_new_tokens=16, seed=1,
                              checker=checker)
    assert calls[0][0] == ["PROMPT:q0", "PROMPT:q1"] and calls[0][2:] == (3, 0.7, 16)
    assert len(set(calls[0][1])) == 2
    assert got["avg@k"] == pytest.approx(0.5) and got["length"] == 3


# ------------------------------------------------------------------------------------------------ table
def _write_run(path, feedback, rows):
    path.mkdir(parents=True)
    with open(path / "eval.jsonl", "w") as f:
        for step, p, m, a, length in rows:
            f.write(json.dumps({"step": step, "feedback": feedback, "k": 12, "pass@k": p, "maj@k": m,
                                "avg@k": a, "length": length, "extra": "ignored"}) + "\n")


def test_results_table_best_per_metric_and_step(tmp_path):
    _write_run(tmp_path / "runs" / "b_sa", "stepalign", [(0, 0.5, 0.2, 0.1, 900.0), (10, 0.9, 0.5, 0.3, 1000.0),
                                                       (20, 0.9, 0.6, 0.3, 1100.0), (30, 0.8, 0.6, 0.2, 1200.0)])
    _write_run(tmp_path / "runs" / "a_grpo", "grpo", [(0, 0.5, 0.2, 0.1, 900.0), (10, 0.7, 0.1, 0.15, 950.0)])
    records = load_evals([tmp_path / "runs"])
    best = best_by_metric(records)
    assert list(best) == ["GRPO", "StepAlignFB"]  # the paper's row order
    sa = best["StepAlignFB"]
    # ties go to the earliest step: pass 0.9 at 10 and 20 -> 10; maj 0.6 at 20 and 30 -> 20; avg 0.3 -> 10
    assert sa["pass@k"] == (0.9, 10) and sa["maj@k"] == (0.6, 20) and sa["avg@k"] == (0.3, 10)
    assert sa["length"] == (1000.0, 10)  # at the best Avg@k step
    assert best["GRPO"]["maj@k"] == (0.2, 0) and best["GRPO"]["pass@k"] == (0.7, 10)

    out = tmp_path / "out"
    table = main([str(tmp_path / "runs"), "--out", str(out)])
    assert "| StepAlignFB | 90.00 (10) | 60.00 (20) | 30.00 (10) | 1000 (10) |" in table
    assert "Pass@12" in table
    # the per-step table: every evaluated step, "–" where a run has none
    assert "| Avg@12 by step | 0 | 10 | 20 | 30 |" in table
    assert "| GRPO | 10.00 | 15.00 | – | – |" in table and "| StepAlignFB | 10.00 | 30.00 | 30.00 | 20.00 |" in table
    assert (out / "results.md").read_text() == table
    for name in ["pass_at_k", "maj_at_k", "avg_at_k", "length"]:
        assert (out / f"{name}.png").stat().st_size > 1000
    # a list of run directories reads the same records
    same = load_evals([tmp_path / "runs" / "a_grpo", tmp_path / "runs" / "b_sa"])
    assert best_by_metric(same) == best


def test_bad_eval_rows_name_the_file_line_and_field(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.jsonl").write_text('{"step": 0, "feedback": "grpo", "k": 4, "pass@k": 0.5, "maj@k": 0.5, '
                                    '"avg@k": 50, "length": 3}\n')
    with pytest.raises(ValueError, match=r"eval.jsonl:1: field 'avg@k'"):
        load_evals([run])
    with pytest.raises(FileNotFoundError):
        load_evals([tmp_path / "nothing"])


# ------------------------------------------------------------------------------------------------ figure
def _marks(T, start, end, claim, earlier):
    wc, ec = np.zeros(T, bool), np.zeros(T, bool)
    wc[list(claim)] = True
    ec[list(earlier)] = True
    return ErrorMarks(start, end, wc, ec)


def test_auroc_matches_brute_force_pair_counting():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 5, size=rng.integers(1, 8)).astype(float)  # small range: many ties
        neg = rng.integers(0, 5, size=rng.integers(1, 8)).astype(float)
        brute = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])
        assert auroc(pos, neg) == pytest.approx(brute)
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0 and auroc([1.0], [1.0]) == 0.5


def test_localization_scores_on_synthetic_advantages():
    # rollout 0: 12 tokens, steps [0,4) correct, [4,8) erroneous with claim {6,7}, then [8,12) continuation
    A0 = np.array([0.1, -0.1, 0.2, 0.0, 0.1, 0.0, -2.0, -1.0, -5.0, 0.3, 0.0, -1.0])
    m0 = _marks(12, 4, 8, {6, 7}, range(4))
    # rollout 1: the most negative token before the end of the error is an earlier correct token
    A1 = np.array([-3.0, 0.5, 0.0, -1.0, 1.0, 1.0])
    m1 = _marks(6, 2, 5, {3}, {0, 1})
    s = localization_scores([A0, A1], [m0, m1])
    # top-1 ignores t=8 (after the erroneous step) in rollout 0: argmin over [0,8) is t=6, on the claim
    assert s["per_rollout"]["top1"] == [1.0, 0.0] and s["top1"] == 0.5
    share0 = (2.0 + 1.0) / (0.1 + 2.0 + 1.0 + 5.0 + 1.0)
    share1 = 1.0 / 4.0
    assert s["per_rollout"]["neg_mass_share"] == pytest.approx([share0, share1])
    assert s["neg_mass_share"] == pytest.approx((share0 + share1) / 2)
    # AUROC of -A: rollout 0 claim {2, 1} vs earlier {-0.1, 0.1, -0.2, 0} -> 1; rollout 1 claim {1} vs {3, -0.5}
    assert s["per_rollout"]["auroc"] == pytest.approx([1.0, 0.5])
    assert s["auroc_pooled"] == pytest.approx(auroc([2.0, 1.0, 1.0], [-0.1, 0.1, -0.2, 0.0, 3.0, -0.5]))
    # an error in the first step has no earlier correct tokens: AUROC undefined, left out and counted
    m2 = _marks(3, 0, 2, {1}, [])
    s2 = localization_scores([A0, [0.0, -1.0, 0.0]], [m0, m2])
    assert s2["n_auroc"] == 1 and s2["auroc"] == pytest.approx(1.0) and s2["top1"] == 1.0
    with pytest.raises(ValueError, match="rollout 0"):
        localization_scores([A0[:5]], [m0])


def test_error_marks_are_validated():
    with pytest.raises(ValueError, match="wrong claim"):
        _marks(6, 2, 4, {5}, {0})  # claim outside the erroneous step
    with pytest.raises(ValueError, match="before error_start"):
        _marks(6, 2, 4, {3}, {2})
    with pytest.raises(ValueError, match="bool"):
        ErrorMarks(0, 1, np.array([1, 0]), np.array([0, 0]))


def test_advantage_by_position_and_its_png(tmp_path):
    # A_t = relative position to the claim start: each bin's mean is known exactly
    A0, m0 = np.arange(10) - 4.0, _marks(10, 3, 6, {4}, range(3))
    A1, m1 = np.arange(6) - 1.0, _marks(6, 1, 3, {1}, [0])
    prof = advantage_by_position([A0, A1], [m0, m1], lo=-4, hi=6, bin_size=2)
    assert prof.bin_start.tolist() == [-4, -2, 0, 2, 4]
    # bins [-4,-2): only rollout 0 (-3.5); [-2,0): rollout 0 has -1.5, rollout 1 only rel -1 -> -1, each
    # rollout weighs the same -> -1.25; [4,6): rollout 0 has 4.5, rollout 1 only rel 4 -> 4.25
    assert prof.mean == pytest.approx([-3.5, -1.25, 0.5, 2.5, 4.25])
    assert prof.n_rollouts.tolist() == [1, 2, 2, 2, 2]
    png = plot_advantage_by_position({"StepAlignFB": prof, "RefSol": prof}, tmp_path / "pos.png")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError):
        advantage_by_position([A0], [m0], lo=0, hi=5, bin_size=2)


def test_html_escapes_tokens_marks_the_error_and_shows_contexts_side_by_side():
    tokens = [["Step", " 1:", " <b>", "&", "</b>", '"q"', "\n", "42"]]
    T = len(tokens[0])
    mk = _marks(T, 6, 8, {7}, range(6))
    advantages = {"StepAlignFB": [np.linspace(-1, 1, T)], "RefSol": [np.zeros(T)], "verdict": [np.ones(T)]}
    page = render_advantage_html(tokens, advantages, [mk], title="A_t <demo>",
                                 scores={"StepAlignFB": {"top1": 1.0}})
    assert "<b>" not in page and "</b>" not in page and "<demo>" not in page
    assert "&lt;b&gt;" in page and "&amp;" in page and "&lt;/b&gt;" in page and "A_t &lt;demo&gt;" in page
    assert '&quot;q&quot;' in page  # quotes inside tokens cannot break out of the attributes
    assert "↵" in page  # the newline token is visible
    for ctx in advantages:
        assert f"<h3>{ctx}</h3>" in page
    assert "repeat(3, 1fr)" in page
    assert page.count('class="tok step claim"') == 3  # the claim token, once per context
    assert page.count("▶") >= 3
    assert "rgba(220, 38, 38" in page and "rgba(22, 163, 74" in page
    assert 'title="t=0  A_t=-1.0000' in page
    with pytest.raises(ValueError, match="context 'RefSol', rollout 0"):
        render_advantage_html(tokens, {"RefSol": [np.zeros(T - 1)]}, [mk])


# ------------------------------------------------------------------------------------------------ figure driver
def _problem():
    from data import Problem
    return Problem(id="p42", problem="Start with 17. Add 25, then multiply the result by 3. What is the final number?",
                   answer="126", reference_solution="(17 + 25) × 3: adding 25 gives 42; 3 times that is 126. "
                   "Hence \\boxed{126}.", steps=("17 + 25 = 42", "42 * 3 = 126"))


def _completion(tokenizer, text, end_of_turn=True):
    from rollout import Completion
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids += [tokenizer.convert_tokens_to_ids("<|im_end|>")] if end_of_turn else []
    return Completion(ids, tokenizer.decode(ids, skip_special_tokens=True), "stop")


def _joined(tokenizer, ids, mask):
    return "".join(tokenizer.decode([i]) for i, m in zip(ids, mask) if m)


def test_token_char_spans_cover_the_text_and_marks_point_at_the_wrong_result(smol_tokenizer):
    from critic import ExactArithmeticCritic
    tok = smol_tokenizer
    c = _completion(tok, "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\n\\boxed{136}")
    spans = token_char_spans(tok, c.token_ids, c.text)
    assert "".join(c.text[s:e] for s, e in spans) == c.text and spans[-1][0] == spans[-1][1]  # <|im_end|>: empty
    assert all(c.text[s:e] == tok.decode([i]) for i, (s, e) in zip(c.token_ids[:-1], spans))
    q = ExactArithmeticCritic().critique_one(_problem(), c.text)
    assert q.wrong_claim == "136" and c.text[slice(*q.wrong_span)] == "136"
    mk = error_marks_from_spans(spans, c.text, q.wrong_span)
    ids = c.token_ids
    assert _joined(tok, ids, mk.wrong_claim) == "136"
    assert mk.wrong_claim.sum() == 3  # SmolLM2 writes one token per digit
    assert "".join(tok.decode([i]) for i in ids[mk.error_start:mk.error_end]) == "Step 2: 42 * 3 = 136"
    assert _joined(tok, ids, mk.earlier_correct) == "Step 1: 17 + 25 = 42"
    # no "Step i:" markers: the erroneous step is the line of the wrong claim, earlier lines are correct steps
    c2 = _completion(tok, "1. 17 + 25 = 42\n2. 42 * 3 = 136\n\\boxed{136}", end_of_turn=False)
    q2 = ExactArithmeticCritic().critique_one(_problem(), c2.text)
    mk2 = error_marks_from_spans(token_char_spans(tok, c2.token_ids, c2.text), c2.text, q2.wrong_span)
    assert _joined(tok, c2.token_ids, mk2.wrong_claim) == "136"
    assert "".join(tok.decode([i]) for i in c2.token_ids[mk2.error_start:mk2.error_end]) == "2. 42 * 3 = 136"
    assert _joined(tok, c2.token_ids, mk2.earlier_correct) == "1. 17 + 25 = 42\n"


def test_token_char_spans_give_a_split_multibyte_character_to_the_token_that_completes_it(smol_tokenizer):
    tok = smol_tokenizer
    # 🙂 is F0 9F 99 82 in UTF-8; byte-level BPE writes those bytes as the symbols ð Ł Ļ Ĥ: one token per byte
    byte_ids = tok.convert_tokens_to_ids(["ð", "Ł", "Ļ", "Ĥ"])
    head = tok("Step 1: 6 × 7 = 43 ", add_special_tokens=False).input_ids
    ids = head + byte_ids + tok(" ok", add_special_tokens=False).input_ids
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "Step 1: 6 × 7 = 43 🙂 ok"
    spans = token_char_spans(tok, ids, text)
    assert "".join(text[s:e] for s, e in spans) == text
    emoji = text.index("🙂")
    assert [spans[len(head) + k] for k in range(4)] == [(emoji, emoji)] * 3 + [(emoji, emoji + 1)]
    with pytest.raises(ValueError, match="not a prefix"):
        token_char_spans(tok, ids, "something else entirely")


def _direct_logprobs(model, prompt_ids, y):
    """log π(y_t | prompt, y<t) from the full logits of one unpadded sequence (independent of rollout.py)."""
    import torch
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + y])).logits[0]  # (L, V)
    logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1].double(), -1)  # (T, V)  row t predicts y_t
    return logp[torch.arange(len(y)), torch.tensor(y)].numpy()  # (T,)


def test_mechanism_driver_matches_direct_forward_passes(tiny_smol, tmp_path):
    import critic
    model, tok = tiny_smol
    p = _problem()
    wrong_late = _completion(tok, "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\n\\boxed{136}")
    right = _completion(tok, "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\n\\boxed{126}")
    wrong_early = _completion(tok, "Step 1: 17 + 25 = 41\n\\boxed{41}", end_of_turn=False)  # shorter: padding
    seen = []

    def echo(problem, response, critique):  # a new feedback form plugs in as one more entry
        seen.append(response)
        return [{"role": "user", "content": f"{problem.problem}\nAn earlier attempt:\n{response}"}]

    contexts = {**MECHANISM_CONTEXTS, "echo": echo}
    res = mechanism(model, tok, [p], contexts=contexts, completions=[[wrong_late, right, wrong_early]],
                    batch_size=2)
    assert res.counts["sampled"] == 3 and res.counts["kept"] == 2 and res.counts["case_A"] == 1
    assert res.completions == [wrong_late, wrong_early] and seen == [wrong_late.text, wrong_early.text]
    assert [_joined(tok, c.token_ids, m.wrong_claim) for c, m in zip(res.completions, res.marks)] == ["136", "41"]
    student = tok(critic.render(tok, critic.student_messages(p), False), add_special_tokens=False).input_ids
    for name in contexts:
        assert len(res.advantages[name]) == 2
        for c, q, A in zip(res.completions, res.critiques, res.advantages[name]):
            assert A.shape == (len(c.token_ids),)
            teacher = tok(critic.render(tok, contexts[name](p, c.text, q), True), add_special_tokens=False).input_ids
            direct = _direct_logprobs(model, teacher, c.token_ids) - _direct_logprobs(model, student, c.token_ids)
            np.testing.assert_allclose(A, direct, atol=1e-4)
    # the stepalign teacher saw this rollout's critique, the refsol teacher the reference solution
    assert critic.teacher_messages(p, "stepalign", res.critiques[0].text) == \
        MECHANISM_CONTEXTS["stepalign"](p, wrong_late.text, res.critiques[0])
    assert "42 * 3 = 126" in res.critiques[0].text
    # the verdict teacher saw the grade of this very rollout: its answer and "incorrect", never the gold answer
    verdict_prompt = MECHANISM_CONTEXTS["verdict"](p, wrong_late.text, res.critiques[0])[0]["content"]
    assert "final answer was 136. This answer is incorrect." in verdict_prompt and "126" not in verdict_prompt

    table, record = write_mechanism_report(res, tok, tmp_path, model_name="tiny")
    assert "| StepAlignFB | 2 |" in table and "| Verdict | 2 |" in table and "| echo | 2 |" in table
    assert "| chance |" in table
    assert json.loads((tmp_path / "localization.json").read_text())["counts"]["kept"] == 2
    assert (tmp_path / "advantage_by_position.png").stat().st_size > 1000
    page = (tmp_path / "advantage.html").read_text()
    assert page.count('class="tok step claim"') == 4 * (3 + 2)  # 4 contexts × (3 + 2 wrong-result tokens)
    assert page.count('<p class="caption">p42: Start with 17.') == 2


def test_command_line_dispatches_on_its_first_argument(monkeypatch):
    import evaluate
    calls = []
    monkeypatch.setattr(evaluate, "mechanism_main", lambda argv: calls.append(argv) or {"ok": True})
    assert evaluate.main(["mechanism", "--out", "somewhere"]) == {"ok": True}
    assert calls == [["--out", "somewhere"]]
