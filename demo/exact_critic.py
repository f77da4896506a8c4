"""The exact arithmetic critic: always right on the problems of demo/arithmetic.py, in the LLM critic's schema.

`ExactArithmeticCritic().critique(batch)` checks every equation of every step of a response against the
problem's exact chain ("17 + 25 = 42", "42 * 3 = 126"; data.Problem.steps), with its own parser of integer
expressions (+ - * / × · ÷, parentheses, thousands separators), and writes the schema of
prompts.critic_messages as a faithful scribe: correct steps copied byte for byte, at the pivotal step only the
wrong claim replaced, then the continuation in the student's style. The case is read from the final answer
the grader reads (grading.answer_span): none -> C, wrong -> D, right -> A or B. It also locates the first
wrong claim (Critique.wrong_span), which `error_marks_from_spans` turns into token marks (ErrorMarks) for the
step diagnostics and the mechanism figure. Rollouts are outside text: reading them takes time linear in their
length whatever their shape (tests/test_parsing.py), and an equation that does not evaluate (unbalanced, or
of more digits than a number can be written with) is not judged, never raised.

Departures from the paper:
1. This critic is ours (CPU-sized experiments); the paper's critic is QwQ-32B. In case C (no final answer) it
   copies the correct steps verbatim rather than compressing them, and it drops a trailing step that was cut
   off before completing an equation, then completes the solution from there.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

import critic
import data
import grading
import prompts

_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)"  # 126, -8, 5,000
_OPS = "+\\-*/×·÷"
# An equation "lhs = rhs": lhs a chain of numbers joined by operators (spaces and parentheses around them), with
# at least one operator. Every run of the chain is possessive (*+ ++) and each of its numbers atomic (?>...), read
# once: the matches are those of the backtracking form, because a chain reads one way only (a number read shorter
# is followed by a digit or a comma, which neither continues nor ends a chain). Only the rhs backtracks, over its
# own digits. Where a search starts, and why that is linear too: _equation_matches.
_LHS_NUM = r"(?>-?(?:\d{1,3}(?:,\d{3})++|\d++))"  # _NUM, its longest reading only
_LINK = rf"[\s)]*+[{_OPS}][\s(]*+"  # an operator between two numbers
_EQUATION = re.compile(rf"(?P<lhs>[(\s]*+{_LHS_NUM}(?:{_LINK}{_LHS_NUM})++[\s)]*+)="
                       rf"[ \t]*+(?P<rhs>{_NUM})(?!\d)(?!\.\d)")
# the chain read from a start, to its last number (group "last"; "first" when it has one number)
_CHAIN = re.compile(rf"[(\s]*+(?P<first>{_LHS_NUM})(?:{_LINK}(?P<last>{_LHS_NUM}))*+")
# Where an equation may start: a number, or the run of "(" and spaces before it, not right after a letter, a digit
# or a point (where the run follows one, its second character), as the lookbehind (?<![\w.]) of a search from every
# position would first start it. A later start inside the same run reads the same chain: it is not tried.
_START = re.compile(r"(?:(?<![\w.(\s])|(?<=[\w.][(\s]))[(\s]*+-?\d")
_TOKEN = re.compile(rf"\d{{1,3}}(?:,\d{{3}})+|\d+|[{_OPS}()]")
_CANON = {"×": "*", "·": "*", "÷": "/"}
# Every value of an expression (numerator and denominator) has at most as many digits as int() reads from text
# and str() writes (sys.int_info.default_max_str_digits, 4300), so that a reason can print it; an expression
# that goes past it is not judged. It also bounds the cost of each operation, whatever numbers a rollout chains.
_TOO_LARGE = 10 ** sys.int_info.default_max_str_digits
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3}


def _eval_expression(expr: str) -> tuple[Fraction, list]:
    """Value of an integer expression with + - * / and parentheses, usual precedence, unary minus binding
    tightest; also its tokens. Raises ValueError for anything else, and for a value of _TOO_LARGE or more.

    Iterative (operator precedence with two stacks), so that nesting depth is no recursion depth: the tree is
    the one of the grammar sum := product (+|- product)*, product := atom (*|/ atom)*, atom := -atom | (sum) | N.
    """
    tokens = [_CANON.get(t, t) for t in _TOKEN.findall(expr)]
    values: list[Fraction] = []
    ops: list[str] = []  # pending operators and open parentheses

    def reduce() -> None:  # apply the operator on top of the stack to its operands
        op = ops.pop()
        if op == "neg":
            value = -values.pop()
        else:
            rhs, lhs = values.pop(), values.pop()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = lhs + rhs if op == "+" else lhs - rhs if op == "-" else lhs * rhs if op == "*" else lhs / rhs
        if abs(value.numerator) >= _TOO_LARGE or value.denominator >= _TOO_LARGE:
            raise ValueError(f"a value of more than {sys.int_info.default_max_str_digits} digits")
        values.append(value)

    want_operand = True
    for t in tokens:
        if want_operand:
            if t == "-":
                ops.append("neg")
            elif t == "(":
                ops.append(t)
            elif t.replace(",", "").isdigit():
                values.append(Fraction(int(t.replace(",", ""))))  # int() refuses over 4300 digits (ValueError)
                want_operand = False
            else:
                raise ValueError(f"expected a number, got {t!r}")
        elif t == ")":
            while ops and ops[-1] != "(":
                reduce()
            if not ops:
                raise ValueError("unbalanced parentheses")
            ops.pop()
        elif t in ("+", "-", "*", "/"):
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[t]:  # left-associative
                reduce()
            ops.append(t)
            want_operand = True
        else:
            raise ValueError("trailing tokens")
    if want_operand:
        raise ValueError("expected a number, got None")
    while ops:
        if ops[-1] == "(":
            raise ValueError("unbalanced parentheses")
        reduce()
    return values[0], tokens


@dataclass
class _Equation:
    start: int  # span of "lhs = rhs" in the step text
    end: int
    rhs_start: int
    lhs: str  # stripped, as written
    claimed: int
    value: Fraction  # the true value of lhs
    operands: tuple[int, str, int] | None  # (a, op, b) for a single-operation equation


def _equation_matches(text: str) -> Iterator[re.Match]:
    """The "lhs = rhs" matches in `text`, left to right, without overlap: those of a search from every position
    (re.finditer with the lookbehind (?<![\\w.])), found in time linear in len(text), whatever its shape.

    A start whose chain reaches no "= number" is passed over with its chain (the search from every position read
    it again from each): a later start inside it reads the same chain to the same end and fails the same way,
    except from the last group of digits of its last number ("1,2345": "2345" is a number of its own)."""
    pos = 0
    while (begin := _START.search(text, pos)) is not None:
        m = _EQUATION.match(text, begin.start())
        if m is None:
            chain = _CHAIN.match(text, begin.start())
            last_start, last_end = chain.span("last") if chain.group("last") is not None else chain.span("first")
            comma = text.rfind(",", last_start, last_end)
            pos = last_end if comma == -1 else comma + 1  # past at least the chain's first character
            continue
        pos = m.end()
        yield m


def _equations(text: str) -> list[_Equation]:
    """The equations of `text` that evaluate, left to right (_equation_matches); linear in len(text)."""
    found = []
    for m in _equation_matches(text):
        lhs = m.group("lhs").strip()
        # drop parentheses that belong to the surrounding prose, e.g. "(so 17 + 25 = 42)": counted once, cut by
        # index (counting and slicing again for each one was quadratic in a run of parentheses)
        i, j, opens, closes = 0, len(lhs), lhs.count("("), lhs.count(")")
        while opens > closes and i < j and lhs[i] == "(":
            i, opens = i + 1, opens - 1
            while i < j and lhs[i].isspace():
                i += 1
        while closes > opens and i < j and lhs[j - 1] == ")":
            j, closes = j - 1, closes - 1
            while i < j and lhs[j - 1].isspace():
                j -= 1
        lhs = lhs[i:j]
        try:
            value, tokens = _eval_expression(lhs)
            claimed = int(m.group("rhs").replace(",", ""))  # int() refuses over 4300 digits (ValueError)
        except ValueError:
            continue
        operands = None
        if len(tokens) == 3 and tokens[1] in "+-*/":
            operands = (int(tokens[0].replace(",", "")), tokens[1], int(tokens[2].replace(",", "")))
        start = m.start("lhs") + (len(m.group("lhs")) - len(m.group("lhs").lstrip()))
        found.append(_Equation(start, m.end("rhs"), m.start("rhs"), lhs, claimed, value, operands))
    return found


def copied_correct_equations(response: str, corrected: str) -> int:
    """How many true equations of `response` a corrected solution copies verbatim before it departs from the
    response: those that end inside the two texts' common prefix. A wrong attempt with one or more is one where
    alignment can matter: the critic keeps its correct work and corrects a later claim."""
    shared = len(os.path.commonprefix([response, corrected]))
    return sum(eq.end <= shared and eq.value == eq.claimed for eq in _equations(response))


def _chain(problem: data.Problem) -> list[tuple[int, str, int, int]]:
    """The problem's exact steps "a op b = r" as tuples."""
    if not problem.steps:
        raise ValueError(f"problem {problem.id}: ExactArithmeticCritic needs a problem with exact steps "
                         "(demo/arithmetic.py)")
    chain = []
    for step in problem.steps:
        eqs = _equations(step)
        if len(eqs) != 1 or eqs[0].operands is None or eqs[0].value != eqs[0].claimed:
            raise ValueError(f"problem {problem.id}: step {step!r} is not a true equation 'a op b = r'")
        a, op, b = eqs[0].operands
        chain.append((a, op, b, eqs[0].claimed))
    return chain


