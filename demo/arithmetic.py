"""The demo's problems: chained integer arithmetic for CPU-sized runs, a stand-in for OpenMathReasoning.

`arithmetic_problems(n, seed, ...)` makes left-to-right chained integer problems ("Start with 17. Add 25, then
multiply the result by 3. What is the final number?") with exact steps ("17 + 25 = 42", "42 * 3 = 126"; the exact
critic checks against them) and a reference solution in a wording of its own (a sentence per operation, the boxed
answer on its own line): a correct solution that is not the student's steps or format, as the paper's RefSol.
`step_solution` writes the gold solution in the student's step format (the format control's context) and
`prose_solution` the first study's foreign one-line reference (a stress case).

Departures from the paper: the arithmetic tasks are ours (CPU-sized experiments); they are not in the paper.
"""
from __future__ import annotations

import random

from data import Problem


_OP_SYMBOL = {"+": "+", "-": "-", "*": "*"}
_OP_WORDS = {"+": "add {b}", "-": "subtract {b}", "*": "multiply the result by {b}"}
_OP_PROSE = {"+": "adding {b} gives {r}", "-": "taking away {b} leaves {r}", "*": "{b} times that is {r}"}
_OP_SENTENCE = {"+": "Adding {b} gives {a} + {b} = {r}.", "-": "Subtracting {b} leaves {a} - {b} = {r}.",
                "*": "Multiplying that by {b} gives {a} × {b} = {r}."}


