"""Tests of data.py: step splitting, arithmetic tasks, OpenMathReasoning loading, the filter's selection and
manifest."""
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from data import DataError, Problem, load_manifest, load_openmathreasoning, load_openmathreasoning_hub, problem_key, split_steps, step_spans, strip_think, write_manifest
from demo.arithmetic import apply_op, arithmetic_problems, chain_of, prose_solution, step_solution
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


def test_arithmetic_reference_solution_is_a_correct_solution_in_its_own_wording():
    """RefSol's context (issue 31): every equation in it is true and is the problem's chain, in order; the boxed
    answer closes it on its own line, as the task asks of every solution; no "Step i:" marker and none of the lines
    of the solution in the student's format (step_solution, the format control's context): the equations are the
    problem's, the wording is its own."""
    for p in arithmetic_problems(50, seed=0, n_ops=3):
        ref = p.reference_solution
        lines = ref.splitlines()
        assert lines[-1] == f"\\boxed{{{p.answer}}}" and p.answer in lines[-2]
        assert not re.search(r"(?im)^\s*step\s+\d", ref)
        assert not any(line in ref for line in step_solution(p).splitlines()[:-1])
        equations = re.findall(r"(\d+) ([-+×]) (\d+) = (\d+)", ref)
        start, chain = chain_of(p)
        assert [(int(a), {"×": "*"}.get(op, op), int(b), int(r)) for a, op, b, r in equations] == chain
        assert all(apply_op(a, op, b) == r for a, op, b, r in chain) and chain[-1][3] == int(p.answer)


def test_prose_style_is_the_first_studys_reference_byte_for_byte():
    """--refsol-style prose reproduces the reference of the first study (seeds 101-103, commit ac0a73d): one line of
    prose, Unicode operators, the boxed answer in its last sentence (the string below is that code's output)."""
    [p] = [q for q in arithmetic_problems(2, seed=101, n_ops=2, max_operand=9) if q.id == "arith-s101-0"]
    assert prose_solution(p) == ("The operations apply in the order given, so the quantity is (4 × 2) − 1. Working "
                                 "from the inside out, from 4: 2 times that is 8; taking away 1 leaves 7. Hence the "
                                 "final number is \\boxed{7}.")


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


# ---------------------------------------------------------------------------------------------- problem identity
# (a problem, the same problem in other bytes that do not change what it says): each pair has one problem_key
SAME_PROBLEM = [
    ("What is 12 + 30?", "What is 12\u200b + 30?"),  # zero-width space
    ("What is 12 + 30?", "What\u00a0is 12 + 30?"),  # no-break space
    ("What is 12 + 30?", "What is \uff11\uff12 + \uff13\uff10?"),  # fullwidth digits
    ("What is 12 + 30?", "What is 12 + 30?  \t\n"),  # trailing whitespace
    ("Start with 4.\nAdd 5.", "Start with 4.\r\nAdd 5."),  # CRLF
    ("Start with 4. Add 5.", "Start  with 4.\n\n Add 5."),  # a run of whitespace
    ("What is 12 + 30?", "\ufeffWhat is 12\u2060 + 30?\u00ad"),  # BOM, word joiner, soft hyphen
    ("Find caf\u00e9's x.", "Find cafe\u200b\u0301's x."),  # a combining mark split from its letter by a ZWSP
]


@pytest.mark.parametrize("a, b", SAME_PROBLEM)
def test_problem_key_is_the_same_for_bytes_that_do_not_show(a, b):
    assert a != b and problem_key(a) == problem_key(b)
    assert problem_key(problem_key(b)) == problem_key(b)  # idempotent


def test_problem_key_keeps_what_changes_the_problem():
    """Case is kept (a set A and its element a); other digits and words stay different problems."""
    for a, b in [("Let A be a set.", "Let a be a set."), ("What is 12 + 30?", "What is 12 + 31?"),
                 ("What is 12 + 30?", "What is 1 2 + 30?")]:
        assert problem_key(a) != problem_key(b)


