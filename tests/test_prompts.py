"""Tests of prompts.py: the student, teacher and critic prompts, the verdict text, the chat template switch,
and the think-tag reading of a rendered prompt."""
import pytest

from data import STEP_FORMAT, Problem
from demo.exact_critic import ExactArithmeticCritic
from prompts import (corrected_solution, critic_messages, prompt_opens_think, render, student_messages, teacher_messages,
                     verdict_text)

PROBLEM = Problem("t1", "Start with 17. Add 25, then multiply the result by 3, then subtract 4. "
                  "What is the final number?", "122", reference_solution="((17 + 25) × 3) − 4 = 122, \\boxed{122}",
                  steps=("17 + 25 = 42", "42 * 3 = 126", "126 - 4 = 122"))


class RecordingTokenizer:
    def __init__(self):
        self.kwargs = None

    def apply_chat_template(self, messages, **kwargs):
        self.kwargs = kwargs
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_prompts_and_render():
    student = student_messages(PROBLEM)
    assert student == [{"role": "user", "content": f"{PROBLEM.problem}\n\n{STEP_FORMAT}"}]
    step = teacher_messages(PROBLEM, "stepalign", "Case: A ...critique...")[0]["content"]
    assert step.startswith(PROBLEM.problem) and "Case: A ...critique..." in step and "Do not mention" in step
    assert step.endswith(STEP_FORMAT)
    ref = teacher_messages(PROBLEM, "refsol", PROBLEM.reference_solution)[0]["content"]
    assert PROBLEM.reference_solution in ref and ref.endswith(STEP_FORMAT)
    with pytest.raises(ValueError, match="unknown feedback"):
        teacher_messages(PROBLEM, "grpo", "")
    tok = RecordingTokenizer()
    assert render(tok, student, thinking=False).endswith("<assistant>")
    assert tok.kwargs == {"tokenize": False, "add_generation_prompt": True, "enable_thinking": False}
    render(tok, student, thinking=True)
    assert tok.kwargs["enable_thinking"] is True
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136"
    prompt = critic_messages(PROBLEM, response)[0]["content"]
    assert response in prompt and "(2 numbered steps)" in prompt and PROBLEM.reference_solution in prompt
    assert "Reference answer: 122" in prompt
    assert "character for character" in prompt  # the faithful-scribe rule: correct steps copied verbatim


def test_verdict_text_states_the_answer_and_the_verdict_only():
    wrong = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\nStep 3: 136 - 4 = 132\n\\boxed{132}"
    right = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 4 = 122\n\\boxed{122}"
    v = verdict_text(wrong, correct=False)
    assert "132" in v and "incorrect" in v
    assert PROBLEM.answer not in v and "126" not in v  # neither the gold answer nor any step of the attempt
    v = verdict_text(right, correct=True)
    assert "122" in v and "correct" in v and "incorrect" not in v
    assert verdict_text("a \\boxed{7} then \\boxed{9}", correct=False).count("9") == 1  # the graded (last) box
    none = verdict_text("Step 1: 17 + 25 = 42\nStep 2: 42 * 3 =", correct=False)
    assert "did not give a final answer" in none and "incorrect" in none
    with pytest.raises(ValueError, match="without a final"):
        verdict_text("no answer", correct=True)


def test_verdict_prompt_differs_from_the_others_only_in_c():
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\nStep 3: 136 - 4 = 132\n\\boxed{132}"
    critique = ExactArithmeticCritic().critique_one(PROBLEM, response).text
    c = verdict_text(response, correct=False)
    verdict = teacher_messages(PROBLEM, "verdict", c)
    assert len(verdict) == 1 and verdict[0]["role"] == "user"
    content = verdict[0]["content"]
    assert c in content and "132" in content and "incorrect" in content
    assert PROBLEM.reference_solution not in content and critique not in content and "Corrected solution" not in content
    assert "122" not in content.replace(PROBLEM.problem, "")  # the gold answer appears nowhere
    step = teacher_messages(PROBLEM, "stepalign", critique)[0]["content"]
    ref = teacher_messages(PROBLEM, "refsol", PROBLEM.reference_solution)[0]["content"]
    for form in (content, step, ref):  # the same problem text first and the same format instruction last
        assert form.startswith(PROBLEM.problem + "\n\n") and form.endswith("\n\n" + STEP_FORMAT)
    # stepalign and verdict share the layout and the closing instruction; only c and the noun naming it differ
    assert (content.split("=== End of verdict ===")[1].replace("verdict", "review")
            == step.split("=== End of review ===")[1])
    assert teacher_messages(PROBLEM, "verdict", "X")[0]["content"].replace("X", c) == content