def _chain_index(eq: _Equation, chain: list[tuple[int, str, int, int]]) -> int | None:
    """Which step of the exact chain this equation computes (its operands and operation), if any."""
    for j, (a, op, b, r) in enumerate(chain):
        if eq.operands is not None:
            x, o, y = eq.operands
            if o == op and ((x, y) == (a, b) or (op in "+*" and (x, y) == (b, a))):
                return j
        elif eq.value == r:  # a multi-operation equation: judged by the value it reaches
            return j
    return None


def _judge(eq: _Equation, chain: list, expected: int) -> tuple[bool, int | None, str | None]:
    """(valid, chain index, reason if invalid): true arithmetic AND a step of the problem's computation.
    `expected` is the index of the chain step the student is presumably attempting (for the reason only)."""
    j = _chain_index(eq, chain)
    if eq.value != eq.claimed:
        return False, j, f"{eq.lhs} = {_fmt(eq.value)}, not {eq.claimed}"
    if j is None:
        if expected < len(chain):
            a, op, b, _ = chain[expected]
            return False, None, f"{eq.lhs} is not the problem's computation at this point, {a} {op} {b}"
        return False, None, f"{eq.lhs} is not a step of the problem's computation"
    return True, j, None


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


@dataclass
class _Style:
    """How the student writes: step marker, operator symbols, spacing; used for the continuation."""
    marker_prefix: str = "Step "
    marker_suffix: str = ": "
    symbols: dict | None = None
    spaced: bool = True

    def equation(self, a: int, op: str, b: int, r: int) -> str:
        sym = (self.symbols or {}).get(op, op)
        return f"{a} {sym} {b} = {r}" if self.spaced else f"{a}{sym}{b}={r}"

    def step(self, i: int, a: int, op: str, b: int, r: int) -> str:
        return f"{self.marker_prefix}{i}{self.marker_suffix}{self.equation(a, op, b, r)}"


