"""bench/gpu_check.sh, the prepared device check, in its CPU mode: the same steps at tiny sizes (the GPU mode needs
a CUDA device and is run by hand, bench/gpu_check.sh's header)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(smollm2_dir, tmp_path):
    """The SD-step benchmark at batch 1, 2, 4, then train.py under torchrun (1 rank, gloo) on a random Qwen3-shaped
    model: 3 steps, and a --resume that runs step 4. Measured: ~40 s on 2 cores; the limit turns a hang into a
    failure (the whole process group is killed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OUT")}
    env |= {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--tokenizer",
                             str(smollm2_dir), "--out", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"gpu_check.sh did not finish in 600 s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    bench = (tmp_path / "bench_sd_step.md").read_text()
    assert [line.split("|")[1].strip() for line in bench.splitlines() if line.startswith("| ")][1:] == ["1", "2", "4"]
    assert "resumed at step 3: yes" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_sd_step.md", "eval.jsonl", "log.jsonl",
                                                          "train_resume_step_4.log", "train_steps_1_3.log",
                                                          "versions.txt"]  # the logs only (the model went to --work)
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] == r["grad_norm"] for r in logs)  # every step took its AdamW step (no NaN norm)
