"""The loop on a tiny random model: data order, DDP (2 torchrun ranks = 1 process), exact resume, SIGTERM, and
faults: the critic server dying mid-run, a non-finite loss, a run that learns nothing; critiques that fail the schema
skipped and counted; micro-batches against one batch; the micro-batch losses against Eq. 3 and PBSD written out on
model(...).logits."""
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import config
import evaluate
from demo import exact_critic
import feedback
import grading
import lora
import rollout
import sd_loss
import train
from conftest import (U64, first_order_bound, fp32_rounding, log_softmax_rounding, logit_rounding, tiny_llama,
                      tiny_llama_chain)
from test_critic import Handler as ReplyHandler, chat_answer, serve  # noqa: F401 (serve: a fixture, a server on loopback)
from infra import checkpoint, dist, logs, stop_rules

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


def test_data_order_is_a_seeded_stream_of_epoch_permutations():
    cfg = config.parse_config(["--prompts-per-step", "4", "--seed", "1"])
    items = [f"p{i}" for i in range(6)]
    steps = [feedback.step_problems(items, cfg, s) for s in range(3)]  # 12 draws = 2 epochs of 6
    assert steps[0] == feedback.step_problems(items, cfg, 0)
    flat = [p for s in steps for p in s]
    assert sorted(flat[:6]) == items and sorted(flat[6:]) == items  # each epoch is a permutation
    assert config.total_steps(cfg, 6) == 7 * 6 // 4


# ---------------------------------------------------------------------------------------------- the loop
@pytest.mark.parametrize("form", ["stepalign", "refsol", "grpo"])
def test_two_steps_log_everything(tiny_model_dir, tmp_path, form):
    out = tmp_path / form
    train.main(tiny_args(tiny_model_dir, out, "--feedback", form, "--max-steps", "2"))
    log = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    for key in ("loss", "reward", "response_length", "tokens_per_s", "time_rollout", "time_student",
                "skipped_critic", "skipped_nonfinite", "adv_mean"):
        assert key in log[0]
    if form != "grpo":
        assert "time_teacher" in log[0] and "divergence" in log[0] and "adv_neg_frac" in log[0]
        for r in log:  # the diagnostics of a declining run
            assert r["entropy_student"] > 0 and r["entropy_teacher"] > 0
            assert 0.01 <= r["div_top1_share"] <= 1 and 0 <= r["claim_located"] <= 1
            assert "teacher_reward" not in r  # (--teacher-samples is off)
    assert all(0 <= r["answered"] <= 1 for r in log)
    if form == "stepalign":
        assert log[0]["critic_schema_ok"] == 1.0 and "time_critic" in log[0]
        assert log[0]["skipped_unstructured_step"] == log[0]["kept_unstructured_step"] == 0
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2] and all(e["feedback"] == form for e in evals)
    assert {"pass@k", "maj@k", "avg@k", "length"} <= set(evals[0])
    saved = json.loads((out / "checkpoints" / "step_000002" / "config.json").read_text())
    assert saved["feedback"] == form
    # the adapter moved and is in the PEFT layout
    weights = adapter(out, 2)
    assert all(k.startswith("base_model.model.") for k in weights)
    if form != "grpo":  # (the random model never answers, so GRPO's groups have zero advantage)
        assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())


class Alternating(grading.AnswerChecker):
    """Scripted rewards 1, 0, 1, 0, ... in grading order: every GRPO group of G = 2 rollouts has one right and one
    wrong answer, so every advantage is ±1 (the random model never answers). Evaluation grades for real."""

    graded = 0

    def grade(self, text, gold):
        self.graded += 1
        return self.graded % 2 == 1


def test_grpo_with_scripted_rewards_moves_the_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "grpo"
    cfg = config.form_config(config.parse_config(tiny_args(tiny_model_dir, out, "--feedback", "grpo",
                                                           "--max-steps", "2")), "grpo")
    with Alternating() as checker:
        _, counters, steps = train.train(cfg, dist.Dist(), checker)
    assert steps == 2 and counters["skipped_empty"] == counters["skipped_nonfinite"] == 0
    assert [r["reward"] for r in read_jsonl(out / "log.jsonl")] == [0.5, 0.5]
    weights = adapter(out, 2)
    moved = [v.abs().max().item() for k, v in weights.items() if k.endswith("lora_B.weight")]
    assert len(moved) == 14 and min(moved) > 1e-3  # every B (0 at the start) took AdamW steps of ~lr = 1e-2


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_args(tiny_model_dir, straight, "--max-steps", "4"))
    train.main(tiny_args(tiny_model_dir, resumed, "--max-steps", "2"))
    with (resumed / "log.jsonl").open("a") as f:  # a crash after logging step 3, before its checkpoint
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    train.main(tiny_args(tiny_model_dir, resumed, "--max-steps", "4", "--resume"))
    a, b = adapter(straight, 4), adapter(resumed, 4)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the same operations in the same order: bit-identical
    assert [r["step"] for r in read_jsonl(resumed / "log.jsonl")] == [1, 2, 3, 4]
    # the same batches after the resume: the rollouts' lengths and rewards are identical
    for r1, r2 in zip(read_jsonl(straight / "log.jsonl")[2:], read_jsonl(resumed / "log.jsonl")[2:]):
        assert (r1["response_length"], r1["reward"]) == (r2["response_length"], r2["reward"])


