"""The loop on a tiny random model: config, data order, DDP (2 torchrun ranks = 1 process), exact resume,
SIGTERM, atomic checkpoints, and faults (critic down, non-finite loss, missing paths)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A 2-layer random Llama with the real SmolLM2 tokenizer, saved like any local model."""
    path = tmp_path_factory.mktemp("tiny_model")
    tiny_llama(len(smol_tokenizer), seed=0).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def tiny_args(model_dir, out_dir, *extra):
    return ["--model", str(model_dir), "--data", "arithmetic", "--arith-train", "8", "--arith-test", "2",
            "--arith-ops", "1", "--arith-max-operand", "9", "--critic", "exact", "--engine", "transformers",
            "--max-new-tokens", "6", "--prompts-per-step", "4", "--micro-batch", "2", "--lr", "1e-2",
            "--dtype", "float32", "--no-grad-checkpointing", "--eval-every", "2", "--eval-samples", "2",
            "--lora-r", "4", "--lora-alpha", "8", "--grpo-group-size", "2", "--no-progress", "--seed", "3",
            "--out-dir", str(out_dir), *extra]


def adapter(out_dir, step):
    return load_file(Path(out_dir) / "checkpoints" / f"step_{step:06d}" / "adapter_model.safetensors")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_cli(args, nproc=None, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", str(ROOT / "train.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- config
def test_every_config_field_is_an_option_with_help():
    text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT).stdout
    for f in train.dataclasses.fields(train.Config):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"]


def test_paper_defaults_and_demo_preset():
    paper = train.parse_config([])
    assert (paper.feedback, paper.model, paper.lora_r, paper.lora_alpha, paper.temperature, paper.lr,
            paper.prompts_per_step, paper.max_new_tokens, paper.divergence) == (
        "stepalign", "Qwen/Qwen3-1.7B", 64, 128.0, 1.1, 5e-6, 32, 2048, "forward")
    assert (paper.student_thinking, paper.teacher_thinking) == (False, True)
    assert train.group_size(paper) == 1 and train.group_size(train.parse_config(["--feedback", "grpo"])) == 8
    demo = train.parse_config(["--preset", "demo", "--lr", "0.5"])
    assert demo.model == "smollm2-135m-instruct" and demo.critic == "exact" and demo.lr == 0.5
    assert train.parse_config(["--preset", "demo", "--no-stop-at-boxed"]).stop_at_boxed is False


def test_data_order_is_a_seeded_stream_of_epoch_permutations():
    cfg = train.parse_config(["--prompts-per-step", "4", "--seed", "1"])
    items = [f"p{i}" for i in range(6)]
    steps = [train.step_problems(items, cfg, s) for s in range(3)]  # 12 draws = 2 epochs of 6
    assert steps[0] == train.step_problems(items, cfg, 0)
    flat = [p for s in steps for p in s]
    assert sorted(flat[:6]) == items and sorted(flat[6:]) == items  # each epoch is a permutation
    assert train.total_steps(cfg, 6) == 7 * 6 // 4


def test_missing_paths_fail_at_start(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        train.check_inputs(train.parse_config(["--data", str(tmp_path / "nope.jsonl")]))
    with pytest.raises(SystemExit, match="no such directory"):
        train.check_inputs(train.parse_config(["--data", "arithmetic", "--engine", "transformers",
                                               "--model", str(tmp_path / "no_model")]))
    result = run_cli(["--data", str(tmp_path / "nope.jsonl")])
    assert result.returncode != 0 and "no such file" in result.stderr


def test_engine_vllm_without_vllm_or_with_a_bad_memory_fraction_fails_at_start(monkeypatch):
    """--engine vllm runs on CPU too (tests/test_vllm.py); what it needs is said before any model is loaded."""
    import importlib.util
    real = importlib.util.find_spec
    args = ["--preset", "demo", "--engine", "vllm"]
    if real("vllm") is not None:
        with pytest.raises(SystemExit, match=r"--vllm-gpu-memory 1.5: a fraction in \(0, 1\)"):
            train.check_inputs(train.parse_config(args + ["--vllm-gpu-memory", "1.5"]))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SystemExit, match=r"--engine vllm: .*requirements-gpu\.txt.*VLLM_CPU=1 bash setup\.sh"):
        train.check_inputs(train.parse_config(args))


