"""scripts/study.py's runs: each a train.py command of the demo preset sharing the seed's step-0 evaluation through one
file; a finished run is not run again, one with a checkpoint continues, one cut short before it starts again. A stop
signal reaches every run once and the study waits for their checkpoints; bad options and run files are one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import config
from scripts import study

ROOT = Path(__file__).resolve().parent.parent


def eval_row(step, **extra):
    return {"step": step, "feedback": "stepalign", "k": 4, "pass@k": 0.5, "maj@k": 0.25, "avg@k": 0.25,
            "length": 30.0, "answered": 0.5, **extra}


def commands(tmp_path, seed=101, extra=(), name="first"):
    return dict(study.train_commands(tmp_path, seed, list(extra), name))


def test_each_study_runs_its_own_refsol_arm_with_its_seeds():
    """The first study (seeds 101-103) reran under its own reference, the prose one, byte for byte its text then
    (tests/test_data.py); the second (seeds 201-203) uses the fair reference. Both run the same rows."""
    assert study.STUDIES["first"]["seeds"] == (101, 102, 103) and study.STUDIES["second"]["seeds"] == (201, 202, 203)
    for name, style in (("first", "prose"), ("second", "reference")):
        runs = {row: options for _, row, _, options in study.run_dirs(Path("out"), 1, name)}
        assert config.parse_config(runs["refsol"]).refsol_style == style
        assert config.parse_config(runs["refsol_steps"]).refsol_style == "steps"
    assert study.gate("first") == {} and set(study.gate("second")) == {"stepalign", "refsol", "refsol_steps"}


def test_a_fresh_seed_runs_every_row_in_order_sharing_one_base_eval(tmp_path):
    runs = study.train_commands(tmp_path, 101, ["--max-steps", "1"], "first")
    assert [name for name, _ in runs] == ["repeat/stepalign", "repeat/refsol", "repeat/refsol_steps", "-/grpo",
                                          "paper/stepalign", "paper/refsol", "paper/refsol_steps"]
    for name, cmd in runs:
        assert cmd[1] == str(study.TRAIN) and study.TRAIN.is_file() and "--resume" not in cmd
        cfg = config.parse_config(cmd[2:])  # train.py's own parser takes every command
        assert (cfg.preset, cfg.seed, cfg.max_steps) == ("demo", 101, 1)
        assert cfg.base_eval == str(tmp_path / "seed101" / "base_eval.json")
    by_name = {name: config.parse_config(cmd[2:]) for name, cmd in runs}
    assert by_name["paper/refsol_steps"].refsol_style == "steps"
    assert by_name["paper/refsol_steps"].teacher_layout == "paper" and by_name["-/grpo"].feedback == "grpo"


def test_finished_runs_are_skipped_unfinished_ones_resume_and_ones_without_a_checkpoint_restart(tmp_path):
    fresh = commands(tmp_path)
    cfg = config.parse_config(fresh["repeat/stepalign"][2:])
    steps = config.total_steps(cfg, len(config.load_problems(cfg)[0]))
    done, cut, early = (tmp_path / "seed101" / "repeat" / row for row in ("stepalign", "refsol", "refsol_steps"))
    for run_dir, last in ((done, steps), (cut, 0)):
        (run_dir / "checkpoints" / f"step_{last:06d}").mkdir(parents=True)
        (run_dir / "eval.jsonl").write_text("".join(json.dumps(eval_row(s)) + "\n" for s in sorted({0, last})))
    early.mkdir(parents=True)
    (early / "log.jsonl").write_text("")  # started, stopped before its first checkpoint
    now = commands(tmp_path)
    assert "repeat/stepalign" not in now
    assert now["repeat/refsol"][-1] == "--resume"
    assert now["repeat/refsol_steps"] == fresh["repeat/refsol_steps"] and not early.exists()


# ------------------------------------------------------------------------------------------------ stopping the study
# train.py's stand-in: records every stop signal it gets; "checkpoint" exits 128 + the signal after a moment (its
# checkpoint), "hang" never exits
STUB = """import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out-dir") + 1])
out.mkdir(parents=True, exist_ok=True)
got = []
def handle(signum, frame):
    got.append(signum)
    (out / "signals").write_text(" ".join(map(str, got)))
    if {mode!r} == "checkpoint":
        time.sleep(0.5)
        (out / "checkpointed").write_text(str(signum))
        sys.exit(128 + signum)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, handle)
