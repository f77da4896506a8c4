"""Tests of demo/exact_critic.py: cases A-D, verbatim copies of correct steps, the corrected claim in the student's
style, and the final answer read as the grader reads it."""
import pytest

import prompts
from critic import Critique, parse_critique
from data import Problem, split_steps
from demo.arithmetic import arithmetic_problems
from demo import exact_critic
from demo.exact_critic import ExactArithmeticCritic
from grading import extract_answer
from demo import arithmetic

PROBLEM = Problem("t1", "Start with 17. Add 25, then multiply the result by 3, then subtract 4. "
                  "What is the final number?", "122", reference_solution="((17 + 25) × 3) − 4 = 122, \\boxed{122}",
                  steps=("17 + 25 = 42", "42 * 3 = 126", "126 - 4 = 122"))


def corrected_steps(critique: Critique) -> list[str]:
    return split_steps(critique.text.split("Corrected solution:\n", 1)[1])


def test_case_a_copies_the_whole_solution():
    response = ("Step 1: First, 17 + 25 = 42.\nStep 2: Then 42 * 3 = 126.\nStep 3: Finally 126 - 4 = 122.\n"
                "The final answer is \\boxed{122}.")
    c = ExactArithmeticCritic().critique([(PROBLEM, response)])[0]
    assert (c.case, c.pivot_step, c.step_ok, c.schema_ok, c.wrong_claim) == ("A", None, [True] * 3, True, None)
    assert c.text.split("Corrected solution:\n", 1)[1] == response  # byte-identical


def test_case_b_right_answer_with_a_wrong_step():
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 124\nStep 3: 126 - 4 = 122\n\\boxed{122}"
    c = ExactArithmeticCritic().critique_one(PROBLEM, response)
    assert (c.case, c.pivot_step, c.step_ok) == ("B", 2, [True, False, True])
    assert "Step 2: Incorrect -- 42 * 3 = 126, not 124" in c.text
    assert corrected_steps(c) == ["Step 1: 17 + 25 = 42", "Step 2: 42 * 3 = 126", "Step 3: 126 - 4 = 122"]
    assert response[c.wrong_span[0]:c.wrong_span[1]] == c.wrong_claim == "124" and c.corrected_claim == "126"


def test_case_c_truncated_is_completed():
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 4 ="
    c = ExactArithmeticCritic().critique_one(PROBLEM, response)
    assert (c.case, c.pivot_step, c.step_ok) == ("C", None, [True, True, True])
    steps = corrected_steps(c)
    assert steps[:2] == split_steps(response)[:2]  # verbatim
    assert steps[2] == "Step 3: 126 - 4 = 122" and c.text.endswith("\\boxed{122}")
    # truncated after a wrong step: the pivot is found, the solution corrected and completed
    c = ExactArithmeticCritic().critique_one(PROBLEM, "Step 1: 17 + 25 = 43\nStep 2: 43 * 3")
    assert (c.case, c.pivot_step, c.wrong_claim, c.corrected_claim) == ("C", 1, "43", "42")
    assert corrected_steps(c) == ["Step 1: 17 + 25 = 42", "Step 2: 42 * 3 = 126", "Step 3: 126 - 4 = 122"]


def test_case_d_faithful_scribe():
    response = ("Step 1: We add: 17 + 25 = 42.\nStep 2: Then 42 * 3 = 136, so we now have 136.\n"
                "Step 3: 136 - 4 = 132.\nThe final answer is \\boxed{132}.")
    c = ExactArithmeticCritic().critique_one(PROBLEM, response)
    assert (c.case, c.pivot_step, c.step_ok, c.schema_ok) == ("D", 2, [True, False, False], True)
    student = split_steps(response)
    steps = corrected_steps(c)
    assert steps[0] == student[0]  # correct step copied byte-identical
    assert steps[1] == "Step 2: Then 42 * 3 = 126, so we now have 126."  # only the wrong claim replaced
    assert steps[2] == "Step 3: 126 - 4 = 122"  # continuation
    assert c.text.endswith("The final answer is \\boxed{122}.")  # the student's final line, right answer
    assert response[c.wrong_span[0]:c.wrong_span[1]] == "136" and c.wrong_span[0] == response.index("136")
    assert "Step 3: Incorrect -- 136 - 4 is not the problem's computation at this point, 126 - 4" in c.text


