"""Critic and teacher contexts: the three feedback forms c that the self-teacher sees.

- `student_messages(problem)`: the solver's prompt (problem + STEP_FORMAT); no context.
- `teacher_messages(problem, feedback, context_text)`: the self-teacher's prompt, one `if` per feedback form:
  "stepalign" (the critique, presented as expert feedback on an earlier attempt), "refsol" (a reference
  solution, as in OPSD) and "verdict" (`verdict_text(response, correct)`: the attempt's final answer and whether
  the verifier accepted it; no solution, no critique). GRPO has no teacher.
- `render(tokenizer, messages, thinking)`: the chat template, with the thinking switch per role (the paper:
  student off, teacher on). Rollout tokens y are appended to this string's ids, never re-tokenized.
- The StepAlignFB critic: `critic_messages(problem, response)` asks for ONE schema, no preamble:

      Case: D
      Pivotal step: 2
      Summary:
      Step 1: Correct
      Step 2: Incorrect -- 42 * 3 = 126, not 136
      Corrected solution:
      Step 1: 17 + 25 = 42          <- correct steps copied verbatim
      Step 2: 42 * 3 = 126          <- at the pivotal step only the wrong claim replaced
      Step 3: 126 - 4 = 122         <- continuation in the student's style
      \\boxed{122}

  `parse_critique(raw, n_steps, think_in_prompt)` strips `<think>` traces and validates it (one summary line per
  student step, a case, a pivotal step that is the first Incorrect line); text that does not validate is kept
  with `schema_ok=False`, counted by `critique_metrics` as `critic_schema_ok`. Whether such a critique still
  reaches the teacher is train.py's `--critic-unstructured` (skip by default).
- Think traces, both template styles: the tag in the output ("<think>…</think>answer", Qwen3) and the tag in
  the prompt (QwQ-32B's template ends the prompt with "<think>\n", so the output is "…</think>answer").
  A critique cut by the token limit (finish_reason "length") is a failure with error_kind "length" in every
  backend, whichever the style: with the tag in the prompt it has no tag at all and would otherwise pass as
  text. `MAX_TOKENS` is the one default budget.
- Backends, each with `.critique(batch: list[(Problem, response)]) -> list[Critique]`:
  `ServerCritic` (an OpenAI-compatible /v1/chat/completions server, e.g. `vllm serve Qwen/QwQ-32B
  --enable-prefix-caching`; stdlib only), `LocalCritic` (a transformers model, greedy, batched) and
  `ExactArithmeticCritic` (always right on `data.arithmetic_problems`, same schema). A ServerCritic failure for
  one item (down, timeout, HTTP error, malformed answer, cut by the length limit) gives a Critique with `error`
  (a message) and `error_kind` (a short reason to count by) set: it never raises into the training loop and
  never hangs. `ServerCritic.check()` is the preflight before a run: the model list, then a one-token
  completion, with a short timeout; it raises `CriticUnavailable` with one line naming the URL and what failed
  (never the key). LocalCritic and ExactArithmeticCritic run in-process: an exception there
  (out of memory, a problem without exact steps) is a configuration error and is raised.

Run the tests:  python -m pytest tests/test_critic.py -q

Departures from the paper:
1. The prompts are written in our own words after the paper's description (cases A–D, pivotal step,
   verbatim copy, corrected continuation); the paper's exact wording is not reproduced.
2. The schema adds two header lines, "Case:" and "Pivotal step:", so that a critique can be validated
   and its case counted without a second model call.
3. `ExactArithmeticCritic` is ours (CPU-sized experiments): it checks every equation of every step against
   the problem's exact chain. In case C (no final answer) it copies the correct steps verbatim rather
   than compressing them, and it drops a trailing step that was cut off before completing an equation,
   then completes the solution from there.
4. A critic that runs out of tokens (finish_reason "length") gives no critique: the item is a failure
   (error_kind "length"), counted, never guessed at. The paper gives no budget; ours is MAX_TOKENS (16,384).
   An answer that ended normally but never closed its trace (`think_in_prompt`, or an unclosed "<think>")
   leaves an empty critique, which fails validation.
5. The "verdict" form (issue 6, the outcome-in-context baseline) is ours. Its text states the attempt's final
   answer (the last \\boxed{}, as the grader reads it) and "correct" or "incorrect"; the gold answer is not
   an input of `verdict_text`, so a wrong attempt's verdict cannot reveal it. An attempt without a final answer
   is said to have none and to count as incorrect. Its prompt has stepalign's layout (problem, one framing
   sentence, the delimited context, the same closing instruction, STEP_FORMAT); only c and the nouns naming it
   differ.
6. The "turns" teacher layout (`--teacher-layout turns`) is ours, for small self-teachers: the paper puts c in
   one user turn with the problem. "turns" continues the student's own chat: its prompt, the attempt y as the
   assistant's turn, then "Feedback: c" and a request for the corrected solution in the same format. On the
   135M demo model the paper's layout makes the teacher write prose and stop answering in the format, so its
   samples are right less often than the student's; "turns" keeps the format (docs/demo/teacher_gap.md).
   RefSol under "turns" also sees the attempt, which the OPSD teacher does not.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from fractions import Fraction

from data import STEP_FORMAT, Problem, split_steps, step_spans, strip_think

# The critic's generation budget, its <think> trace included: one default for ServerCritic, LocalCritic,
# train.py and the difficulty filter. The paper does not give one. A reasoning critic's trace counts against
# it, so it is generous; with the critic prompt (problem, reference solution, a rollout of up to 2,048 tokens)
# it still fits a 32k-token context. An answer cut by this limit is a failure (error_kind "length"), never a
# critique.
MAX_TOKENS = 16384


@dataclass
class Critique:
    text: str  # the feedback c given to the teacher (think trace removed)
    case: str | None = None  # 'A' | 'B' | 'C' | 'D' when the schema validated
    pivot_step: int | None = None  # 1-based index of the first wrong student step
    step_ok: list[bool] | None = None  # one verdict per student step
    schema_ok: bool = False
    error: str | None = None  # the backend failed for this item (text is then empty); a message for people
    # why, for counting: "refused", "timeout", "connection", "http_<status>", "malformed", "length"
    error_kind: str | None = None
    schema_error: str | None = None  # why the schema did not validate
    # where the wrong claim is in the student's response (ExactArithmeticCritic only; for figures)
    wrong_claim: str | None = None  # e.g. "136"
    wrong_span: tuple[int, int] | None = None  # [start, end) character offsets in the response
    corrected_claim: str | None = None  # e.g. "126"


# ---------------------------------------------------------------------------------------------- prompts
def student_messages(problem: Problem) -> list[dict]:
    return [{"role": "user", "content": f"{problem.problem}\n\n{STEP_FORMAT}"}]


TEACHER_LAYOUTS = ("paper", "turns")


def teacher_messages(problem: Problem, feedback: str, context_text: str, layout: str = "paper",
                     attempt: str | None = None) -> list[dict]:
    """The self-teacher's prompt: the problem plus the feedback c of the given form.

    layout "paper": one user turn, the problem, then c framed for its form, then the step format.
    layout "turns": the student's own conversation continued: the student prompt, the attempt y as the
    assistant's turn, then c in a user turn asking for the corrected solution in the same format. The framing
    is the same for every form, so c stays the one thing that varies (departure 6)."""
    if layout == "turns":
        if attempt is None:
            raise ValueError("teacher layout 'turns' needs the attempt y")
        if feedback not in ("stepalign", "refsol", "verdict"):
            raise ValueError(f"unknown feedback form {feedback!r}; expected 'stepalign', 'refsol' or 'verdict'")
        return student_messages(problem) + [
            {"role": "assistant", "content": attempt},
            {"role": "user", "content": f"Feedback:\n{context_text}\n\nWrite the corrected solution in the same "
                                        "format."}]
    if layout != "paper":
        raise ValueError(f"unknown teacher layout {layout!r}; expected one of {TEACHER_LAYOUTS}")
    if feedback == "stepalign":
        content = (f"{problem.problem}\n\n"
                   "An expert reviewed an earlier attempt at this problem. The review below judges each step "
                   "of that attempt by its number and then gives a corrected solution that keeps the correct "
                   "steps and continues to the answer.\n\n"
                   f"=== Expert review ===\n{context_text}\n=== End of review ===\n\n"
                   "Now write your own fresh, self-contained solution to the problem. Do not mention the "
                   f"review or the earlier attempt.\n\n{STEP_FORMAT}")
        return [{"role": "user", "content": content}]
    if feedback == "refsol":
        content = (f"{problem.problem}\n\n"
                   f"Here is a reference solution to this problem:\n\n{context_text}\n\n"
                   "With the reference solution in mind, solve the problem yourself, in your own words.\n\n"
                   f"{STEP_FORMAT}")
        return [{"role": "user", "content": content}]
    if feedback == "verdict":
        content = (f"{problem.problem}\n\n"
                   "A verifier checked the final answer of an earlier attempt at this problem against the correct "
                   "answer. Its verdict is below.\n\n"
                   f"=== Verdict ===\n{context_text}\n=== End of verdict ===\n\n"
                   "Now write your own fresh, self-contained solution to the problem. Do not mention the "
                   f"verdict or the earlier attempt.\n\n{STEP_FORMAT}")
        return [{"role": "user", "content": content}]
    raise ValueError(f"unknown feedback form {feedback!r}; expected 'stepalign', 'refsol' or 'verdict'")


def verdict_text(response: str, correct: bool) -> str:
    """The verdict context c: the attempt's final answer (its last \\boxed{}) and whether it is correct.

    `correct` is the verifier's grade of `response` (evaluate.grade). The gold answer is deliberately not an
    argument: a wrong attempt learns only that its answer is wrong (departure 5).
    """
    from evaluate import extract_answer  # imported here: evaluate.py is not otherwise a dependency of critic.py

    answer = extract_answer(response)
    if answer is None:
        if correct:
            raise ValueError("verdict_text: correct=True for a response without a final \\boxed{} answer")
        return "The earlier attempt did not give a final answer (no \\boxed{} answer), so it counts as incorrect."
    judgement = "correct" if correct else "incorrect"
    return f"The earlier attempt's final answer was {answer}. This answer is {judgement}."


def render(tokenizer, messages: list[dict], thinking: bool) -> str:
    """The prompt string: chat template, generation prompt appended, thinking mode on or off (Qwen3's
    `enable_thinking`; templates without the switch ignore it)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def critic_messages(problem: Problem, response: str) -> list[dict]:
    """The StepAlignFB critic prompt: problem, reference answer (and solution), the student's numbered steps."""
    n = len(split_steps(response))
    reference = (f"Reference solution (to help you judge; do not copy its wording):\n{problem.reference_solution}\n\n"
                 if problem.reference_solution else "")
    content = (
        "You are checking a student's solution to a math problem, step by step, and writing feedback that "
        "shows the student exactly where the solution first goes wrong.\n\n"
        f"Problem:\n{problem.problem}\n\n"
        f"Reference answer: {problem.answer}\n\n"
        f"{reference}"
        f"Student's solution ({n} numbered steps):\n{response}\n\n"
        "Put the attempt in exactly one case:\n"
        "A: the final answer is correct and every step is correct.\n"
        "B: the final answer is correct, but some non-routine step is unjustified or invalid.\n"
        "C: there is no final answer (the student ran out of room).\n"
        "D: the final answer is wrong.\n"
        "The pivotal step N is the first incorrect step; write \"none\" when no step is incorrect.\n\n"
        "Reply with exactly the following and nothing else, no preamble:\n"
        "Case: <A, B, C or D>\n"
        "Pivotal step: <N or none>\n"
        "Summary:\n"
        f"<one line per student step, {n} lines in order: \"Step i: Correct\" or "
        "\"Step i: Incorrect -- <short reason>\">\n"
        "Corrected solution:\n"
        "<the solution, rewritten by these rules>\n\n"
        "Rules for the corrected solution:\n"
        "- Copy each correct step before step N exactly as the student wrote it: the same words, notation, "
        "numbers and line breaks, character for character.\n"
        "- At step N keep the student's wording and replace only the wrong claim by the right one.\n"
        "- Then continue in the student's style, with steps numbered \"Step i:\", until the final answer, "
        "written as \\boxed{answer}.\n"
        "- Case A: copy the student's solution unchanged. Case C: you may shorten the correct steps, then "
        "complete the solution.")
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------- the schema
_CASE = re.compile(r"^[ \t]*\**[ \t]*case[ \t]*\**[ \t]*:[ \t]*\**[ \t]*([ABCD])\b", re.IGNORECASE | re.MULTILINE)
_PIVOT = re.compile(r"^[ \t]*\**[ \t]*pivotal step[ \t]*\**[ \t]*:[ \t]*\**[ \t]*(\d+|none)\b",
                    re.IGNORECASE | re.MULTILINE)
