"""bench/bench_vs_trl.py without trl: it skips with one line and exit 0, and the dataset it gives TRL's SDFTTrainer
makes TRL's teacher prompt ("{prompt}{privileged_context}") our teacher prompt, as train.py builds it."""
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import feedback
import prompts
import rollout
from feedback import Item

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_vs_trl.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="trl is installed: the bench would run")
def test_without_trl_it_skips_with_one_line_and_exit_0():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()]
    assert proc.stdout.startswith("bench_vs_trl.py: skipped: trl") and "pip install trl==1.16.0 peft" in proc.stdout


def test_trl_teacher_prompt_is_ours(smol_tokenizer):
    """Each row: the student prompt x of collect_rollouts, and x + privileged context = the teacher prompt that
    with_teacher_prompts renders for a rollout of the same problem, in our step order."""
    bench = load_bench()
    cfg = bench.workload(steps=2)
    rows = bench.trl_rows(cfg, smol_tokenizer, steps=2)
    train, _ = bench.config.load_problems(cfg)
    problems = [p for step in range(2) for p in feedback.step_problems(train, cfg, step)]
    assert len(rows) == len(problems) == 2 * cfg.prompts_per_step
    y = rollout.Completion([28, 29], "Step 1: 8 + 7 = 15", "length")
    items = [Item(p, [], y) for p in problems]
    contexts = [feedback.FORMS[feedback.form_name(cfg)].context(it, None) for it in items]
    items, too_long = feedback.with_teacher_prompts(cfg, smol_tokenizer, items, contexts, max_positions=8192)
    assert too_long == 0
    for row, it in zip(rows, items):
        assert row["prompt"] == prompts.render(smol_tokenizer, prompts.student_messages(it.problem),
                                               cfg.student_thinking)
        assert row["prompt"] + row["privileged_context"] == it.teacher_prompt
        assert it.problem.reference_solution in row["privileged_context"]
    assert not cfg.stop_at_boxed and cfg.feedback == "refsol" and dataclasses.asdict(cfg)["preset"] == "demo"