# ---------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("feedback", ["stepalign", "refsol", "grpo"])
def test_two_steps_log_everything(tiny_model_dir, tmp_path, feedback):
    out = tmp_path / feedback
    train.main(tiny_args(tiny_model_dir, out, "--feedback", feedback, "--max-steps", "2"))
    log = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    for key in ("loss", "reward", "response_length", "tokens_per_s", "time_rollout", "time_student",
                "skipped_critic", "skipped_nonfinite", "adv_mean"):
        assert key in log[0]
    if feedback != "grpo":
        assert "time_teacher" in log[0] and "divergence" in log[0] and "adv_neg_frac" in log[0]
    if feedback == "stepalign":
        assert log[0]["critic_schema_ok"] == 1.0 and "time_critic" in log[0]
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2] and all(e["feedback"] == feedback for e in evals)
    assert {"pass@k", "maj@k", "avg@k", "length"} <= set(evals[0])
    saved = json.loads((out / "checkpoints" / "step_000002" / "config.json").read_text())
    assert saved["feedback"] == feedback
    # the adapter moved and is in the PEFT layout
    weights = adapter(out, 2)
    assert all(k.startswith("base_model.model.") for k in weights)
    if feedback != "grpo":  # (the random model never answers, so GRPO's groups have zero advantage)
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(tiny_model_dir, straight, "--max-steps", "4"))
    train.main(tiny_args(tiny_model_dir, resumed, "--max-steps", "2"))
    with (resumed / "log.jsonl").open("a") as f:  # a crash after logging step 3, before its checkpoint
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    train.main(tiny_args(tiny_model_dir, resumed, "--max-steps", "4", "--resume"))
    a, b = adapter(straight, 4), adapter(resumed, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_jsonl(resumed / "log.jsonl")] == [1, 2, 3, 4]
    # the same batches after the resume: the rollouts' lengths and rewards are identical
    for r1, r2 in zip(read_jsonl(straight / "log.jsonl")[2:], read_jsonl(resumed / "log.jsonl")[2:]):
        assert (r1["response_length"], r1["reward"]) == (r2["response_length"], r2["reward"])