_HEADER = re.compile(r"^[ \t]*[#*]*[ \t]*corrected solution[ \t]*\**[ \t]*:?[ \t]*\**[ \t]*$",
                     re.IGNORECASE | re.MULTILINE)
_SUMMARY_LINE = re.compile(r"^[ \t]*[-*]?[ \t]*\**[ \t]*step[ \t]+(\d+)[ \t]*\**[ \t]*:[ \t]*\**[ \t]*"
                           r"(correct|incorrect)\b", re.IGNORECASE | re.MULTILINE)


def format_critique(case: str, pivot_step: int | None, step_ok: list[bool], reasons: list[str | None],
                    corrected_solution: str) -> str:
    """The one schema, as the critic prompt asks for it."""
    lines = [f"Case: {case}", f"Pivotal step: {pivot_step if pivot_step is not None else 'none'}", "Summary:"]
    for i, (ok, reason) in enumerate(zip(step_ok, reasons), start=1):
        lines.append(f"Step {i}: Correct" if ok else f"Step {i}: Incorrect -- {reason}")
    lines += ["Corrected solution:", corrected_solution]
    return "\n".join(lines)


def parse_critique(raw: str, n_steps: int, think_in_prompt: bool = False) -> Critique:
    """Strip think traces and validate the schema against a student solution of `n_steps` steps.

    think_in_prompt: the critic's prompt ended with an open <think> tag (data.strip_think's `opened`)."""
    text = strip_think(raw, opened=think_in_prompt)

    def unstructured(why: str) -> Critique:
        return Critique(text=text, schema_ok=False, schema_error=why)

    header = _HEADER.search(text)
    if header is None:
        return unstructured("no 'Corrected solution:' line")
    if not text[header.end():].strip():
        return unstructured("the corrected solution is empty")
    head = text[:header.start()]
    case = _CASE.search(head)
    if case is None:
        return unstructured("no 'Case: A|B|C|D' line before the corrected solution")
    pivot = _PIVOT.search(head)
    if pivot is None:
        return unstructured("no 'Pivotal step: N|none' line before the corrected solution")
    summary = _SUMMARY_LINE.findall(head)
    indices = [int(i) for i, _ in summary]
    if indices != list(range(1, n_steps + 1)):
        return unstructured(f"summary lines for steps {indices}, expected 1..{n_steps}")
    step_ok = [verdict.lower() == "correct" for _, verdict in summary]
    pivot_step = None if pivot.group(1).lower() == "none" else int(pivot.group(1))
    first_wrong = next((i for i, ok in enumerate(step_ok, start=1) if not ok), None)
    if pivot_step != first_wrong:
        return unstructured(f"pivotal step {pivot_step} is not the first incorrect step ({first_wrong})")
    case_letter = case.group(1).upper()
    if case_letter == "A" and first_wrong is not None:
        return unstructured("case A with an incorrect step")
    return Critique(text=text, case=case_letter, pivot_step=pivot_step, step_ok=step_ok, schema_ok=True)


