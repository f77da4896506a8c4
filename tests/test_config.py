"""config.py through train.py's command line: every option has help, the presets, and every bad option, bad input
or unreachable critic server refused at start by name, before anything loads."""
import dataclasses
import json
import subprocess
import sys

import pytest

import config
import feedback
import train
from test_train import ROOT, run_cli, tiny_args, tiny_model_dir  # noqa: F401 (tiny_model_dir is a fixture)
from infra import logs
from demo import arithmetic



def test_every_config_field_is_an_option_with_help():
    text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT).stdout
    for f in dataclasses.fields(config.Config):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"]


def test_paper_defaults_and_demo_preset():
    paper = config.parse_config([])
    assert (paper.feedback, paper.model, paper.lora_r, paper.lora_alpha, paper.temperature, paper.lr,
            paper.prompts_per_step, paper.max_new_tokens, paper.divergence) == (
        "stepalign", "Qwen/Qwen3-1.7B", 64, 128.0, 1.1, 5e-6, 32, 2048, "forward")
    assert (paper.student_thinking, paper.teacher_thinking) == (False, True)
    assert feedback.group_size(paper) == 1 and feedback.group_size(config.parse_config(["--feedback", "grpo"])) == 8
    demo = config.parse_config(["--preset", "demo", "--lr", "0.5"])
    assert demo.model == "smollm2-135m-instruct" and demo.critic == "exact" and demo.lr == 0.5
    assert config.parse_config(["--preset", "demo", "--no-stop-at-boxed"]).stop_at_boxed is False


