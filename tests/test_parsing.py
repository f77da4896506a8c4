"""The parsers of outside text take time linear in their input, whatever its shape (issue 30, class 1).

Outside text is what the project did not write: critic answers (critic.parse_critique, data.strip_think,
prompts.corrected_solution), rollouts (data.step_spans, grading's \\boxed reader, demo/exact_critic's equations)
and the problems and references around them. A parse that backtracks (adjacent quantifiers over overlapping
classes, a search from every position, a copy of the rest of the text per match) grows as n^2 or n^3 on some
shape: 700 spaces after "Corrected solution" cost 107 s, and a signal waits for the parse to return.

Each shape is timed at n and 4n characters: the least CPU time (time.process_time, so that other processes on the
machine do not count) of REPEATS calls. Linear gives a ratio of about 4, quadratic 16, cubic 64; the test asserts
a ratio under 8. A call that runs past DEADLINE_S is interrupted by SIGALRM (the re engine checks for signals) and
fails the test: a generous bound for one parse of at most 4 x 100 KB, which takes milliseconds, and what ends the
old, super-linear parsers, which would otherwise run for hours on the first size.
"""
import gc
import random
import re
import signal
import time

import pytest

import critic
import data
import grading
import prompts
from demo import exact_critic
from infra import chat_client

REPEATS = 5
DEADLINE_S = 10.0  # one call of one shape at 4n; linear parsers take milliseconds
RATIO = 8.0  # t(4n) / t(n): linear 4, quadratic 16

BODY = "\nCorrected solution:\nStep 1: 1 + 1 = 2\n\\boxed{2}"  # a valid end, so that the head is parsed
PROBLEM = data.Problem("p", "Start with 1. Add 1.", "2", steps=("1 + 1 = 2",))