def apply_op(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operation {op!r}; expected one of '+', '-', '*'")


# A one-shot worked example for very small solvers (the demo's 135M model almost never uses the step format
# without one: ~0% boxed answers; with it, Avg@4 ≈ 16% on one-operation problems at temperature 0.5). It has as
# many steps as the problems it precedes, so that the format it shows is the one asked for.
WORKED_EXAMPLE = ("Example:\nProblem: Start with 4. Add 3. What is the final number?\nStep 1: 4 + 3 = 7\n"
                  "\\boxed{7}\n\nNow solve this problem in the same format.\nProblem: ")
_EXAMPLE_OPS = [("+", 3), ("-", 2), ("+", 6), ("-", 8)]  # the example's steps, in turn


def worked_example_for(n_ops: int) -> str:
    """The worked example for problems of `n_ops` operations (n_ops = 1 gives WORKED_EXAMPLE)."""
    value, chain = 4, []
    for i in range(n_ops):
        op, b = _EXAMPLE_OPS[i % len(_EXAMPLE_OPS)]
        chain.append((value, op, b, apply_op(value, op, b)))
        value = chain[-1][3]
    lines = "".join(f"Step {i}: {a} {op} {b} = {r}\n" for i, (a, op, b, r) in enumerate(chain, start=1))
    return (f"Example:\nProblem: {problem_text(4, chain)}\n{lines}\\boxed{{{value}}}\n\n"
            "Now solve this problem in the same format.\nProblem: ")


def problem_text(start: int, chain: list[tuple[int, str, int, int]]) -> str:
    """"Start with 17. Add 25, then multiply the result by 3. What is the final number?" """
    clauses = [_OP_WORDS[op].format(b=b) for _, op, b, _ in chain]
    clauses[0] = clauses[0].replace(" the result", "")
    instruction = clauses[0][0].upper() + clauses[0][1:]
    if len(clauses) > 1:
        instruction += ", then " + ", then ".join(clauses[1:])
    return f"Start with {start}. {instruction}. What is the final number?"


def step_solution(problem: Problem) -> str:
    """A correct solution in the student's step format, written from the problem's exact steps alone (never from
    a student's attempt): "Step 1: 17 + 25 = 42", "Step 2: 42 * 3 = 126", "\\boxed{126}". The context of the
    format control (RefSol with --refsol-style steps): the gold solution in the format the student is asked for."""
    if not problem.steps:
        raise ValueError(f"problem {problem.id}: a step-format solution needs the problem's exact steps "
                         "(demo/arithmetic.py)")
    lines = [f"Step {i}: {step}" for i, step in enumerate(problem.steps, start=1)]
    return "\n".join(lines + [f"\\boxed{{{problem.answer}}}"])


def arithmetic_problems(n: int, seed: int, n_ops: int = 2, max_operand: int = 50,
                        ops: str = "+-*", worked_example: bool = False) -> list[Problem]:
    """`n` chained integer problems, deterministic in `seed`, evaluated strictly left to right.

    Each problem starts from a number in [1, max_operand] and applies `n_ops` operations drawn from `ops`
    with operands in [1, max_operand] (for "*": [2, max(2, max_operand // 5)], so that products stay
    readable). Results never go negative: a subtraction draws its operand from [1, current value]; from a
    value of 0 the next operation is drawn from the other ops (with ops="-" alone the problem is redrawn). Steps are
    "a op b = r" with r feeding the next step; the answer is the last r. With `worked_example`, the problem
    text starts with WORKED_EXAMPLE (student, critic and teacher all see it, as part of the problem).
    """
    if n < 0 or n_ops < 1 or max_operand < 2:
        raise ValueError(f"need n >= 0, n_ops >= 1, max_operand >= 2; got n={n}, n_ops={n_ops}, "
                         f"max_operand={max_operand}")
    unknown = sorted(set(ops) - set(_OP_SYMBOL))
    if unknown or not ops:
        raise ValueError(f"ops={ops!r}: supported operations are '+', '-', '*'")
    rng = random.Random(seed)
    worked_example_text = worked_example_for(n_ops)
    problems = []
    for i in range(n):
        for _attempt in range(1000):
            start, chain = _draw_chain(rng, n_ops, max_operand, ops)
            if chain is not None:
                break
        else:
            raise ValueError(f"ops={ops!r}, n_ops={n_ops}, max_operand={max_operand}: found no chain that stays "
                             "non-negative in 1000 draws")
        value = chain[-1][3]
        text = problem_text(start, chain)
        if worked_example:
            text = worked_example_text + text
        steps = tuple(f"{a} {_OP_SYMBOL[op]} {b} = {r}" for a, op, b, r in chain)
        problems.append(Problem(id=f"arith-s{seed}-{i}", problem=text, answer=str(value),
                                reference_solution=_arithmetic_reference(start, chain),
                                steps=steps, source=f"arithmetic(n_ops={n_ops},max_operand={max_operand})"))
    return problems


def _draw_chain(rng: random.Random, n_ops: int, max_operand: int, ops: str):
    """(start, [(a, op, b, r), ...]), or (start, None) at a dead end (only '-' allowed and the value is 0)."""
    start = rng.randint(1, max_operand)
    value, chain = start, []
    for _ in range(n_ops):
        choices = [o for o in ops if not (o == "-" and value < 1)]
        if not choices:
            return start, None
        op = rng.choice(choices)
        if op == "*":
            b = rng.randint(2, max(2, max_operand // 5))
        elif op == "-":
            b = rng.randint(1, min(max_operand, value))
        else:
            b = rng.randint(1, max_operand)
        r = apply_op(value, op, b)
        chain.append((value, op, b, r))
        value = r
    return start, chain


def _arithmetic_reference(start: int, chain: list[tuple[int, str, int, int]]) -> str:
    """The RefSol context: a correct, natural solution in a wording of its own, as a strong model writes one: a
    sentence per operation with its equation (no "Step i:" markers, not the student's steps), then the answer,
    the boxed answer on its own line as the task asks of every solution."""
    lines = [f"We start with {start}."]
    lines += [_OP_SENTENCE[op].format(a=a, b=b, r=r) for a, op, b, r in chain]
    final = chain[-1][3]
    return "\n".join(lines + [f"So the final number is {final}.", f"\\boxed{{{final}}}"])


def chain_of(problem: Problem) -> tuple[int, list[tuple[int, str, int, int]]]:
    """(start, [(a, op, b, r), ...]) read back from an arithmetic problem's exact steps ("17 + 25 = 42")."""
    if not problem.steps:
        raise ValueError(f"problem {problem.id}: no exact steps (demo/arithmetic.py)")
    chain = []
    for step in problem.steps:
        lhs, r = step.split(" = ")
        a, op, b = lhs.split(" ")
        chain.append((int(a), op, int(b), int(r)))
    return chain[0][0], chain


def prose_solution(problem: Problem) -> str:
    """--refsol-style prose, a stress case kept from the first study (seeds 101-103): a correct solution as one line
    of prose with Unicode operators and the whole computation as one nested expression, its boxed answer inside the
    last sentence. Its teacher could not teach (teacher gap +0 on seed 101): it tests a context foreign to the
    student's format, not the paper's RefSol."""
    start, chain = chain_of(problem)
    expr = str(start)
    for _, op, b, _ in chain:
        expr = f"({expr} {'×' if op == '*' else '−' if op == '-' else '+'} {b})"
    expr = expr[1:-1] if expr.startswith("(") else expr
    prose = "; ".join(_OP_PROSE[op].format(b=b, r=r) for _, op, b, r in chain)
    final = chain[-1][3]
    return (f"The operations apply in the order given, so the quantity is {expr}. "
            f"Working from the inside out, from {start}: {prose}. "
            f"Hence the final number is \\boxed{{{final}}}.")