@pytest.mark.parametrize("a, b", SAME_PROBLEM)
def test_a_held_out_problem_equal_to_a_training_one_but_for_invisible_bytes_is_refused(tmp_path, a, b):
    """The manifest's contamination check compares problem_key: before it, a zero-width space (or NBSP,
    fullwidth digits, CRLF) let a training problem into the held-out split under another id."""
    path = tmp_path / "m.jsonl"
    rows = [("a", a, "train"), ("b", "2+2?", "test"), ("c", b, "test")]
    path.write_text("".join(json.dumps({"id": i, "problem": q, "answer": "2", "split": s}) + "\n" for i, q, s in rows))
    with pytest.raises(DataError, match=r"rows 1 \(id 'a', train\) and 3 \(id 'c', test\) hold the same problem"):
        load_manifest(path, "test")


def test_omr_rows_of_one_problem_in_other_bytes_are_deduplicated(tmp_path):
    path = write_jsonl(tmp_path / "omr.jsonl", [omr_row(a) for a, _ in SAME_PROBLEM[:1]]
                       + [omr_row(b) for _, b in SAME_PROBLEM[:4]])
    problems, stats = load_openmathreasoning(path)
    assert [p.problem for p in problems] == [SAME_PROBLEM[0][0]] and stats.duplicates == 4


def test_arithmetic_held_out_problems_drawn_for_training_are_dropped_by_problem_key(monkeypatch):
    """config.load_problems drops a held-out arithmetic problem also drawn for training, compared by problem_key:
    held-out problems that differ from training ones only by a zero-width space all drop, so it refuses."""
    import config

    def draws(n, seed, **kw):  # the training seed is odd, the held-out seed even
        return [Problem(f"arith-s{seed}-{i}", f"Start with {i}." + "\u200b" * (seed % 2 == 0), str(i),
                        steps=(f"{i} + 0 = {i}",)) for i in range(n)]

    monkeypatch.setattr(config.arithmetic, "arithmetic_problems", draws)
    cfg = config.parse_config(["--preset", "demo", "--arith-train", "4", "--arith-test", "3"])
    with pytest.raises(config.ConfigError, match="every held-out problem is also a training problem"):
        config.load_problems(cfg)


def test_rows_with_text_that_is_not_text_are_refused_or_skipped_and_counted(tmp_path):
    """A lone surrogate (JSON's \\ud800 escape; no UTF-8 encodes it: the tokenizer and file writes fail on it mid-run)
    in a problem, answer or solution, and a blank problem: DataError naming the file, row and field, or with skip_bad
    skipped and counted. A manifest row: every field checked, the gold answer by the caller's `answer_problem`."""
    path = write_jsonl(tmp_path / "s.jsonl", [omr_row("a"), omr_row("b\ud800"), omr_row("c", solution="x\udfff"),
                                              omr_row(" \t")])
    with pytest.raises(DataError, match=r"s.jsonl: row 2: field 'problem' holds a lone surrogate U\+D800"):
        load_openmathreasoning(path)
    problems, stats = load_openmathreasoning(path, skip_bad=True)
    assert [p.problem for p in problems] == ["a"] and stats.skipped_bad == 3 and stats.rows == 4
    manifest = tmp_path / "m.jsonl"
    row = {"id": "a", "problem": "1+1?", "answer": "2", "split": "train"}
    for bad, phrase in (({"reference_solution": 5}, "field 'reference_solution' is int 5, not a string or null"),
                        ({"answer": "\udc00"}, "field 'answer' holds a lone surrogate U+DC00 at character 0"),
                        ({"answer": "}{"}, "field 'answer' '}{': unreadable")):
        manifest.write_text(json.dumps({**row, **bad}) + "\n")
        with pytest.raises(DataError) as err:
            load_manifest(manifest, answer_problem=lambda a: "unreadable" if a == "}{" else None)
        assert str(err.value) == f"{manifest}: row 1: {phrase}"
    manifest.write_text(json.dumps({**row, "reference_solution": None, "source": ""}) + "\n")
    assert load_manifest(manifest)[0].reference_solution is None