class _Deadline(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Deadline()


def _cpu_seconds(parse, text: str, repeats: int = REPEATS) -> float:
    """The least CPU time of `repeats` calls of parse(text); fails past DEADLINE_S of wall time for one call."""
    best = float("inf")
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    gc.disable()
    try:
        for _ in range(repeats):
            signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
            start = time.process_time()
            try:
                parse(text)
            except _Deadline:
                pytest.fail(f"one call on {len(text):,} characters ran past {DEADLINE_S} s")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            best = min(best, time.process_time() - start)
    finally:
        gc.enable()
        signal.signal(signal.SIGALRM, previous)
    return best


def _error_marks(text: str):
    """exact_critic.error_marks_from_spans with one token per character and the wrong claim in the last step."""
    return exact_critic.error_marks_from_spans([(i, i + 1) for i in range(len(text))], text,
                                               (len(text) - 2, len(text) - 1))


# (id, parse, make(n) -> a text of about n characters); n is chosen so that the new code takes milliseconds
SHAPES = [
    # critic answers: whitespace runs after and before each header of the schema, think tags
    ("header_then_spaces", lambda t: critic.parse_critique(t, 1), lambda n: "Corrected solution" + " " * n + "x"),
    ("case_then_spaces", lambda t: critic.parse_critique(t, 1), lambda n: "Case" + " " * n + "x" + BODY),
    ("case_colon_spaces", lambda t: critic.parse_critique(t, 1), lambda n: "Case:" + " " * n + "x" + BODY),
    ("pivot_colon_spaces", lambda t: critic.parse_critique(t, 1),
     lambda n: "Case: A\nPivotal step:" + " " * n + "x" + BODY),
    ("summary_line_of_spaces", lambda t: critic.parse_critique(t, 1),
     lambda n: "Case: A\nPivotal step: none\n" + " " * n + "x" + BODY),
    ("summary_step_spaces", lambda t: critic.parse_critique(t, 1),
     lambda n: "Case: A\nPivotal step: none\nStep 1" + " " * n + "x" + BODY),
    ("critique_think_tags", lambda t: critic.parse_critique(t, 1), lambda n: "<think>" * (n // 7) + BODY),
    ("corrected_solution_spaces", prompts.corrected_solution, lambda n: "Corrected solution" + " " * n + "x"),
    ("strip_think_open_tags", data.strip_think, lambda n: "<think>" * (n // 7)),
    ("strip_think_opened", lambda t: data.strip_think(t, opened=True), lambda n: "x<think>" * (n // 8)),
    # rollouts: step markers
    ("many_step_markers", data.step_spans, lambda n: "Step 1:\n" * (n // 8)),
    ("step_marker_spaces", data.step_spans, lambda n: "Step 1" + " " * n + "x"),
    # the \boxed reader: linear before issue 30 already (made so in an earlier round), kept as a guard
    ("unclosed_boxes", grading.extract_answer, lambda n: "\\boxed{" * (n // 7)),
    ("nested_braces", grading.extract_answer, lambda n: "\\boxed{" + "{" * (n // 2) + "}" * (n // 2)),
    ("empty_boxes", grading.extract_answer, lambda n: "\\boxed{ }" * (n // 9)),
    ("boxed_then_spaces", grading.extract_answer, lambda n: ("\\boxed" + " " * 1000) * (n // 1006)),
    # the exact critic's equations in a rollout
    ("operator_chain_without_equals", exact_critic._equations, lambda n: "1+" * (n // 2) + "1"),
    ("run_of_parentheses", exact_critic._equations, lambda n: "(" * n + "x"),
    ("run_of_spaces", exact_critic._equations, lambda n: "1 +" + " " * n + "x"),
    ("unbalanced_parentheses", exact_critic._equations, lambda n: "(" * n + "1+1=2"),
    ("nested_parentheses", exact_critic._equations, lambda n: "(" * (n // 2) + "1+1" + ")" * (n // 2) + "=2"),
    ("thousands_groups", exact_critic._equations, lambda n: "1" + ",234" * (n // 4) + "5"),
    ("product_of_large_numbers", exact_critic._equations, lambda n: "99999*" * (n // 6) + "2=1"),
    ("exact_critic_run_of_spaces", lambda t: exact_critic.ExactArithmeticCritic().critique_one(PROBLEM, t),
     lambda n: "Step 1: 1 + 1 = 2, then 1 +" + " " * n + "x\n\\boxed{2}"),
    ("error_marks_many_steps", _error_marks, lambda n: "Step 1: x\n" * (n // 10) + "Step 2: 3"),
]
SIZES = {"many_step_markers": 50_000, "error_marks_many_steps": 20_000, "product_of_large_numbers": 20_000,
         "nested_parentheses": 50_000, "unbalanced_parentheses": 50_000}


@pytest.mark.parametrize("parse, make, n", [pytest.param(p, m, SIZES.get(name, 100_000), id=name)
                                            for name, p, m in SHAPES])
def test_parse_time_is_linear_in_the_input(parse, make, n):
    small, large = make(n), make(4 * n)
    t_small, t_large = _cpu_seconds(parse, small), _cpu_seconds(parse, large)
    ratio = t_large / max(t_small, 1e-6)
    assert ratio < RATIO, (f"{len(small):,} -> {len(large):,} characters: {t_small * 1e3:.1f} -> "
                           f"{t_large * 1e3:.1f} ms, x{ratio:.1f} (linear x4, quadratic x16)")


def test_the_largest_answer_the_client_accepts_parses_within_seconds():
    """A critique as large as infra/chat_client accepts (MAX_ANSWER_BYTES, 16 MiB) in the two slowest shapes for
    the schema's regexes (one line of spaces; many lines of spaces): one parse ends within DEADLINE_S, so a signal
    waits for it no longer (measured: under 0.5 s each, see critic.py's docstring)."""
    size = chat_client.MAX_ANSWER_BYTES
    for text in ("Case: A\nPivotal step: none\n" + " " * size + "x" + BODY,
                 ("Step 1" + " " * 25 + "x\n") * (size // 33) + BODY):
        _cpu_seconds(lambda t: critic.parse_critique(t, 1), text, repeats=1)


# ---------------------------------------------------------------------------------------------- same matches
# The backtracking patterns as they were before issue 30. The linear ones must match exactly the same text: on
# short strings over the characters the patterns care about, where backtracking is cheap, every match (span and
# groups) is compared.
_BEFORE = {
    "header": (prompts.CORRECTED_SOLUTION_HEADER,
               r"^[ \t]*[#*]*[ \t]*corrected solution[ \t]*\**[ \t]*:?[ \t]*\**[ \t]*$"),
    "case": (critic._CASE, r"^[ \t]*\**[ \t]*case[ \t]*\**[ \t]*:[ \t]*\**[ \t]*([ABCD])\b"),
    "pivot": (critic._PIVOT, r"^[ \t]*\**[ \t]*pivotal step[ \t]*\**[ \t]*:[ \t]*\**[ \t]*(\d+|none)\b"),
    "summary": (critic._SUMMARY_LINE, r"^[ \t]*[-*]?[ \t]*\**[ \t]*step[ \t]+(\d+)[ \t]*\**[ \t]*:[ \t]*\**[ \t]*"
                                      r"(correct|incorrect)\b"),
    "step_marker": (data._STEP_MARKER, r"^[ \t]*(?:[*#]+[ \t]*)?step[ \t]+(\d+)[ \t]*(?:\*\*)?[ \t]*[:.)]"),
    "marker_parts": (exact_critic._MARKER_PARTS,
                     r"^([ \t]*(?:[*#]+[ \t]*)?step[ \t]+)(\d+)([ \t]*(?:\*\*)?[ \t]*[:.)][ \t]*(?:\*\*)?[ \t]*)"),
}


def _schema_line(rng) -> str:
    """A line near the schema's: runs of spaces and marks around a keyword, a colon and a value."""
    def run():
        return rng.choice(["", "", " ", "  ", "\t", " \t ", "*", "**", "#", "- ", "* "])
    keyword, values = rng.choice([("Case", "AdE"), ("case", "Bx"), ("Pivotal step", ["1", "none", "12x", "None"]),
                                  ("Step 1", ["Correct", "Incorrect -- r", "correctly"]), ("step 12", ["correct"]),
                                  ("Step  3", ["Incorrect"]), ("Corrected solution", [""]), ("Step", ["Correct"]),
                                  ("corrected Solution", ["", "x"]), ("Step 1x", ["Correct"]), ("ſtep 2", ["Correct"])])
    value = rng.choice(values) if rng.random() < 0.8 else rng.choice(["", "A", "1", "x", "Correct"])
    colon = rng.choice(["", ":", ":", ":", ".", ")"])
    return run() + run() + keyword + run() + run() + colon + run() + run() + value + rng.choice(["", "", " ", "x"])


@pytest.mark.parametrize("name", sorted(_BEFORE))
def test_linear_patterns_match_what_the_backtracking_ones_matched(name):
    new, before = _BEFORE[name]
    old = re.compile(before, new.flags)
    rng = random.Random(0)
    matched = 0
    for _ in range(20_000):
        text = "\n".join(_schema_line(rng) for _ in range(rng.randint(1, 3)))
        got = [(m.span(), m.groups()[1:] if "marker" in new.groupindex else m.groups()) for m in new.finditer(text)]
        want = [(m.span(), m.groups()) for m in old.finditer(text)]
        assert got == want, repr(text)
        matched += bool(want)
    assert matched > 200, matched  # hundreds of matches; the other lines are near misses


def _chain_text(rng) -> str:
    """Numbers and operators with spaces, parentheses, commas and stray characters around them, mostly ending in
    "= number"."""
    def num():
        return rng.choice(["1", "23", "456", "7890", "1,234", "12,345,678", "1,2345", "-5", "١٢", "3.5", "0"])

    def sep():
        return rng.choice(["", "", " ", "  ", "(", " (", ")", ") ", "\n", "\t", "(("])
    parts = [rng.choice(["", "", "so ", "(", "x", "a.", "1,", "Step 1: "]) + sep() + num()]
    for _ in range(rng.randint(0, 3)):
        parts.append(sep() + rng.choice("+-*/×·÷") + sep() + num())
    parts.append(sep() + rng.choice(["=", "=", "= ", "=\t", "=\n", ""]) + num())
    parts.append(rng.choice(["", "", ".", ").", "x", "5", ".5", ",", " + 1 = 7", ", 3 * 4 = 12"]))
    if rng.random() < 0.5:
        parts.insert(rng.randint(0, len(parts)), rng.choice(["1", ",", " ", "(", ")", "=", "-", "x", "."]))
    return "".join(parts)


def test_linear_equation_search_finds_what_the_backtracking_search_found():
    """exact_critic._equation_matches (possessive, atomic, one start per chain) against re.finditer of the former
    backtracking pattern, on chains of numbers and operators with spaces, parentheses, commas, stray characters."""
    num = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)"
    old = re.compile(rf"(?<![\w.])(?P<lhs>[(\s]*{num}(?:[\s)]*[+\-*/×·÷][\s(]*{num})+[\s)]*)="
                     rf"[ \t]*(?P<rhs>{num})(?!\d)(?!\.\d)")
    rng = random.Random(0)
    matched = 0
    for _ in range(40_000):
        text = _chain_text(rng)
        got = [(m.span(), m.span("lhs"), m.span("rhs")) for m in exact_critic._equation_matches(text)]
        want = [(m.span(), m.span("lhs"), m.span("rhs")) for m in old.finditer(text)]
        assert got == want, repr(text)
        matched += bool(want)
    assert matched > 10_000
