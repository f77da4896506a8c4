"""Tests of infra/report.py: the best-per-metric table, the per-step table and the plots, through the command line,
and bad rows of eval.jsonl."""
import json
import re

import pytest

from evaluate import main
from infra.report import ReportError, best_by_metric, load_evals, md_cell, results_table, steps_table


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
    # over trained checkpoints only: GRPO's maj 0.1 at step 10 is below the base policy's 0.2, and shown as it is
    assert best["GRPO"]["maj@k"] == (0.1, 10) and best["GRPO"]["pass@k"] == (0.7, 10)

    out = tmp_path / "out"
    table = main([str(tmp_path / "runs"), "--out", str(out)])
    assert "| StepAlignFB | 90.00 (10) | 60.00 (20) | 30.00 (10) | 1000 (10) |" in table
    # the base policy, shared by both runs, on a row of its own before them
    rows = [line for line in table.split("\n\n")[0].splitlines() if line.startswith("| ")]
    assert rows[1:] == ["| base policy (step 0) | 50.00 | 20.00 | 10.00 | 900 |",
                        "| GRPO | 70.00 (10) | 10.00 (10) | 15.00 (10) | 950 (10) |",
                        "| StepAlignFB | 90.00 (10) | 60.00 (20) | 30.00 (10) | 1000 (10) |"]
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
    with pytest.raises(ReportError, match=r"eval.jsonl:1: field 'avg@k'"):
        load_evals([run])
    with pytest.raises(ReportError, match="nothing: no such run directory"):
        load_evals([tmp_path / "nothing"])


GOOD = {"step": 0, "feedback": "grpo", "k": 4, "pass@k": 0.5, "maj@k": 0.5, "avg@k": 0.25, "length": 3}


def _lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def test_a_last_line_cut_by_a_kill_is_skipped_and_reported(tmp_path):
    """A killed run's eval.jsonl ends mid-line: the complete lines are read, the cut one is reported once (file and
    line) and skipped; the same text with its newline (written whole, then garbage) is an error instead."""
    run = tmp_path / "run"
    run.mkdir()
    whole = _lines(GOOD, {**GOOD, "step": 2})
    (run / "eval.jsonl").write_text(whole + json.dumps({**GOOD, "step": 4})[:30])
    torn = []
    records = load_evals([run], on_torn=torn.append)
    assert [r.step for r in records] == [0, 2]
    assert len(torn) == 1 and torn[0].startswith(f"{run / 'eval.jsonl'}:3: the last line was cut mid-write")
    (run / "eval.jsonl").write_text(whole + json.dumps({**GOOD, "step": 4})[:30] + "\n")
    with pytest.raises(ReportError, match=r"eval.jsonl:3: not a JSON line"):
        load_evals([run], on_torn=torn.append)


@pytest.mark.parametrize("line, message", [
    ('{"step": 0, "feedback"', r":1: not a JSON line"),  # garbage before the last line
    ("[1, 2]", r":1: a JSON list, not an object"),
    (b"\xff\xfe", r":1: not a JSON line \(UnicodeDecodeError"),
    ({k: v for k, v in GOOD.items() if k != "k"}, r":1: field 'k' must be an integer >= 1, got None"),
    ({**GOOD, "step": "0"}, r":1: field 'step' must be an integer >= 0, got '0'"),
    ({**GOOD, "step": -1}, r":1: field 'step' must be an integer >= 0"),
    ({**GOOD, "k": True}, r":1: field 'k' must be an integer"),
    ({**GOOD, "feedback": 3}, r":1: field 'feedback' must be a non-empty string"),
    ({**GOOD, "length": -2}, r":1: field 'length' must be a finite number >= 0"),
    ({**GOOD, "maj@k": None}, r":1: field 'maj@k' must be a finite number in \[0, 1\]"),
    ({**GOOD, "answered": 2}, r":1: field 'answered' must be a finite number in \[0, 1\]"),
])
def test_every_bad_line_is_an_error_naming_file_line_and_field(tmp_path, line, message):
    run = tmp_path / "run"
    run.mkdir()
    text = (line if isinstance(line, bytes) else _lines(line).encode()) + b"\n" + _lines({**GOOD, "step": 9}).encode()
    (run / "eval.jsonl").write_bytes(text)
    with pytest.raises(ReportError, match="eval.jsonl" + message):
        load_evals([run])


def test_names_we_did_not_write_cannot_shift_the_tables_columns(tmp_path):
    """Two runs of one form are labelled by their directory names, and a form logged in eval.jsonl is shown as it
    is: a `|`, a newline or markup in either stays inside its cell (before, `|` added a column and a newline
    ended the row)."""
    for name in ("a|b", "c\\"):
        _write_run(tmp_path / "runs" / name, "stepalign", [(0, 0.5, 0.2, 0.1, 900.0), (1, 0.5, 0.2, 0.1, 900.0)])
    _write_run(tmp_path / "runs" / "x", "new|form\n<b>", [(0, 0.5, 0.2, 0.1, 900.0), (1, 0.5, 0.2, 0.1, 900.0)])
    records = load_evals([tmp_path / "runs"])
    for table in (results_table(records), steps_table(records)):
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert len(rows) == 5 + (table == results_table(records))  # header, rule, (the base policy,) three runs
        cells = {len(re.split(r"(?<!\\)\|", line.replace("\\\\", ""))) for line in rows}  # unescaped |
        assert len(cells) == 1, table
    table = results_table(records)
    assert r"StepAlignFB (a\|b)" in table and r"StepAlignFB (c\\)" in table and r"new\|form\n\<b\>" in table


@pytest.mark.parametrize("text", ["a|b", "x\ny\r", "c\\", "<script>", "run_1 *x* [l](u) `c` ~s~ &amp;", "\u2028"])
def test_md_cell_escapes_every_special_character_and_round_trips(text):
    """The output has no unescaped special character nor a line break, and shows the text as it is: Markdown's
    unescaping (a backslash before punctuation) gives the text back, its line breaks written as escapes."""
    cell = md_cell(text)
    assert not re.search(r"(?<!\\)[|`<>*_\[\]~&]", cell.replace("\\\\", "")) and "\n" not in cell
    unescaped = re.sub(r"\\([\\|`<>*_\[\]~&])", r"\1", cell)
    assert unescaped == text.replace("\n", "\\n").replace("\r", "\\r").replace("\u2028", "\\u2028")