def test_case_d_wrong_operation_keeps_student_style():
    response = "**Step 1:** 17+25=42\n**Step 2:** 42+3=45\n**Step 3:** 45-4=41\n\\boxed{41}"
    c = ExactArithmeticCritic().critique_one(PROBLEM, response)
    assert (c.case, c.pivot_step, c.wrong_claim) == ("D", 2, "42+3=45")
    assert corrected_steps(c) == ["**Step 1:** 17+25=42", "**Step 2:** 42*3=126", "**Step 3:** 126-4=122"]


def test_case_d_all_steps_right_but_stopped_early():
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 × 3 = 126\n\\boxed{126}"
    c = ExactArithmeticCritic().critique_one(PROBLEM, response)
    assert (c.case, c.pivot_step, c.step_ok) == ("D", None, [True, True])
    assert response[slice(*c.wrong_span)] == "126" and c.wrong_span[0] == response.index("{126}") + 1
    assert corrected_steps(c) == [*split_steps(response), "Step 3: 126 - 4 = 122"]


def test_an_extra_step_past_the_answer_is_removed_not_corrected():
    # the student finished the computation, then kept going: that step has no right version, so the corrected
    # solution drops it (the wrong claim is the whole extra equation) and ends with the answer
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 4 = 122\nStep 4: 122 + 1 = 123"
    c = ExactArithmeticCritic().critique_one(PROBLEM, response)
    assert (c.case, c.pivot_step, c.step_ok) == ("C", 4, [True, True, True, False])
    assert (c.wrong_claim, c.corrected_claim) == ("122 + 1 = 123", "")
    assert response[slice(*c.wrong_span)] == "122 + 1 = 123"
    assert corrected_steps(c) == split_steps(response)[:3] and c.text.endswith("\\boxed{122}")
    # the extra computation inside a step that also holds a right one: only the extra part goes
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126 and 126 - 4 = 122, so 122 * 2 = 244\n\\boxed{244}"
    c = ExactArithmeticCritic().critique_one(PROBLEM, response)
    assert (c.case, c.pivot_step, c.wrong_claim) == ("D", 2, "122 * 2 = 244")
    assert corrected_steps(c) == ["Step 1: 17 + 25 = 42", "Step 2: 42 * 3 = 126 and 126 - 4 = 122, so"]


def test_exact_critic_reads_thousands_separators():
    p = Problem("t", "Start with 500. Multiply by 10, then subtract 10.", "4990",
                steps=("500 * 10 = 5000", "5000 - 10 = 4990"))
    right = "Step 1: 500 * 10 = 5,000\nStep 2: 5,000 - 10 = 4,990\n\\boxed{4,990}"
    assert ExactArithmeticCritic().critique_one(p, right).case == "A"
    c = ExactArithmeticCritic().critique_one(p, "Step 1: 500 * 10 = 5,100\nStep 2: 5,100 - 10 = 5,090\n\\boxed{5090}")
    assert (c.case, c.pivot_step, c.wrong_claim, c.corrected_claim) == ("D", 1, "5,100", "5000")


def test_exact_critic_on_generated_problems_and_no_steps():
    critic = ExactArithmeticCritic()
    for p in arithmetic_problems(20, seed=5, n_ops=3):
        right = "\n".join(f"Step {i}: {s}" for i, s in enumerate(p.steps, 1)) + f"\n\\boxed{{{p.answer}}}"
        c = critic.critique_one(p, right)
        assert c.case == "A" and c.text.endswith(right)
        assert parse_critique(c.text, 3).schema_ok
        wrong = right.replace(f"= {p.steps[0].split(' = ')[1]}\n", f"= {int(p.steps[0].split(' = ')[1]) + 1}\n", 1)
        c = critic.critique_one(p, wrong)
        assert c.pivot_step == 1 and c.case in "BD"
    with pytest.raises(ValueError, match="needs a problem with exact steps"):
        critic.critique_one(Problem("x", "q", "1"), "Step 1: 1 + 0 = 1")


