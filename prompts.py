"""The prompts: what the solver, the self-teacher and the critic read, and the critique schema.

- `student_messages(problem)`: the solver's prompt (problem + data.STEP_FORMAT); no context.
- `teacher_messages(problem, feedback, context_text)`: the self-teacher's prompt, one `if` per feedback form:
  "stepalign" (the critique, presented as expert feedback on an earlier attempt), "refsol" (a reference
  solution, as in OPSD) and "verdict" (`verdict_text(response, correct)`: the attempt's final answer and whether
  the verifier accepted it; no solution, no critique). GRPO has no teacher.
- `render(tokenizer, messages, thinking)`: the chat template, with the thinking switch per role (the paper:
  student off, teacher on). `encode(tokenizer, messages, thinking)`: its token ids, the ones every engine and
  scorer reads: the template's special tokens as such, every content (problem, reference, critique, rollout) as
  text only, so no outside text can open or close a turn. Rollout tokens y are appended to these ids, never
  re-tokenized. `render_and_encode`: both at once (the template rendered once).
  `prompt_opens_think(prompt)`: the rendered prompt ends with an open <think> tag (QwQ-32B's template).
- The StepAlignFB critic: `critic_messages(problem, response)` asks for ONE schema, no preamble
  (`format_critique` writes it; critic.parse_critique validates it):

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

Departures from the paper:
1. The prompts are written in our own words after the paper's description (cases A–D, pivotal step,
   verbatim copy, corrected continuation); the paper's exact wording is not reproduced.
2. The schema adds two header lines, "Case:" and "Pivotal step:", so that a critique can be validated
   and its case counted without a second model call.
3. The "verdict" form (the outcome-in-context baseline) is ours. Its text states the attempt's final
   answer (the last \\boxed{}, as the grader reads it) and "correct" or "incorrect"; the gold answer is not
   an input of `verdict_text`, so a wrong attempt's verdict cannot reveal it. An attempt without a final answer
   is said to have none and to count as incorrect. Its prompt has stepalign's layout (problem, one framing
   sentence, the delimited context, the same closing instruction, STEP_FORMAT); only c and the nouns naming it
   differ.
4. The "turns" teacher layout (`--teacher-layout turns`) is ours, for small self-teachers: the paper puts c in
   one user turn with the problem. "turns" continues the student's own chat: its prompt, the attempt y as the
   assistant's turn, then "Feedback: c" and a request for the corrected solution in the same format. On the
   135M demo model the paper's layout makes the teacher write prose and stop answering in the format, so its
   samples are right less often than the student's; "turns" keeps the format (docs/earlier_preset/teacher_gap.md).
   RefSol under "turns" also sees the attempt, which the OPSD teacher does not.
5. The "echo" teacher layout (`--teacher-layout echo`) is ours too: the solution that c
   holds is put in the student's chat as the model's own earlier answer, then "Solve the problem again, in the
   same format." StepAlignFB's solution is the critique's corrected solution (`corrected_solution`: the
   judgement lines above it are left out), RefSol's the reference solution; a verdict holds no solution, so
   Verdict's teacher is the "turns" one. Under "turns" the attempt y sits in the teacher's context, so the
   teacher can copy y token by token: it is confident in the student's own tokens, errors included, and Eq. 3
   then mostly sharpens the student on its own samples. Under "echo" the teacher copies the corrected solution
   instead, which StepAlignFB keeps aligned with y up to the wrong claim (docs/earlier_preset/ablation.md).
6. The "repeat" teacher layout (`--teacher-layout repeat`, ours, the demo preset's) is "echo" with the student
   prompt itself as the last turn instead of "Solve the problem again, in the same format.". The teacher then
   answers the very turn the student answers, and the solution before it is the one thing it has that the
   student has not. Under
   "echo" the request for "the same format" makes the 135M teacher restate the problem first, as the worked
   example does ("Problem: ..."); Eq. 3 taught that opening to the student, which then restated the problem with
   wrong numbers (docs/earlier_preset/ablation.md).
"""
from __future__ import annotations

import re

import data
import grading


def student_messages(problem: data.Problem) -> list[dict]:
    return [{"role": "user", "content": f"{problem.problem}\n\n{data.STEP_FORMAT}"}]


TEACHER_LAYOUTS = ("paper", "turns", "echo", "repeat")