def critique_metrics(critiques: list[Critique]) -> dict[str, float]:
    """Batch metrics: critic_schema_ok (fraction that validated), critic_error (fraction the backend failed
    on; these also count as not schema_ok) and the fraction of each case among all critiques."""
    n = len(critiques)
    if n == 0:
        return {}
    metrics = {"critic_schema_ok": sum(c.schema_ok for c in critiques) / n,
               "critic_error": sum(c.error is not None for c in critiques) / n}
    for letter in "ABCD":
        metrics[f"critic_case_{letter}"] = sum(c.case == letter for c in critiques) / n
    return metrics


# ---------------------------------------------------------------------------------------------- exact critic
_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)"  # 126, -8, 5,000
_OPS = "+\\-*/×·÷"
_EQUATION = re.compile(rf"(?<![\w.])(?P<lhs>[(\s]*{_NUM}(?:[\s)]*[{_OPS}][\s(]*{_NUM})+[\s)]*)="
                       rf"[ \t]*(?P<rhs>{_NUM})(?!\d)(?!\.\d)")
_TOKEN = re.compile(rf"\d{{1,3}}(?:,\d{{3}})+|\d+|[{_OPS}()]")
_CANON = {"×": "*", "·": "*", "÷": "/"}


def _eval_expression(expr: str) -> tuple[Fraction, list]:
    """Value of an integer expression with + - * / and parentheses, usual precedence; also its tokens."""
    tokens = [_CANON.get(t, t) for t in _TOKEN.findall(expr)]
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom() -> Fraction:
        t = take() if peek() is not None else None
        if t == "-":
            return -atom()
        if t == "(":
            value = sum_()
            if take() != ")":
                raise ValueError("unbalanced parentheses")
            return value
        if t is None or not t.replace(",", "").isdigit():
            raise ValueError(f"expected a number, got {t!r}")
        return Fraction(int(t.replace(",", "")))

    def product() -> Fraction:
        value = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def sum_() -> Fraction:
        value = product()
        while peek() in ("+", "-"):
            op, rhs = take(), product()
            value = value + rhs if op == "+" else value - rhs
        return value

    value = sum_()
    if pos != len(tokens):
        raise ValueError("trailing tokens")
    return value, tokens


