"""infra/ (the run's plumbing): checkpoints written atomically (an exception or a kill -9 during a save), the log cut back on resume,
and sampling from a bf16 model that keeps a small adapter."""
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import config
import evaluate
import lora
import train
from conftest import fp32_rounding, log_softmax_rounding, logit_rounding
from test_critic import serve  # noqa: F401 (a fixture: a chat-completions server on loopback)
from test_train import ROOT, adapter, read_jsonl, run_cli, tiny_args, tiny_model_dir  # noqa: F401 (a fixture)
from infra import checkpoint
from infra import dist
from infra import logs
from infra import signals
from infra import stop_rules
import policy
import rollout
from demo import arithmetic


def two_steps_then_a_fresh_policy(tiny_model_dir, tmp_path):
    """A run of 2 steps in tmp_path/run, its step-2 adapter, and a freshly built policy and optimizer to save with."""
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "2"))
    before = adapter(out, 2)
    cfg = config.parse_config(tiny_args(tiny_model_dir, out))
    model, _ = policy.build_model(cfg, dist.Dist())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return out, before, cfg, model, optimizer


def test_the_adapter_depends_on_the_seed_alone_not_on_whether_the_model_cache_was_there(tmp_path, monkeypatch):
    """The demo model's first load fills the cache (rollout.smollm2_path): it builds the model from a config, which
    draws random weights from torch's global generator, before the GGUF weights replace them. The adapter drawn
    after it must be the one a later load (from the cache) draws: before policy.build_model seeded right before
    add_lora, the first run of a fresh checkout trained from another A (the first study's rerun found it: the
    same step-1 loss, since B = 0, another gradient)."""
    monkeypatch.setenv("SDCF_CACHE", str(tmp_path))
    cfg = config.parse_config(["--preset", "demo", "--seed", "102", "--out-dir", str(tmp_path / "run")])
    filled, _ = policy.build_model(cfg, dist.Dist())
    assert (tmp_path / rollout.SMOLLM2 / "model.safetensors").is_file()  # this load was the conversion
    cached, _ = policy.build_model(cfg, dist.Dist())
    a, b = lora.lora_state_dict(filled), lora.lora_state_dict(cached)
    assert len(a) == 420 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_during_save_leaves_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    out, before, cfg, model, optimizer = two_steps_then_a_fresh_policy(tiny_model_dir, tmp_path)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(lora, "save_adapter", dies)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(cfg, model, optimizer, 2, {}, dist.Dist())
    monkeypatch.undo()
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step_000002"]
    after = adapter(out, 2)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_sampling_keeps_a_small_adapter():
    """policy.sampling() with a bf16 model: a small adapter (ΔW below half a bf16 ulp of W on most entries, as after
    a few steps at the paper's lr) moves the sampling log-probs as much as the fp32 computation says. Merged into
    the bf16 weights instead, a third of that change is lost (the defect this guards against)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama_config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m32 = lora.add_lora(LlamaForCausalLM(llama_config).eval(), r=8, alpha=16)
    ids = torch.randint(0, 256, (2, 48))  # (B, L)
    params = [p for p in m32.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    for _ in range(10):  # a small, trained (so coherent) adapter
        m32(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    for layer in lora.lora_layers(m16).values():  # as policy.build_model: a bf16 base, an fp32 adapter
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

    d32 = change(m32, contextlib.nullcontext)  # (B, L - 1)
    cfg = config.parse_config(["--engine", "transformers", "--data", "arithmetic"])
    # fp32, merged in place: x·(W + ΔW)ᵀ against x·Wᵀ + s·B(A·x). Each logit moves by at most δz (conftest's
    # logit_rounding on this model's sizes), so each log π(y_t) by 2δz plus two log-softmaxes' rounding; the base
    # log-probs are the same ops on the same (saved) W, exactly; then the change's own subtraction rounds once more.
    with torch.no_grad():
        e_max = 2 * logit_rounding(m32, ids.shape[1]) + log_softmax_rounding(m32(input_ids=ids).logits).max().item()
    d = change(m32, lambda: policy.sampling(cfg, m32))  # (B, L - 1)
    assert ((d - d32).abs() <= e_max + fp32_rounding(1, d32.abs())).all()
    # bf16 with an fp32 copy: measured, not derived (the rounding bound of one bf16 forward, λ√n·2⁻⁸ of the logits'
    # scale, exceeds the change itself), against the third of it lost when merged into the bf16 weights
    assert 0.9 < shrink(change(m16, lambda: policy.sampling(cfg, m16))) < 1.1
    for model in (m32, m16):
        assert not any(layer.merged for layer in lora.lora_layers(model).values())  # unmerged on exit
    assert shrink(change(m16, merged_into_bf16)) < 0.8


def test_resume_drops_a_log_line_cut_by_a_kill(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    checkpoint.truncate_log(log, 3)
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
            if seen and checkpoint.checkpoint_dirs(killed):  # a save after the first: the resume has one to go on from
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                partial = [p for p in seen if p.exists()]
                break
        if partial:
            break
    assert partial, "no kill landed inside a checkpoint save"
    assert checkpoint.checkpoint_dirs(killed)[-1].name < partial[0].name.removeprefix(".tmp_")
    for done in checkpoint.checkpoint_dirs(killed):  # every checkpoint left is complete
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


def test_one_run_per_out_dir_and_a_crashed_holder_does_not_block(tiny_model_dir, tmp_path):
    """Two real processes on one out-dir: the second is refused (exit 2, one line naming the holder's pid) before it
    loads a model; after the holder is killed with SIGKILL, its lock does not block the next run, which says whose
    lock it took over; a clean exit releases the lock (the record is emptied)."""
    out = tmp_path / "run"
    lock = out / ".lock"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    holder = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                               *tiny_args(tiny_model_dir, out, "--max-steps", "200", "--eval-every", "1000")],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120  # a generous limit that turns a hang into a failure
        while time.time() < deadline and holder.poll() is None and not (lock.exists() and lock.read_text()):
            time.sleep(0.1)
        assert holder.poll() is None and f'"pid": {holder.pid}' in lock.read_text()
        second = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "1"))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        [line] = second.stderr.strip().splitlines()
        assert line.startswith(f"train.py: error: --out-dir {out}: in use by another run (pid {holder.pid} on host ")
        assert holder.poll() is None  # the refused run left the holder alone
    finally:
        holder.kill()  # SIGKILL: no handler runs, the lock file keeps the holder's record
        holder.wait()
    assert f'"pid": {holder.pid}' in lock.read_text()
    third = run_cli(tiny_args(tiny_model_dir, out, "--max-steps", "1", "--eval-every", "1"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"{lock}: taken over from a run that ended without releasing it (crashed or killed): pid {holder.pid} " \
           in third.stdout
    assert lock.read_text() == ""  # released at exit


def test_a_second_ctrl_c_stops_at_once():
    """Real signals to this process: SIGTERM then SIGINT set the flag (the first signal is the one reported); a
    second SIGINT raises KeyboardInterrupt; the previous handlers are back after the block."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with signals.StopFlag() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # the first SIGINT: only the flag
            assert stop.requested and stop.signum == signal.SIGTERM
            assert stop.agreed(dist.Dist())
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("the second SIGINT did not interrupt")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_garbage_and_truncated_checkpoint_files_are_refused_by_name(tmp_path):
    """A checkpoint file of random bytes, or cut at any length, raises CheckpointError naming it in one line, and
    nothing else: on garbage the unpickler raises many types (IndexError, KeyError, struct.error, ...), and any one
    that escaped would end --resume with a traceback instead of falling back to an earlier checkpoint (struct.error
    reads "error"). Seeded: every run tries the same 500 files, among which each of those types occurs. No warning
    escapes either."""
    path = tmp_path / "rng_rank0.pt"
    torch.save(checkpoint.rng_state(), path)
    whole = path.read_bytes()
    cases = [random.Random(seed).randbytes(size) for seed in range(100) for size in (1, 8, 512, 4096)]
    cases += [whole[:n] for n in range(0, len(whole), max(1, len(whole) // 100))]
    kinds = set()
    for data in cases:
        path.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(checkpoint.CheckpointError) as refused:
                checkpoint.load_data(path)
        message = str(refused.value)  # never "refused ... never code": random bytes name no object
        assert message.startswith(f"{path}: cannot be read (") and "\n" not in message, message
        kinds.add(message.split("cannot be read (")[1].split(":")[0])
    assert {"not a file of torch.save", "IndexError", "KeyError", "error", "EOFError", "RuntimeError"} <= kinds, kinds


def test_room_for_two_checkpoints_is_checked_on_the_real_disk(tmp_path):
    free = __import__("shutil").disk_usage(tmp_path).free
    checkpoint.check_room(tmp_path, one_checkpoint=1024)
    with pytest.raises(checkpoint.SaveError) as e:
        checkpoint.check_room(tmp_path, one_checkpoint=free // 2 + 2 ** 20)  # two do not fit in what is free
    assert str(e.value).startswith(f"--out-dir {tmp_path}: its disk has ") and "room for 2 checkpoints" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_failed_save_names_the_disk_and_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path):
    """A real write failure from the kernel: a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored, so write() fails
    with EFBIG as on a full disk it fails with ENOSPC) during a save. SaveError names the checkpoint, the disk and
    the previous checkpoint, which is intact; no temporary directory is left."""
    import resource
    out, before, cfg, model, optimizer = two_steps_then_a_fresh_policy(tiny_model_dir, tmp_path)
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
    try:
        with pytest.raises(checkpoint.SaveError) as e:
            checkpoint.save_checkpoint(cfg, model, optimizer, 4, {}, dist.Dist())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    message = str(e.value)
    assert message.startswith(f"{out / 'checkpoints' / 'step_000004'}: the checkpoint of step 4 could not be written")
    assert f"the disk of {out} has " in message and "\n" not in message
    assert message.endswith(f"the previous checkpoint {out / 'checkpoints' / 'step_000002'} is intact")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    after = adapter(out, 2)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_delta_finite_proves_a_finite_delta_by_its_bound_and_forms_it_only_when_the_bound_fails():
    """ΔW = (α/r)·B A in fp32: finite when (α/r)·r·max|B|·max|A| is below fp32's max; past that, ΔW itself decides."""
    m = lora.LoRALinear(torch.nn.Linear(6, 5), r=2, alpha=4.0, dropout=0.0, dtype=None)
    with torch.no_grad():
        m.lora_B.weight.fill_(0.5)
    assert stop_rules.delta_finite(m) and torch.isfinite(m.delta_weight()).all()
    with torch.no_grad():  # rank 0 of B meets rank 1 of A: max|B|·max|A| = 1e40, yet B A = 0
        m.lora_A.weight.zero_(), m.lora_B.weight.zero_()
        m.lora_B.weight[:, 0], m.lora_A.weight[1, :] = 1e20, 1e20
    assert stop_rules.delta_finite(m) and torch.equal(m.delta_weight(), torch.zeros(5, 6))
    with torch.no_grad():  # now they meet: 2·1e40 overflows fp32
        m.lora_A.weight[0, :] = 1e20
    assert not stop_rules.delta_finite(m) and not torch.isfinite(m.delta_weight()).all()
    with torch.no_grad():
        m.lora_A.weight[0, 0] = float("nan")
    assert not stop_rules.delta_finite(m)


# ---------------------------------------------------------------------------------------------- a signal stops a run in seconds
def untimed(record):
    """A log record without its wall-clock fields (seconds, tokens_per_s, time_<phase>): what a resume reproduces."""
    return {k: v for k, v in record.items() if not (k.startswith("time_") or k in ("seconds", "tokens_per_s"))}


def same_run(straight, resumed, steps):
    """The resumed run's adapter, step log and evaluations equal the uninterrupted run's, bit for bit."""
    a, b = adapter(straight, steps), adapter(resumed, steps)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [untimed(r) for r in read_jsonl(straight / "log.jsonl")] == [untimed(r) for r in read_jsonl(resumed / "log.jsonl")]
    assert read_jsonl(straight / "eval.jsonl") == read_jsonl(resumed / "eval.jsonl")


def stopped_process(argv, out, ready, signum, bound_s):
    """Start `argv` (a train.py process, one thread), wait until `ready()` (a generous 120 s limit that turns a hang
    into a failure), send `signum`, and return (its output, its exit code). The exit must come
    within `bound_s`, far less than the work the process is stuck in would take (else TimeoutExpired)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.1)
        assert proc.poll() is None and ready(), "the process ended or never reached the point to signal"
        proc.send_signal(signum)
        return proc.communicate(timeout=bound_s)[0], proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sighup_checkpoints_and_exits_129_as_sigterm_does(tiny_model_dir, tmp_path):
    """SIGHUP (the terminal or ssh session closed) during the steps: the checkpoint SIGTERM would write, exit
    128 + 1 = 129, and --resume continues. Before, SIGHUP's default action ended the run with no checkpoint.
    A real train.py process and a real signal."""
    out = tmp_path / "run"
    log = out / "log.jsonl"
    output, code = stopped_process([sys.executable, str(ROOT / "train.py"),
                                    *tiny_args(tiny_model_dir, out, "--max-steps", "40", "--eval-every", "100")],
                                   out, lambda: log.exists() and log.read_text().count("\n") >= 1, signal.SIGHUP,
                                   bound_s=60)
    assert code == 129, output[-2000:]
    assert "SIGHUP: checkpoint written at step" in output and "Traceback" not in output
    steps = [int(p.name.split("_")[1]) for p in checkpoint.checkpoint_dirs(out)]
    assert len(steps) == 1 and 1 <= steps[0] < 40
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", str(steps[0] + 1), "--resume", "--eval-every", "100"))
    assert read_jsonl(out / "log.jsonl")[-1]["step"] == steps[0] + 1


# the rollouts of step 2 and later crawl: 0.2 s per sampled token, so that step's rollouts (4 samples of 200 tokens)
# would take 160 s; the run is train.py's main in a process of its own, under a real signal
SLOW_ROLLOUTS = """import sys, time
sys.path.insert(0, {root!r})
import rollout, train
from infra import logs
slow, write, is_end = [False], logs.Logger.write, rollout.TransformersEngine._is_end
def write_then_slow(self, name, record):
    write(self, name, record)
    slow[0] = slow[0] or name == "log.jsonl"
def crawl(self, ids):
    if slow[0]:
        print("generating slowly", flush=True) if len(ids) == 1 else None
        time.sleep(0.2)
    return is_end(self, ids)
logs.Logger.write, rollout.TransformersEngine._is_end = write_then_slow, crawl
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_signal_during_rollouts_stops_the_run_in_seconds_and_resume_is_exact(tiny_model_dir, tmp_path):
    """Ctrl-C (SIGINT) while step 2's rollouts are being sampled: the engine polls the stop flag once per token, so
    the batch is dropped at once (not after its 160 s), step 1's checkpoint is written, exit 130; --resume then ends
    where an uninterrupted run ends, bit for bit."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"

    def args(out, *extra):
        return tiny_args(tiny_model_dir, out, "--max-steps", "3", "--eval-every", "100", "--max-new-tokens", "200",
                         *extra)

    r = run_cli(args(straight))
    assert r.returncode == 0, r.stderr[-2000:]
    script = tmp_path / "slow_rollouts.py"
    script.write_text(SLOW_ROLLOUTS.format(root=str(ROOT)))
    log = stopped / "log.jsonl"
    output, code = stopped_process([sys.executable, str(script), *args(stopped)], stopped,
                                         lambda: log.exists() and log.read_text().count("\n") == 1, signal.SIGINT,
                                         bound_s=20)
    assert code == 130, output[-2000:]
    assert "SIGINT: checkpoint written at step 1" in output and "Traceback" not in output
    assert [p.name for p in checkpoint.checkpoint_dirs(stopped)] == ["step_000001"]
    r = run_cli(args(stopped, "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    same_run(straight, stopped, 3)


def test_a_signal_during_a_hung_critic_request_stops_the_run_in_seconds_and_resume_is_exact(tiny_model_dir, tmp_path,
                                                                                            serve):
    """A critic server on loopback that answers step 1's critiques, then holds every request open for 600 s (the
    --critic-timeout): SIGTERM during that wait ends the run within seconds (the critic client polls the stop flag,
    cuts its connections, retries nothing), with step 1's checkpoint and exit 143; with the server answering again,
    --resume ends where an uninterrupted run ends, bit for bit."""
    from test_critic import MODELS, ModelsHandler, chat_answer

    release, asked = threading.Event(), []

    def respond(body, headers):
        if body is None or body["max_tokens"] == 1:  # the preflight: the model list, one token
            return 200, MODELS if body is None else chat_answer("OK")
        asked.append(body)
        if len(asked) > 4 and hang[0]:  # step 1 asks 4 critiques
            release.wait(600)
        return 200, chat_answer("Step 1 is wrong.")

    hang = [False]
    _, url = serve(respond, ModelsHandler)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"

    def args(out, *extra):
        return tiny_args(tiny_model_dir, out, "--max-steps", "3", "--eval-every", "100", "--critic", "server",
                         "--critic-url", url + "/v1", "--critic-model", "critic", "--critic-timeout", "600",
                         "--critic-retries", "0", "--critic-unstructured", "keep", "--no-critic-think-in-prompt",
                         *extra)

    try:
        r = run_cli(args(straight))
        assert r.returncode == 0, r.stderr[-2000:]
        asked.clear()
        hang[0] = True
        output, code = stopped_process([sys.executable, str(ROOT / "train.py"), *args(stopped)], stopped,
                                             lambda: len(asked) > 4, signal.SIGTERM, bound_s=20)
        assert code == 143, output[-2000:]
        assert "SIGTERM: checkpoint written at step 1" in output and "Traceback" not in output
        assert [p.name for p in checkpoint.checkpoint_dirs(stopped)] == ["step_000001"]
        hang[0] = False
        r = run_cli(args(stopped, "--resume"))
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        release.set()
    same_run(straight, stopped, 3)


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_signal_at_an_evaluation_boundary_checkpoints_first_and_resume_evaluates(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, when):
    """A real SIGTERM to this process right after step 2's log line (`before` its evaluation, --eval-every 2), or
    once step 2's evaluation has begun (`during`: the engine drops it at its first token): exit 143 with step 2's
    checkpoint and no evaluation of step 2 in eval.jsonl; --resume runs that evaluation first, then the rest, and
    the logs, evaluations and weights equal an uninterrupted run's."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"

    def args(out, *extra):
        return tiny_args(tiny_model_dir, out, "--max-steps", "4", "--eval-every", "2", *extra)

    train.main(args(straight))
    write, evaluate_policy = logs.Logger.write, evaluate.evaluate_policy

    def write_then_signal(self, name, record):
        write(self, name, record)
        if name == "log.jsonl" and record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def signal_then_evaluate(cfg, engine, tokenizer, checker, test, step, d):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate_policy(cfg, engine, tokenizer, checker, test, step, d)

    if when == "before":
        monkeypatch.setattr(logs.Logger, "write", write_then_signal)
    else:
        monkeypatch.setattr(evaluate, "evaluate_policy", signal_then_evaluate)
    with pytest.raises(SystemExit) as stop:
        train.main(args(stopped))
    assert stop.value.code == 143
    monkeypatch.undo()
    assert [p.name for p in checkpoint.checkpoint_dirs(stopped)] == ["step_000002"]
    assert [r["step"] for r in read_jsonl(stopped / "eval.jsonl")] == [0]
    train.main(args(stopped, "--resume"))
    assert [r["step"] for r in read_jsonl(stopped / "eval.jsonl")] == [0, 2, 4]
    same_run(straight, stopped, 4)


# ---------------------------------------------------------------------------------------------- nothing outside the out-dir
def test_the_lock_never_writes_through_a_link(tmp_path):
    """A .lock that is a symbolic link was opened through it and its target truncated to the lock's record: refused
    (O_NOFOLLOW), as are a hard link and a FIFO; the target keeps its bytes."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for i, make in enumerate((lambda p: p.symlink_to(victim), lambda p: os.link(victim, p), os.mkfifo)):
        out = tmp_path / f"run{i}"
        out.mkdir()
        make(out / ".lock")
        with pytest.raises(checkpoint.OutDirBusy, match=r"\.lock"):
            checkpoint.OutDirLock(out).__enter__()
    assert victim.read_text() == "precious"


def test_every_write_of_a_run_stays_inside_its_out_dir(tmp_path):
    """The log lines, the checkpoints, the adapters pushed for vLLM and the --base-eval file never write through a
    link planted in the out-dir (nor a log through a hard link): EscapesOutDir names it, the target is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").symlink_to(victim)
    os.link(victim, out / "eval.jsonl")
    log = logs.Logger(out, enabled=True)
    for name in ("log.jsonl", "eval.jsonl"):
        with pytest.raises(logs.EscapesOutDir, match=name):
            log.write(name, {"step": 1})
    (out / "checkpoints").symlink_to(outside)
    cfg = config.parse_config(["--out-dir", str(out), "--engine", "vllm"])
    with pytest.raises(logs.EscapesOutDir, match="checkpoints: a symbolic link"):
        checkpoint.save_checkpoint(cfg, None, None, 2, {}, dist.Dist())
    (out / "adapters").symlink_to(outside)
    with pytest.raises(logs.EscapesOutDir, match="adapters: a symbolic link"):
        policy.push_adapter(cfg, dist.Dist(), None, None, 3)
    base_eval = tmp_path / "base_eval.json"
    (tmp_path / "base_eval.json.tmp").symlink_to(victim)  # the temporary file of the atomic write
    test = arithmetic.arithmetic_problems(2, seed=0)
    evaluate.save_base_eval(dataclasses.replace(cfg, base_eval=str(base_eval), model="no-such/model"), {"step": 0},
                            test)
    assert json.loads(base_eval.read_text())["result"] == {"step": 0}
    assert victim.read_text() == "precious" and sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


# ---------------------------------------------------------------------------------------------- the critic's client
def test_the_client_repairs_lone_surrogates_and_never_shows_a_secret(serve, smol_tokenizer):
    """An answer whose content holds a lone surrogate (JSON's \\ud800 escape) became a str the tokenizer refuses
    (TypeError) and no UTF-8 file takes: it is valid Unicode once it enters (U+FFFD) and counted. A key that no header
    can carry is refused before a header holds it (http.client's ValueError printed it); a password in the URL is
    sent as Basic authentication and appears in no message."""
    from infra import chat_client
    server, url = serve(lambda body, headers: (200, b'{"choices": [{"message": {"content": "Step 1: \\ud800 ok"},'
                                                    b' "finish_reason": "stop"}]}'))
    client = chat_client.ChatClient(url + "/v1", "m", max_tokens=8, api_key_env="SDCF_NO_SUCH_VARIABLE")
    [(text, error, _)] = client.complete([[{"role": "user", "content": "hi"}]])
    assert error is None and text == "Step 1: \ufffd ok" and client.repaired == 1
    assert smol_tokenizer(text, add_special_tokens=False).input_ids and text.encode("utf-8")
    with pytest.raises(chat_client.RequestFailed) as failed:
        chat_client.request(url + "/v1/models", None, "sk-secret-key\r", 5.0)
    assert failed.value.kind == "bad_key" and "secret" not in str(failed.value) and "U+000D" in str(failed.value)
    secret_url = url.replace("http://", "http://alice:pw%40s3cret@") + "/v1"
    client = chat_client.ChatClient(secret_url, "m", max_tokens=8, api_key_env="SDCF_NO_SUCH_VARIABLE")
    client.complete([[{"role": "user", "content": "hi"}]])
    import base64
    assert server.requests[-1][1]["Authorization"] == "Basic " + base64.b64encode(b"alice:pw@s3cret").decode()
    server.respond = lambda body, headers: (500, {"error": "down"})
    [(_, error, _)] = client.complete([[{"role": "user", "content": "hi"}]])
    assert "s3cret" not in error + repr(client) and "[redacted]@127.0.0.1" in error


def test_every_failure_kind_of_the_critic_has_a_fix_of_its_own():
    """The stop rule says what to change from the most frequent failure kind (stop_rules.critic_fix). Every kind the
    client raises (read from infra/chat_client.py's source, so a kind cannot be added without its fix), the critic's
    own and an HTTP status get a fix of their own, never the fallback, and no two share one. Before, an answer longer
    than max_tokens can decode to was "malformed", whose fix blamed --critic-url; a bad key had the fallback."""
    import re
    source = (ROOT / "infra" / "chat_client.py").read_text()
    kinds = set(re.findall(r'(?:kind = |(?:True|False),\s*)"(\w+)"', source))
    assert {"refused", "timeout", "connection", "malformed", "oversized", "bad_key", "length", "empty"} <= kinds
    kinds -= {"abandoned"}  # only while the run stops: that step is dropped, never counted
    kinds |= {"schema", "control_token", "http_401", "http_404", "http_500"}
    cfg = config.parse_config(["--critic", "server", "--critic-max-tokens", "512"])
    fixes = {kind: stop_rules.critic_fix(cfg, {f"critic_failed_{kind}": 1.0}) for kind in kinds}
    fallback = stop_rules.critic_fix(cfg, {})
    assert all(fix != fallback for fix in fixes.values()), fixes
    assert len(set(fixes.values())) == len(kinds) - 1  # refused and connection: the same fix (the server is down)
    assert "--critic-max-tokens 512" in fixes["oversized"] and "--critic-url" not in fixes["oversized"]