class Payload:
    """A pickled object whose unpickling makes a directory: what a hostile checkpoint file would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("name", ["rng_rank0.pt", "optimizer.pt"])
def test_resume_refuses_a_checkpoint_that_holds_code(tiny_model_dir, tmp_path, capsys, name):
    """A `__reduce__` payload planted in a checkpoint file never runs: --resume exits 2, one line naming the file."""
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "1", "--eval-every", "1"))
    [ckpt] = checkpoint.checkpoint_dirs(out)
    marker = tmp_path / "payload_ran"
    torch.save({"state": Payload(str(marker)), "tensor": torch.zeros(2)}, ckpt / name)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2", "--eval-every", "1", "--resume"))
    assert stop.value.code == stop_rules.EXIT_BAD_INPUT
    assert not marker.exists()
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train.py: error:")]
    assert str(ckpt / name) in line and "refused" in line and "never code" in line
    assert "mkdir" in line and "weights_only" not in line  # names the object, never advises weights_only=False


@pytest.mark.parametrize("form", ["stepalign"])
def test_two_ranks_equal_one_process(tiny_model_dir, tmp_path, form):
    """torchrun with 2 CPU ranks (gloo) and 1 process over the same global batch of 2 problems, bit for bit: the
    same LoRA weights after 2 steps and the same logged metrics. Exact by construction: with one problem per rank
    and one per micro-batch, each micro-batch is the same computation in both runs (the same shapes and weights,
    one thread each), and what the ranks combine is a sum of two terms (gradients, metric sums), a + b in either
    order; counts are integers. So any difference is a real one (a problem drawn by the wrong rank, a normalizer
    counted on one rank only, a metric averaged instead of summed), not rounding."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--feedback", form, "--max-steps", "2", "--prompts-per-step", "2", "--micro-batch", "1")
    r1 = run_cli(tiny_args(tiny_model_dir, one, *args))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli(tiny_args(tiny_model_dir, two, *args), nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = adapter(one, 2), adapter(two, 2)
    # the weights did move: B starts at 0 (A starts random, so a check including A could not fail)
    assert max(v.abs().max().item() for k, v in a.items() if k.endswith("lora_B.weight")) > 1e-3
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    l1, l2 = read_jsonl(one / "log.jsonl"), read_jsonl(two / "log.jsonl")
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2]
    for r1_, r2_ in zip(l1, l2):  # metrics are all-reduced over ranks
        # the top-1% share is over the step's tokens of both ranks, not a mean of the ranks' own shares
        for key in ("reward", "response_length", "loss", "grad_norm", "div_top1_share", "entropy_student",
                    "entropy_teacher", "answered"):
            assert r1_[key] == r2_[key], key
    assert read_jsonl(one / "eval.jsonl")[-1]["avg@k"] == read_jsonl(two / "eval.jsonl")[-1]["avg@k"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_writes_a_checkpoint_and_resume_finishes(tiny_model_dir, tmp_path, signum, code):
    """SIGTERM, and SIGINT (Ctrl-C) alike: a checkpoint of the last completed step, exit 128 + the signal's number,
    and --resume finishes the run. A real process and a real signal."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    args = tiny_args(tiny_model_dir, out, "--max-steps", "40", "--eval-every", "100")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, output[-2000:]
    assert f"{signal.Signals(signum).name}: checkpoint written at step" in output and "Traceback" not in output
    steps = [int(p.name.split("_")[1]) for p in checkpoint.checkpoint_dirs(out)]
    assert len(steps) == 1 and 1 <= steps[0] < 40
    assert not list((out / "checkpoints").glob(".tmp_*"))
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", str(steps[0] + 1), "--resume", "--eval-every", "100"))
    assert read_jsonl(out / "log.jsonl")[-1]["step"] == steps[0] + 1


class CriticServer:
    """A real OpenAI-compatible critic on 127.0.0.1 that can be stopped (connections refused) and restarted on
    the same port. Its critiques are free text (the schema is not under test here)."""

    def __init__(self, content: str = "Step 1 is wrong."):
        from http.server import ThreadingHTTPServer

        class Handler(ReplyHandler):  # tests/test_critic.py's: its reply() and quiet log
            def do_GET(self):  # noqa: N802
                self.reply(200, {"object": "list", "data": [{"id": "critic", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self.reply(200, {"choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]})

        self.handler, self.server_class, self.server, self.port = Handler, ThreadingHTTPServer, None, 0
        self.start()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self):
        import threading
        self.server = self.server_class(("127.0.0.1", self.port), self.handler)  # (allow_reuse_address is set)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.mark.slow
def test_a_critic_that_dies_mid_run_warns_then_stops_with_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """Steps 1-2 answered; the server dies for step 3 (warning, the run goes on: 4 of 12 critiques failed),
    comes back for step 4, dies again for step 5: 8 of the last 16 critiques failed, at --critic-fail-max 0.5,
    so the run checkpoints step 5 and exits 3. With the server back, --resume finishes the run."""
    server = CriticServer()
    out = tmp_path / "run"
    real_write = logs.Logger.write

    def write_then_act(self, name, record):  # the loop's own step boundary: kill or revive the real server
        real_write(self, name, record)
        if name == "log.jsonl" and record["step"] in (2, 4):
            server.stop()
        elif name == "log.jsonl" and record["step"] == 3:
            server.start()

    monkeypatch.setattr(logs.Logger, "write", write_then_act)
    args = tiny_args(tiny_model_dir, out, "--max-steps", "6", "--eval-every", "100", "--critic", "server",
                     "--critic-url", server.url, "--critic-model", "critic", "--critic-retries", "0",
                     "--critic-fail-window", "4", "--critic-fail-max", "0.5",
                     "--critic-unstructured", "keep", "--no-critic-think-in-prompt")  # free text reaches the teacher
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(args)
        err = capsys.readouterr().err
        assert stop.value.code == stop_rules.EXIT_CRITIC_DOWN, err
        warnings = [line for line in err.splitlines() if "the critic failed on" in line]
        assert warnings == [f"[stepalign] step {s}: the critic failed on 4 of 4 rollouts (refused 4); they are "
                            "skipped" for s in (3, 5)]
        assert (f"stopped at step 5: 8 of 16 critiques failed over the last 4 steps (refused 8), at least "
                f"--critic-fail-max 0.5. Fix: the critic server at {server.url} does not answer") in err
        assert "continue with the same command and --resume" in err
        assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step_000005"]
        log = read_jsonl(out / "log.jsonl")
        assert [r["critic_failed"] for r in log] == [0, 0, 4, 0, 4]
        assert [r.get("critic_failed_refused", 0) for r in log] == [0, 0, 4, 0, 4]
        assert log[-1]["skipped_critic"] == 8
        server.start()
        monkeypatch.undo()
        train.main([*args, "--resume"])
        assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
        assert read_jsonl(out / "log.jsonl")[-1]["critic_failed"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize("content,kind,failed", [("ok</think>\n\nLooks fine to me.", "schema", 0),
                                                ("a trace never closed", "empty", 0),  # all trace: empty
                                                ("", "empty", 4)])  # an empty content: the request failed
def test_unusable_critiques_are_skipped_counted_and_stop_the_run(tiny_model_dir, tmp_path, capsys, content, kind,
                                                                 failed):
    """The paper's default: a critique that fails the schema (or is empty) never reaches the teacher; the step counts
    it, warns naming it, and it counts toward --critic-fail-max like a failed request: a critic that never follows
    the schema stops the run (exit 3), at the last step too, with a checkpoint."""
    server = CriticServer(content)  # QwQ-style: the trace's <think> was in the prompt
    out = tmp_path / "run"
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(tiny_args(tiny_model_dir, out, "--max-steps", "1", "--critic", "server", "--critic-url",
                                 server.url, "--critic-model", "critic", "--critic-retries", "0", "--eval-every", "5"))
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert stop.value.code == stop_rules.EXIT_CRITIC_DOWN, err
    assert f"step 1: the critic failed on 4 of 4 rollouts ({kind} 4); they are skipped" in err
    assert f"stopped at step 1: 4 of 4 critiques failed over the last 1 steps ({kind} 4)" in err
    assert "this was the last step" in err
    [record] = read_jsonl(out / "log.jsonl")
    assert record["critic_failed"] == failed and record["skipped_critic"] == 4  # nothing usable
    assert record.get(f"unusable_{kind}", 0) == 4 - failed
    assert record["skipped_unstructured_step"] == 4 - failed and record["skipped_critic_step"] == 4
    assert record["kept_unstructured_step"] == 0 and record["critic_schema_ok"] == 0.0
    assert record["loss"] == 0.0 and record["skipped_empty"] == 1  # nothing reached the teacher
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step_000001"]


def test_unstructured_policy_skip_or_keep(tiny_model_dir, smol_tokenizer, serve):
    """skip (default): only schema-valid critiques reach the teacher. keep: an unstructured critique does too,
    an empty one does not. A failed critique (here: cut by the length limit) is skipped under both."""
    from demo.arithmetic import arithmetic_problems
    from rollout import Completion
    problem = arithmetic_problems(1, seed=0, n_ops=2)[0]
    wrong = "Step 1: " + problem.steps[0].rsplit("=", 1)[0] + "= 1000\n\\boxed{1000}"
    valid = exact_critic.ExactArithmeticCritic().critique_one(problem, wrong).text
    # QwQ-style answers (the template opened <think> in the prompt, the paper's default --critic-think-in-prompt)
    answers = {"VALID": (f"Step 1 is wrong.\n</think>\n\n{valid}", "stop"),
               "FREE-TEXT": ("Hmm.\n</think>\n\nRecheck the first sum.", "stop"),
               "EMPTY": ("Hmm.\n</think>\n\n", "stop"), "CUT": ("Let me think about step", "length")}

    def respond(body, headers):
        marker = next(m for m in answers if m in body["messages"][0]["content"])
        return 200, chat_answer(*answers[marker])

    server, url = serve(respond)
    for policy, skipped, kept in (("skip", [False, True, True, True], 0), ("keep", [False, False, True, True], 1)):
        cfg = config.parse_config(tiny_args(tiny_model_dir, "/tmp/unused", "--critic", "server", "--critic-url", url,
                                           "--critic-retries", "0", "--critic-unstructured", policy))
        items = [feedback.Item(problem, [1], Completion([5], f"{wrong}\n{m}", "stop")) for m in answers]
        contexts, _, stats = feedback.feedback_contexts(cfg, config.make_critic(cfg), items, logs.Timer())
        items, _ = feedback.with_teacher_prompts(cfg, smol_tokenizer, items, contexts, 8192)
        assert [it.skipped for it in items] == skipped
        assert (stats["critic_failed"], stats["critic_schema_ok"]) == (1.0, 1.0)
        assert (stats["kept_unstructured"], stats["skipped_unstructured"]) == (kept, 2 - kept)
        assert "Incorrect" in smol_tokenizer.decode(items[0].teacher_ids)
        if policy == "keep":
            assert "Recheck the first sum." in smol_tokenizer.decode(items[1].teacher_ids)


def test_non_finite_loss_skips_the_step_without_touching_weights(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = sd_loss.chunked_self_distillation_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(sd_loss, "chunked_self_distillation_loss", nan_loss)
    with pytest.raises(SystemExit) as stop:  # a run whose every step was skipped learned nothing: not a success
        train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2", "--feedback", "refsol"))
    assert stop.value.code == stop_rules.EXIT_NOTHING_LEARNED
    log = read_jsonl(out / "log.jsonl")
    assert [r["skipped_nonfinite"] for r in log] == [1, 2]
    assert all(v.abs().max() == 0 for k, v in adapter(out, 2).items() if "lora_B" in k)  # B is still zero


def strict_jsonl(path):
    """The lines of a JSONL file, refusing the non-standard constants NaN and Infinity that json.loads accepts."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def diverging_run(tiny_model_dir, out, lr: str, capsys) -> tuple[str, list[dict]]:
    """A refsol run at `lr` that must stop at step 2 with exit 5 (--nonfinite-max 2): its stderr and log.jsonl."""
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, out, "--feedback", "refsol", "--lr", lr, "--max-steps", "6",
                             "--nonfinite-max", "2", "--eval-every", "100"))
    err = capsys.readouterr().err
    assert stop.value.code == stop_rules.EXIT_DIVERGED, err
    assert "stopped at step 2: its last 2 steps were refused" in err
    return err, strict_jsonl(out / "log.jsonl")