def teacher_messages(problem: data.Problem, feedback: str, context_text: str, layout: str = "paper",
                     attempt: str | None = None) -> list[dict]:
    """The self-teacher's prompt: the problem plus the feedback c of the given form.

    layout "paper": one user turn, the problem, then c framed for its form, then the step format.
    layout "turns": the student's own conversation continued: the student prompt, the attempt y as the
    assistant's turn, then c in a user turn asking for the corrected solution in the same format. The framing
    is the same for every form, so c stays the one thing that varies (departure 4).
    layout "echo": the student prompt, the solution c holds as the assistant's turn, then "Solve the problem
    again, in the same format." (departure 5).
    layout "repeat": as "echo", but the last turn is the student prompt itself, word for word (departure 6)."""
    if layout == "turns":
        if attempt is None:
            raise ValueError("teacher layout 'turns' needs the attempt y")
        if feedback not in ("stepalign", "refsol", "verdict"):
            raise ValueError(f"unknown feedback form {feedback!r}; expected 'stepalign', 'refsol' or 'verdict'")
        return student_messages(problem) + [
            {"role": "assistant", "content": attempt},
            {"role": "user", "content": f"Feedback:\n{context_text}\n\nWrite the corrected solution in the same "
                                        "format."}]
    if layout in ("echo", "repeat"):
        if feedback == "verdict":  # a verdict holds no solution to echo: its teacher sees the attempt, as in turns
            return teacher_messages(problem, feedback, context_text, "turns", attempt)
        if feedback not in ("stepalign", "refsol"):
            raise ValueError(f"unknown feedback form {feedback!r}; expected 'stepalign', 'refsol' or 'verdict'")
        solution = corrected_solution(context_text) if feedback == "stepalign" else context_text
        x = student_messages(problem)
        again = x if layout == "repeat" else [{"role": "user",
                                               "content": "Solve the problem again, in the same format."}]
        return x + [{"role": "assistant", "content": solution}] + again
    if layout != "paper":
        raise ValueError(f"unknown teacher layout {layout!r}; expected one of {TEACHER_LAYOUTS}")
    if feedback == "stepalign":
        content = (f"{problem.problem}\n\n"
                   "An expert reviewed an earlier attempt at this problem. The review below judges each step "
                   "of that attempt by its number and then gives a corrected solution that keeps the correct "
                   "steps and continues to the answer.\n\n"
                   f"=== Expert review ===\n{context_text}\n=== End of review ===\n\n"
                   "Now write your own fresh, self-contained solution to the problem. Do not mention the "
                   f"review or the earlier attempt.\n\n{data.STEP_FORMAT}")
        return [{"role": "user", "content": content}]
    if feedback == "refsol":
        content = (f"{problem.problem}\n\n"
                   f"Here is a reference solution to this problem:\n\n{context_text}\n\n"
                   "With the reference solution in mind, solve the problem yourself, in your own words.\n\n"
                   f"{data.STEP_FORMAT}")
        return [{"role": "user", "content": content}]
    if feedback == "verdict":
        content = (f"{problem.problem}\n\n"
                   "A verifier checked the final answer of an earlier attempt at this problem against the correct "
                   "answer. Its verdict is below.\n\n"
                   f"=== Verdict ===\n{context_text}\n=== End of verdict ===\n\n"
                   "Now write your own fresh, self-contained solution to the problem. Do not mention the "
                   f"verdict or the earlier attempt.\n\n{data.STEP_FORMAT}")
        return [{"role": "user", "content": content}]
    raise ValueError(f"unknown feedback form {feedback!r}; expected 'stepalign', 'refsol' or 'verdict'")


# The schema's "Corrected solution:" line, as critic.parse_critique finds it (markdown and case tolerated).
# Possessive quantifiers (*+ ?+): each run of spaces or marks is read once, never given back, so a search
# is linear in the text (backtracking over the adjacent [ \t]*: 400 spaces after the header took over 20 s).
# The lines matched are the same: every run is optional and the character that must follow the runs (a
# letter, the end of the line) is in none of their classes, so only the greedy reading fits.
CORRECTED_SOLUTION_HEADER = re.compile(r"^[ \t]*+[#*]*+[ \t]*+corrected solution"
                                       r"[ \t]*+\**+[ \t]*+:?+[ \t]*+\**+[ \t]*+$", re.IGNORECASE | re.MULTILINE)


def corrected_solution(critique_text: str) -> str:
    """The corrected solution of a critique in the schema: what follows its "Corrected solution:" line, found as
    the parser finds it. A critique without one (free text, kept by --critic-unstructured keep) is returned
    whole: it is all there is."""
    header = CORRECTED_SOLUTION_HEADER.search(critique_text)
    tail = critique_text[header.end():] if header else ""
    return tail.strip("\n") if tail.strip() else critique_text


def verdict_text(response: str, correct: bool) -> str:
    """The verdict context c: the attempt's final answer (its last \\boxed{}) and whether it is correct.

    `correct` is the verifier's grade of `response` (grading.grade). The gold answer is deliberately not an
    argument: a wrong attempt learns only that its answer is wrong (departure 3).
    """
    answer = grading.extract_answer(response)
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


HOLE = "\x00content {}\x00"  # a message's place in the template's skeleton (encode); it holds no special token


def encode(tokenizer, messages: list[dict], thinking: bool) -> list[int]:
    """The prompt's token ids (render_and_encode's)."""
    return render_and_encode(tokenizer, messages, thinking)[1]