def test_missing_paths_fail_at_start(tmp_path):
    with pytest.raises(config.ConfigError, match="no such file"):
        config.check_inputs(config.parse_config(["--data", str(tmp_path / "nope.jsonl")]))
    with pytest.raises(config.ConfigError, match="--model .*no_model: no such directory"):
        config.check_inputs(config.parse_config(["--data", "arithmetic", "--engine", "transformers",
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
    "critic_retries": "-1", "nonfinite_max": "0", "critic_max_tokens": "0", "critic_temperature": "-1", "critic_top_p": "0", "sample_log_mb": "-1", "vllm_gpu_memory": "1.2",
    "vllm_kv_cache_gib": "-1",
    "lora_r": "0", "lora_alpha": "-2", "lora_targets": "q_proj,,v_proj", "sd_samples": "0", "grpo_group_size": "1",
    "grpo_clip": "0", "temperature": "-1", "max_new_tokens": "0", "lr": "-1", "weight_decay": "-0.1",
    "max_grad_norm": "0", "prompts_per_step": "0", "micro_batch": "0", "loss_chunk": "0", "epochs": "0",
    "max_steps": "-1", "eval_every": "0", "eval_samples": "0", "eval_temperature": "-0.5", "eval_problems": "-1",
    "seed": "-1", "out_dir": "runs/{model}", "model": "/nonexistent/model", "data": "/nonexistent/data.jsonl",
    "critic_model": ("/nonexistent/critic", "--critic", "local"), "div_clip": "-0.05",
    "base_eval": "/",
}


# values inside a lower bound that would fail later, after the model loaded: past an upper bound or an integer range
# (a port past 65535 raised in urllib at step 1; 2 * 2^1100 s of backoff overflowed a float; numpy's seeds are 32-bit;
# a timer of 10^10 s overflows threading's wait)
BAD_BOUNDS = [("critic_url", "http://127.0.0.1:70000/v1"), ("critic_url", "http://127.0.0.1:8000/v1 x"),
              ("critic_retries", "1100"), ("critic_retries", "11"), ("seed", "4294967296"),
              ("critic_timeout", "10000000000.0")]


def test_every_option_with_a_bad_value_is_refused_by_name(tiny_model_dir, tmp_path, capsys):
    """Walk every option of Config: a bad value stops main before anything loads, with one line naming the
    option and the value (exit 2). An accepted bad value would start training here instead."""
    base = tiny_args(tiny_model_dir, tmp_path / "run", "--max-steps", "1")
    fields = dataclasses.fields(config.Config)
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
    for name, value in BAD_BOUNDS:
        option = "--" + name.replace("_", "-")
        err = expect_refusal(capsys, [*base, option, value])
        assert err.startswith(f"train.py: error: {option} {value}: "), err
    for value in ("nan", "inf"):  # non-finite floats pass a comparison with a bound
        assert "--lr " + value in expect_refusal(capsys, [*base, "--lr", value])
    assert "argument --lr: invalid float value: 'abc'" in expect_refusal(capsys, [*base, "--lr", "abc"])


def test_options_that_depend_on_each_other(tiny_model_dir, tmp_path, capsys):
    cfg = config.parse_config(tiny_args(tiny_model_dir, tmp_path / "run", "--prompts-per-step", "4"))
    assert config.config_problems(cfg, world=2) == []
    assert config.config_problems(cfg, world=3) == ["--prompts-per-step 4: must divide by the number of ranks (3)"]
    base = tiny_args(tiny_model_dir, tmp_path / "run")
    err = expect_refusal(capsys, [*base, "--objective", "pbsd", "--feedback", "grpo", "--lr", "-1"])
    assert "--objective pbsd with --feedback grpo" in err and "--lr -1.0" in err  # every problem, one line each
    assert "--epochs 1 x 8 training problems // --prompts-per-step 9 is 0 steps" in expect_refusal(
        capsys, [*base, "--epochs", "1", "--prompts-per-step", "9"])
    assert "--eval-problems 3: must be at most the 2 held-out problems" in expect_refusal(
        capsys, [*base, "--eval-problems", "3"])
    assert "--div-clip 0.05: clips the full-vocabulary divergences" in expect_refusal(
        capsys, [*base, "--divergence", "sampled", "--div-clip", "0.05"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "problem": "1+1?", "answer": "2", "split": "train"}) + "\n")
    assert f"{manifest}: no row with split 'test'" in expect_refusal(capsys, [*base, "--data", str(manifest),
                                                                             "--feedback", "refsol"])
    assert "--critic exact only knows arithmetic" in expect_refusal(capsys, [*base, "--data", str(manifest)])
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)  # JSON nested past Python's recursion limit
    assert f"--base-eval {deep}: must be a step-0 evaluation" in expect_refusal(capsys,
                                                                              [*base, "--base-eval", str(deep)])


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
    out = tmp_path / "real"  # (a checkpoint that loads: --resume compares the options of the newest one that does)
    train.main(tiny_args(tiny_model_dir, out, "--lr", "0.5", "--max-steps", "1", "--eval-every", "1"))
    capsys.readouterr()
    err = expect_refusal(capsys, tiny_args(tiny_model_dir, out, "--resume", "--micro-batch", "1"))
    assert err.splitlines() == [f"train.py: error: --lr 0.01: {out / 'checkpoints' / 'step_000001'} was written "
                                "with 0.5; --resume continues a run only with the options it started with"]


def test_engine_vllm_without_vllm_or_with_a_bad_memory_fraction_fails_at_start(monkeypatch):
    """--engine vllm runs on CPU too (tests/test_vllm.py); what it needs is said before any model is loaded."""
    import importlib.util
    real = importlib.util.find_spec
    args = ["--preset", "demo", "--engine", "vllm"]
    if real("vllm") is not None:
        with pytest.raises(config.ConfigError, match=r"--vllm-gpu-memory 1.5: must be a fraction in \(0, 1\]"):
            config.check_inputs(config.parse_config(args + ["--vllm-gpu-memory", "1.5"]))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(config.ConfigError, match=r"--engine vllm: .*requirements-gpu\.txt.*VLLM_CPU=1 bash setup\.sh"):
        config.check_inputs(config.parse_config(args))


def test_a_dead_critic_server_stops_the_run_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    err = expect_refusal(capsys, tiny_args(tiny_model_dir, out, "--max-steps", "1", "--critic", "server",
                                           "--critic-url", "http://127.0.0.1:9/v1"))
    assert err == "train.py: error: critic server http://127.0.0.1:9/v1/models: connection refused: is the server " \
                  "running at --critic-url?\n"
    assert not out.exists()  # nothing was started


