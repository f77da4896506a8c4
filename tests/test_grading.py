"""Tests of grading.py: the one \\boxed reader (against the former rescanning reader, linear time, the sampler's
stop rule), the fast path, math-verify grading cases, threads, the time limit, and bad gold answers."""
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from grading import AnswerChecker, answer_span, boxes, extract_answer, fast_equivalent, grade
from rollout import closes_boxed


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=5.0) as c:
        yield c


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


def test_boxes_gives_each_box_its_content_span_and_the_grader_the_last_complete_one():
    text = r"a \boxed{3} b \fbox {x^{2}} c \boxed{} d \boxed{12"
    assert [None if e is None else text[s:e] for s, e in boxes(text)] == ["3", "x^{2}", "", None]
    assert text[slice(*answer_span(text))] == "x^{2}" == extract_answer(text)
    assert boxes("no box here") == [] and answer_span(r"\boxed{ }") is None


def test_the_samplers_stop_rule_reads_boxes_as_the_grader_does():
    """rollout.closes_boxed (stop_at_boxed) reads grading.boxes: a sample ends once it holds a complete box, so
    every answer the grader can read ends sampling, and an unclosed box never does."""
    assert closes_boxed("Step 1: 3 + 4 = 7\n\\boxed{7}") and closes_boxed(r"\boxed{\frac{1}{2}} and more")
    assert not closes_boxed(r"\boxed{\frac{1}{2}") and not closes_boxed(r"\boxed") and not closes_boxed("{7}")
    rng = np.random.default_rng(1)
    pieces = ["\\boxed{", "\\fbox{", "{", "}", "\\}", " ", "7"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces, size=rng.integers(0, 10)))
        assert closes_boxed(text) == any(e is not None for _, e in boxes(text))
        if extract_answer(text) is not None:
            assert closes_boxed(text), repr(text)