def test_a_diverging_run_is_refused_step_by_step_then_stops_with_the_last_good_weights(tiny_model_dir, tmp_path,
                                                                                        capsys):
    """--lr 1e30: AdamW's first step moves every LoRA weight by ~lr, so ΔW = (α/r)·B A overflows fp32. Each such
    update is undone (weights and AdamW state) and counted; after --nonfinite-max steps in a row the run stops
    (exit 5) with a checkpoint holding the last good weights (here the initial ones: B = 0). Sampling never sees
    the diverged weights; log.jsonl stays strict JSON."""
    out = tmp_path / "run"
    err, log = diverging_run(tiny_model_dir, out, "1e30", capsys)
    assert "skipped_nonfinite 2: a loss" in err and "--lr (1e+30)" in err
    assert [r["skipped_nonfinite"] for r in log] == [1, 2]
    assert all(math.isfinite(r["grad_norm"]) for r in log)  # (the gradients were fine; the updates were not)
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step_000002"]
    weights = adapter(out, 2)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(v.abs().max() == 0 for k, v in weights.items() if "lora_B" in k)  # the initial B: nothing applied
    strict_jsonl(out / "eval.jsonl")


def test_a_finite_divergence_is_refused_and_the_checkpoint_keeps_the_last_good_step(tiny_model_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    """--lr 1e6 stays finite (every LoRA weight moves by ~lr; the issue's run exited 0 with |w| ≈ 2.2e6): the update
    grows the residual stream ~1e20× (past 1/u = 2²⁴ of fp32, stop_rules.refused_update), is undone and counted as
    skipped_diverged; the run stops with exit 5 naming --lr. Then a run whose lr explodes after one good step: its
    last checkpoint holds that step's weights, bit for bit."""
    out = tmp_path / "huge"
    err, log = diverging_run(tiny_model_dir, out, "1e6", capsys)
    assert "skipped_diverged 2: an update" in err and "Fix: a lower --lr (1000000.0)" in err
    assert [(r["skipped_diverged"], r["skipped_nonfinite"]) for r in log] == [(1, 0), (2, 0)]
    assert all(v.abs().max() == 0 for k, v in adapter(out, 2).items() if "lora_B" in k)  # the initial B

    real_policy = train.start_policy

    def lr_explodes_after_one_step(cfg, d):
        model, tokenizer, params, optimizer = real_policy(cfg, d)
        step = optimizer.step

        def stepped(*a, **k):
            out = step(*a, **k)
            for group in optimizer.param_groups:  # (a restored state keeps it: load_state_dict restores lr)
                group["lr"] = 1e6
            return out
        optimizer.step = stepped
        return model, tokenizer, params, optimizer

    monkeypatch.setattr(train, "start_policy", lr_explodes_after_one_step)
    out = tmp_path / "explodes"
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, out, "--feedback", "refsol", "--max-steps", "6", "--nonfinite-max", "2",
                             "--eval-every", "1"))
    assert stop.value.code == stop_rules.EXIT_DIVERGED
    assert [r["skipped_diverged"] for r in strict_jsonl(out / "log.jsonl")] == [0, 1, 2]
    good, last = adapter(out, 1), adapter(out, 3)
    assert any(v.abs().max() > 0 for k, v in good.items() if "lora_B" in k)  # step 1 moved the weights
    assert all(torch.equal(good[k], last[k]) for k in good)


def test_the_divergence_probe_keeps_k_positions_and_refuses_a_policy_moved_past_log_v():
    """stop_rules.probe_policy keeps the last K = PROBE_POSITIONS positions' log-probs (K, V), not (L, V), those of one
    full forward there within its rounding (the LM head's product on K rows may block otherwise: 2δz, conftest.
    logit_rounding, plus the log-softmax's); refused_update's criterion (b) alone: with the residual stream unchanged, a
    `before` whose policy is one-hot where the policy now puts its least mass (π ≤ 1/V there, KL = −log π > log V)
    is refused as diverged, and the policy itself is not."""
    from conftest import log_softmax_rounding, logit_rounding, tiny_llama
    model, d, K = lora.add_lora(tiny_llama(64), r=4, alpha=8), dist.Dist(), stop_rules.PROBE_POSITIONS
    probe = torch.randint(3, 64, (1, K + 20), generator=torch.Generator().manual_seed(0))  # (1, L), L > K
    logp, residual = stop_rules.probe_policy(model, probe, d)  # (K, V)
    assert logp.shape == (K, 64)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=probe).logits[0, -K:].float(), -1)  # (K, V)
    assert ((logp - full).abs() <= 2 * logit_rounding(model, K + 20) + log_softmax_rounding(full)).all()
    assert stop_rules.refused_update(model, probe, (logp, residual), d)[0] is None
    one_hot = torch.full_like(logp, -1e4).scatter(-1, logp.argmin(-1, keepdim=True), 0.0)  # (K, V)
    assert stop_rules.refused_update(model, probe, (one_hot, residual), d)[0] == "skipped_diverged"


def test_verdict_feedback_and_pbsd_objective_run(tiny_model_dir, tmp_path, capsys):
    train.main(tiny_args(tiny_model_dir, tmp_path / "{feedback}", "--feedback", "verdict", "--max-steps", "1",
                         "--teacher-samples"))
    [record] = read_jsonl(tmp_path / "verdict" / "log.jsonl")
    assert "divergence" in record and record["skipped_critic"] == 0
    # SD with --teacher-samples: the teacher's samples are drawn and graded (the random model never answers)
    assert (record["teacher_reward"], record["teacher_answered"]) == (0.0, 0.0) and "time_teacher_sample" in record
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, tmp_path / "{feedback}", "--feedback", "refsol", "--objective", "pbsd",
                             "--max-steps", "1"))
    assert stop.value.code == stop_rules.EXIT_NOTHING_LEARNED  # every pair a tie: no step, and the exit code says so
    assert "train.py: error: run pbsd-refsol took no optimizer step in its 1 steps (skipped_empty 1" in \
        capsys.readouterr().err
    [record] = read_jsonl(tmp_path / "pbsd-refsol" / "log.jsonl")
    assert {"tie_frac", "teacher_reward", "time_teacher_sample"} <= set(record)
    # the random model never answers: every pair is a tie (both wrong), so no preference and no AdamW step
    assert record["tie_frac"] == 1.0 and record["teacher_reward"] == 0.0 and record["skipped_empty"] == 1
    assert read_jsonl(tmp_path / "pbsd-refsol" / "eval.jsonl")[0]["feedback"] == "pbsd-refsol"
    with pytest.raises(config.ConfigError, match="needs a teacher context"):
        config.check_inputs(config.parse_config(["--objective", "pbsd", "--feedback", "grpo", "--data", "arithmetic"]))


def test_teacher_context_per_feedback_form(tiny_model_dir, smol_tokenizer):
    """Each form puts its own c in the teacher prompt: the critique, the reference solution, or the verdict."""
    from demo.arithmetic import arithmetic_problems
    from rollout import Completion
    problem = arithmetic_problems(1, seed=0, n_ops=2)[0]
    wrong = "Step 1: " + problem.steps[0].rsplit("=", 1)[0] + "= 1000\n\\boxed{1000}"
    for form, expected in (("stepalign", "Incorrect"), ("refsol", problem.reference_solution),
                               ("verdict", "1000. This answer is incorrect")):
        cfg = config.parse_config(tiny_args(tiny_model_dir, "/tmp/unused", "--feedback", form))
        ids = smol_tokenizer(wrong, add_special_tokens=False).input_ids  # (the wrong claim is located on them)
        item = feedback.Item(problem, [1], Completion(ids, wrong, "stop"), reward=0.0)
        backend = config.make_critic(cfg) if form == "stepalign" else None
        contexts, _, stats = feedback.feedback_contexts(cfg, backend, [item], logs.Timer())
        [fed], _ = feedback.with_teacher_prompts(cfg, smol_tokenizer, [item], contexts, 8192)
        teacher_prompt = smol_tokenizer.decode(fed.teacher_ids)
        assert expected in teacher_prompt and problem.problem in teacher_prompt
        if form == "stepalign":
            assert stats["critic_schema_ok"] == 1.0
        if form != "refsol":
            assert problem.reference_solution not in teacher_prompt
        # --teacher-layout turns: the attempt y is the assistant's turn, followed by c in a user turn
        cfg = config.parse_config(tiny_args(tiny_model_dir, "/tmp/unused", "--feedback", form,
                                           "--teacher-layout", "turns"))
        [fed], _ = feedback.with_teacher_prompts(cfg, smol_tokenizer, [item], contexts, 8192)
        turns_prompt = smol_tokenizer.decode(fed.teacher_ids)
        assert turns_prompt.index(wrong) < turns_prompt.index(expected)
        assert turns_prompt != teacher_prompt


