"""Tests of data.py: step splitting, arithmetic tasks, OpenMathReasoning loading, the filter's selection and
manifest."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from data import (DataError, Problem, arithmetic_problems, apply_op, load_manifest,
                  load_openmathreasoning, load_openmathreasoning_hub, split_steps,
                  step_spans, strip_think, write_manifest)
from scripts.filter_problems import select_hard, split_train_test


# ---------------------------------------------------------------------------------------------- step format
def test_split_steps_numbered_with_final_answer_line():
    text = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nThe final answer is \\boxed{126}."
    assert split_steps(text) == ["Step 1: 17 + 25 = 42", "Step 2: 42 * 3 = 126"]


def test_split_steps_markdown_markers_preamble_and_multiline_steps():
    text = ("Let me solve this.\n\n**Step 1:** Start with 17 and add 25.\n17 + 25 = 42\n\n"
            "**Step 2.** Multiply: 42 * 3 = 126\n\n\\boxed{126}\nsome trailing chatter")
    assert split_steps(text) == ["**Step 1:** Start with 17 and add 25.\n17 + 25 = 42",
                                 "**Step 2.** Multiply: 42 * 3 = 126"]


def test_split_steps_spans_are_verbatim_slices():
    text = "  Step 1: a\r\nStep 2:   b  \nStep 3) c"
    spans = step_spans(text)
    assert [text[s:e] for s, e in spans] == split_steps(text) == ["Step 1: a", "Step 2:   b", "Step 3) c"]


def test_split_steps_without_markers_is_one_step():
    assert split_steps("  17 + 25 = 42, times 3 is 126. \\boxed{126}\n") == ["17 + 25 = 42, times 3 is 126. \\boxed{126}"]
    assert split_steps("") == [] and split_steps(" \n ") == []


def test_split_steps_truncated_and_boxed_inside_last_step():
    assert split_steps("Step 1: 17 + 25 = 42\nStep 2: 42 * 3 =") == ["Step 1: 17 + 25 = 42", "Step 2: 42 * 3 ="]
    assert split_steps("Step 1: 2 + 2 = 4, so \\boxed{4}") == ["Step 1: 2 + 2 = 4, so \\boxed{4}"]
    # "step" inside a sentence is not a marker
    assert split_steps("Step 1: the next step 2 is easy\nStep 2: done") == ["Step 1: the next step 2 is easy",
                                                                         "Step 2: done"]


def test_strip_think_closed_orphan_close_and_unterminated():
    assert strip_think("<think>hmm</think>\n\nanswer") == "answer"
    assert strip_think("reasoning without opening tag</think>answer") == "answer"  # opening tag was in the prompt
    assert strip_think("answer <think>cut off while thinking") == "answer"
    assert strip_think("<think>never closed") == ""
    assert strip_think("a<think>x</think>b<think>y</think>c") == "abc"
    # the prompt opened the trace (QwQ-32B's template): without </think> the whole text is trace
    assert strip_think("trace cut off, no tag at all", opened=True) == ""
    assert strip_think("an answer from a model that did not think") == "an answer from a model that did not think"
    assert strip_think("trace</think>\nanswer", opened=True) == strip_think("trace</think>\nanswer") == "answer"
    assert strip_think("<think>trace</think>answer", opened=True) == "answer"  # the tag in the output as well


# ---------------------------------------------------------------------------------------------- arithmetic
def test_strip_think_pairs_each_open_tag_with_the_first_close_after_it():
    """As re.sub("<think>.*?</think>") did, without its rescan from every unclosed tag (tests/test_parsing.py)."""
    assert strip_think("a<think>b<think>c</think>d</think>e") == "e"  # then everything before the last </think>
    assert strip_think("a<think>b<think>c</think>d") == "ad"
    assert strip_think("a<think>b</think>c<think>d<think>e") == "ac"
    assert strip_think("a</think>b<think>c</think>d") == "bd"
    assert strip_think("<think>" * 3 + "x") == ""


def test_arithmetic_problems_deterministic_by_seed():
    assert arithmetic_problems(20, seed=3) == arithmetic_problems(20, seed=3)
    assert arithmetic_problems(20, seed=3) != arithmetic_problems(20, seed=4)
    assert len({p.id for p in arithmetic_problems(20, seed=3)}) == 20


@pytest.mark.parametrize("n_ops,max_operand,ops", [(1, 10, "+"), (2, 50, "+-*"), (4, 99, "-*"), (3, 20, "-")])
def test_arithmetic_steps_are_an_exact_left_to_right_chain(n_ops, max_operand, ops):
    for p in arithmetic_problems(30, seed=1, n_ops=n_ops, max_operand=max_operand, ops=ops):
        assert len(p.steps) == n_ops
        start = int(p.problem.split("Start with ")[1].split(".")[0])
        value = start
        for step in p.steps:
            lhs, rhs = step.split(" = ")
            a, op, b = lhs.split(" ")
            assert int(a) == value and op in ops  # each step starts from the previous result
            value = apply_op(value, op, int(b))
            assert int(rhs) == value >= 0
            assert 1 <= int(b) <= max_operand
        assert p.answer == str(value)
        assert p.problem.endswith("What is the final number?")


def test_arithmetic_reference_solution_is_another_derivation():
    for p in arithmetic_problems(10, seed=0, n_ops=3):
        ref = p.reference_solution
        assert ref.endswith(f"\\boxed{{{p.answer}}}.")
        assert "Step" not in ref and not any(step in ref for step in p.steps)  # different wording and notation


def test_arithmetic_problem_text_is_unambiguous():
    p = arithmetic_problems(1, seed=0, n_ops=3, ops="+")[0]
    assert p.problem.lower().count("add") == 3 and ", then add" in p.problem


def test_arithmetic_bad_arguments():
    with pytest.raises(ValueError, match="supported operations"):
        arithmetic_problems(3, seed=0, ops="+/")
    with pytest.raises(ValueError, match="n_ops"):
        arithmetic_problems(3, seed=0, n_ops=0)


def test_import_has_no_model_code():
    code = "import sys, data; assert not {'torch', 'transformers'} & set(sys.modules), 'model code imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# ---------------------------------------------------------------------------------------------- OpenMathReasoning
def omr_row(problem, answer="5", ptype="has_answer_extracted", solution="<think>long trace</think>\nSo it is 5.",
            **extra):
    row = {"problem": problem, "expected_answer": answer, "generated_solution": solution, "problem_type": ptype,
           "problem_source": "aops_c4", "pass_rate_72b_tir": "0.25", "generation_model": "DeepSeek-R1",
           "inference_mode": "cot"}
    row.update(extra)
    return row


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def test_load_jsonl_filters_dedups_and_strips_think(tmp_path):
    path = write_jsonl(tmp_path / "omr.jsonl", [
        omr_row("What is 2+3?"),
        omr_row("What is 2+3?", solution="another solution"),  # duplicate: the first row wins
        omr_row("Prove it.", ptype="converted_proof"),
        omr_row("Hard one", answer="7", solution="<think>cut off"),  # no reference left after stripping
        omr_row("Hard one", answer="7", solution="It is 7."),  # duplicate fills the missing reference
        omr_row("Conflict", answer="1"), omr_row("Conflict", answer="2"),
    ])
    problems, stats = load_openmathreasoning(path)
    assert [p.problem for p in problems] == ["What is 2+3?", "Hard one", "Conflict"]
    assert problems[0].reference_solution == "So it is 5." and problems[0].answer == "5"
    assert problems[0].source == "OpenMathReasoning:aops_c4" and problems[0].id.startswith("omr-")
    assert problems[1].reference_solution == "It is 7."
    assert problems[2].answer == "1"
    assert (stats.rows, stats.kept, stats.duplicates, stats.not_extracted, stats.answer_conflicts,
            stats.skipped_bad) == (7, 3, 3, 1, 1, 0)
    again, _ = load_openmathreasoning([tmp_path])  # a directory of shards
    assert again == problems


def test_load_limit(tmp_path):
    path = write_jsonl(tmp_path / "omr.jsonl", [omr_row(f"q{i}") for i in range(10)])
    problems, stats = load_openmathreasoning(path, limit=4)
    assert len(problems) == 4 and stats.rows == 4


@pytest.mark.parametrize("row,field", [
    (omr_row("q", answer=""), "expected_answer"),
    (omr_row("  "), "problem"),
    ({k: v for k, v in omr_row("q").items() if k != "expected_answer"}, "expected_answer"),
    ({("question" if k == "problem" else k): v for k, v in omr_row("q").items()}, "problem"),  # wrong column
    (omr_row("q", answer=None), "expected_answer"),
])
def test_bad_row_error_names_file_row_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [omr_row("fine"), row])
    with pytest.raises(DataError) as err:
        load_openmathreasoning(path)
    message = str(err.value)
    assert str(path) in message and "row 2" in message and repr(field) in message


def test_bad_json_line_and_skip_bad_counts(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [omr_row("a"), omr_row("b", answer="")], raw_lines=["{oops", "[1]"])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: field 'expected_answer'"):
        load_openmathreasoning(path)
    problems, stats = load_openmathreasoning(path, skip_bad=True)
    assert [p.problem for p in problems] == ["a"]
    assert stats.skipped_bad == 3 and stats.rows == 4  # nothing dropped silently
    assert "3 bad rows skipped" in stats.summary()
    path2 = write_jsonl(tmp_path / "bad2.jsonl", [omr_row("a")], raw_lines=["{oops"])
    with pytest.raises(DataError, match=r"bad2.jsonl: row 2: not a JSON object"):
        load_openmathreasoning(path2)
    deep = write_jsonl(tmp_path / "deep.jsonl", [omr_row("a")], raw_lines=["[" * 100_000])  # nested past recursion
    with pytest.raises(DataError, match=r"deep.jsonl: row 2: not a JSON object \(maximum recursion depth"):
        load_openmathreasoning(deep)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_openmathreasoning(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_openmathreasoning(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet or .jsonl"):
        load_openmathreasoning(tmp_path / "empty")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [omr_row("p1"), omr_row("p1"), omr_row("p2", answer="3")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    problems, stats = load_openmathreasoning(tmp_path / "x.parquet")
    assert [p.problem for p in problems] == ["p1", "p2"] and stats.duplicates == 1
    # a wrong column name in parquet: the same error as in JSONL, naming the file, the row and the field
    renamed = [{("answer" if k == "expected_answer" else k): v for k, v in r.items()} for r in rows]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "y.parquet")
    with pytest.raises(DataError, match=r"y.parquet: row 1: field 'expected_answer' is missing"):
        load_openmathreasoning(tmp_path / "y.parquet")
    # not a parquet file at all
    (tmp_path / "z.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="z.parquet: cannot read parquet"):
        load_openmathreasoning(tmp_path / "z.parquet")


def test_parquet_without_pyarrow_or_pandas_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"x.parquet: reading parquet needs pyarrow or pandas \(pip install pyarrow\)"):
        load_openmathreasoning(tmp_path / "x.parquet")


def test_invalid_utf8_names_the_row_or_is_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(omr_row("p1")).encode() + b"\n" + b'{"problem": "\xff\xfe"}\n'
                     + json.dumps(omr_row("p2")).encode() + b"\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: not UTF-8 text"):
        load_openmathreasoning(path)
    problems, stats = load_openmathreasoning(path, skip_bad=True)
    assert [p.problem for p in problems] == ["p1", "p2"] and stats.skipped_bad == 1


def test_hub_loader_uses_datasets_lazily(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_openmathreasoning_hub()
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([omr_row("h1"), omr_row("h1"), omr_row("h2", answer="")])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"nvidia/OpenMathReasoning\[cot\]: row 3: field 'expected_answer'"):
        load_openmathreasoning_hub()
    problems, stats = load_openmathreasoning_hub(split="cot", skip_bad=True)
    assert [p.problem for p in problems] == ["h1"] and stats.skipped_bad == 1
    assert calls[-1] == ("nvidia/OpenMathReasoning", "cot", True)


# ---------------------------------------------------------------------------------------------- difficulty filter
def test_select_hard_keeps_avg_below_threshold_solved_by_critic():
    problems = [Problem(str(i), f"q{i}", str(i), reference_solution="r") for i in range(6)]
    counts = [0, 4, 5, 16, 3, 1]
    critic = [True, True, True, True, False, True]
    kept = select_hard(problems, counts, critic, n=16, threshold=5)
    assert [r["id"] for r in kept] == ["0", "1", "5"]  # 4/16 < 5/16 kept, 5/16 not; 3/16 unsolved by critic
    assert kept[1]["solver_pass_rate"] == 4 / 16 and kept[1]["n_samples"] == 16 and kept[1]["critic_correct"]
    with pytest.raises(ValueError, match="impossible"):
        select_hard(problems[:1], [17], [True])
    with pytest.raises(ValueError, match="must match"):
        select_hard(problems, counts[:2], critic)


def test_split_312_into_282_and_30_deterministic():
    rows = [{"id": f"p{i:03d}"} for i in range(312)]
    train, test = split_train_test(rows, n_test=30, seed=0)
    assert (len(train), len(test)) == (282, 30)
    assert {r["id"] for r in train} | {r["id"] for r in test} == {r["id"] for r in rows}
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert split_train_test(list(reversed(rows)), 30, seed=0) == (train, test)  # independent of input order
    assert split_train_test(rows, 30, seed=1)[1] != test
    with pytest.raises(ValueError, match="duplicate ids"):
        split_train_test(rows + rows[:1], 30, seed=0)


def test_manifest_round_trip(tmp_path):
    problems = [Problem(f"id{i}", f"q{i}", str(i), reference_solution=f"ref{i}", source="s") for i in range(5)]
    kept = select_hard(problems, [0, 1, 2, 3, 4], [True] * 5)
    train, test = split_train_test(kept, 2, seed=0)
    write_manifest(tmp_path / "m.jsonl", train, test)
    assert {p.id for p in load_manifest(tmp_path / "m.jsonl", split="test")} == {r["id"] for r in test}
    assert sorted(load_manifest(tmp_path / "m.jsonl"), key=lambda p: p.id) == problems
    rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert all("solver_pass_rate" in r and r["split"] in ("train", "test") for r in rows)


def test_manifest_row_with_an_unknown_split_is_an_error_naming_the_row(tmp_path):
    rows = [{"id": "a", "problem": "1+1?", "answer": "2", "split": "train"},
            {"id": "b", "problem": "2+2?", "answer": "4", "split": "trian"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"m.jsonl: row 2: field 'split' is 'trian'; expected 'train' or 'test'"):
        load_manifest(tmp_path / "m.jsonl", "train")


@pytest.mark.parametrize("rows, message", [
    ([("a", "1+1?", "train"), ("b", "2+2?", "test"), ("a", "3+3?", "train")],
     "id 'a' is twice in train (rows 1 and 3)"),
    ([("a", "1+1?", "train"), ("b", "2+2?", "test"), ("b", "3+3?", "test")],
     "id 'b' is twice in test (rows 2 and 3)"),
    ([("a", "1+1?", "train"), ("b", "2+2?", "test"), ("a", "1+1?", "test")],
     "id 'a' is in both train and test (rows 1 and 3)"),
    ([("a", "1+1?", "train"), ("b", "2+2?", "test"), ("c", " 1+1? ", "test")],
     "rows 1 (id 'a', train) and 3 (id 'c', test) hold the same problem"),
])
def test_manifest_duplicate_ids_and_train_test_overlap_are_refused_by_name(tmp_path, rows, message):
    """Every row is read, whichever split is asked for: a duplicate surfaces whether the run loads train or test."""
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": i, "problem": q, "answer": "2", "split": s}) + "\n" for i, q, s in rows))
    for split in ("train", "test"):
        with pytest.raises(DataError) as e:
            load_manifest(path, split)
        assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)
