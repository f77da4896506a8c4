"""The teacher-gap command: the prompts it samples are training's, the numbers are the samples' Avg@k, the student
samples in training's sampling context (a bf16 model keeps a small adapter), and the command line runs end to end on
a tiny model."""
import json

import pytest
import torch

import config
import lora
import rollout
from scripts import teacher_gap
from conftest import tiny_llama
from demo.arithmetic import arithmetic_problems
from prompts import encode, teacher_messages, verdict_text
from rollout import Completion
from test_train import tiny_args, tiny_model_dir  # noqa: F401  (a fixture)
from infra import dist
import policy


class Checker:
    def grade(self, text, gold):
        return text.strip() == f"\\boxed{{{gold}}}"


class ScriptedEngine:
    """Answers by prompt: the student prompt right on problem 0 only (sample 0 of 2), a teacher prompt that holds
    the critique ("Expert review") always right, the reference solution's prompt never answering, the verdict's
    prompt always wrong. Records every call (prompts, seeds, adapter, whether the model's adapter is merged)."""

    def __init__(self, problems, tokenizer, model):
        self.problems, self.tokenizer, self.model, self.calls = problems, tokenizer, model, []

    def generate(self, prompt_ids, seeds, n=1, temperature=1.0, max_new_tokens=256, adapter=True):
        merged = all(m.merged for m in lora.lora_layers(self.model).values())
        self.calls.append((list(prompt_ids), list(seeds), n, adapter, merged))
        out = []
        for prompt in [self.tokenizer.decode(ids) for ids in prompt_ids]:
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
    cfg = config.parse_config(tiny_args(tiny_model_dir, "/tmp/unused"))
    model, _ = policy.build_model(cfg, dist.Dist())
    engine = ScriptedEngine(problems, smol_tokenizer, model)
    res = teacher_gap.teacher_gap(cfg, model, engine, smol_tokenizer, Checker(), config.make_critic(cfg), problems, k=2,
                                  context=512)
    # student: problem 0 has 1 of 2 right, the others 0 of 2 -> Avg@2 = (0.5 + 0 + 0) / 3. Exact: the per-problem
    # means (0.5, 0, 0) are exact and add up exactly in any order, then one division by 3; the gap is then the same
    # 100·(1 − that) as teacher_gap computes it
    assert res["student"] == {"avg@k": 0.5 / 3, "answered": 1.0, "n_samples": 6}
    assert res["stepalign"]["avg@k"] == 1.0 and res["stepalign"]["gap"] == 100 * (1 - 0.5 / 3)
    assert (res["refsol"]["avg@k"], res["refsol"]["answered"]) == (0.0, 0.0)
    assert (res["verdict"]["avg@k"], res["verdict"]["answered"]) == (0.0, 1.0)
    assert all(res[f]["skipped"] == 0 and res[f]["n_samples"] == 6 for f in teacher_gap.DEFAULT_FORMS)
    # the calls: the student prompt (adapter on and merged, as policy.sampling does, k samples each), then one
    # teacher sample per rollout and form, adapter off and unmerged, from the prompt training renders:
    # teacher_messages + encode with --teacher-thinking
    student_call, *teacher_calls = engine.calls
    assert student_call[2:] == (2, True, True) and len(teacher_calls) == 3
    rollouts = [(p, j) for p in problems for j in range(2)]
    for form, (prompts, seeds, n, adapter, merged) in zip(teacher_gap.DEFAULT_FORMS, teacher_calls):
        assert (n, adapter, merged, len(prompts)) == (1, False, False, 6)
        for prompt, (p, j) in zip(prompts, rollouts):
            text = engine_text(engine, p, j)
            c = {"stepalign": lambda: config.make_critic(cfg).critique([(p, text)])[0].text,
                 "refsol": lambda: p.reference_solution,
                 "verdict": lambda: verdict_text(text, correct=Checker().grade(text, p.answer))}[form]()
            assert prompt == encode(smol_tokenizer, teacher_messages(p, form, c), cfg.teacher_thinking)
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


class LogitsProbe:
    """An engine that samples nothing: at the student's call it records the logits its model computes on fixed ids,
    as they are (what the transformers engine would sample from) and with the adapter disabled (the base policy)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))  # (B, L)

    def generate(self, prompts, seeds, n=1, temperature=1.0, max_new_tokens=256, adapter=True):
        if adapter:
            with torch.no_grad():
                self.student = self.model(input_ids=self.ids).logits  # (B, L, V)
                with lora.adapters_disabled(self.model):
                    self.base = self.model(input_ids=self.ids).logits  # (B, L, V)
        ids = self.tokenizer("\\boxed{0}", add_special_tokens=False).input_ids
        return [[Completion(ids, "\\boxed{0}", "stop")] * n for _ in prompts]


def test_bf16_student_keeps_a_small_adapter(smol_tokenizer, tmp_path, monkeypatch):
    """--dtype bfloat16 --adapter DIR: the student samples the trained policy even when its ΔW is below half a bf16
    ulp of W in every entry (merged into the bf16 weights, as teacher_gap.py once did, it samples exactly the base).
    Without --adapter (B = 0) the student samples exactly the base: the difference is the adapter's."""
    model = tiny_llama(len(smol_tokenizer))
    targets = tuple(config.parse_config([]).lora_targets.split(","))
    with torch.no_grad():  # every targeted |W| >= 2^-6: a bf16 half-ulp there is >= 2^-14, twice the ΔW below
        for name, p in model.named_parameters():
            if name.rsplit(".", 2)[-2] in targets:
                p.copy_(p.sign() * p.abs().clamp(min=2.0 ** -6))
    model.save_pretrained(tmp_path / "model")
    smol_tokenizer.save_pretrained(tmp_path / "model")
    lora.add_lora(model, r=4, alpha=8, targets=targets)
    for layer in lora.lora_layers(model).values():  # |ΔW| <= (α/r)·r·|B|·max|A| <= 8 · 1e-5 / √32 < 2^-15
        torch.nn.init.constant_(layer.lora_B.weight, 1e-5)
    lora.save_adapter(model, str(tmp_path / "adapter"))
    probes = []

    def make_engine(kind, name, m, tok, **kwargs):
        probes.append(LogitsProbe(m, tok))
        return probes[-1]

    monkeypatch.setattr(rollout, "make_engine", make_engine)
    args = [*tiny_args(tmp_path / "model", tmp_path / "run"), "--dtype", "bfloat16", "--split", "train",
            "--n-problems", "1", "--k", "1", "--forms", "verdict"]
    teacher_gap.main([*args, "--adapter", str(tmp_path / "adapter")])
    teacher_gap.main(args)
    trained, fresh = probes
    layers = lora.lora_layers(trained.model).values()
    assert trained.student.dtype == torch.bfloat16
    assert all(torch.equal((m.weight.float() + m.delta_weight()).bfloat16(), m.weight) for m in layers)
    assert not torch.equal(trained.student, trained.base)  # the trained policy
    assert torch.equal(fresh.student, fresh.base)  # B = 0: the base policy, bit for bit
