"""The loop on a tiny random model: config, data order, DDP (2 torchrun ranks = 1 process), exact resume,
SIGTERM, atomic checkpoints (kill -9 during a save), and faults: every bad option refused at start by name, the
critic server down at start and dying mid-run, a non-finite loss, a run that learns nothing; critiques that fail
the schema skipped and counted; a small adapter kept by bf16 sampling."""
import contextlib
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

import lora
import train
from conftest import tiny_llama
from test_critic import chat_answer, serve  # noqa: F401 (serve is a fixture: a chat-completions server on loopback)

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
    with pytest.raises(train.ConfigError, match="no such file"):
        train.check_inputs(train.parse_config(["--data", str(tmp_path / "nope.jsonl")]))
    with pytest.raises(train.ConfigError, match="--model .*no_model: no such directory"):
        train.check_inputs(train.parse_config(["--data", "arithmetic", "--engine", "transformers",
                                               "--model", str(tmp_path / "no_model")]))


def expect_refusal(capsys, args) -> str:
    """train.main refuses `args` at start: exit code 2, one 'train.py: error:' line per problem. Returns stderr."""
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err and all(line.startswith("train.py: error: ") for line in err.splitlines()), err
    return err


# option -> a bad value (or the arguments that make it bad); bools have no bad value, choices are argparse's
BAD_VALUES = {
    "pbsd_beta": "0", "arith_train": "0", "arith_test": "0", "arith_ops": "0", "arith_max_operand": "1",
    "arith_operators": "+/", "critic_url": "localhost:8000/v1", "critic_api_key_env": "MY-KEY",
    "critic_timeout": "0", "critic_fail_window": "0", "critic_fail_max": "1.5", "critic_concurrency": "0",
    "critic_retries": "-1", "critic_max_tokens": "0", "vllm_gpu_memory": "1.2", "vllm_kv_cache_gib": "-1",
    "lora_r": "0", "lora_alpha": "-2", "lora_targets": "q_proj,,v_proj", "sd_samples": "0", "grpo_group_size": "1",
    "grpo_clip": "0", "temperature": "-1", "max_new_tokens": "0", "lr": "-1", "weight_decay": "-0.1",
    "max_grad_norm": "0", "prompts_per_step": "0", "micro_batch": "0", "loss_chunk": "0", "epochs": "0",
    "max_steps": "-1", "eval_every": "0", "eval_samples": "0", "eval_temperature": "-0.5", "eval_problems": "-1",
    "seed": "-1", "out_dir": "runs/{model}", "model": "/nonexistent/model", "data": "/nonexistent/data.jsonl",
    "critic_model": ("/nonexistent/critic", "--critic", "local"),
}


def test_every_option_with_a_bad_value_is_refused_by_name(tiny_model_dir, tmp_path, capsys):
    """Walk every option of Config: a bad value stops main before anything loads, with one line naming the
    option and the value (exit 2). An accepted bad value would start training here instead."""
    base = tiny_args(tiny_model_dir, tmp_path / "run", "--max-steps", "1")
    fields = train.dataclasses.fields(train.Config)
    walked = set()
    for f in fields:
        option = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            continue  # --x / --no-x: every value is valid
        if f.metadata["choices"]:
            value, extra = "nope", ()
        else:
            bad = BAD_VALUES[f.name]
            value, *extra = bad if isinstance(bad, tuple) else (bad,)
        err = expect_refusal(capsys, [*base, *extra, option, value])
        assert option in err and value in err, (option, err)
        walked.add(f.name)
    assert walked == {f.name for f in fields if f.type != "bool"}
    for value in ("nan", "inf"):  # non-finite floats pass a comparison with a bound
        assert "--lr " + value in expect_refusal(capsys, [*base, "--lr", value])
    assert "argument --lr: invalid float value: 'abc'" in expect_refusal(capsys, [*base, "--lr", "abc"])