@dataclass
class _Equation:
    start: int  # span of "lhs = rhs" in the step text
    end: int
    rhs_start: int
    lhs: str  # stripped, as written
    claimed: int
    value: Fraction  # the true value of lhs
    operands: tuple[int, str, int] | None  # (a, op, b) for a single-operation equation


def _equations(text: str) -> list[_Equation]:
    found = []
    for m in _EQUATION.finditer(text):
        lhs = m.group("lhs").strip()
        # drop parentheses that belong to the surrounding prose, e.g. "(so 17 + 25 = 42)"
        while lhs.count("(") > lhs.count(")") and lhs.startswith("("):
            lhs = lhs[1:].lstrip()
        while lhs.count(")") > lhs.count("(") and lhs.endswith(")"):
            lhs = lhs[:-1].rstrip()
        try:
            value, tokens = _eval_expression(lhs)
        except ValueError:
            continue
        operands = None
        if len(tokens) == 3 and tokens[1] in "+-*/":
            operands = (int(tokens[0].replace(",", "")), tokens[1], int(tokens[2].replace(",", "")))
        start = m.start("lhs") + (len(m.group("lhs")) - len(m.group("lhs").lstrip()))
        found.append(_Equation(start, m.end("rhs"), m.start("rhs"), lhs, int(m.group("rhs").replace(",", "")), value, operands))
    return found


