"""The teacher-gap command: the prompts it samples are training's, the numbers are the samples' Avg@k, and the
command line runs end to end on a tiny model."""
import json

import pytest

import teacher_gap
import train
from data import arithmetic_problems
from prompts import render, teacher_messages, verdict_text
from rollout import Completion
from test_train import tiny_args, tiny_model_dir  # noqa: F401  (a fixture)


class Checker:
    def grade(self, text, gold):
        return text.strip() == f"\\boxed{{{gold}}}"


class ScriptedEngine:
    """Answers by prompt: the student prompt right on problem 0 only (sample 0 of 2), a teacher prompt that holds
    the critique ("Expert review") always right, the reference solution's prompt never answering, the verdict's
    prompt always wrong. Records every call (prompts, seeds, adapter)."""

    def __init__(self, problems, tokenizer):
        self.problems, self.tokenizer, self.calls = problems, tokenizer, []

    def generate(self, prompts, seeds, n=1, temperature=1.0, max_new_tokens=256, adapter=True):
        self.calls.append((list(prompts), list(seeds), n, adapter))
        out = []
        for prompt in prompts:
            p = next(p for p in self.problems if p.problem in prompt)
            right, wrong = f"\\boxed{{{p.answer}}}", f"\\boxed{{{int(p.answer) + 1}}}"
            if "Expert review" in prompt:
                texts = [right] * n
            elif "reference solution" in prompt:
                texts = ["I think so."] * n
            elif "Verdict" in prompt:
                texts = [wrong] * n
            else:
                texts = [right if p is self.problems[0] and j == 0 else wrong for j in range(n)]
            out.append([Completion(self.tokenizer(t, add_special_tokens=False).input_ids, t, "stop") for t in texts])
        return out


def test_gap_samples_training_teacher_prompts_and_counts_avg_at_k(tiny_model_dir, smol_tokenizer):  # noqa: F811
    problems = arithmetic_problems(3, seed=0, n_ops=1)
    cfg = train.parse_config(tiny_args(tiny_model_dir, "/tmp/unused"))
    engine = ScriptedEngine(problems, smol_tokenizer)
    res = teacher_gap.teacher_gap(cfg, engine, smol_tokenizer, Checker(), train.make_critic(cfg), problems, k=2,
                                  context=512)
    # student: problem 0 has 1 of 2 right, the others 0 of 2 -> Avg@2 = (0.5 + 0 + 0) / 3
    assert res["student"] == {"avg@k": pytest.approx(0.5 / 3), "answered": 1.0, "n_samples": 6}
    assert res["stepalign"]["avg@k"] == 1.0 and res["stepalign"]["gap"] == pytest.approx(100 * (1 - 0.5 / 3))
    assert (res["refsol"]["avg@k"], res["refsol"]["answered"]) == (0.0, 0.0)
    assert (res["verdict"]["avg@k"], res["verdict"]["answered"]) == (0.0, 1.0)
    assert all(res[f]["skipped"] == 0 and res[f]["n_samples"] == 6 for f in teacher_gap.FORMS)
    # the calls: the student prompt (adapter on, k samples each), then one teacher sample per rollout and form,
    # adapter off, from the prompt training renders: teacher_messages + render with --teacher-thinking
    student_call, *teacher_calls = engine.calls
    assert student_call[2:] == (2, True) and len(teacher_calls) == 3
    rollouts = [(p, j) for p in problems for j in range(2)]
    for form, (prompts, seeds, n, adapter) in zip(teacher_gap.FORMS, teacher_calls):
        assert (n, adapter, len(prompts)) == (1, False, 6)
        for prompt, (p, j) in zip(prompts, rollouts):
            text = engine_text(engine, p, j)
            c = {"stepalign": lambda: train.make_critic(cfg).critique([(p, text)])[0].text,
                 "refsol": lambda: p.reference_solution,
                 "verdict": lambda: verdict_text(text, correct=Checker().grade(text, p.answer))}[form]()
            assert prompt == render(smol_tokenizer, teacher_messages(p, form, c), cfg.teacher_thinking)
    assert teacher_calls[0][1] == teacher_calls[1][1]  # the same seeds for every form: paired samples
    assert [r["teacher"]["stepalign"]["reward"] for r in res["samples"]] == [1.0] * 6
    table = teacher_gap.gap_table(res, k=2)
    assert "| StepAlignFB teacher (x + c) | 100.0 | 1.00 | +83.3 | 6 | 0 |" in table


def engine_text(engine, p, j):
    """The student rollout the scripted engine wrote for sample j of problem p."""
    return f"\\boxed{{{p.answer}}}" if p is engine.problems[0] and j == 0 else f"\\boxed{{{int(p.answer) + 1}}}"


def test_command_line_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "gap.json"
    args = tiny_args(tiny_model_dir, tmp_path / "run", "--teacher-thinking")
    teacher_gap.main(["--split", "train", "--n-problems", "2", "--k", "2", "--forms", "stepalign,verdict",
                      "--json", str(out), *args])
    printed = capsys.readouterr().out
    assert "| student (x) |" in printed and "| StepAlignFB teacher (x + c) |" in printed and "RefSol" not in printed
    record = json.loads(out.read_text())
    assert record["split"] == "train" and record["k"] == 2 and record["config"]["seed"] == 3
    assert len(record["samples"]) == 4 and set(record["samples"][0]["teacher"]) == {"stepalign", "verdict"}
    with pytest.raises(SystemExit):
        teacher_gap.main(["--forms", "grpo", *args])