def test_options_that_depend_on_each_other(tiny_model_dir, tmp_path, capsys):
    cfg = train.parse_config(tiny_args(tiny_model_dir, tmp_path / "run", "--prompts-per-step", "4"))
    assert train.config_problems(cfg, world=2) == []
    assert train.config_problems(cfg, world=3) == ["--prompts-per-step 4: must divide by the number of ranks (3)"]
    base = tiny_args(tiny_model_dir, tmp_path / "run")
    err = expect_refusal(capsys, [*base, "--objective", "pbsd", "--feedback", "grpo", "--lr", "-1"])
    assert "--objective pbsd with --feedback grpo" in err and "--lr -1.0" in err  # every problem, one line each
    assert "--epochs 1 x 8 training problems // --prompts-per-step 9 is 0 steps" in expect_refusal(
        capsys, [*base, "--epochs", "1", "--prompts-per-step", "9"])
    assert "--eval-problems 3: must be at most the 2 held-out problems" in expect_refusal(
        capsys, [*base, "--eval-problems", "3"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2", "split": "train"}) + "\n")
    assert f"{manifest}: no row with split 'test'" in expect_refusal(capsys, [*base, "--data", str(manifest),
                                                                             "--feedback", "refsol"])
    assert "--critic exact only knows arithmetic" in expect_refusal(capsys, [*base, "--data", str(manifest)])


def test_bad_input_is_one_line_without_traceback(tmp_path):
    """The real command line: exit code 2 and one line on stderr, for a bad value and for a bad manifest row."""
    result = run_cli(["--preset", "demo", "--temperature", "-1"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "train.py: error: --temperature -1.0: must be > 0 (rollouts are samples of the policy)"]
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "a", "problem": "1+1?", "answer": "2", "split": "train"}, {"id": "b", "problem": "2+2?",
                                                                             "split": "test"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli(["--preset", "demo", "--data", str(manifest), "--feedback", "refsol"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"train.py: error: {manifest}: row 2: field 'answer' is missing or empty"]


def test_a_fresh_run_refuses_an_out_dir_with_checkpoints(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000004").mkdir(parents=True)
    err = expect_refusal(capsys, tiny_args(tiny_model_dir, out))
    assert "holds checkpoints of an earlier run (latest step_000004): continue it with --resume" in err
    saved = train.dataclasses.asdict(train.parse_config(tiny_args(tiny_model_dir, out, "--lr", "0.5")))
    (out / "checkpoints" / "step_000004" / "config.json").write_text(json.dumps(saved))
    err = expect_refusal(capsys, tiny_args(tiny_model_dir, out, "--resume", "--micro-batch", "1"))
    assert err.splitlines() == [f"train.py: error: --lr 0.01: {out / 'checkpoints' / 'step_000004'} was written "
                                "with 0.5; --resume continues a run only with the options it started with"]


def test_engine_vllm_without_vllm_or_with_a_bad_memory_fraction_fails_at_start(monkeypatch):
    """--engine vllm runs on CPU too (tests/test_vllm.py); what it needs is said before any model is loaded."""
    import importlib.util
    real = importlib.util.find_spec
    args = ["--preset", "demo", "--engine", "vllm"]
    if real("vllm") is not None:
        with pytest.raises(train.ConfigError, match=r"--vllm-gpu-memory 1.5: must be a fraction in \(0, 1\]"):
            train.check_inputs(train.parse_config(args + ["--vllm-gpu-memory", "1.5"]))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(train.ConfigError, match=r"--engine vllm: .*requirements-gpu\.txt.*VLLM_CPU=1 bash setup\.sh"):
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
        for r in log:  # the diagnostics of a declining run
            assert r["entropy_student"] > 0 and r["entropy_teacher"] > 0
            assert 0.01 <= r["div_top1_share"] <= 1 and 0 <= r["claim_located"] <= 1
            assert "teacher_reward" not in r  # (--teacher-samples is off)
    assert all(0 <= r["answered"] <= 1 for r in log)
    if feedback == "stepalign":
        assert log[0]["critic_schema_ok"] == 1.0 and "time_critic" in log[0]
        assert log[0]["skipped_unstructured_step"] == log[0]["kept_unstructured_step"] == 0
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
        # the top-1% share is over the step's tokens of both ranks, not a mean of the ranks' own shares
        for key in ("div_top1_share", "entropy_student", "entropy_teacher", "answered"):
            assert r1_[key] == pytest.approx(r2_[key], rel=1e-3, abs=1e-6)
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


def test_a_dead_critic_server_stops_the_run_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    err = expect_refusal(capsys, tiny_args(tiny_model_dir, out, "--max-steps", "1", "--critic", "server",
                                           "--critic-url", "http://127.0.0.1:9/v1"))
    assert err == "train.py: error: critic server http://127.0.0.1:9/v1/models: connection refused: is the server " \
                  "running at --critic-url?\n"
    assert not out.exists()  # nothing was started


class CriticServer:
    """A real OpenAI-compatible critic on 127.0.0.1 that can be stopped (connections refused) and restarted on
    the same port. Its critiques are free text (the schema is not under test here)."""

    def __init__(self, content: str = "Step 1 is wrong."):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.answer({"object": "list", "data": [{"id": "critic", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self.answer({"choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": content}}]})

            def answer(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

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
    real_write = train.Logger.write

    def write_then_act(self, name, record):  # the loop's own step boundary: kill or revive the real server
        real_write(self, name, record)
        if name == "log.jsonl" and record["step"] in (2, 4):
            server.stop()
        elif name == "log.jsonl" and record["step"] == 3:
            server.start()

    monkeypatch.setattr(train.Logger, "write", write_then_act)
    args = tiny_args(tiny_model_dir, out, "--max-steps", "6", "--eval-every", "100", "--critic", "server",
                     "--critic-url", server.url, "--critic-model", "critic", "--critic-retries", "0",
                     "--critic-fail-window", "4", "--critic-fail-max", "0.5",
                     "--critic-unstructured", "keep", "--no-critic-think-in-prompt")  # free text reaches the teacher
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(args)
        err = capsys.readouterr().err
        assert stop.value.code == train.EXIT_CRITIC_DOWN, err
        warnings = [line for line in err.splitlines() if "the critic failed on" in line]
        assert warnings == [f"[stepalign] step {s}: the critic failed on 4 of 4 rollouts (refused 4); they are "
                            "skipped" for s in (3, 5)]
        assert (f"stopped at step 5: 8 of 16 critiques failed over the last 4 steps (refused 8), at least "
                f"--critic-fail-max 0.5. Fix: the critic server at {server.url} does not answer") in err
        assert "continue with the same command and --resume" in err
        assert [p.name for p in train.checkpoint_dirs(out)] == ["step_000005"]
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


def test_unstructured_critiques_are_skipped_and_logged_per_step(tiny_model_dir, tmp_path):
    """The paper's default: a critique that fails the schema never reaches the teacher; the step counts it."""
    server = CriticServer("ok</think>\n\nLooks fine to me.")  # QwQ-style: the trace's <think> was in the prompt
    out = tmp_path / "run"
    try:
        with pytest.raises(SystemExit) as stop:  # no step changed the weights
            train.main(tiny_args(tiny_model_dir, out, "--max-steps", "1", "--critic", "server", "--critic-url",
                                 server.url, "--critic-model", "critic", "--critic-retries", "0", "--eval-every", "5"))
    finally:
        server.stop()
    assert stop.value.code == train.EXIT_NOTHING_LEARNED
    [record] = read_jsonl(out / "log.jsonl")
    assert record["critic_failed"] == 0 and record["skipped_critic"] == 0  # the server answered every request
    assert record["skipped_unstructured_step"] == record["skipped_critic_step"] == 4
    assert record["kept_unstructured_step"] == 0 and record["critic_schema_ok"] == 0.0
    assert record["loss"] == 0.0 and record["skipped_empty"] == 1  # nothing reached the teacher


def test_unstructured_policy_skip_or_keep(tiny_model_dir, smol_tokenizer, serve):
    """skip (default): only schema-valid critiques reach the teacher. keep: an unstructured critique does too,
    an empty one does not. A failed critique (here: cut by the length limit) is skipped under both."""
    from data import arithmetic_problems
    from rollout import Completion
    problem = arithmetic_problems(1, seed=0, n_ops=2)[0]
    wrong = "Step 1: " + problem.steps[0].rsplit("=", 1)[0] + "= 1000\n\\boxed{1000}"
    valid = train.exact_critic.ExactArithmeticCritic().critique_one(problem, wrong).text
    # QwQ-style answers (the template opened <think> in the prompt, the paper's default --critic-think-in-prompt)
    answers = {"VALID": (f"Step 1 is wrong.\n</think>\n\n{valid}", "stop"),
               "FREE-TEXT": ("Hmm.\n</think>\n\nRecheck the first sum.", "stop"),
               "EMPTY": ("Hmm.\n</think>\n\n", "stop"), "CUT": ("Let me think about step", "length")}

    def respond(body, headers):
        marker = next(m for m in answers if m in body["messages"][0]["content"])
        return 200, chat_answer(*answers[marker])

    server, url = serve(respond)
    for policy, skipped, kept in (("skip", [False, True, True, True], 0), ("keep", [False, False, True, True], 1)):
        cfg = train.parse_config(tiny_args(tiny_model_dir, "/tmp/unused", "--critic", "server", "--critic-url", url,
                                           "--critic-retries", "0", "--critic-unstructured", policy))
        items = [train.Item(problem, [1], Completion([5], f"{wrong}\n{m}", "stop")) for m in answers]
        stats = train.attach_feedback(cfg, train.make_critic(cfg), None, smol_tokenizer, None, items, 0,
                                      train.Timer())
        assert [it.skipped for it in items] == skipped
        assert (stats["critic_failed"], stats["critic_schema_ok"]) == (1.0, 1.0)
        assert (stats["kept_unstructured"], stats["skipped_unstructured"]) == (kept, 2 - kept)
        assert "Incorrect" in smol_tokenizer.decode(items[0].teacher_ids)
        if policy == "keep":
            assert "Recheck the first sum." in smol_tokenizer.decode(items[1].teacher_ids)


def test_non_finite_loss_skips_the_step_without_touching_weights(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train.sd_loss.chunked_self_distillation_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(train.sd_loss, "chunked_self_distillation_loss", nan_loss)
    with pytest.raises(SystemExit) as stop:  # a run whose every step was skipped learned nothing: not a success
        train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2", "--feedback", "refsol"))
    assert stop.value.code == train.EXIT_NOTHING_LEARNED
    log = read_jsonl(out / "log.jsonl")
    assert [r["skipped_nonfinite"] for r in log] == [1, 2]
    assert all(v.abs().max() == 0 for k, v in adapter(out, 2).items() if "lora_B" in k)  # B is still zero


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
    assert stop.value.code == train.EXIT_NOTHING_LEARNED  # every pair a tie: no step, and the exit code says so
    assert "train.py: error: run pbsd-refsol took no optimizer step in its 1 steps (skipped_empty 1" in \
        capsys.readouterr().err
    [record] = read_jsonl(tmp_path / "pbsd-refsol" / "log.jsonl")
    assert {"tie_frac", "teacher_reward", "time_teacher_sample"} <= set(record)
    # the random model never answers: every pair is a tie (both wrong), so no preference and no AdamW step
    assert record["tie_frac"] == 1.0 and record["teacher_reward"] == 0.0 and record["skipped_empty"] == 1
    assert read_jsonl(tmp_path / "pbsd-refsol" / "eval.jsonl")[0]["feedback"] == "pbsd-refsol"
    with pytest.raises(train.ConfigError, match="needs a teacher context"):
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
        ids = smol_tokenizer(wrong, add_special_tokens=False).input_ids  # (the wrong claim is located on them)
        item = train.Item(problem, [1], Completion(ids, wrong, "stop"), reward=0.0)
        backend = train.make_critic(cfg) if feedback == "stepalign" else None
        stats = train.attach_feedback(cfg, backend, None, smol_tokenizer, None, [item], 0, train.Timer())
        teacher_prompt = smol_tokenizer.decode(item.teacher_ids)
        assert expected in teacher_prompt and problem.problem in teacher_prompt
        if feedback == "stepalign":
            assert stats["critic_schema_ok"] == 1.0
        if feedback != "refsol":
            assert problem.reference_solution not in teacher_prompt
        # --teacher-layout turns: the attempt y is the assistant's turn, followed by c in a user turn
        cfg = train.parse_config(tiny_args(tiny_model_dir, "/tmp/unused", "--feedback", feedback,
                                           "--teacher-layout", "turns"))
        train.attach_feedback(cfg, backend, None, smol_tokenizer, None, [item], 0, train.Timer())
        turns_prompt = smol_tokenizer.decode(item.teacher_ids)
        assert turns_prompt.index(wrong) < turns_prompt.index(expected)
        assert turns_prompt != teacher_prompt


def test_a_step_with_nothing_to_learn_leaves_the_weights_alone(tiny_model_dir, tmp_path):
    """Every rollout skipped (e.g. the critic down): no AdamW step, whose momentum would still move the weights."""
    cfg = train.parse_config(tiny_args(tiny_model_dir, tmp_path / "run", "--feedback", "refsol"))
    with train.grading.AnswerChecker() as checker:
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


def test_bf16_sampling_keeps_a_small_adapter():
    """Run.sampling() with a bf16 model: a small adapter (ΔW below half a bf16 ulp of W on most entries, as after
    a few steps at the paper's lr) moves the sampling log-probs as much as the fp32 computation says. Merged into
    the bf16 weights instead, a third of that change is lost (the defect this guards against)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m32 = lora.add_lora(LlamaForCausalLM(config).eval(), r=8, alpha=16)
    ids = torch.randint(0, 256, (2, 48))  # (B, L)
    params = [p for p in m32.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    for _ in range(10):  # a small, trained (so coherent) adapter
        m32(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    for layer in lora.lora_layers(m16).values():  # as train.build_model: a bf16 base, an fp32 adapter
        layer.lora_A.float(), layer.lora_B.float()
    erased = [((layer.weight.float() + layer.delta_weight()).bfloat16() == layer.weight) for layer in
              lora.lora_layers(m16).values()]
    assert sum(e.sum().item() for e in erased) / sum(e.numel() for e in erased) > 0.5  # the adapter is small

    def logp(model):  # (B, L - 1)  log π(y_t) of the tokens, as the sampling forward computes them
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()  # (B, L, V)
        return torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)

    def change(model, context):  # the adapter's effect: log π_θ − log π_base, under the given weights context
        with context():
            with_adapter = logp(model)
            with lora.adapters_disabled(model):
                return with_adapter - logp(model)

    def shrink(d):  # the share of the fp32 change that survives: 1 when none is lost
        return ((d * d32).sum() / (d32 * d32).sum()).item()

    @contextlib.contextmanager
    def merged_into_bf16():  # what sampling did before: W ← W + ΔW in the bf16 weights
        lora.merge(m16)
        try:
            yield
        finally:
            lora.unmerge(m16)

    d32 = change(m32, contextlib.nullcontext)
    cfg = train.parse_config(["--engine", "transformers", "--data", "arithmetic"])
    for model, low, high in ((m32, 0.999, 1.001), (m16, 0.9, 1.1)):  # fp32: merged in place; bf16: an fp32 copy
        run = train.Run(cfg, train.Dist(), None, model, None, None, None, None, [], [], [], None, {})
        assert low < shrink(change(model, run.sampling)) < high
        assert not any(layer.merged for layer in lora.lora_layers(model).values())  # unmerged on exit
    assert shrink(change(m16, merged_into_bf16)) < 0.8


def test_resume_drops_a_log_line_cut_by_a_kill(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    train.truncate_log(log, 3)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_save_then_resume_is_exact(tiny_model_dir, tmp_path):
    """A real training process killed with SIGKILL while its checkpoint directory .tmp_step_N is being written:
    the checkpoints left are complete, the resume removes the partial one, and the final adapter and logs equal
    those of a run never interrupted (bit for bit: same process setup, one thread)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def args(out, *extra):
        return tiny_args(tiny_model_dir, out, "--max-steps", "6", "--eval-every", "1", *extra)

    r = run_cli(args(straight))
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    checkpoints, partial = killed / "checkpoints", []
    for attempt in range(4):  # a kill can land just after the rename; then the next save is the target
        resume = ["--resume"] * (attempt > 0)
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(killed, *resume)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            seen = list(checkpoints.glob(".tmp_step_*")) if checkpoints.is_dir() else []
            if seen and train.checkpoint_dirs(killed):  # a save after the first: the resume has one to go on from
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                partial = [p for p in seen if p.exists()]
                break
        if partial:
            break
    assert partial, "no kill landed inside a checkpoint save"
    assert train.checkpoint_dirs(killed)[-1].name < partial[0].name.removeprefix(".tmp_")
    for done in train.checkpoint_dirs(killed):  # every checkpoint left is complete
        assert {"adapter_model.safetensors", "optimizer.pt", "state.json", "config.json", "rng_rank0.pt"} <= {
            p.name for p in done.iterdir()}
    r = run_cli(args(killed, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"removed {partial[0]}: a checkpoint whose save was interrupted" in r.stdout
    assert not list(checkpoints.glob(".tmp_*"))
    a, b = adapter(straight, 6), adapter(killed, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = read_jsonl(straight / "log.jsonl"), read_jsonl(killed / "log.jsonl")
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["reward"]) for r in log_a] == [(r["loss"], r["reward"]) for r in log_b]
    assert read_jsonl(straight / "eval.jsonl")[-1] == read_jsonl(killed / "eval.jsonl")[-1]


def test_wrong_claim_advantage_on_a_hand_made_rollout(smol_tokenizer):
    """The exact critic's wrong claim, mapped to tokens, and the mean A_t on it and on the rest of the rollout."""
    from data import arithmetic_problems
    from rollout import Completion
    problem = arithmetic_problems(1, seed=0, n_ops=2)[0]
    lhs, value = problem.steps[0].rsplit("=", 1)  # "25 - 2 ", " 23"
    wrong_value = str(int(value) + 1)
    text = f"Step 1: {lhs}= {wrong_value}\n\\boxed{{{wrong_value}}}"
    ids = smol_tokenizer(text, add_special_tokens=False).input_ids
    correct_text = f"Step 1: {problem.steps[0]}\n\\boxed{{{problem.answer}}}"
    correct_ids = smol_tokenizer(correct_text, add_special_tokens=False).input_ids
    items = [train.Item(problem, [1], Completion(ids, text, "stop")),
             train.Item(problem, [1], Completion(correct_ids, correct_text, "stop"))]
    train.locate_wrong_claims(smol_tokenizer, items)
    assert items[1].wrong_claim is None  # a right answer: no wrong claim to locate
    claim = items[0].wrong_claim
    # independently: the tokens whose decoded text overlaps the first occurrence of the wrong value after "="
    start = text.index("= " + wrong_value) + 2
    ends = [len(smol_tokenizer.decode(ids[:t + 1])) for t in range(len(ids))]
    starts = [0] + ends[:-1]
    expected = [s_ < start + len(wrong_value) and e > start and s_ < e for s_, e in zip(starts, ends)]
    assert claim.tolist() == expected and claim.any()
    T = max(len(ids), len(correct_ids))
    A = torch.arange(2 * T, dtype=torch.float32).view(2, T)  # (2, T)
    mask = torch.zeros(2, T)
    mask[0, :len(ids)] = 1
    mask[1, :len(correct_ids)] = 1
    m = train.wrong_claim_metrics(A, mask, [it.wrong_claim for it in items])
    on = [t for t in range(len(ids)) if expected[t]]
    off = [t for t in range(len(ids)) if not expected[t]]  # (row 1 has no located claim: left out)
    assert m["adv_claim"] == pytest.approx(sum(on) / len(on)) and m["n_claim_tokens"] == len(on)
    assert m["adv_off_claim"] == pytest.approx(sum(off) / len(off)) and m["n_off_claim_tokens"] == len(off)
    assert train.wrong_claim_metrics(A, mask, [None, None]) == {}


def test_step_diagnostics_are_over_the_whole_step_not_per_micro_batch(tiny_model_dir, tmp_path):
    """div_top1_share is the share of the top 1% of ALL the step's tokens (not a mean of per-micro-batch shares);
    the entropies are token-weighted means: one micro-batch of 4 and four of 1 give the same step values."""
    from sd_loss import top_share
    values = {}
    with train.grading.AnswerChecker() as checker:
        for mb in (1, 4):
            cfg = train.parse_config(tiny_args(tiny_model_dir, tmp_path / f"mb{mb}", "--feedback", "refsol",
                                               "--micro-batch", str(mb)))
            run, _ = train.start_run(cfg, train.Dist(), checker)
            items, _ = run.rollouts_and_feedback(0, train.Timer())
            per_rollout = [train.micro_batch_loss(cfg, run.model, [it], run.tokenizer.pad_token_id, 1.0,
                                                  train.Timer())[1]["token_divergence"] for it in items]  # (T_i,)
            sums, _ = run.optimize(items, train.Timer())
            values[mb] = {k: sums[k] / sums[f"{k}/weight"] for k in ("div_top1_share", "entropy_student",
                                                                     "entropy_teacher", "answered")}
    assert values[1] == pytest.approx(values[4], rel=1e-5)
    assert values[1]["div_top1_share"] == pytest.approx(top_share(torch.cat(per_rollout)), rel=1e-6)
    mean_of_shares = sum(top_share(v) for v in per_rollout) / len(per_rollout)
    assert abs(values[1]["div_top1_share"] - mean_of_shares) > 1e-3  # (the test tells the two apart)
