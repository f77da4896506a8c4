"""scripts/study.py's runs: each a train.py command of the demo preset sharing the seed's step-0 evaluation through one
file; a finished run is not run again, one with a checkpoint continues, one cut short before it starts again."""
import json

import config
from scripts import study


def commands(tmp_path, seed=101, extra=()):
    return dict(study.train_commands(tmp_path, seed, list(extra)))


def test_a_fresh_seed_runs_every_row_in_order_sharing_one_base_eval(tmp_path):
    runs = study.train_commands(tmp_path, 101, ["--max-steps", "1"])
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
        (run_dir / "eval.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in sorted({0, last})))
    early.mkdir(parents=True)
    (early / "log.jsonl").write_text("")  # started, stopped before its first checkpoint
    now = commands(tmp_path)
    assert "repeat/stepalign" not in now
    assert now["repeat/refsol"][-1] == "--resume"
    assert now["repeat/refsol_steps"] == fresh["repeat/refsol_steps"] and not early.exists()