(out / "pid").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""
DRIVER = """import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from scripts import study
study.TRAIN, study.STOP_WAIT_S = Path({stub!r}), {wait}
study.main(["--seeds", "1", "2", "--jobs", "2", "--out", {out!r}])
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is no longer running


@pytest.mark.parametrize("signum, mode", [(signal.SIGTERM, "checkpoint"), (signal.SIGHUP, "checkpoint"),
                                          (signal.SIGINT, "checkpoint"), (signal.SIGTERM, "hang")])
def test_a_stopped_study_stops_its_runs_waits_for_their_checkpoints_and_leaves_no_orphan(tmp_path, signum, mode):
    """A real study process running two stand-in train.py processes (one per seed), and a real signal: SIGTERM and
    SIGHUP to the study, SIGINT to its whole process group as a terminal's Ctrl-C sends it. Each run gets the signal
    exactly once (a second SIGINT would stop train.py without a checkpoint), the study waits for their checkpoints
    and exits 128 + the signal's number; a run that does not exit is killed after STOP_WAIT_S. Before, the study
    died at once and its train.py processes ran on, orphaned."""
    stub, driver, out = tmp_path / "train_stub.py", tmp_path / "driver.py", tmp_path / "study"
    stub.write_text(STUB.format(mode=mode))
    driver.write_text(DRIVER.format(root=str(ROOT), stub=str(stub), wait=1.0 if mode == "hang" else 60.0,
                                    out=str(out)))
    runs = [out / f"seed{seed}" / "repeat" / "stepalign" for seed in (1, 2)]
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group, as a terminal's job
    pids = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not all((r / "pid").exists() for r in runs):
            time.sleep(0.1)
        assert all((r / "pid").exists() for r in runs), proc.communicate(timeout=5)[0] if proc.poll() else "hang"
        time.sleep(0.2)  # each stand-in has installed its handlers before it wrote its pid
        pids = [int((r / "pid").read_text()) for r in runs]
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 128 + signum, output
        assert "Traceback" not in output
        for run in runs:
            assert (run / "signals").read_text() == str(int(signum))  # once
            assert (run / "checkpointed").exists() == (mode == "checkpoint")
        if mode == "hang":
            assert output.count("killed (its last checkpoint stays)") == 2, output
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        for pid in pids + ([proc.pid] if proc.poll() is None else []):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ bad options and files
def _refused(capsys, argv):
    """study.main(argv) ends with exit 2 and `study.py: error:` lines only."""
    with pytest.raises(SystemExit) as e:
        study.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err and all(line.startswith("study.py: error: ") for line in err.splitlines()), err
    return err


def test_bad_options_are_refused_in_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    """--jobs 0 looped for ever; the other options were not checked at all (--seed 5 was taken as --seeds 5)."""
    monkeypatch.setattr(study, "run_all", lambda *a: pytest.fail("the study started runs"))
    out = ["--out", str(tmp_path / "study")]
    assert "--jobs 0: must be >= 1" in _refused(capsys, ["--jobs", "0", *out])
    assert "--seeds 1 1: must be distinct integers >= 0" in _refused(capsys, ["--seeds", "1", "1", *out])
    assert "--seeds -3: must be distinct" in _refused(capsys, ["--seeds", "-3", *out])
    assert "invalid int value: 'x'" in _refused(capsys, ["--seeds", "x", *out])
    (tmp_path / "file").write_text("")
    assert "is a file" in _refused(capsys, ["--out", str(tmp_path / "file")])
    assert "no such directory" in _refused(capsys, ["--report", "--out", str(tmp_path / "none")])
    assert "--seed: the study sets this" in _refused(capsys, [*out, "--seed", "5"])
    assert "--seed --out-dir: the study sets this" in _refused(capsys, [*out, "--out-dir=x", "--see", "101"])
    assert "unrecognized arguments: --no-such-option" in _refused(capsys, [*out, "--no-such-option"])
    assert "--lr -1.0: must be > 0" in _refused(capsys, [*out, "--lr", "-1"])
    assert not (tmp_path / "study").exists()


def _finished_run(out, seed=101, evals=None):
    """A finished StepAlignFB run of the study, as the report reads it: its checkpoint's config.json and its logs."""
    run = out / f"seed{seed}" / "repeat" / "stepalign"
    argv = ["--preset", "demo", "--seed", str(seed), "--out-dir", str(run), "--feedback", "stepalign"]
    cfg = config.parse_config(argv)
    steps = study.run_steps(cfg)
    (run / "checkpoints" / f"step_{steps:06d}").mkdir(parents=True)
    (run / "checkpoints" / f"step_{steps:06d}" / "config.json").write_text(json.dumps(vars(cfg)))
    (run / "eval.jsonl").write_text(evals if evals is not None else
                                    "".join(json.dumps(eval_row(s)) + "\n" for s in (0, steps)))
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "wrong_attempts": 4, "wrong_correct_prefix": 1}) + "\n")
    return run, steps