# data._STEP_MARKER in three parts, possessive as it is (linear, the same matches)
_MARKER_PARTS = re.compile(r"^([ \t]*+(?:[*#]++[ \t]*+)?+step[ \t]++)(\d++)"
                           r"([ \t]*+(?:\*\*)?+[ \t]*+[:.)][ \t]*+(?:\*\*)?+[ \t]*+)", re.IGNORECASE)


def _style_of(steps: list[str]) -> _Style:
    style = _Style(symbols={})
    marker = _MARKER_PARTS.match(steps[0]) if steps else None
    if marker is not None:
        style.marker_prefix, style.marker_suffix = marker.group(1), marker.group(3) or ": "
    for step in steps:
        for eq in _equations(step):
            for sym in re.findall(rf"[{_OPS}]", eq.lhs):
                style.symbols.setdefault(_CANON.get(sym, sym), sym)
    first = next((eq for s in steps for eq in _equations(s)), None)
    if first is not None:
        style.spaced = " " in first.lhs
    return style


def _same_integer(answer: str, gold: str) -> bool:
    try:
        return int(answer.strip().replace(" ", "").replace(",", "")) == int(gold)
    except ValueError:
        return False


def _replace_number(text: str, old: int, new: int) -> str:
    """Replace later mentions of the number `old` (written with or without thousands separators)."""
    forms = sorted({str(old), f"{old:,}"}, key=len, reverse=True)
    pattern = "|".join(re.escape(f) for f in forms)
    return re.sub(rf"(?<![\d.,])(?:{pattern})(?![\d]|,\d)", str(new), text)