def test_a_step_with_nothing_to_learn_leaves_the_weights_alone(tiny_model_dir, tmp_path, monkeypatch):
    """Every rollout of step 2 skipped (e.g. the critic down), after a real step 1 (AdamW has momentum): no AdamW
    step, whose momentum would still move the weights."""
    calls = []
    real = feedback.feedback_contexts

    def none_at_step_2(cfg, backend, items, timer):
        calls.append(len(items))
        contexts, critiques, stats = real(cfg, backend, items, timer)
        return (contexts if len(calls) == 1 else [None] * len(items)), critiques, stats

    monkeypatch.setattr(feedback, "feedback_contexts", none_at_step_2)
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--feedback", "refsol", "--max-steps", "2", "--eval-every", "1"))
    before, after = adapter(out, 1), adapter(out, 2)
    assert any(v.abs().max() > 0 for k, v in before.items() if "lora_B" in k)  # step 1 moved the weights
    assert all(torch.equal(before[k], after[k]) for k in before)
    log = read_jsonl(out / "log.jsonl")
    assert [r["skipped_empty"] for r in log] == [0, 1] and log[1]["skipped_critic_step"] == 4
    assert log[1]["grad_norm"] is None  # no step taken (NaN, written as null: log.jsonl is strict JSON)


def count_evaluations(monkeypatch) -> list[tuple[str, int]]:
    """(form, step) of every evaluate_policy call from now on; the evaluations still run."""
    calls, real = [], evaluate.evaluate_policy

    def counting(cfg, engine, tokenizer, checker, test, step, d):
        calls.append((cfg.feedback, step))
        return real(cfg, engine, tokenizer, checker, test, step, d)

    monkeypatch.setattr(evaluate, "evaluate_policy", counting)
    return calls


def test_feedback_all_evaluates_the_base_policy_once(tiny_model_dir, tmp_path, monkeypatch):
    calls = count_evaluations(monkeypatch)
    train.main(tiny_args(tiny_model_dir, tmp_path / "{feedback}", "--feedback", "all", "--max-steps", "1",
                         "--eval-every", "1"))
    assert calls == [("stepalign", 0), ("stepalign", 1), ("refsol", 1), ("grpo", 1)]
    step0 = [read_jsonl(tmp_path / f / "eval.jsonl")[0] for f in ("stepalign", "refsol", "grpo")]
    assert [e["feedback"] for e in step0] == ["stepalign", "refsol", "grpo"]
    assert all({k: v for k, v in e.items() if k != "feedback"} == {k: v for k, v in step0[0].items()
                                                                    if k != "feedback"} for e in step0)


def test_base_eval_file_is_written_by_the_first_run_and_read_by_the_next(tiny_model_dir, tmp_path, monkeypatch):
    """--base-eval (study.py: one per seed): the first run evaluates the base policy and writes it; a later run, in
    another invocation, logs the same step 0 without evaluating it again."""
    calls = count_evaluations(monkeypatch)
    path = tmp_path / "base_eval.json"
    for form in ("refsol", "grpo"):
        train.main(tiny_args(tiny_model_dir, tmp_path / form, "--feedback", form, "--max-steps", "1",
                             "--eval-every", "1", "--base-eval", str(path)))
        assert path.is_file()
    assert calls == [("refsol", 0), ("refsol", 1), ("grpo", 1)]
    step0 = [read_jsonl(tmp_path / f / "eval.jsonl")[0] for f in ("refsol", "grpo")]
    assert [e["feedback"] for e in step0] == ["refsol", "grpo"]
    assert step0[1] == {**step0[0], "feedback": "grpo"} == {**json.loads(path.read_text())["result"], "feedback": "grpo"}


def test_a_problem_drawn_twice_in_one_step_gets_two_rollouts(smol_tokenizer):
    from demo.arithmetic import arithmetic_problems
    from rollout import Completion

    class Engine:
        def generate(self, prompts, seeds, n, **kw):
            self.seeds = seeds
            return [[Completion([5], "x", "stop")] * n for _ in prompts]

    class Checker:
        def grade(self, text, gold):
            return False

    cfg = config.parse_config(["--feedback", "grpo", "--grpo-group-size", "2"])
    problem = arithmetic_problems(1, seed=0)[0]
    engine = Engine()
    items = feedback.collect_rollouts(cfg, engine, smol_tokenizer, Checker(), [(0, problem), (5, problem)], 7,
                                   logs.Timer())
    assert len(set(engine.seeds)) == 2  # (the engine derives one seed per sample from each)
    assert [(it.draw, it.sample) for it in items] == [(0, 0), (0, 1), (5, 0), (5, 1)]


def test_micro_batches_take_the_same_step_as_one_batch(tiny_model_dir, tmp_path, monkeypatch):
    """--micro-batch 1 and 4 over the same 4 rollouts, through train.main: the same gradient, the same LoRA weights
    after the step and the same step values, up to fp32 rounding (conftest.fp32_rounding). div_top1_share is the
    share of the top 1% of ALL the step's tokens (not a mean of per-micro-batch shares); the other statistics are
    token-weighted means."""
    from sd_loss import top_share
    per_rollout = []  # (T_i,) the valid tokens' divergences of each micro-batch of one rollout (mb 1)
    advantages = []  # (T_i,) their A_t
    lengths = [0]  # the longest sequence scored (prompt + rollout)
    real = train.sd_micro_batch
    real_policy = train.start_policy

    def recording(*args):
        loss, stats, mask = real(*args)
        per_rollout.append(stats.token_divergence[mask.bool()])
        advantages.append(stats.token_advantage[mask.bool()])
        lengths.append(max(len(it.teacher_ids) + len(it.completion.token_ids) for it in args[2]))
        return loss, stats, mask

    seen = {}  # micro-batch size -> {"abs": Σ over backward passes of |∂L_mb/∂p|, "grad": the step's ∂L/∂p,
    #            "clipped": what AdamW saw, "before"/"after": the weights}

    def recording_policy(cfg, d):
        model, tokenizer, params, optimizer = real_policy(cfg, d)
        rec = seen.setdefault(cfg.micro_batch, {"abs": [torch.zeros_like(p) for p in params],
                                                "grad": [torch.zeros_like(p) for p in params]})
        for i, p in enumerate(params):
            p.register_hook(lambda g, i=i: (rec["abs"][i].add_(g.abs()), rec["grad"][i].add_(g), None)[-1])
        step = optimizer.step

        def recorded_step(*a, **k):
            rec["clipped"] = [p.grad.clone() for p in params]
            rec["before"] = [p.detach().clone() for p in params]
            out = step(*a, **k)
            rec["after"] = [p.detach().clone() for p in params]
            return out
        optimizer.step = recorded_step
        return model, tokenizer, params, optimizer

    monkeypatch.setattr(train, "start_policy", recording_policy)
    logs = {}
    for mb in (4, 1):
        if mb == 1:
            monkeypatch.setattr(train, "sd_micro_batch", recording)
        out = tmp_path / f"mb{mb}"
        train.main(tiny_args(tiny_model_dir, out, "--feedback", "refsol", "--micro-batch", str(mb), "--max-steps", "1"))
        [logs[mb]] = read_jsonl(out / "log.jsonl")
    one, four = seen[1], seen[4]
    # the weights moved: the step's change (A starts random, so a check of the weights themselves could not fail)
    assert max((a - b).abs().max().item() for a, b in zip(one["after"], one["before"])) > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(one["before"], four["before"]))  # (the same initialization)
    # Where the two runs round differently: only in the matrix products, whose blocking depends on the number of
    # rows, and in the sums over tokens and micro-batches. A row-wise reduction (RMSNorm over D, log-softmax over V)
    # runs the same kernel on the same row in both. So a logit z differs by at most δz = fp32_rounding(n, M): n the
    # matrix-product chain (conftest.tiny_llama_chain without V), M ≥ Σ_i |h_i·W_vi| = √D·max|γ|·max_v ‖W_v‖ (h the
    # final RMSNorm's output, γ its weight, W the LM head).
    weights = load_file(tiny_model_dir / "model.safetensors")
    W, gamma = weights["model.embed_tokens.weight"], weights["model.norm.weight"]  # (V, D) tied, (D,)
    V, D = W.shape
    n = tiny_llama_chain(0, max(lengths))
    dz = fp32_rounding(n, math.sqrt(D) * gamma.abs().max().item() * W.norm(dim=1).max().item())
    # the gradient: a sum of the 4 rollouts' gradients, each through the forward and backward chains (2n roundings),
    # summed in another order and blocking; scale: Σ over rollouts of |their gradient| (elementwise)
    n_grad = 2 * n + 4
    dg = [fp32_rounding(n_grad, a1) for a1 in one["abs"]]
    for g1, g4, bound in zip(one["grad"], four["grad"], dg):
        assert ((g1 - g4).abs() <= bound).all()
    # the weights: AdamW's first step (bias-corrected, no weight decay) is W − lr·ĝ/(|ĝ| + ε) of the clipped ĝ = c·g,
    # whose derivative is lr·ε/(|ĝ| + ε)²: near |ĝ| ≈ ε (a lora_B element with a tiny gradient) a rounding of g is
    # amplified ~lr/(4ε) ≈ 2.5e5×. So the bound is that map applied to the gradient's bound, plus one rounding of W.
    lr, eps = 1e-2, 1e-8
    c = (sum(g.abs().sum() for g in one["clipped"]) / sum(g.abs().sum() for g in one["grad"])).item()  # the clip
    assert c <= 1  # (factor, the same in both runs up to the norm's rounding)
    for w1, w4, gc, bound, w0 in zip(one["after"], four["after"], one["clipped"], dg, one["before"]):
        dgc = c * bound
        bound_w = lr * eps * dgc / ((gc.abs() - dgc).clamp(min=0) + eps) ** 2 + fp32_rounding(1, w0.abs() + lr)
        assert ((w1 - w4).abs() <= bound_w).all(), (w1 - w4).abs().max()
    # the step values, to first order in δz: log π(y) = z_y − logsumexp(z) moves by ≤ 2δz, so A_t = log π_base(y_t) −
    # log π_θ(y_t) by ≤ 4δz; KL_t = Σ_v p_t·(log p_t − log p_s) by ≤ ‖p_t − p_s‖₁·2δz ≤ √(2·KL_t)·2δz (Pinsker);
    # an entropy by ≤ 2·max|z|·δz ≤ 2·M·δz. Loss and divergence are means of KL_t over the step's tokens.
    kl = torch.cat(per_rollout).double()  # (N,)
    d_kl = (2 * kl).sqrt() * 2 * dz  # (N,)
    for key in ("loss", "divergence"):
        assert logs[1][key] == pytest.approx(logs[4][key], rel=0, abs=d_kl.mean().item()), key
    share = logs[1]["div_top1_share"]
    assert share == pytest.approx(logs[4]["div_top1_share"], rel=0, abs=(1 + share) * (d_kl.sum() / kl.sum()).item())
    M = math.sqrt(D) * gamma.abs().max().item() * W.norm(dim=1).max().item()
    for key in ("entropy_student", "entropy_teacher"):
        assert logs[1][key] == pytest.approx(logs[4][key], rel=0, abs=2 * M * dz), key
    grad_norm_bound = math.sqrt(sum((b ** 2).sum().item() for b in dg))  # |‖g₁‖ − ‖g₄‖| ≤ ‖g₁ − g₄‖
    assert logs[1]["grad_norm"] == pytest.approx(logs[4]["grad_norm"], rel=0, abs=grad_norm_bound)
    assert logs[1]["adv_mean"] == pytest.approx(logs[4]["adv_mean"], rel=0, abs=4 * dz)
    # a token whose A_t is within 4δz of 0 may change sign; the fractions are fp32 means re-weighted by token
    # counts (diagnostics.metric_sums): a few roundings of numbers ≤ 1
    A = torch.cat(advantages)  # (N,)
    flipped = (A.abs() <= 4 * dz).float().mean().item()
    assert abs(logs[1]["adv_neg_frac"] - logs[4]["adv_neg_frac"]) <= flipped + fp32_rounding(8, 1.0)
    assert logs[1]["answered"] == logs[4]["answered"]
    assert len(per_rollout) == 4
    # the same fp32 divergences in the same order through the same top_share; diagnostics.step_record carries it in
    # float64 and divides it by its weight 1.0, and JSON round-trips a float: bit-identical
    assert logs[1]["div_top1_share"] == top_share(torch.cat(per_rollout))
    mean_of_shares = sum(top_share(v) for v in per_rollout) / len(per_rollout)
    assert abs(logs[1]["div_top1_share"] - mean_of_shares) > 1e-3  # (the test tells the two apart)