@pytest.mark.parametrize("tail, graded", [
    ("\\boxed{122} or maybe \\boxed{13", "122"),  # the former reader took the unclosed last box: case C
    ("\\boxed{132} then \\boxed{}", "132"),  # ... and the empty last box: a wrong claim ""
    ("\\fbox{122}", "122"),  # ... and saw no \fbox at all: case C
])
def test_the_case_follows_the_answer_the_grader_reads(tail, graded):
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 4 = 122\n" + tail
    assert extract_answer(response) == graded
    c = ExactArithmeticCritic().critique_one(PROBLEM, response)
    if graded == PROBLEM.answer:
        assert c.case == "A" and c.wrong_claim is None
    else:
        assert (c.case, c.wrong_claim, c.corrected_claim) == ("D", graded, PROBLEM.answer)
        assert response[slice(*c.wrong_span)] == graded


def test_copied_correct_equations_counts_the_true_work_kept_before_the_fix():
    """The alignment count: true equations of the attempt that the corrected solution copies before it departs."""
    problem = arithmetic.arithmetic_problems(1, seed=3, n_ops=3, max_operand=20, ops="+-")[0]
    chain = [tuple(int(t) if t.isdigit() else t for t in s.split() if t != "=") for s in problem.steps]
    (a, op, b, r), rest = chain[0], chain[1:]
    first = f"{a} {op} {b} = {r}"
    late = "\n".join([f"Step 1: {first}", f"Step 2: {rest[0][0]} {rest[0][1]} {rest[0][2]} = {rest[0][3] + 1}"])
    early = f"Step 1: {a} {op} {b} = {r + 1}"
    numbered = f"1. {first}\n2. {rest[0][0]} {rest[0][1]} {rest[0][2]} = {rest[0][3] + 10}"  # one step, no marker
    critic = exact_critic.ExactArithmeticCritic()
    counts = [exact_critic.copied_correct_equations(t, prompts.corrected_solution(critic.critique_one(problem, t).text))
              for t in (late, early, numbered)]
    assert counts == [1, 0, 1]
    # a number cut inside the shared prefix ("2" of "25" against "2") is not a copied equation
    assert exact_critic.copied_correct_equations("Step 1: 1 + 1 = 25", "Step 1: 1 + 1 = 2") == 0
    assert exact_critic.copied_correct_equations("Step 1: 1 + 1 = 2\n", "Step 1: 1 + 1 = 2\n") == 1


@pytest.mark.parametrize("step, judged", [
    ("17 + (25 + 3 = 42", []),  # an unclosed parenthesis (was an IndexError)
    ("(" * 2000 + "17 + 25" + ")" * 2000 + " = 42", [(42, 42)]),  # nesting deeper than recursion (RecursionError)
    ("17 + 25 = " + "4" * 5000, []),  # a claim of more digits than int() reads (ValueError)
    ("9" * 3000 + " * " + "9" * 3000 + " = 1", []),  # a value of more digits than a reason can print (ValueError)
])
def test_malformed_equations_are_not_judged_and_never_raise(step, judged):
    """What a rollout writes cannot crash the exact critic: an equation that does not evaluate is not one."""
    assert [(e.value, e.claimed) for e in exact_critic._equations(step)] == judged
    c = ExactArithmeticCritic().critique_one(PROBLEM, f"Step 1: {step}\nStep 2: 42 * 3 = 126\n\\boxed{{126}}")
    assert c.schema_ok and c.case == "D"


def test_iterative_evaluation_is_python_arithmetic():
    """_eval_expression (two stacks, no recursion) against Python's own evaluation of the same expression in
    Fractions: precedence, left associativity, unary minus, parentheses, the ×·÷ signs."""
    import random
    from fractions import Fraction
    rng = random.Random(0)

    def expression(depth: int) -> str:
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(["", "-", "- "]) + str(rng.randint(0, 30))
        op = rng.choice("+-*/×·÷")
        inner = f"{expression(depth - 1)} {op} {expression(depth - 1)}"
        return f"({inner})" if rng.random() < 0.5 else inner

    checked = 0
    for _ in range(3000):
        expr = expression(4)
        python = expr.replace("×", "*").replace("·", "*").replace("÷", "/")
        python = "".join(f"Fraction({t})" if t.isdigit() else t for t in exact_critic._TOKEN.findall(python))
        try:
            want = eval(python, {"Fraction": Fraction})
        except ZeroDivisionError:
            with pytest.raises(ValueError, match="division by zero"):
                exact_critic._eval_expression(expr)
            continue
        assert exact_critic._eval_expression(expr)[0] == want, expr
        checked += 1
    assert checked > 2000