def _chain(problem: Problem) -> list[tuple[int, str, int, int]]:
    """The problem's exact steps "a op b = r" as tuples."""
    if not problem.steps:
        raise ValueError(f"problem {problem.id}: ExactArithmeticCritic needs a problem with exact steps "
                         "(data.arithmetic_problems)")
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


_MARKER_PARTS = re.compile(r"^([ \t]*(?:[*#]+[ \t]*)?step[ \t]+)(\d+)([ \t]*(?:\*\*)?[ \t]*[:.)][ \t]*(?:\*\*)?[ \t]*)",
                           re.IGNORECASE)


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


def _boxed(text: str) -> tuple[str, int, int] | None:
    """The content of the last \\boxed{...} (braces balanced) and its span, or None."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    i, depth = start + len("\\boxed{"), 1
    for k in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[i:k], i, k
    return None


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

    def critique(self, batch: list[tuple[Problem, str]]) -> list[Critique]:
        return [self.critique_one(problem, response) for problem, response in batch]

    def critique_one(self, problem: Problem, response: str) -> Critique:
        chain = _chain(problem)
        spans = step_spans(response)
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
        boxed = _boxed(response)
        if boxed is None:
            case = "C"
        elif not _same_integer(boxed[0], problem.answer):
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
                wrong_claim, wrong_span, corrected_claim = boxed[0], (boxed[1], boxed[2]), problem.answer
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
        text = format_critique(case, pivot, step_ok, reasons, "\n".join(lines))
        return Critique(text=text, case=case, pivot_step=pivot, step_ok=step_ok, schema_ok=True,
                        wrong_claim=wrong_claim, wrong_span=wrong_span, corrected_claim=corrected_claim)

    @staticmethod
    def _final_line(response: str, spans: list[tuple[int, int]], answer: str) -> str:
        """The student's final-answer line with the right answer in its box, or a plain \\boxed{answer}."""
        tail = response[spans[-1][1]:] if spans else ""
        for line in tail.splitlines():
            box = _boxed(line)
            if box is not None:
                return (line[:box[1]] + answer + line[box[2]:]).strip()
        return f"\\boxed{{{answer}}}"


