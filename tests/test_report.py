"""Tests of infra/report.py: the best-per-metric table, the per-step table and the plots, through the command line,
and bad rows of eval.jsonl."""
import json

import pytest

from evaluate import main
from infra.report import best_by_metric, load_evals


def _write_run(path, feedback, rows):
    path.mkdir(parents=True)
    with open(path / "eval.jsonl", "w") as f:
        for step, p, m, a, length in rows:
            f.write(json.dumps({"step": step, "feedback": feedback, "k": 12, "pass@k": p, "maj@k": m,
                                "avg@k": a, "length": length, "extra": "ignored"}) + "\n")


def test_results_table_best_per_metric_and_step(tmp_path):
    _write_run(tmp_path / "runs" / "b_sa", "stepalign", [(0, 0.5, 0.2, 0.1, 900.0), (10, 0.9, 0.5, 0.3, 1000.0),
                                                       (20, 0.9, 0.6, 0.3, 1100.0), (30, 0.8, 0.6, 0.2, 1200.0)])
    _write_run(tmp_path / "runs" / "a_grpo", "grpo", [(0, 0.5, 0.2, 0.1, 900.0), (10, 0.7, 0.1, 0.15, 950.0)])
    records = load_evals([tmp_path / "runs"])
    best = best_by_metric(records)
    assert list(best) == ["GRPO", "StepAlignFB"]  # the paper's row order
    sa = best["StepAlignFB"]
    # ties go to the earliest step: pass 0.9 at 10 and 20 -> 10; maj 0.6 at 20 and 30 -> 20; avg 0.3 -> 10
    assert sa["pass@k"] == (0.9, 10) and sa["maj@k"] == (0.6, 20) and sa["avg@k"] == (0.3, 10)
    assert sa["length"] == (1000.0, 10)  # at the best Avg@k step
    assert best["GRPO"]["maj@k"] == (0.2, 0) and best["GRPO"]["pass@k"] == (0.7, 10)

    out = tmp_path / "out"
    table = main([str(tmp_path / "runs"), "--out", str(out)])
    assert "| StepAlignFB | 90.00 (10) | 60.00 (20) | 30.00 (10) | 1000 (10) |" in table
    assert "Pass@12" in table
    # the per-step table: every evaluated step, "–" where a run has none
    assert "| Avg@12 by step | 0 | 10 | 20 | 30 |" in table
    assert "| GRPO | 10.00 | 15.00 | – | – |" in table and "| StepAlignFB | 10.00 | 30.00 | 30.00 | 20.00 |" in table
    assert (out / "results.md").read_text() == table
    for name in ["pass_at_k", "maj_at_k", "avg_at_k", "length"]:
        assert (out / f"{name}.png").stat().st_size > 1000
    # a list of run directories reads the same records
    same = load_evals([tmp_path / "runs" / "a_grpo", tmp_path / "runs" / "b_sa"])
    assert best_by_metric(same) == best


def test_bad_eval_rows_name_the_file_line_and_field(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.jsonl").write_text('{"step": 0, "feedback": "grpo", "k": 4, "pass@k": 0.5, "maj@k": 0.5, '
                                    '"avg@k": 50, "length": 3}\n')
    with pytest.raises(ValueError, match=r"eval.jsonl:1: field 'avg@k'"):
        load_evals([run])
    with pytest.raises(FileNotFoundError):
        load_evals([tmp_path / "nothing"])