# ---------------------------------------------------------------------------------------------- the losses on a model
VOCAB = 61


@pytest.fixture
def models():
    """(LoRA model with a nonzero B, the same base model without LoRA), both fp32, eval mode."""
    import copy
    base = tiny_llama(VOCAB, seed=1)
    model = lora.add_lora(copy.deepcopy(base), r=4, alpha=8)
    torch.manual_seed(2)
    for m in lora.lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.2)
    return model.eval(), base.eval()


def direct_logits(model, prompt: list[int], y: list[int]) -> torch.Tensor:
    """(|y|, V) logits of the positions that predict y, from one unpadded forward of prompt + y."""
    logits = model(torch.tensor([prompt + y])).logits[0]  # (L, V)
    return logits[len(prompt) - 1:len(prompt) - 1 + len(y)].float()  # (|y|, V)


def direct_token_logp(model, prompt: list[int], y: list[int], dz: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(|y|,) log π(y_t | prompt, y<t) from one unpadded forward of prompt + y, and (|y|,) how far
    rollout.score_sequences' (batched, padded) may be from each: its logits are within δz of these
    (conftest.logit_rounding), so z_y − logsumexp(z) within 2δz, plus the two log-softmaxes' own rounding."""
    z = direct_logits(model, prompt, y)  # (|y|, V)
    logp_y = torch.log_softmax(z, -1).gather(-1, torch.tensor(y)[:, None]).squeeze(-1)  # (|y|,)
    return logp_y, 2 * dz + log_softmax_rounding(z).squeeze(-1)  # (|y|,), (|y|,) float64


def sum_rounding(logp_y: torch.Tensor, bound: torch.Tensor) -> float:
    """How far two fp32 sums over y's tokens (pbsd.sequence_logprob over the padded row, whose padding adds exact
    zeros, and .sum() over the |y| tokens) may be apart when each term is within its `bound`: Σ_t bound_t plus the
    two sums' own rounding."""
    return (bound.sum() + fp32_rounding(len(logp_y), logp_y.detach().abs().sum().double())).item()


def direct_seq_logp(model, prompt: list[int], y: list[int], dz: float) -> tuple[float, float]:
    """log π(y | prompt) from one unpadded forward of prompt + y, and how far the batched, padded scoring's sum
    (pbsd.sequence_logprob of rollout.score_sequences) may be from it."""
    logp_y, bound = direct_token_logp(model, prompt, y, dz)  # (|y|,), (|y|,)
    return logp_y.sum().item(), sum_rounding(logp_y, bound)


def token_grad_abs(logp_y: torch.Tensor, params: list) -> list[torch.Tensor]:
    """Σ_t |∂ log π(y_t)/∂p| per parameter, one backward pass per token: the scale of the gradient's sum."""
    total = [torch.zeros_like(p) for p in params]
    for t in range(len(logp_y)):
        for acc, g in zip(total, torch.autograd.grad(logp_y[t], params, retain_graph=True)):
            acc += g.abs()
    return total


def pairs_data():
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    student_prompts = [ids(5), ids(8), ids(6)]  # x
    teacher_prompts = [p + ids(k) for p, k in zip(student_prompts, (4, 7, 3))]  # x + c
    student_ids, teacher_ids = [ids(6), ids(3), ids(4)], [ids(4), ids(7), ids(5)]  # y_S, y_T
    return student_prompts, teacher_prompts, student_ids, teacher_ids, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]


def pair_items(skip_last: bool = False) -> list:
    """Items of pairs_data: rollout y_S after x, teacher prompt x + c, teacher sample y_T (and one skipped row)."""
    from demo.arithmetic import arithmetic_problems
    from rollout import Completion
    problem = arithmetic_problems(1, seed=0)[0]
    x, xc, y_S, y_T, r_S, r_T = pairs_data()
    items = [feedback.Item(problem, x[b], Completion(y_S[b], "", "stop"), reward=r_S[b], teacher_ids=xc[b],
                        teacher_sample=Completion(y_T[b], "", "stop"), teacher_reward=r_T[b]) for b in range(3)]
    if skip_last:
        items[-1] = dataclasses.replace(items[-1], skipped=True, teacher_ids=None)
    return items


def test_scoring_with_the_adapter_off_is_the_base_model(models):
    """rollout.score_sequences (batched, padded) summed by pbsd.sequence_logprob against one unpadded forward per row:
    with the adapter disabled, the base model's log π(y|x, c); with it on, the policy's log π_θ(y|x). Each within
    the sum of its tokens' bounds (direct_token_logp) and the two sums' rounding (sum_rounding)."""
    model, base = models
    from pbsd import sequence_logprob
    x, xc, y_S, y_T, _, _ = pairs_data()
    with torch.no_grad(), lora.adapters_disabled(model):
        teacher_logp, mask = rollout.score_sequences(model, xc, y_T, pad_id=0)  # (B, T)
    policy_logp, _ = rollout.score_sequences(model, x, y_T, pad_id=0)
    dz = logit_rounding(model, max(len(p) + len(y) for p, y in zip(xc, y_T)))  # (x + c is the longer prompt)
    for b in range(len(x)):
        with torch.no_grad():
            expected_base, bound_base = direct_seq_logp(base, xc[b], y_T[b], dz)
            expected_policy, bound_policy = direct_seq_logp(model, x[b], y_T[b], dz)
            base_x, bound_base_x = direct_seq_logp(base, x[b], y_T[b], dz)
        assert abs(sequence_logprob(teacher_logp, mask)[b].item() - expected_base) <= bound_base
        assert abs(sequence_logprob(policy_logp, mask)[b].item() - expected_policy) <= bound_policy
        # LoRA changes the policy by more than the bounds: scoring that left the adapter off (within bound_base_x of
        # base_x) would fail the check above
        assert abs(base_x - expected_policy) > bound_base_x + bound_policy
    assert not any(m.disabled for m in lora.lora_layers(model).values())  # the adapter is back on