# ---------------------------------------------------------------------------------------------- server critic
class _RequestFailed(Exception):
    def __init__(self, message: str, retryable: bool, kind: str):
        super().__init__(message)
        self.retryable, self.kind = retryable, kind


class CriticUnavailable(Exception):
    """The critic server failed its preflight (`ServerCritic.check`); the message is one line, without the key."""


def _network_failure(e: Exception, url: str) -> _RequestFailed:
    """An exception of urllib / http.client / the socket layer as a retryable failure with its kind."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ConnectionRefusedError):
        kind = "refused"
    elif isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
        kind = "timeout"
    else:
        kind = "connection"  # reset, closed without an answer, unreachable host, DNS
    return _RequestFailed(f"request to {url} failed: {type(reason).__name__}: {reason}", True, kind)


class ServerCritic:
    """Critic behind an OpenAI-compatible chat-completions server (stdlib only: urllib + a thread pool).

    Greedy by default (temperature 0, the paper's critic). The API key is read from the environment variable
    `api_key_env` at each request (never stored on the object, printed, logged, or put into an error message);
    when the variable is unset no Authorization header is sent (a local vLLM without --api-key needs none).
    Each request: at most `timeout_s` seconds per attempt, `max_retries` retries with exponential backoff
    (`backoff_s * 2**attempt`) on connection errors, timeouts, HTTP 5xx/408/429 and malformed answers.
    A batch never waits longer than its worst case of all attempts; an item that fails comes back as a
    Critique with `error` set.

    An answer is used only when its finish_reason is "stop": one cut by `max_tokens` ("length") is a failure
    with error_kind "length" and is not retried (greedy decoding would cut it again); any other finish_reason
    is a malformed answer. think_in_prompt: the server's chat template ends the prompt with an open <think>
    tag (QwQ-32B's does), so an answer without </think> is all trace (data.strip_think).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_tokens: int = MAX_TOKENS,
                 timeout_s: float = 1200.0, max_retries: int = 3, backoff_s: float = 2.0, max_workers: int = 32,
                 temperature: float = 0.0, think_in_prompt: bool = False):
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.api_key_env, self.max_tokens = model, api_key_env, max_tokens
        self.timeout_s, self.max_retries, self.backoff_s, self.max_workers = timeout_s, max_retries, backoff_s, max_workers
        self.temperature = temperature  # 0: greedy, the paper's critic; the difficulty filter may sample
        self.think_in_prompt = think_in_prompt

    def __repr__(self) -> str:
        return (f"ServerCritic(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"timeout_s={self.timeout_s}, max_retries={self.max_retries})")

    def critique(self, batch: list[tuple[Problem, str]]) -> list[Critique]:
        answers = self.complete([critic_messages(problem, response) for problem, response in batch])
        out = []
        for (text, error, kind), (_, response) in zip(answers, batch):
            if error is not None:
                out.append(Critique(text="", error=error, error_kind=kind,
                                    schema_error="no critique (backend error)"))
            else:
                out.append(parse_critique(text, len(split_steps(response)), self.think_in_prompt))
        return out

    def complete(self, messages_batch: list[list[dict]]) -> list[tuple[str | None, str | None, str | None]]:
        """(text, None, None) or (None, error, error_kind) per conversation, in order; never raises for a failed
        request. The text is the raw answer (think trace included); error_kind "length": cut by max_tokens."""
        if not messages_batch:
            return []
        worst_case = (self.max_retries + 1) * 2 * self.timeout_s + self.backoff_s * (2 ** (self.max_retries + 1)) + 5
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(messages_batch)))
        try:
            futures = [pool.submit(self._complete_one, m) for m in messages_batch]
            wait(futures, timeout=worst_case)
            results = []
            for f in futures:
                if not f.done():
                    f.cancel()
                    results.append((None, f"no answer within {worst_case:.0f} s", "timeout"))
                else:
                    results.append(f.result())  # _complete_one returns errors, it does not raise
            return results
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _complete_one(self, messages: list[dict]) -> tuple[str | None, str | None, str | None]:
        key = os.environ.get(self.api_key_env) or None
        error, kind = "no attempt made", None
        for attempt in range(self.max_retries + 1):
            if attempt > 0:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return self._post(messages, key), None, None
            except _RequestFailed as e:
                error, kind = _redact(f"{e} (attempt {attempt + 1} of {self.max_retries + 1})", key), e.kind
                if not e.retryable:
                    break
        return None, error, kind

    def _post(self, messages: list[dict], key: str | None) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                chunks = []
                while chunk := response.read(65536):
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        raise _RequestFailed(f"timed out after {self.timeout_s} s while reading the answer", True,
                                             "timeout")
                raw = b"".join(chunks)
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace") if e.fp is not None else ""
            raise _RequestFailed(f"HTTP {e.code} from {self.url}: {detail}",
                                 retryable=e.code >= 500 or e.code in (408, 429), kind=f"http_{e.code}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout
            raise _network_failure(e, self.url) from None
        try:
            answer = json.loads(raw)
            choice = answer["choices"][0]
            finish_reason = choice.get("finish_reason")
            # read before the content: a reasoning server may send no content at all for an answer cut short
            if finish_reason == "length":
                raise _RequestFailed(f"the answer from {self.url} was cut at max_tokens={self.max_tokens} "
                                     "(finish_reason 'length'); a truncated critique is not used", False, "length")
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
            if finish_reason != "stop":
                raise ValueError(f"finish_reason is {finish_reason!r}, expected 'stop'")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise _RequestFailed(f"malformed answer from {self.url}: {type(e).__name__}: {e}; "
                                 f"body starts {raw[:120]!r}", True, "malformed") from None
        return text

    def check(self, timeout_s: float = 10.0) -> None:
        """Preflight, before a run spends anything: the server lists `self.model`, and answers a one-token
        completion. Raises CriticUnavailable with one line naming the URL and what failed (never the key)."""
        key = os.environ.get(self.api_key_env) or None
        models_url = self.url.rsplit("/chat/completions", 1)[0] + "/models"
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        probe = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "Say OK."}],
                            "temperature": 0.0, "max_tokens": 1}).encode("utf-8")
        for url, body in ((models_url, None), (self.url, probe)):
            headers = {"Content-Type": "application/json", **auth} if body else auth
            request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    raw = response.read(1 << 20)
            except urllib.error.HTTPError as e:
                detail = e.read(200).decode("utf-8", "replace").strip() if e.fp is not None else ""
                if e.code in (401, 403):
                    what = (f"HTTP {e.code} (unauthorized): the key in ${self.api_key_env} was refused" if key
                            else f"HTTP {e.code} (unauthorized): it needs an API key in ${self.api_key_env}")
                else:
                    what = f"HTTP {e.code}: {detail[:200]}"
                raise CriticUnavailable(_redact(f"critic server {url}: {what}", key)) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                failure = _network_failure(e, url)
                what = {"refused": "connection refused: is the server running at --critic-url?",
                        "timeout": f"no answer within {timeout_s} s"}.get(failure.kind, str(failure))
                raise CriticUnavailable(_redact(f"critic server {url}: {what}", key)) from None
            try:
                answer = json.loads(raw)
                if body is None:
                    served = [m["id"] for m in answer["data"]]
                elif not isinstance(answer["choices"][0]["message"]["content"], str):
                    raise TypeError("the completion's content is not a string")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                what = f"not an OpenAI-compatible answer ({type(e).__name__}: {e}); body starts {raw[:80]!r}"
                raise CriticUnavailable(_redact(f"critic server {url}: {what}", key)) from None
            if body is None and self.model not in served:
                raise CriticUnavailable(f"critic server {url}: serves {served[:5]}, not {self.model!r} "
                                        "(--critic-model)")