@pytest.mark.parametrize("feedback", ["stepalign"])
def test_two_ranks_equal_one_process(tiny_model_dir, tmp_path, feedback):
    """torchrun with 2 CPU ranks (gloo) and 1 process over the same global batch: the same LoRA weights after
    2 steps, up to float summation order (tolerance 1e-5 absolute on weights of size ~1e-1)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--feedback", feedback, "--max-steps", "2")
    r1 = run_cli(tiny_args(tiny_model_dir, one, *args))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli(tiny_args(tiny_model_dir, two, *args), nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = adapter(one, 2), adapter(two, 2)
    assert max(v.abs().max().item() for v in a.values()) > 1e-3  # the weights did move
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    l1, l2 = read_jsonl(one / "log.jsonl"), read_jsonl(two / "log.jsonl")
    for r1_, r2_ in zip(l1, l2):  # metrics are all-reduced over ranks
        assert r1_["reward"] == r2_["reward"] and r1_["response_length"] == r2_["response_length"]
        assert r1_["loss"] == pytest.approx(r2_["loss"], rel=1e-3, abs=1e-6)
    assert read_jsonl(one / "eval.jsonl")[-1]["avg@k"] == read_jsonl(two / "eval.jsonl")[-1]["avg@k"]


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    args = tiny_args(tiny_model_dir, out, "--max-steps", "40", "--eval-every", "100")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output[-2000:]
    assert "checkpoint written at step" in output
    steps = [int(p.name.split("_")[1]) for p in train.checkpoint_dirs(out)]
    assert len(steps) == 1 and 1 <= steps[0] < 40
    assert not list((out / "checkpoints").glob(".tmp_*"))
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", str(steps[0] + 1), "--resume", "--eval-every", "100"))
    assert read_jsonl(out / "log.jsonl")[-1]["step"] == steps[0] + 1


def test_a_kill_during_save_leaves_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2"))
    before = adapter(out, 2)
    cfg = train.parse_config(tiny_args(tiny_model_dir, out))
    model, _ = train.build_model(cfg, train.Dist())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(train.lora, "save_adapter", dies)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(cfg, model, optimizer, 2, {}, train.Dist())
    monkeypatch.undo()
    assert [p.name for p in train.checkpoint_dirs(out)] == ["step_000002"]
    after = adapter(out, 2)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_critic_server_down_skips_rollouts_not_the_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "1", "--critic", "server", "--critic-url",
                         "http://127.0.0.1:9/v1", "--critic-retries", "0", "--critic-timeout", "2"))
    [record] = read_jsonl(out / "log.jsonl")
    assert record["skipped_critic"] == 4 and record["skipped_critic_step"] == 4
    assert record["loss"] == 0.0  # nothing left to learn from, and no crash


def test_non_finite_loss_skips_the_step_without_touching_weights(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train.sd_loss.chunked_self_distillation_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(train.sd_loss, "chunked_self_distillation_loss", nan_loss)
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2", "--feedback", "refsol"))
    log = read_jsonl(out / "log.jsonl")
    assert [r["skipped_nonfinite"] for r in log] == [1, 2]
    assert all(v.abs().max() == 0 for k, v in adapter(out, 2).items() if "lora_B" in k)  # B is still zero


def test_verdict_feedback_and_pbsd_objective_run(tiny_model_dir, tmp_path):
    train.main(tiny_args(tiny_model_dir, tmp_path / "{feedback}", "--feedback", "verdict", "--max-steps", "1"))
    [record] = read_jsonl(tmp_path / "verdict" / "log.jsonl")
    assert "divergence" in record and record["skipped_critic"] == 0
    train.main(tiny_args(tiny_model_dir, tmp_path / "{feedback}", "--feedback", "refsol", "--objective", "pbsd",
                         "--max-steps", "1"))
    [record] = read_jsonl(tmp_path / "pbsd-refsol" / "log.jsonl")
    assert {"tie_frac", "teacher_reward", "time_teacher_sample"} <= set(record)
    # the random model never answers: every pair is a tie (both wrong), so no preference and no AdamW step
    assert record["tie_frac"] == 1.0 and record["teacher_reward"] == 0.0 and record["skipped_empty"] == 1
    assert read_jsonl(tmp_path / "pbsd-refsol" / "eval.jsonl")[0]["feedback"] == "pbsd-refsol"
    with pytest.raises(SystemExit, match="needs a teacher context"):
        train.check_inputs(train.parse_config(["--objective", "pbsd", "--feedback", "grpo", "--data", "arithmetic"]))


def test_teacher_context_per_feedback_form(tiny_model_dir, smol_tokenizer):
    """Each form puts its own c in the teacher prompt: the critique, the reference solution, or the verdict."""
    from data import arithmetic_problems
    from rollout import Completion
    problem = arithmetic_problems(1, seed=0, n_ops=2)[0]
    wrong = "Step 1: " + problem.steps[0].rsplit("=", 1)[0] + "= 1000\n\\boxed{1000}"
    for feedback, expected in (("stepalign", "Incorrect"), ("refsol", problem.reference_solution),
                               ("verdict", "1000. This answer is incorrect")):
        cfg = train.parse_config(tiny_args(tiny_model_dir, "/tmp/unused", "--feedback", feedback))
        item = train.Item(problem, [1], Completion([5], wrong, "stop"), reward=0.0)
        backend = train.make_critic(cfg) if feedback == "stepalign" else None
        stats = train.attach_feedback(cfg, backend, None, smol_tokenizer, None, [item], 0, train.Timer())
        teacher_prompt = smol_tokenizer.decode(item.teacher_ids)
        assert expected in teacher_prompt and problem.problem in teacher_prompt
        if feedback == "stepalign":
            assert stats["critic_schema_ok"] == 1.0
        if feedback != "refsol":
            assert problem.reference_solution not in teacher_prompt


def test_a_step_with_nothing_to_learn_leaves_the_weights_alone(tiny_model_dir, tmp_path):
    """Every rollout skipped (e.g. the critic down): no AdamW step, whose momentum would still move the weights."""
    cfg = train.parse_config(tiny_args(tiny_model_dir, tmp_path / "run", "--feedback", "refsol"))
    with train.evaluate.AnswerChecker() as checker:
        run, _ = train.start_run(cfg, train.Dist(), checker)
        items, _ = run.rollouts_and_feedback(0, train.Timer())
        run.optimize(items, train.Timer())  # a real step: AdamW now has momentum
        before = [p.detach().clone() for p in run.params]
        assert any(b.abs().max() > 0 for b in before[1::2])  # (lora_B moved)
        for it in items:
            it.skipped = True
        _, grad_norm = run.optimize(items, train.Timer())
    assert all(torch.equal(b, p) for b, p in zip(before, run.params))
    assert run.counters["skipped_empty"] == 1 and grad_norm != grad_norm  # NaN: no step taken


def test_feedback_all_evaluates_the_base_policy_once(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = train.evaluate_policy

    def counting(cfg, engine, tokenizer, checker, test, step, d):
        calls.append((cfg.feedback, step))
        return real(cfg, engine, tokenizer, checker, test, step, d)

    monkeypatch.setattr(train, "evaluate_policy", counting)
    train.main(tiny_args(tiny_model_dir, tmp_path / "{feedback}", "--feedback", "all", "--max-steps", "1",
                         "--eval-every", "1"))
    assert calls == [("stepalign", 0), ("stepalign", 1), ("refsol", 1), ("grpo", 1)]
    step0 = [read_jsonl(tmp_path / f / "eval.jsonl")[0] for f in ("stepalign", "refsol", "grpo")]
    assert [e["feedback"] for e in step0] == ["stepalign", "refsol", "grpo"]
    assert all({k: v for k, v in e.items() if k != "feedback"} == {k: v for k, v in step0[0].items()
                                                                    if k != "feedback"} for e in step0)


def test_a_problem_drawn_twice_in_one_step_gets_two_rollouts(smol_tokenizer):
    from data import arithmetic_problems
    from rollout import Completion

    class Engine:
        def generate(self, prompts, seeds, n, **kw):
            self.seeds = seeds
            return [[Completion([5], "x", "stop")] * n for _ in prompts]

    class Checker:
        def grade(self, text, gold):
            return False

    cfg = train.parse_config(["--feedback", "grpo", "--grpo-group-size", "2"])
    problem = arithmetic_problems(1, seed=0)[0]
    engine = Engine()
    items = train.collect_rollouts(cfg, engine, smol_tokenizer, Checker(), [(0, problem), (5, problem)], 7,
                                   train.Timer())
    assert len(set(engine.seeds)) == 2  # (the engine derives one seed per sample from each)
    assert [(it.draw, it.sample) for it in items] == [(0, 0), (0, 1), (5, 0), (5, 1)]