def test_run_files_kept_without_checkpoints_give_the_same_report_and_are_never_run_again(tmp_path, capsys):
    """The study's committed run files (docs/demo/study2: config.json, eval.jsonl, log.jsonl; no checkpoints) are a
    finished run to the report, the same table as from the live run; the study never removes or reruns them."""
    out = tmp_path / "study"
    run, steps = _finished_run(out)
    study.main(["--report", "--seeds", "101", "--out", str(out)])
    live = (out / "study.md").read_text()
    checkpoint = run / "checkpoints" / f"step_{steps:06d}"
    (run / "config.json").write_text((checkpoint / "config.json").read_text())
    shutil.rmtree(checkpoint.parent)
    study.main(["--report", "--seeds", "101", "--out", str(out)])
    assert (out / "study.md").read_text() == live and "| StepAlignFB | repeat | 25.00 |" in live
    assert "repeat/stepalign" not in commands(out, name="second") and (run / "eval.jsonl").is_file()
    (run / "eval.jsonl").write_text(json.dumps(eval_row(0)) + "\n")  # logs of a run cut before its last step
    study.main(["--report", "--seeds", "101", "--out", str(out)])
    assert "seed101/repeat/stepalign" in (out / "study.md").read_text().split("Not finished")[1]
    capsys.readouterr()

def test_the_goal_is_checked_as_pre_registered_two_se_above_each_arm_and_ten_points_over_the_base():
    """goal_lines against the numbers worked by hand: StepAlignFB 30, 40, 50 from 10 each; RefSol 5 on every seed
    (differences 25, 35, 45: mean 35, sample std 10, 2 SE = 20/√3 = 11.55, met); the control 30, 40, 60
    (differences 0, 0, -10: missed); the gain over the base 30 >= 10. Then the control at 20, 30, 40 (differences
    10, 10, 10: SE 0, met) makes the goal met, unless the gate says RefSol's teacher cannot teach (not drawn: not
    decided); a study without a goal has no line."""
    def runs(*rows):
        return {f"repeat/{row}": {str(s): {"last": v / 100, "step0": 0.1} for s, v in zip((1, 2, 3), values)}
                for row, values in rows}
    result = {"study": "second", "runs": runs(("stepalign", (30, 40, 50)), ("refsol", (5, 5, 5)),
                                              ("refsol_steps", (30, 40, 60)))}
    line = study.goal_lines(result)[1]
    assert "**missed**" in line and "minus RefSol +35.00, 2 SE = 11.55: yes" in line
    assert "step format (control) -3.33" in line and "minus the base policy +30.00, at least +10: yes" in line
    result["runs"] |= runs(("refsol_steps", (20, 30, 40)))
    assert "**met**" in study.goal_lines(result)[1]
    gated = study.goal_lines({**result, "gate": {"refsol": 0.0}})[1]  # RefSol's teacher not above its student
    assert "**not decided**" in gated and "minus RefSol: not drawn (a teacher that cannot teach)" in gated
    assert study.goal_lines({**result, "study": "first"}) == []