def test_turns_layout_continues_the_students_chat_and_varies_only_c():
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\nStep 3: 136 - 4 = 132\n\\boxed{132}"
    contexts = {"stepalign": ExactArithmeticCritic().critique_one(PROBLEM, response).text,
                "refsol": PROBLEM.reference_solution, "verdict": verdict_text(response, correct=False)}
    for form, c in contexts.items():
        m = teacher_messages(PROBLEM, form, c, layout="turns", attempt=response)
        assert m[:1] == student_messages(PROBLEM)  # the student's own prompt, unchanged
        assert m[1] == {"role": "assistant", "content": response}  # its attempt y
        assert m[2]["role"] == "user" and c in m[2]["content"] and len(m) == 3
        # the same framing for every form: c is the only difference
        assert m[2]["content"].replace(c, "C") == "Feedback:\nC\n\nWrite the corrected solution in the same format."
    with pytest.raises(ValueError, match="needs the attempt"):
        teacher_messages(PROBLEM, "stepalign", "c", layout="turns")
    with pytest.raises(ValueError, match="unknown teacher layout"):
        teacher_messages(PROBLEM, "stepalign", "c", layout="sideways", attempt=response)
    with pytest.raises(ValueError, match="unknown feedback"):
        teacher_messages(PROBLEM, "grpo", "c", layout="turns", attempt=response)


def test_echo_layout_gives_the_solution_in_c_as_the_models_own_answer():
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\nStep 3: 136 - 4 = 132\n\\boxed{132}"
    critique = ExactArithmeticCritic().critique_one(PROBLEM, response).text
    fixed = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 4 = 122\n\\boxed{122}"
    assert corrected_solution(critique) == fixed  # the critique's last section, without its judgement lines
    assert corrected_solution("free text, no schema") == "free text, no schema"
    # found as critic.parse_critique finds it: markdown and case tolerated
    assert corrected_solution("Case: D\n**Corrected Solution:**\nStep 1: 1 + 1 = 2") == "Step 1: 1 + 1 = 2"
    again = {"role": "user", "content": "Solve the problem again, in the same format."}
    m = teacher_messages(PROBLEM, "stepalign", critique, layout="echo", attempt=response)
    assert m == student_messages(PROBLEM) + [{"role": "assistant", "content": fixed}, again]
    m = teacher_messages(PROBLEM, "refsol", PROBLEM.reference_solution, layout="echo", attempt=response)
    assert m == student_messages(PROBLEM) + [{"role": "assistant", "content": PROBLEM.reference_solution}, again]
    verdict = verdict_text(response, correct=False)  # no solution to echo: the turns teacher
    assert (teacher_messages(PROBLEM, "verdict", verdict, layout="echo", attempt=response)
            == teacher_messages(PROBLEM, "verdict", verdict, layout="turns", attempt=response))
    with pytest.raises(ValueError, match="unknown feedback"):
        teacher_messages(PROBLEM, "grpo", "c", layout="echo", attempt=response)


def test_repeat_layout_ends_with_the_student_prompt_word_for_word(smol_tokenizer):
    response = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\nStep 3: 136 - 4 = 132\n\\boxed{132}"
    critique = ExactArithmeticCritic().critique_one(PROBLEM, response).text
    for form, c in (("stepalign", critique), ("refsol", PROBLEM.reference_solution)):
        echo = teacher_messages(PROBLEM, form, c, layout="echo", attempt=response)
        m = teacher_messages(PROBLEM, form, c, layout="repeat", attempt=response)
        assert m == echo[:2] + student_messages(PROBLEM)  # echo's solution turn, then the student's own prompt
        # rendered: the teacher's text ends with the student's turn and generation prompt, byte for byte, so the
        # two read the rollout y after the same last turn
        student = render(smol_tokenizer, student_messages(PROBLEM), False)
        last_turn = student[student.rindex("<|im_start|>user"):]
        assert render(smol_tokenizer, m, False).endswith(last_turn)
        assert render(smol_tokenizer, m, False).count(PROBLEM.problem) == 2
    verdict = verdict_text(response, correct=False)
    assert (teacher_messages(PROBLEM, "verdict", verdict, layout="repeat", attempt=response)
            == teacher_messages(PROBLEM, "verdict", verdict, layout="turns", attempt=response))


def test_prompt_opens_think_reads_the_template_style(smol_tokenizer):
    qwq_style = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n"
    qwen3_thinking_off = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert prompt_opens_think(qwq_style) and not prompt_opens_think(qwen3_thinking_off)
    assert not prompt_opens_think(render(smol_tokenizer, [{"role": "user", "content": "q <think>"}], thinking=True))