def render_and_encode(tokenizer, messages: list[dict], thinking: bool) -> tuple[str, list[int]]:
    """The prompt string (`render`'s, rendered once) and its token ids: the string with the chat template's own
    special tokens as their ids and each message's content (outside text: a problem, a reference, a critique, a
    rollout) tokenized as text, so that a content holding "<|im_end|><|im_start|>user" stays those characters and
    never opens a turn.

    How: the template is rendered with a hole in place of every content (the skeleton: the template's own pieces),
    then once per message with that content alone in its hole (what the template makes of it: Qwen3's drops the
    thought of an assistant turn in history). The rendered string is cut at the special tokens of the template's
    pieces only; each text run between two of them (template text and contents together) is tokenized with
    `split_special_tokens=True`. A tokenizer tokenizes a whole string the same way, cut at every special token,
    so where no content holds a special token's string the ids are `tokenizer(render(...)).input_ids` exactly
    (tests/test_special_tokens.py, on SmolLM2's and a Qwen3-format tokenizer)."""
    skeleton = render(tokenizer, [m | {"content": HOLE.format(k)} for k, m in enumerate(messages)], thinking)
    cuts = []  # (start, end) of each hole in the skeleton
    for k in range(len(messages)):
        start = skeleton.find(HOLE.format(k))
        if start < 0 or skeleton.count(HOLE.format(k)) != 1 or (cuts and start < cuts[-1][1]):
            raise ValueError(f"the chat template does not render message {k}'s content once, in order")
        cuts.append((start, start + len(HOLE.format(k))))
    bounds = [0] + [i for cut in cuts for i in cut] + [len(skeleton)]
    spans = [(skeleton[a:b], False) for a, b in zip(bounds[::2], bounds[1::2])]  # the template's own pieces
    for k, (start, end) in enumerate(cuts):  # what the template makes of content k, between its fixed neighbours
        alone = render(tokenizer, [m if j == k else m | {"content": HOLE.format(j)}
                                   for j, m in enumerate(messages)], thinking)
        tail = len(skeleton) - end
        if not (len(alone) >= start + tail and alone.startswith(skeleton[:start])
                and alone.endswith(skeleton[end:])):
            raise ValueError(f"the chat template renders its own text differently for message {k}'s content")
        spans.insert(2 * k + 1, (alone[start:len(alone) - tail], True))
    whole = render(tokenizer, messages, thinking)
    if "".join(text for text, _ in spans) != whole:
        raise ValueError("the chat template renders the messages' contents differently together than alone")
    special = special_tokens(tokenizer)
    ids, run = [], ""  # run: the text since the last special token of the template
    for text, content in spans:
        parts = [text] if content or special is None else special.split(text)  # text, special, text, ...
        for i, part in enumerate(parts):
            if i % 2 == 0:
                run += part
                continue
            ids += tokenizer(run, add_special_tokens=False, split_special_tokens=True).input_ids if run else []
            ids.append(tokenizer.convert_tokens_to_ids(part))
            run = ""
    return whole, ids + (tokenizer(run, add_special_tokens=False, split_special_tokens=True).input_ids if run else [])


def special_tokens(tokenizer) -> re.Pattern | None:
    """A pattern that finds the tokenizer's special tokens (longest first, as a tokenizer matches them) and captures
    each, for re.split; None if it has none. A special token that strips the spaces beside it (lstrip, rstrip) or
    matches whole words only is refused: cutting at it would not give the tokenizer's ids."""
    tokens = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
    odd = [t.content for t in tokens if t.lstrip or t.rstrip or t.single_word]
    if odd:
        raise ValueError(f"special tokens {odd} strip spaces or match single words: prompts.encode cannot cut "
                         "at them")
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted({t.content for t in tokens}, key=len,
                                                                   reverse=True)) + ")")


def critic_messages(problem: data.Problem, response: str) -> list[dict]:
    """The StepAlignFB critic prompt: problem, reference answer (and solution), the student's numbered steps."""
    n = len(data.split_steps(response))
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


def format_critique(case: str, pivot_step: int | None, step_ok: list[bool], reasons: list[str | None],
                    corrected_solution: str) -> str:
    """The one schema, as the critic prompt asks for it."""
    lines = [f"Case: {case}", f"Pivotal step: {pivot_step if pivot_step is not None else 'none'}", "Summary:"]
    for i, (ok, reason) in enumerate(zip(step_ok, reasons), start=1):
        lines.append(f"Step {i}: Correct" if ok else f"Step {i}: Incorrect -- {reason}")
    lines += ["Corrected solution:", corrected_solution]
    return "\n".join(lines)


def prompt_opens_think(prompt: str) -> bool:
    """True when a rendered prompt ends with an open <think> tag (QwQ-32B's template ends with "<think>\n")."""
    return prompt.rstrip().endswith("<think>")
