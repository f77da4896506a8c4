"""samples.jsonl (infra/sample_log.py): one line per rollout of each step, with the critique as the critic gave it
(or its failure), the teacher's context and what the loss saw; its per-rollout divergences add up to the step's loss;
it is bounded by --sample-log-mb and cut back with the other logs on --resume."""
import json

import pytest

import train
from conftest import fp32_rounding
from test_train import CriticServer, read_jsonl, tiny_args, tiny_model_dir  # noqa: F401 (a fixture)


def test_each_rollout_of_each_step_with_its_critique_context_and_loss(tiny_model_dir, tmp_path):
    """StepAlignFB with the exact critic, 3 steps of 4 rollouts: 12 lines, each with the rollout, the critique (raw =
    its text for the exact critic) and c = the critique's text. Eq. 3 divides by the step's valid tokens, so the
    rollouts' mean divergences weighted by their tokens add up to the step's loss: both are fp32 sums of the same
    non-negative per-token terms in another order (each row's mean is also divided and multiplied back), so they
    differ by rounding on chains of at most the step's tokens plus a few operations (conftest.fp32_rounding)."""
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "3", "--eval-every", "100"))
    samples, log = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in samples] == [1] * 4 + [2] * 4 + [3] * 4
    for r in samples:
        assert r["critique"]["raw"] == r["critique"]["text"] and r["critique"]["error"] is None
        assert r["context"] == r["critique"]["text"] and not r["skipped"]
        assert isinstance(r["rollout"], str) and r["rollout_tokens"] >= 1 and r["reward"] in (0.0, 1.0)
    for step in (1, 2, 3):
        rows = [r for r in samples if r["step"] == step]
        tokens = sum(r["rollout_tokens"] for r in rows)
        total = sum(r["divergence"] * r["rollout_tokens"] for r in rows) / tokens
        [rec] = [r for r in log if r["step"] == step]
        assert abs(total - rec["loss"]) <= fp32_rounding(tokens + 4, rec["loss"])


def test_grpo_lines_carry_the_advantage(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--feedback", "grpo", "--max-steps", "1", "--eval-every", "100"))
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 4 * 2  # 4 problems x G = 2
    for draw in {r["draw"] for r in samples}:
        group = [r for r in samples if r["draw"] == draw]
        assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-6)  # A_i is centred in its group
        assert all(r["critique"] is None and r["context"] is None for r in group)


@pytest.mark.slow
def test_a_failed_critique_is_logged_with_its_kind_and_the_raw_answer_of_a_good_one(tiny_model_dir, tmp_path):
    """A real critic server answers step 1 (free text, kept as unstructured feedback), then is down for step 2: the
    lines say what it answered, and then that the requests were refused (4 of 8 failed: under --critic-fail-max 1
    the run goes on)."""
    server = CriticServer(content="Checking the work.</think>Step 1 is wrong.")
    out = tmp_path / "run"
    args = tiny_args(tiny_model_dir, out, "--max-steps", "2", "--eval-every", "100", "--critic", "server",
                     "--critic-url", server.url, "--critic-model", "critic", "--critic-retries", "0",
                     "--critic-fail-max", "1", "--critic-unstructured", "keep", "--no-critic-think-in-prompt")
    import infra.logs as logs
    real_write = logs.Logger.write

    def write_then_stop(self, name, record):
        real_write(self, name, record)
        if name == "log.jsonl" and record["step"] == 1:
            server.stop()

    logs.Logger.write = write_then_stop
    try:
        train.main(args)
    finally:
        logs.Logger.write = real_write
        server.stop()
    samples = read_jsonl(out / "samples.jsonl")
    first, second = [r for r in samples if r["step"] == 1], [r for r in samples if r["step"] == 2]
    assert len(first) == len(second) == 4
    for r in first:
        assert r["critique"]["raw"] == "Checking the work.</think>Step 1 is wrong."
        assert r["critique"]["text"] == "Step 1 is wrong." and r["context"] == "Step 1 is wrong."
        assert r["critique"]["schema_ok"] is False and r["divergence"] is not None
    for r in second:
        assert r["skipped"] and r["critique"]["error_kind"] == "refused" and r["context"] is None
        assert r["divergence"] is None and server.url.split("/v1")[0] in r["critique"]["error"]


def test_the_log_stops_at_its_bound_says_so_once_and_is_cut_back_on_resume(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    one_step = 4 * 400 / 2**20  # a step's lines are well under 400 bytes a rollout at 6 new tokens
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "4", "--eval-every", "2",
                         "--sample-log-mb", f"{one_step * 2.5:.6f}"))
    lines = (out / "samples.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps and steps == sorted(steps) and max(steps) < 4  # stopped before the last step
    assert len((out / "samples.jsonl").read_bytes()) <= one_step * 2.5 * 2**20
    err = capsys.readouterr().err
    assert err.count("reached --sample-log-mb") == 1
    # --resume from the step-2 checkpoint: lines past step 2 are dropped, then written again (no bound now)
    (out / "checkpoints" / "step_000004").rename(tmp_path / "moved")
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "4", "--eval-every", "2", "--resume"))
    steps = [r["step"] for r in read_jsonl(out / "samples.jsonl")]
    assert steps == sorted(steps) and steps.count(3) == 4 and steps.count(4) == 4


def test_zero_turns_it_off(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "1", "--eval-every", "100", "--sample-log-mb", "0"))
    assert not (out / "samples.jsonl").exists() and (out / "log.jsonl").exists()