def _redact(message: str, key: str | None) -> str:
    return message.replace(key, "[redacted]") if key else message


# ---------------------------------------------------------------------------------------------- local critic
class LocalCritic:
    """A critic run locally through transformers: greedy, batched with left padding.

    `model` is a hub id or local path (loaded with AutoModelForCausalLM), or a (model, tokenizer) pair.
    An answer that reaches `max_new_tokens` without an end-of-turn token is a failure with error_kind "length",
    as in ServerCritic. Whether the prompt opened a <think> block is read from the rendered prompt itself.
    """

    def __init__(self, model, max_new_tokens: int = MAX_TOKENS, batch_size: int = 8, thinking: bool = True,
                 dtype=None, device: str = "cpu"):
        if isinstance(model, (tuple, list)):
            self.model, self.tokenizer = model
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        self.max_new_tokens, self.batch_size, self.thinking = max_new_tokens, batch_size, thinking
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stop = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])}
        end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != tok.unk_token_id:
            stop.add(end_of_turn)
        self.stop_ids = sorted(i for i in stop if i is not None)

    def critique(self, batch: list[tuple[Problem, str]]) -> list[Critique]:
        prompts = [render(self.tokenizer, critic_messages(p, r), self.thinking) for p, r in batch]
        out = []
        for prompt, (text, finish_reason), (_, r) in zip(prompts, self.generate(prompts), batch):
            if finish_reason == "length":
                out.append(Critique(text="", error=f"the critique was cut at max_new_tokens={self.max_new_tokens}",
                                    error_kind="length", schema_error="no critique (cut by the length limit)"))
            else:
                out.append(parse_critique(text, len(split_steps(r)), think_in_prompt=prompt_opens_think(prompt)))
        return out

    def generate(self, prompts: list[str]) -> list[tuple[str, str]]:
        """(text, finish_reason) per prompt, greedy; finish_reason "stop" (an end token) or "length"."""
        import torch

        out = []
        device = next(self.model.parameters()).device
        for start in range(0, len(prompts), self.batch_size):
            ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts[start:start + self.batch_size]]
            B, L = len(ids), max(len(x) for x in ids)
            input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)  # (B, L)  left padded
            attention = torch.zeros(B, L, dtype=torch.long)  # (B, L)
            for b, x in enumerate(ids):
                input_ids[b, L - len(x):] = torch.tensor(x)
                attention[b, L - len(x):] = 1
            with torch.no_grad():
                generated = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                                do_sample=False, max_new_tokens=self.max_new_tokens,
                                                eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                                temperature=None, top_p=None, top_k=None)  # (B, L + T_new)
            for row in generated[:, L:].tolist():
                cut = next((k for k, t in enumerate(row) if t in self.stop_ids), None)
                finish_reason = "length" if cut is None else "stop"
                out.append((self.tokenizer.decode(row[:cut], skip_special_tokens=True), finish_reason))
        return out


def prompt_opens_think(prompt: str) -> bool:
    """True when a rendered prompt ends with an open <think> tag (QwQ-32B's template ends with "<think>\n")."""
    return prompt.rstrip().endswith("<think>")