@pytest.mark.parametrize("kind", ["forward", "sampled"])
def test_sd_micro_batch_is_eq3_on_the_model_logits(models, kind):
    """train.sd_micro_batch against Eq. 3 written out here on model(...).logits: the student = the model with its
    adapter after x, the self-teacher = the model with the adapter disabled after x + c, the forward KL per token
    (or the sampled form's −A_t·log π_θ(y_t)), summed over the rollout tokens of the kept rows, divided by the
    normalizer. Values, A_t and LoRA gradients, within the fp32 rounding of the two paths (batched, padded and
    chunked against one unpadded forward per row)."""
    model, _ = models
    items = pair_items(skip_last=True)
    cfg = config.parse_config(["--loss-chunk", "4", "--divergence", kind])  # chunks smaller than the batch
    loss, stats, mask = train.sd_micro_batch(cfg, model, items, 0, 5.0, logs.Timer())
    loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    length = max(len(it.teacher_ids or it.prompt_ids) + len(it.completion.token_ids) for it in items)
    dz = logit_rounding(model, length)
    expected, tol_loss, n_terms = 0.0, 0.0, 0
    expected_grads = {n: torch.zeros_like(p) for n, p in params.items()}
    grad_scale = {n: torch.zeros_like(p) for n, p in params.items()}  # Σ_t |∂term_t/∂p|
    for b, it in enumerate(items[:2]):
        y = it.completion.token_ids
        z_s = direct_logits(model, it.prompt_ids, y)  # (|y|, V)  π_θ(·|x, y<t)
        with torch.no_grad(), lora.adapters_disabled(model):
            z_t = direct_logits(model, it.teacher_ids, y)  # (|y|, V)  π_base(·|x, c, y<t)
        logp_s, logp_t = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)  # (|y|, V)
        A = (logp_t - logp_s).gather(-1, torch.tensor(y)[:, None]).squeeze(-1)  # (|y|,)
        logp_y = logp_s.gather(-1, torch.tensor(y)[:, None]).squeeze(-1)  # (|y|,)
        if kind == "forward":
            terms = (logp_t.exp() * (logp_t - logp_s)).sum(-1) / 5.0  # (|y|,)  KL(teacher‖student)_t / normalizer
            # to first order in δz: |δKL_t| ≤ ‖p_t − p_s‖₁·2δz ≤ √(2·KL_t)·2δz (Pinsker)
            tol_loss += ((2 * terms.detach() * 5.0).clamp(min=0).sqrt() * 2 * dz).sum().item() / 5.0
        else:
            terms = -A.detach() * logp_y / 5.0  # (|y|,)  −A_t · log π_θ(y_t) / normalizer
            # |δ log π(y)| ≤ 2δz (the logit and the logsumexp), |δA_t| ≤ 4δz
            tol_loss += ((4 * dz * logp_y.abs() + 2 * dz * A.abs()).sum() / 5.0).item()
        for t in range(len(y)):  # one backward pass per term: the scale of the gradient's sum
            g_t = torch.autograd.grad(terms[t], list(params.values()), retain_graph=True)
            for (n, _), g in zip(params.items(), g_t):
                expected_grads[n] += g
                grad_scale[n] += g.abs()
        expected += terms.sum().item()
        n_terms += len(y)
        # A_t = log π_base(y_t) − log π_θ(y_t): each log-probability within 2δz
        torch.testing.assert_close(stats.token_advantage[b, :len(y)], A.detach(), atol=4 * dz, rtol=0)
    assert loss.item() == pytest.approx(expected, rel=0, abs=tol_loss)
    assert mask[2].sum() == 0 and stats.token_advantage[2].abs().max() == 0  # the skipped row is left out
    for n in params:  # each term's gradient runs the forward and backward chains, then n_terms are summed
        bound = fp32_rounding(2 * tiny_llama_chain(0, length) + n_terms, grad_scale[n])
        assert ((grads[n] - expected_grads[n]).abs() <= bound).all(), n
    assert any(g.abs().max() > 0 for g in grads.values())


def test_pbsd_micro_batch_against_direct_computation(models):
    """train.pbsd_micro_batch against Eq. P1–P2 written out here, one unpadded forward per sequence: the policy = the
    model with its adapter after x, the base = the model without LoRA after x + c. Loss and LoRA gradients within the
    fp32 rounding of the two paths, carried from the sequence log-probabilities' bounds (direct_token_logp)."""
    model, base = models
    items = pair_items()
    beta = 0.5
    cfg = config.parse_config(["--objective", "pbsd", "--feedback", "refsol", "--pbsd-beta", str(beta),
                               "--loss-chunk", "5"])
    loss, stats, _ = train.pbsd_micro_batch(cfg, model, items, 0, 4, logs.Timer())
    loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    length = max(len(it.teacher_ids) + max(len(it.completion.token_ids), len(it.teacher_sample.token_ids))
                 for it in items)  # the longest sequence scored (the base scores both samples after x + c)
    dz = logit_rounding(model, length)
    # direct, per pair: log π_θ(y_S|x), log π_base(y_S|x, c), log π_θ(y_T|x), log π_base(y_T|x, c), each with its
    # bound, and Σ_t |∇ log π_θ(y_t|x)| over the tokens of y_S and y_T (one backward pass per token)
    seq, seq_bound, grad_abs = [], [], []  # (3 pairs, 4), (3 pairs, 4), (3 pairs, params)
    n_positions = 0  # of every sequence the policy scores: the weight gradient sums over all of them
    for it in items:
        row, row_bound, row_abs = [], [], [torch.zeros_like(p) for p in params.values()]
        for y in (it.completion.token_ids, it.teacher_sample.token_ids):  # y_S, y_T
            policy, d_policy = direct_token_logp(model, it.prompt_ids, y, dz)  # (|y|,) with gradient
            with torch.no_grad():
                base_y, d_base = direct_token_logp(base, it.teacher_ids, y, dz)  # (|y|,)
            row += [policy.sum(), base_y.sum()]
            row_bound += [sum_rounding(policy, d_policy), sum_rounding(base_y, d_base)]
            row_abs = [a + g for a, g in zip(row_abs, token_grad_abs(policy, list(params.values())))]
            n_positions += len(it.prompt_ids) + len(y)
        seq.append(row)
        seq_bound.append(row_bound)
        grad_abs.append(row_abs)
    s = [(it.reward > it.teacher_reward) - (it.reward < it.teacher_reward) for it in items]  # +1 y_S wins, −1 y_T

    def pbsd_value(P_S, B_S, P_T, B_T):  # (3,) each -> (): Eq. P2 over the decisive pairs / 4
        r_S, r_T = beta * (P_S - B_S), beta * (P_T - B_T)  # (3,)  Eq. P1
        terms = [-torch.nn.functional.logsigmoid(s[b] * (r_S[b] - r_T[b])) for b in range(len(s)) if s[b] != 0]
        return torch.stack(terms).sum() / 4

    X = tuple(torch.stack([row[k] for row in seq]) for k in range(4))  # P_S, B_S, P_T, B_T: (3,) each
    expected = pbsd_value(*X)
    expected.backward()
    # the loss, to first order: each sequence log-prob X within its bound δX, |du/dX| = β on the margin u and
    # |d(−log σ(u))/du| = σ(−u) ≤ 1; the margin's subtractions each round by at most 2⁻²⁴·(|P_S| + |B_S| + |P_T| +
    # |B_T|), a perturbation of P_S of that size (β = 0.5 and the division by 4 are exact); then log σ and the sum of
    # the pairs round, on per-pair losses > 0 whose sum / 4 is the loss
    X = tuple(x.detach().double() for x in X)
    dX = [torch.tensor([row[k] for row in seq_bound], dtype=torch.float64) for k in range(4)]  # (3,) each
    dX[0] = dX[0] + fp32_rounding(2, sum(x.abs() for x in X))
    tol_loss = (first_order_bound(pbsd_value, X, tuple(dX)) + fp32_rounding(4, expected.item())).item()
    assert abs(loss.item() - expected.item()) <= tol_loss
    # the gradient: Σ over the decisive pairs of s·c·(∇ log π_θ(y_T|x) − ∇ log π_θ(y_S|x)), c = β·σ(−u)/4 (0 for a
    # tie). Each token's term runs the forward and backward chains, and the weight gradient sums over every
    # position; c itself is off by at most (β/4)·max σ'·δu = (β/16)·δu, δu = β·Σ δX (to first order), plus its own
    # few roundings
    sign = torch.tensor(s, dtype=torch.float64)  # (3,)
    u = sign * beta * ((X[0] - X[1]) - (X[2] - X[3]))  # (3,)  the margins
    c = sign.abs() * beta * torch.sigmoid(-u) / 4  # (3,)  |∂loss/∂ log π_θ(y|x)|
    dc = sign.abs() * beta / 16 * beta * sum(dX) + fp32_rounding(4, c)  # (3,)
    for i, n in enumerate(params):
        scale = sum(c[b].item() * grad_abs[b][i] for b in range(len(s)))  # Σ_t |∂term_t/∂p|
        drift = sum(dc[b].item() * grad_abs[b][i] for b in range(len(s)))
        bound = fp32_rounding(2 * tiny_llama_chain(0, length) + n_positions, scale) + drift
        assert ((grads[n] - params[n].grad).abs() <= bound).all(), n
    assert any(g.abs().max() > 0 for g in grads.values())
    assert (stats.n_pairs.item(), stats.n_decisive.item()) == (3.0, 2.0)
    # one tie among 3 pairs: tie_frac = 1 − k/B in float64, whose division and subtraction each round by ≤ U64
    # (values ≤ 1), and 1/3 here by ≤ U64/3
    assert abs(stats.tie_frac.item() - 1 / 3) <= 3 * U64


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_grpo_micro_batch_against_direct_computation(models, aggregation):
    """train.grpo_micro_batch with non-zero advantages against the clipped surrogate written out here, one unpadded
    forward per rollout: ρ_t = π_θ(y_t)/π_old(y_t) = 1 in value (π_old = π_θ, one optimizer step per batch), so the
    loss is −Σ A_i·(tokens or 1) / normalizer and its gradient −Σ A_i·∇log π_θ(y_t) / normalizer. A sign flip of A
    flips both. The values are exact: ρ_t = exp(x − x) = 1 exactly, the advantages are dyadic (1.5, −0.5, −0.25) so
    every sum and mean of them is exact in fp32 in any order, and the one division by the normalizer (−6.5/16,
    −0.75/4) is exact too. The gradients: within the fp32 rounding of the two paths."""
    model, _ = models
    items = [dataclasses.replace(it, advantage=a) for it, a in zip(pair_items(), [1.5, -0.5, -0.25])]
    cfg = config.parse_config(["--feedback", "grpo", "--grpo-aggregation", aggregation, "--loss-chunk", "5"])
    # the step's count over all micro-batches: these rollouts' 6 + 3 + 4 tokens or 3 sequences, plus another
    # micro-batch's 3 tokens or 1 sequence (so that a loss divided by its own count would show)
    normalizer = 16.0 if aggregation == "token" else 4.0
    loss, stats, _ = train.grpo_micro_batch(cfg, model, items, 0, normalizer, logs.Timer())
    loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad()
    terms, scale = [], [torch.zeros_like(p) for p in params.values()]  # scale: Σ_t |∂term_t/∂p|
    for it in items:
        y = it.completion.token_ids
        logp = torch.log_softmax(direct_logits(model, it.prompt_ids, y), -1)  # (|y|, V)
        logp_y = logp.gather(-1, torch.tensor(y)[:, None]).squeeze(-1)  # (|y|,)  log π_θ(y_t | x, y<t)
        ratio = torch.exp(logp_y - logp_y.detach())  # (|y|,)  ρ_t, π_old = π_θ
        per_token = -ratio * it.advantage  # (|y|,)  −min(ρ_t·A, clip(ρ_t)·A) = −ρ_t·A at ρ_t = 1
        terms.append(per_token.sum() if aggregation == "token" else per_token.mean())
        c = abs(it.advantage) / normalizer / (1 if aggregation == "token" else len(y))  # |∂loss/∂ log π_θ(y_t)|
        scale = [a + c * g for a, g in zip(scale, token_grad_abs(logp_y, list(params.values())))]
    expected = torch.stack(terms).sum() / normalizer
    expected.backward()
    lengths = [len(it.completion.token_ids) for it in items]
    value = -sum(it.advantage * (n if aggregation == "token" else 1) for it, n in zip(items, lengths)) / normalizer
    assert expected.item() == value and abs(value) > 0.1
    assert loss.item() == value
    # each token's term runs the forward and backward chains, the weight gradient sums over every position, and the
    # coefficient −A_i/normalizer (/|y_i|) takes up to 2 roundings
    length = max(len(it.prompt_ids) + n for it, n in zip(items, lengths))
    n_grad = 2 * tiny_llama_chain(0, length) + sum(len(it.prompt_ids) + n for it, n in zip(items, lengths)) + 2
    for (n, p), a in zip(params.items(), scale):
        assert ((grads[n] - p.grad).abs() <= fp32_rounding(n_grad, a)).all(), n
    assert max(g.abs().max() for g in grads.values()) > 1e-2
    # ρ_t = 1 exactly on every valid token, so ratio_mean is the token count divided by itself
    assert stats.ratio_mean.item() == 1.0 and stats.clip_frac.item() == 0.0


