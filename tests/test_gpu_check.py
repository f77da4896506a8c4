"""bench/gpu_check.sh, the prepared device check, in its CPU mode: the same steps at tiny sizes (the GPU mode needs
a CUDA device and is run by hand, bench/gpu_check.sh's header). Three environments: the full one with the demo
model's tokenizer; none of the demo model's files (the built-in Qwen3-format tokenizer of bench/random_qwen3.py);
and the device machine's, neither those files nor math-verify, where step 2 is skipped by name."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOGS = ["bench_sd_step.md", "eval.jsonl", "log.jsonl", "train_resume_step_4.log", "train_steps_1_3.log",
        "versions.txt"]  # the logs only (the model went to --work)


def run_gpu_check(args: list[str], env_extra: dict) -> str:
    """gpu_check.sh --device cpu with `args`; its output. The limit turns a hang into a failure (the whole process
    group is killed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OUT", "PYTHONPATH")}
    env |= {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"} | env_extra
    proc = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"gpu_check.sh did not finish in 600 s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def check_bench(out: Path):
    bench = (out / "bench_sd_step.md").read_text()
    assert [line.split("|")[1].strip() for line in bench.splitlines() if line.startswith("| ")][1:] == ["1", "2", "4"]


def check_train(out: Path, output: str):
    assert "resumed at step 3: yes" in output
    assert sorted(p.name for p in out.iterdir()) == LOGS
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] == r["grad_norm"] for r in logs)  # every step took its AdamW step (no NaN norm)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(smollm2_dir, tmp_path):
    """The SD-step benchmark at batch 1, 2, 4, then train.py under torchrun (1 rank, gloo) on a random Qwen3-shaped
    model with the demo model's tokenizer: 3 steps, and a --resume that runs step 4. Measured: 19-40 s on 2 shared cores."""
    output = run_gpu_check(["--tokenizer", str(smollm2_dir), "--out", str(tmp_path)], {})
    check_bench(tmp_path)
    check_train(tmp_path, output)


def hidden_math_verify(folder: Path) -> dict:
    """Environment in which `import math_verify` fails, as on a machine without it: a package of that name that raises
    ImportError, first on PYTHONPATH."""
    (folder / "math_verify").mkdir(parents=True)
    (folder / "math_verify" / "__init__.py").write_text("raise ImportError('math_verify hidden by the test')\n")
    return {"PYTHONPATH": str(folder)}


@pytest.mark.slow
@pytest.mark.parametrize("math_verify", [True, False], ids=["math-verify", "no-math-verify"])
def test_gpu_check_runs_without_tokenizer_files(tmp_path, math_verify):
    """No --tokenizer and an empty model cache (nothing of the demo model can be found): step 2's model gets the
    built-in Qwen3-format tokenizer and train.py runs as above; without math-verify step 2 is skipped with a line that
    names it and says how to enable it, the benchmark still runs and the check passes. Measured: ~20 s and ~6 s on
    2 shared cores."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    cache.mkdir()
    env = {"SDCF_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    if not math_verify:
        env |= hidden_math_verify(tmp_path / "hide")
    output = run_gpu_check(["--out", str(out)], env)
    check_bench(out)
    if math_verify:
        check_train(out, output)
        assert "tokenizer built in, Qwen3's format" in output
    else:
        skipped = (out / "skipped.txt").read_text()
        assert skipped.startswith("gpu_check.sh: step 2 (train.py) skipped: train.py grades answers with math-verify")
        assert "--wheels DIR" in skipped and skipped.strip() in output
        assert sorted(p.name for p in out.iterdir()) == ["bench_sd_step.md", "skipped.txt", "versions.txt"]
        assert "== 2. train.py" in output and "step 2 skipped (no math-verify)" in output
    assert list(cache.iterdir()) == []  # nothing looked for the demo model