def _fix_step(text: str, chain: list, progress: int, style: _Style):
    """Correct a wrong step: replace only the wrong claims, keep everything else the student wrote.

    Repeatedly takes the first invalid equation: when it computes a step of the chain (right operands)
    only its result is replaced; otherwise the whole equation is replaced by the chain's next step, or, once
    the chain is complete, removed with the rest of the step (an extra computation past the answer has no
    right version). Later mentions of the wrong number in the same step take the corrected value. Returns
    (text, progress, first wrong claim (start, end, claimed, corrected) with offsets in the original text, or
    None); a removed equation is claimed "lhs = rhs" and corrected to "" (nothing), and a step left with only
    its marker is returned as ""."""
    first = None
    for _ in range(4 * len(chain) + 4):
        bad = None
        for eq in _equations(text):
            ok, j, _ = _judge(eq, chain, progress)
            if ok:
                progress = max(progress, j + 1)
            else:
                bad = (eq, j)
                break
        if bad is None:
            break
        eq, j = bad
        if j is not None:  # right computation, wrong result: replace the result only
            new_value = chain[j][3] if eq.operands is not None else int(eq.value)
            span, replacement = (eq.rhs_start, eq.end), str(new_value)
        elif progress < len(chain):  # not a step of the computation: the chain's next step instead
            a, op, b, new_value = chain[progress]
            span, replacement = (eq.start, eq.end), style.equation(a, op, b, new_value)
        else:  # past the end of the chain: the extra computation and the rest of the step are removed
            if first is None:
                first = (eq.start, eq.end, text[eq.start:eq.end], "")
            kept = text[:eq.start]
            return (kept.rstrip(" \t\n,;:") if _MARKER_PARTS.sub("", kept).strip() else ""), progress, first
        if first is None:
            first = (span[0], span[1], str(eq.claimed), str(new_value))  # offsets in the original step text
        text = text[:span[0]] + replacement + _replace_number(text[span[1]:], eq.claimed, new_value)
    return text, progress, first