def test_teacher_samples_call_the_engine_once_even_with_every_rollout_skipped(tiny_smol):
    """vLLM's data-parallel generate is a collective (rollout.VLLMEngine): a rank whose rollouts were all skipped still
    calls the engine, once, with no prompt, so that the ranks that have teacher samples to draw are not left waiting.
    (The real engine with 2 ranks: tests/test_vllm.py::test_two_ranks_finish_when_a_rank_has_nothing_to_sample.)"""
    from demo.arithmetic import arithmetic_problems

    class Recording(rollout.TransformersEngine):
        def generate(self, prompts, seeds, **kw):
            self.calls.append(len(prompts))
            return super().generate(prompts, seeds, **kw)

    engine = Recording(*tiny_smol)
    engine.calls = []
    cfg = config.parse_config(["--feedback", "stepalign", "--objective", "pbsd", "--max-new-tokens", "2"])
    problem = arithmetic_problems(1, seed=0)[0]
    skipped = feedback.Item(problem, [1, 2], rollout.Completion([5], "x", "stop"), skipped=True)
    assert feedback.with_teacher_samples(cfg, engine, None, [skipped], 0, logs.Timer()) == [skipped]
    assert engine.calls == [0]


def test_resume_takes_the_out_dir_by_any_spelling_and_after_a_move(tiny_model_dir, tmp_path, monkeypatch):
    """--resume found the checkpoint in --out-dir, so the out_dir it was saved under does not matter: a trailing
    slash, a relative path and a directory moved since all continue the run (each refused --resume before)."""
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, str(out) + "/", "--max-steps", "1", "--eval-every", "1"))
    monkeypatch.chdir(tmp_path)
    train.main(tiny_args(tiny_model_dir, "run", "--max-steps", "2", "--eval-every", "1", "--resume"))
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    out.rename(moved)
    train.main(tiny_args(tiny_model_dir, moved, "--max-steps", "3", "--eval-every", "1", "--resume"))
    assert [p.name for p in checkpoint.checkpoint_dirs(moved)] == ["step_000001", "step_000002", "step_000003"]
    assert [r["step"] for r in read_jsonl(moved / "log.jsonl")] == [1, 2, 3]


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


CORRUPTIONS = {  # name: (file of the latest checkpoint, what is done to it)
    "optimizer truncated": ("optimizer.pt", _truncate),
    "adapter truncated": ("adapter_model.safetensors", _truncate),
    "adapter missing": ("adapter_model.safetensors", lambda p: p.unlink()),
    "state missing": ("state.json", lambda p: p.unlink()),
    "rng garbage": ("rng_rank0.pt", lambda p: p.write_bytes(random.Random(2).randbytes(512))),  # (IndexError)
    "config garbage": ("config.json", lambda p: p.write_text("{not json")),
    "state nested too deep": ("state.json", lambda p: p.write_text("[" * 100_000)),  # past Python's recursion limit
    # state.json of the wrong shape (a traceback before, or a step no run reached accepted)
    "state step a string": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "4"}))),
    "state step impossible": ("state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()),
                                                                               "step": 999}))),
    "state counters not ints": ("state.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "counters": {"skipped_critic": "many"}}))),
}


def test_resume_falls_back_loudly_past_corrupt_checkpoints(tiny_model_dir, tmp_path, capsys):
    """The latest checkpoint corrupted in several ways (truncated, missing, garbage): --resume names it and why in
    one warning line, continues from the previous checkpoint, and reaches the same weights as the run that was never
    damaged (bit for bit). With every checkpoint corrupt: exit 2, before the model loads, naming each."""
    import shutil
    straight = tmp_path / "straight"
    train.main(tiny_args(tiny_model_dir, straight, "--max-steps", "4"))  # checkpoints at steps 2 and 4
    want = adapter(straight, 4)
    capsys.readouterr()
    for i, (kind, (name, corrupt)) in enumerate(CORRUPTIONS.items()):
        out = tmp_path / f"damaged{i}"
        shutil.copytree(straight, out)
        bad = out / "checkpoints" / "step_000004" / name
        corrupt(bad)
        train.main(tiny_args(tiny_model_dir, out, "--max-steps", "4", "--resume"))
        captured = capsys.readouterr()
        [warning] = [x for x in captured.err.splitlines() if "warning" in x]
        assert warning.startswith(f"train.py: warning: --resume passes over a checkpoint that does not load: {bad}: ")
        assert f"resumed from {out / 'checkpoints' / 'step_000002'} (step 2)" in captured.out, kind
        got = adapter(out, 4)
        assert all(torch.equal(want[k], got[k]) for k in want), kind
        assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2, 3, 4]
    out = tmp_path / "all_bad"
    shutil.copytree(straight, out)
    for step in (2, 4):
        _truncate(out / "checkpoints" / f"step_{step:06d}" / "optimizer.pt")
    r = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "4", "--resume", "--model", "no-such-org/model"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert [line.split(": cannot be read")[0] for line in lines[:2]] == [
        f"train.py: error: --resume: {out / 'checkpoints' / f'step_{s:06d}' / 'optimizer.pt'}" for s in (4, 2)]
    assert lines[2] == f"train.py: error: --resume: none of the checkpoints in {out} loads" and len(lines) == 3