def test_the_report_skips_a_cut_last_line_and_refuses_bad_files_in_one_line(tmp_path, capsys):
    """A run killed mid-write ends its eval.jsonl with a cut line: skipped with a warning (the run counts as not
    finished); garbage elsewhere, a field of the wrong type, or a config.json that is not the run's options are one
    error line naming the file (before: tracebacks)."""
    out = tmp_path / "study"
    run, steps = _finished_run(out)
    study.main(["--report", "--seeds", "101", "--out", str(out)])
    assert "| StepAlignFB | repeat | 25.00 | 25.00 ± nan (n = 1) | 0.50 |" in (out / "study.md").read_text()
    capsys.readouterr()
    rows = [json.dumps(eval_row(s)) for s in (0, steps)]
    (run / "eval.jsonl").write_text(rows[0] + "\n" + rows[1][:20])
    study.main(["--report", "--seeds", "101", "--out", str(out)])
    assert "the last line was cut mid-write" in capsys.readouterr().err
    assert "seed101/repeat/stepalign" in (out / "study.md").read_text().split("Not finished")[1]
    (run / "eval.jsonl").write_text(rows[0][:20] + "\n" + rows[1] + "\n")
    assert f"{run / 'eval.jsonl'}:1: not a JSON line" in _refused(capsys, ["--report", "--seeds", "101", "--out",
                                                                             str(out)])
    (run / "eval.jsonl").write_text(json.dumps(eval_row(0)) + "\n" + json.dumps(eval_row(steps, k="4")) + "\n")
    assert "eval.jsonl:2: field 'k' must be an integer" in _refused(capsys, ["--report", "--seeds", "101", "--out",
                                                                            str(out)])
    (run / "eval.jsonl").write_text("".join(r + "\n" for r in rows))
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "wrong_attempts": "4"}) + "\n")
    assert "log.jsonl:1: field 'wrong_attempts' must be a count" in _refused(capsys, ["--report", "--seeds", "101",
                                                                                     "--out", str(out)])
    config_json = run / "checkpoints" / f"step_{steps:06d}" / "config.json"
    config_json.write_text(json.dumps({**json.loads(config_json.read_text()), "epochs": "1"}))
    assert "field 'epochs' must be int" in _refused(capsys, ["--report", "--seeds", "101", "--out", str(out)])
    config_json.write_text("{")
    assert "config.json: cannot be read" in _refused(capsys, ["--report", "--seeds", "101", "--out", str(out)])


@pytest.mark.parametrize("name, folder", [("first", "study1"), ("second", "study2")])
def test_each_committed_study_recomputes_its_table_from_its_run_files(name, folder):
    """docs/demo/study1 and study2 hold the studies' run files (config.json, eval.jsonl, log.jsonl per run); the
    table and study.json recomputed from them are the committed ones, byte for byte."""
    out = ROOT / "docs" / "demo" / folder
    result = study.collect(out, list(study.STUDIES[name]["seeds"]), name)
    assert not result["unfinished"]
    assert study.report(result) == (out / "study.md").read_text()
    assert json.dumps(result, indent=1) + "\n" == (out / "study.json").read_text()