class ExactArithmeticCritic:
    """A critic that is always right on arithmetic problems with exact steps, writing the same schema as the
    LLM critic: a faithful scribe that copies correct steps byte for byte and replaces only the wrong claim."""

    def critique(self, batch: list[tuple[data.Problem, str]]) -> list[critic.Critique]:
        return [self.critique_one(problem, response) for problem, response in batch]

    def critique_one(self, problem: data.Problem, response: str) -> critic.Critique:
        chain = _chain(problem)
        spans = data.step_spans(response)
        steps = [response[s:e] for s, e in spans]
        style = _style_of(steps)
        # judge every equation of every step; progress = chain steps covered so far
        # (expected = the chain step the student is attempting: each equation attempts one step)
        step_ok, reasons, progress_after, progress, expected = [], [], [0], 0, 0
        for step in steps:
            ok, reason = True, None
            for eq in _equations(step):
                valid, j, why = _judge(eq, chain, expected)
                if valid:
                    progress = max(progress, j + 1)
                elif ok:
                    ok, reason = False, why
                expected = max(expected, j + 1) if j is not None else expected + 1
            step_ok.append(ok)
            reasons.append(reason)
            progress_after.append(progress)
        boxed = grading.answer_span(response)  # the box the grader reads
        if boxed is None:
            case = "C"
        elif not _same_integer(response[boxed[0]:boxed[1]], problem.answer):
            case = "D"
        else:
            case = "A" if all(step_ok) else "B"
        pivot = next((i for i, ok in enumerate(step_ok, start=1) if not ok), None)

        wrong_claim = wrong_span = corrected_claim = None
        if pivot is None:
            keep = len(steps)
            # a last step cut off before it completed anything is completed below instead of copied
            if case == "C" and keep > 0 and progress_after[keep] == progress_after[keep - 1]:
                keep -= 1
            lines, progress = steps[:keep], progress_after[keep]
            if case == "D":  # every step right, the final answer wrong (or stopped early)
                wrong_claim, wrong_span, corrected_claim = response[boxed[0]:boxed[1]], boxed, problem.answer
        else:
            fixed, progress, first = _fix_step(steps[pivot - 1], chain, progress_after[pivot - 1], style)
            lines = steps[:pivot - 1] + ([fixed] if fixed else [])  # "": the step was only an extra computation
            if first is not None:
                offset = spans[pivot - 1][0]
                wrong_span = (offset + first[0], offset + first[1])
                wrong_claim, corrected_claim = response[wrong_span[0]:wrong_span[1]], first[3]
        for a, op, b, r in chain[progress:]:
            lines.append(style.step(len(lines) + 1, a, op, b, r))
        final = self._final_line(response, spans, problem.answer)
        if not (lines and f"\\boxed{{{problem.answer}}}" in lines[-1]):
            lines.append(final)
        text = prompts.format_critique(case, pivot, step_ok, reasons, "\n".join(lines))
        return critic.Critique(text=text, case=case, pivot_step=pivot, step_ok=step_ok, schema_ok=True,
                               wrong_claim=wrong_claim, wrong_span=wrong_span, corrected_claim=corrected_claim,
                               raw=text)

    @staticmethod
    def _final_line(response: str, spans: list[tuple[int, int]], answer: str) -> str:
        """The student's final-answer line with the right answer in its box, or a plain \\boxed{answer}."""
        tail = response[spans[-1][1]:] if spans else ""
        for line in tail.splitlines():
            box = grading.answer_span(line)
            if box is not None:
                return (line[:box[0]] + answer + line[box[1]:]).strip()
        return f"\\boxed{{{answer}}}"


# ---------------------------------------------------------------------------------------------- token marks
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
    ws, we = wrong_span
    if not 0 <= ws < we <= len(text):
        raise ValueError(f"wrong span {wrong_span} outside the rollout text of {len(text)} characters")
    line_start = text.rfind("\n", 0, ws) + 1
    line_end = text.find("\n", ws)
    line_end = len(text) if line_end == -1 else line_end
    steps = data.step_spans(text)
    step = next(((s, e) for s, e in steps if s <= ws and we <= e), None)
    if step is not None:  # the line, cut to its step (a step may start mid-line after a preamble)
        line_start, line_end = max(line_start, step[0]), min(line_end, step[1])
    claim = _overlapping(token_spans, ws, we)  # (T,)
    in_step = np.flatnonzero(_overlapping(token_spans, line_start, max(line_end, we)))
    if not claim.any() or len(in_step) == 0:
        raise ValueError(f"no token covers the wrong span {wrong_span} ({text[ws:we]!r})")
    error_start, error_end = int(in_step[0]), int(in_step[-1]) + 1
    # tokens that meet a step's text before line_start: by a prefix count of those characters, one pass for all
    # the steps (a pass over the tokens per step was O(steps x T))
    marked = np.zeros(len(text) + 1, dtype=np.int64)  # (len + 1,) +1 where a step's part starts, -1 where it ends
    for s, e in steps:
        if s < line_start:
            marked[s] += 1
            marked[min(e, line_start)] -= 1
    covered = np.concatenate([[0], np.cumsum(np.cumsum(marked)[:-1] > 0)])  # (len + 1,) marked characters before i
    bounds = np.clip(np.asarray(token_spans, dtype=np.int64).reshape(-1, 2), 0, len(text))  # (T, 2)
    earlier = covered[bounds[:, 1]] > covered[bounds[:, 0]]  # (T,) a marked character in [start, end)
    earlier[error_start:] = False
    return ErrorMarks(error_start, error_end, claim, earlier)