def _wrong_attempts(problem) -> list[str]:
    """Attempts in the step format with one wrong claim, at each step in turn (the rest computed from it), and
    attempts cut off after each step: what the critic corrects on the demo's problems."""
    steps = [tuple(s.split()) for s in problem.steps]  # ("17", "+", "25", "=", "42")
    attempts = []
    for wrong_at in range(len(steps)):
        value, lines = int(steps[0][0]), []
        for i, (_, op, b, _, _) in enumerate(steps):
            result = arithmetic.apply_op(value, op, int(b)) + (1 if i == wrong_at else 0)
            lines.append(f"Step {i + 1}: {value} {op} {b} = {result}")
            value = result
        attempts.append("\n".join(lines) + f"\n\\boxed{{{value}}}")
        attempts.append("\n".join(lines[:wrong_at + 1]))  # cut off: no final answer
    return attempts


def test_demo_budget_fits_every_context_and_a_correct_answer(smol_tokenizer):
    """Every form's solution in c (the reference, the step-format control, the critic's corrected solutions of
    wrong and cut-off attempts) and a correct answer in the step format fit in --max-new-tokens, with their
    \\boxed{}: a student that imitates its teacher is never cut off before it answers. Over the demo preset's
    problems of seed 0 and of the study's seeds, train and held-out."""
    from demo import exact_critic
    import prompts
    from scripts import study
    critic = exact_critic.ExactArithmeticCritic()
    lengths = []
    for seed in (0, *study.STUDIES["first"]["seeds"], *study.STUDIES["second"]["seeds"]):
        cfg = config.parse_config(["--preset", "demo", "--seed", str(seed)])
        train_set, test_set = config.load_problems(cfg)
        for p in train_set + test_set:
            texts = [p.reference_solution, arithmetic.step_solution(p)]
            texts += [prompts.corrected_solution(c.text) for c in
                      critic.critique([(p, attempt) for attempt in _wrong_attempts(p)])]
            lengths += [len(smol_tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
            assert all("\\boxed{" + p.answer + "}" in t for t in texts)
    fit = sum(n <= cfg.max_new_tokens for n in lengths) / len(lengths)
    assert fit >= 0.99, f"only {fit:.3f} of {len(lengths)} contexts fit in {cfg.max_new_tokens} tokens " \
                        f"(longest {max(lengths)})"


def test_refsol_style_steps_is_the_format_control():
    """--refsol-style steps: RefSol's context is the gold solution in the step format, its runs are named apart,
    and it needs problems with exact steps."""
    cfg = config.parse_config(["--preset", "demo", "--feedback", "refsol", "--refsol-style", "steps"])
    assert config.run_name(cfg) == "refsol_steps" and config.form_config(cfg, "refsol").out_dir.endswith("refsol_steps")
    train_set, _ = config.load_problems(cfg)
    items = [feedback.Item(p, [], None) for p in train_set[:3]]
    contexts, critiques, _ = feedback.feedback_contexts(cfg, None, items, logs.Timer())
    assert critiques is None and contexts == [arithmetic.step_solution(p) for p in train_set[:3]]
    assert contexts[0].splitlines()[0] == "Step 1: " + train_set[0].steps[0]
    bad = config.parse_config(["--feedback", "refsol", "--refsol-style", "steps", "--data", "x.jsonl"])
    assert any(line.startswith("--refsol-style steps") for line in config.config_problems(bad))


def test_a_manifest_with_a_duplicate_id_is_refused_before_the_model_loads(tmp_path):
    """The real command line: a problem id in both train and test is exit 2, one line naming the file, id and rows;
    --model names a hub id that this machine cannot fetch, so reaching the model load would fail otherwise."""
    manifest = tmp_path / "m.jsonl"
    rows = [{"id": "a", "problem": "1+1?", "answer": "2", "split": "train"},
            {"id": "b", "problem": "2+2?", "answer": "4", "split": "train"},
            {"id": "a", "problem": "3+3?", "answer": "6", "split": "test"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli(["--data", str(manifest), "--feedback", "grpo", "--engine", "transformers", "--model",
                      "no-such-org/no-such-model", "--prompts-per-step", "1", "--out-dir", str(tmp_path / "run")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"train.py: error: {manifest}: id 'a' is in both train and test (rows 1 and 3); each problem must be on "
        "one row"]


def test_an_out_dir_under_a_file_is_refused_at_start(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    err = expect_refusal(capsys, tiny_args(tiny_model_dir, tmp_path / "a_file" / "sub" / "run"))
    assert err.splitlines() == [f"train.py: error: --out-dir {tmp_path / 'a_file' / 'sub' / 'run'}: "
                                f"{tmp_path / 'a_file'} is a file, so no directory can be made under it"]


def test_secrets_never_appear_in_output_or_files(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A password in --critic-url is redacted in the printed config line, config.json (the run's and each
    checkpoint's) and every refusal; an API key that no HTTP header can carry (a trailing \\r: http.client's error
    printed the header, key included, at step 1) is refused at start by name, without its bytes."""
    out = tmp_path / "run"
    url = "http://alice:s3cr3t-pw@127.0.0.1:9/v1"  # (the exact critic runs: the server is never asked)
    train.main(tiny_args(tiny_model_dir, out, "--max-steps", "1", "--eval-every", "1", "--critic-url", url))
    captured = capsys.readouterr()
    assert "http://[redacted]@127.0.0.1:9/v1" in captured.out
    written = [p.read_text() for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert len(written) >= 4 and all("s3cr3t" not in text for text in written)
    assert "s3cr3t" not in captured.out + captured.err
    err = expect_refusal(capsys, tiny_args(tiny_model_dir, tmp_path / "r2", "--critic-url",
                                           "http://alice:s3cr3t-pw@127.0.0.1:70000/v1"))
    assert "s3cr3t" not in err and "--critic-url http://[redacted]@127.0.0.1:70000/v1: has a bad port" in err
    monkeypatch.setenv("SDCF_TEST_KEY", "sk-very-secret-key\r")
    err = expect_refusal(capsys, tiny_args(tiny_model_dir, tmp_path / "r3", "--critic", "server",
                                           "--critic-api-key-env", "SDCF_TEST_KEY"))
    assert "very-secret" not in err
    assert err.splitlines() == ["train.py: error: --critic-api-key-env SDCF_TEST_KEY: the key in $SDCF_TEST_KEY "
                                "holds the character U+000D at position 19 of 19 (a trailing newline or \\r?); an API "
                                "key is printable ASCII without spaces"]


BAD_ROWS = {  # what is wrong with a manifest row -> (the row's fields, the phrase of the error)
    "answer that no box reads back": ({"answer": "}{"}, "field 'answer' '}{': its \\boxed{} form reads back as None"),
    "blank answer": ({"answer": "  "}, "field 'answer' is missing or empty"),
    "unbalanced brace": ({"answer": "\\frac{1}{2"}, "field 'answer'"),
    "reference that is a number": ({"reference_solution": 5}, "field 'reference_solution' is int 5, not a string"),
    "lone surrogate in a problem": ({"problem": "What is 2+\ud800?"},
                                    "field 'problem' holds a lone surrogate U+D800 at character 10"),
    "source that is a list": ({"source": ["x"]}, "field 'source' is list"),
    "blank problem": ({"problem": " \n"}, "field 'problem' is missing or empty"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_manifest_row_is_refused_before_the_model_loads(tmp_path, kind):
    """Each bad field of a manifest row: exit 2, one line naming the file, the row and the field. Before, a gold
    answer '}{' or blank, a reference that is a number and a lone surrogate (JSON's \\ud800) each passed the load and
    failed at step 1 or later, after the model loaded; --model names a hub id this machine cannot fetch, so reaching
    the model load would fail otherwise."""
    fields, phrase = BAD_ROWS[kind]
    rows = [{"id": "a", "problem": "1+1?", "answer": "2", "split": "train", "reference_solution": "1+1 = 2"},
            {"id": "b", "problem": "2+2?", "answer": "4", "split": "test", "reference_solution": None, **fields}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))  # (ASCII: the surrogate as its \\ud800 escape)
    result = run_cli(["--data", str(manifest), "--feedback", "grpo", "--engine", "transformers", "--model",
                      "no-such-org/no-such-model", "--prompts-per-step", "1", "--out-dir", str(tmp_path / "run")])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"train.py: error: {manifest}: row 2: ") and phrase in line, line


def test_the_out_dir_is_never_the_model_or_the_data_directory(tiny_model_dir, tmp_path, capsys):
    """--out-dir equal to --model replaced the model's config.json; one above the model or the data (the run deletes
    checkpoints and adapters in its own) or inside the model's directory would write beside or over them. Each is
    refused by name at start, through symbolic links too; nothing in the model's directory changed."""
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    link = tmp_path / "link_to_model"
    link.symlink_to(tiny_model_dir)
    for out, how in ((tiny_model_dir, "is"), (link, "is"), (tiny_model_dir.parent, "holds"),
                     (tiny_model_dir / "runs" / "x", "is inside")):
        err = expect_refusal(capsys, tiny_args(tiny_model_dir, out))
        assert f"--out-dir {out}: {out} {how} the directory {tiny_model_dir.resolve()} of --model" in err, err
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()} == before
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    manifest = data_dir / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "problem": f"{i}+1?", "answer": "2", "split": s}) + "\n"
                                for i, s in (("a", "train"), ("b", "test"))))
    for out in (data_dir, tmp_path):
        err = expect_refusal(capsys, tiny_args(tiny_model_dir, out, "--data", str(manifest), "--feedback", "grpo"))
        assert f"the directory {data_dir.resolve()} of --data" in err, err


def test_a_link_among_the_out_dirs_files_is_refused_at_start(tiny_model_dir, tmp_path, capsys):
    """A .lock that links elsewhere was truncated by the lock; any of the run's names that is a link is refused
    before anything is written, and the link's target keeps its bytes."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (".lock", "log.jsonl", "checkpoints"):
        out = tmp_path / f"run_{name.strip('.')}"
        out.mkdir()
        (out / name).symlink_to(victim)
        err = expect_refusal(capsys, tiny_args(tiny_model_dir, out))
        assert f"{out / name} is a symbolic link" in err
    assert victim.read_text() == "precious"


def test_feedback_all_gives_each_form_its_own_directory():
    """--feedback all with an --out-dir without {feedback}: each form in OUT/FORM (GRPO overwrote the two SD runs
    and printed only its own table); with {feedback} in it, the pattern decides; one form: the directory as given."""
    cfg = config.parse_config(["--preset", "demo", "--out-dir", "runs/mine"])
    assert [config.form_config(cfg, f).out_dir for f in feedback.PAPER_FORMS] == [
        "runs/mine/stepalign", "runs/mine/refsol", "runs/mine/grpo"]
    cfg = config.parse_config(["--preset", "demo", "--out-dir", "runs/{feedback}-x/"])
    assert config.form_config(cfg, "grpo").out_dir == "runs/grpo-x/"
    cfg = config.parse_config(["--preset", "demo", "--feedback", "grpo", "--out-dir", "runs/mine"])
    assert config.form_config(cfg, "grpo").out_dir == "runs/mine"


def test_a_run_prints_one_short_line_of_the_options_it_changed():
    """The console shows each run's options that differ from its preset's (config.json holds them all), booleans
    as their flags and a password in --critic-url redacted."""
    from infra.checkpoint import options_line
    demo = config.parse_config(["--preset", "demo"])
    cfg = config.parse_config(["--preset", "demo", "--seed", "3", "--no-stop-at-boxed",
                               "--critic-url", "http://me:hunter2@127.0.0.1:9/v1"])
    assert options_line(demo, demo) == "--preset demo"
    line = options_line(cfg, demo)
    assert line == "--preset demo --critic-url http://[redacted]@127.0.0.1:9/v1 --no-stop-at-boxed --seed 3"
    assert config.parse_config(line.replace(line.split()[3], "http://127.0.0.1:9/v1").split()).seed == 3