def _manifest(path, rows):
    path.write_text("".join(json.dumps({"id": i, "problem": q, "answer": a, "split": s, "reference_solution": r}) + "\n"
                            for i, q, a, s, r in rows))
    return path


def test_prompts_and_contexts_longer_than_the_model_context_are_refused_or_skipped(tiny_model_dir, tmp_path, capsys):
    """The tiny model's context is 512 tokens (max_position_embeddings). A problem whose student prompt plus
    --max-new-tokens exceeds it: exit 2 at start, one line naming it. A reference solution (the teacher's c) that
    makes the teacher prompt exceed it: that rollout is skipped, counted and warned about; the step goes on."""
    long_text = " ".join(["seven"] * 700)  # > 512 tokens
    rows = [(f"p{i}", f"What is {i} + 1?", str(i + 1), "train", f"{i} + 1 = {i + 1}. \\boxed{{{i + 1}}}")
            for i in range(3)] + [("test0", "What is 5 + 1?", "6", "test", "6")]
    base = ["--feedback", "refsol", "--max-steps", "1", "--eval-every", "1", "--prompts-per-step", "4"]
    data_long_problem = _manifest(tmp_path / "long_problem.jsonl", rows + [("huge", long_text, "7", "train", "7")])
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny_model_dir, tmp_path / "a", *base, "--data", str(data_long_problem)))
    assert stop.value.code == stop_rules.EXIT_BAD_INPUT
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train.py: error:")]
    assert line.startswith(f"train.py: error: rank 0: {data_long_problem}: problem 'huge': its student prompt of ")
    assert "exceeds the window of" in line and "(512 tokens, max_position_embeddings)" in line
    data_long_context = _manifest(tmp_path / "long_context.jsonl", rows + [("big_ref", "What is 6 + 1?", "7", "train",
                                                                           long_text)])
    out = tmp_path / "b"
    train.main(tiny_args(tiny_model_dir, out, *base, "--data", str(data_long_context)))
    [record] = read_jsonl(out / "log.jsonl")
    assert record["skipped_context_step"] == 1 and record["skipped_context"] == 1
    assert record["skipped_critic_step"] == 1 and record["skipped_empty"] == 0  # the other 3 rollouts trained
    assert "step 1: 1 rollouts skipped: their teacher prompt (x + c) and y exceed the window of" in \
        capsys.readouterr().err


def test_activation_checkpointing_changes_no_bit(tiny_model_dir, tmp_path):
    """--grad-checkpointing recomputes each layer's forward in backward with the same kernels on the same inputs: the
    same gradients, so the same adapter and step values bit for bit (a setting of memory against time only;
    bench/bench_step.py measures both)."""
    for flag in ("--grad-checkpointing", "--no-grad-checkpointing"):
        train.main(tiny_args(tiny_model_dir, tmp_path / flag, "--feedback", "refsol", "--max-steps", "2", flag))
    on, off = adapter(tmp_path / "--grad-checkpointing", 2), adapter(tmp_path / "--no-grad-checkpointing", 2)
    assert any(v.abs().max() > 0 for k, v in on.items() if "lora_B" in k)  # the steps moved the weights
    assert all(torch.equal(on[k], off[k]) for k in on)
    values = [[(r["loss"], r["grad_norm"], r["divergence"]) for r in read_jsonl(tmp_path / flag / "log.jsonl")]
              for flag in ("--grad-checkpointing", "--no-grad-checkpointing")]
    assert values[0] == values[1]


def _refused(capsys, args) -> str:
    """train.main(args) exits 2 with only 'train.py: error:' lines on stderr; returns them."""
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err and all(x.startswith("train.py: error: ") for x in err.splitlines()), err
    return err


def test_resume_refuses_a_model_or_data_changed_at_the_same_path(tiny_model_dir, tmp_path, smol_tokenizer, capsys):
    """A checkpoint records the fingerprints of the model's weight files and of the data (infra.fingerprint):
    --resume after either changed at the same path resumed silently before; now exit 2, one line naming which
    fingerprint, old vs new, and what to do. Put back, the run resumes."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (tmp_path / "data").mkdir()
    manifest = _manifest(tmp_path / "data" / "m.jsonl",
                         [(f"p{i}", f"What is {i} + 1?", str(i + 1), "train" if i < 8 else "test", None)
                          for i in range(10)])
    out = tmp_path / "run"
    args = ["--model", str(model), "--data", str(manifest), "--feedback", "grpo", "--eval-every", "1"]
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "1", *args))
    capsys.readouterr()
    ckpt = out / "checkpoints" / "step_000001"
    original = manifest.read_bytes()
    manifest.write_bytes(original.replace(b"What is 3 + 1?", b"What is 3 + 2?").replace(b'"4"', b'"5"'))
    err = _refused(capsys, tiny_args(tiny_model_dir, out, "--max-steps", "2", "--resume", *args))
    assert err.startswith(f"train.py: error: --resume: {ckpt}: the data differ (m.jsonl: sha256 ") and \
        "resume with the model and data the run started with" in err and len(err.splitlines()) == 1
    manifest.write_bytes(original)
    weights = model / "model.safetensors"
    saved = weights.read_bytes()
    tiny_llama(len(smol_tokenizer), seed=1).save_pretrained(model)  # another model of the same shape, same path
    capsys.readouterr()
    err = _refused(capsys, tiny_args(tiny_model_dir, out, "--max-steps", "2", "--resume", *args))
    assert err.startswith(f"train.py: error: --resume: {ckpt}: the model's weights differ (--model; "
                          f"model.safetensors: {weights.stat().st_size} bytes, sha256 "), err
    weights.write_bytes(saved)
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2", "--resume", *args))
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step_000001", "step_000002"]


def test_base_eval_of_another_seed_is_refused_by_name(tiny_model_dir, tmp_path, capsys):
    """--base-eval records what the step-0 evaluation was made of (model files, held-out set, seed, evaluation
    options): a file of another seed was accepted as this run's step 0 before; now refused at start, by name."""
    path = tmp_path / "base_eval.json"
    train.main(tiny_args(tiny_model_dir, tmp_path / "a", "--max-steps", "1", "--eval-every", "1", "--base-eval",
                         str(path)))
    capsys.readouterr()
    for extra, phrase in ((("--seed", "4"), "--seed 3 vs 4"), (("--eval-temperature", "0.5"),
                                                              "--eval-temperature 1.1 vs 0.5")):
        err = _refused(capsys, tiny_args(tiny_model_dir, tmp_path / "b", "--max-steps", "1", "--base-eval",
                                         str(path), *extra))
        assert f"--base-eval {path}: written for another run: " in err and phrase in err, err


def test_torchrun_ranks_given_different_options_are_refused(tiny_model_dir, tmp_path):
    """Two ranks started with different --lr both trained and exited 0 with different weights: at start every rank
    compares its config (and fingerprints) with rank 0's; exit 2, the option named, nothing trained."""
    script = tmp_path / "ranks.py"
    args = tiny_args(tiny_model_dir, tmp_path / "run", "--max-steps", "1", "--prompts-per-step", "2")
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport train\n"
                      f"train.main({args!r} + (['--lr', '0.02'] if os.environ['RANK'] == '1' else []))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(script)], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode != 0 and "train.py: error: rank 1 runs --lr 0.02 but rank 0 0.01: start every rank with " \
                                 "the same options and files" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("train.py: error:")[0] and not (tmp_path / "run" / "checkpoints").exists()


def test_a_stop_signal_does_not_wait_for_the_steps_teacher_prompts(smol_tokenizer):
    """with_teacher_prompts calls its `interrupt` (train.py: the stop flag's check) before tokenizing each prompt: a
    signal raised there abandons step 4 at once, before the next prompt, instead of after the step's last one."""
    cfg = config.parse_config(["--preset", "demo", "--feedback", "refsol"])
    from demo.arithmetic import arithmetic_problems
    p = arithmetic_problems(1, seed=0)[0]
    y = rollout.Completion(smol_tokenizer("Step 1: 1 + 1 = 2").input_ids, "Step 1: 1 + 1 = 2", "stop")
    items = [feedback.Item(p, [], y) for _ in range(5)]
    calls = []

    class Stop(Exception):
        pass

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    with pytest.raises(Stop):
        feedback.with_teacher_prompts(cfg, smol_tokenizer, items, ["c"] * 5, 8192, interrupt=interrupt)
    assert len(calls) == 3
    done, _ = feedback.with_teacher_prompts(cfg, smol_tokenizer, items, ["c"] * 5, 8192, interrupt=lambda: None)
    assert all(it.teacher_ids for it in done)
