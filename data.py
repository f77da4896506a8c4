"""Problems: the record used everywhere, OpenMathReasoning loading, the difficulty filter's manifest, and the step
format the solver is asked to follow. The demo's arithmetic problems: demo/arithmetic.py.

- `Problem` is the one record: id, problem text, gold answer, optional reference solution (the RefSol
  context), optional ground-truth steps (demo/arithmetic.py; the exact critic checks against them), source.
- `load_openmathreasoning(paths)` reads local parquet or JSONL shards of nvidia/OpenMathReasoning;
  `load_openmathreasoning_hub(split)` streams it through the `datasets` library when that is installed.
  Both keep `problem_type == "has_answer_extracted"` rows, deduplicate by problem text (`problem_key`; the
  first row of a problem wins; a later row only fills a missing reference solution), and take the reference
  solution from `generated_solution` with its `<think>` trace removed. Bad rows raise `DataError` naming the
  file, row and field, unless `skip_bad=True`, in which case they are counted in `LoadStats.skipped_bad`.
- The paper's difficulty filter (`python -m scripts.filter_problems`) writes the problems it keeps to a JSONL
  manifest (`write_manifest`), split into train and test, read back by `load_manifest`.
- `problem_key(text)`: a problem's identity wherever problems are compared (deduplication, contamination checks),
  so that a copy that differs only in bytes that do not show (a zero-width space, NBSP, CRLF) is the same problem.
- `STEP_FORMAT` and `split_steps`: numbered "Step i:" lines, then the final answer as \\boxed{...}.

Departures from the paper:
1. Duplicates of a problem keep the first row's answer and reference solution; the paper does not say which
   of the several generated solutions of a problem it used as the RefSol reference.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

OMR_HUB_ID = "nvidia/OpenMathReasoning"
OMR_COLUMNS = ("problem", "expected_answer", "generated_solution", "problem_type", "problem_source",
               "pass_rate_72b_tir", "generation_model", "inference_mode")
# columns a row must have; the others are optional metadata
OMR_REQUIRED = ("problem", "expected_answer", "problem_type", "generated_solution")


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    reference_solution: str | None = None
    steps: tuple[str, ...] | None = None
    source: str = ""


class DataError(ValueError):
    """A bad input file or row; the message names the file, the row (1-based) and the field."""


# ---------------------------------------------------------------------------------------------- step format
STEP_FORMAT = ("Solve the problem step by step. Write each step on its own line, numbered as "
               "\"Step 1: ...\", \"Step 2: ...\", and so on. After the last step, write the final answer "
               "on its own line as \\boxed{answer}.")

# "Step 3:", "Step 3.", "Step 3)", "**Step 3:**", "### Step 3:" at the start of a line ("marker": from its first
# non-blank character). Possessive (*+ ++ ?+), as prompts.CORRECTED_SOLUTION_HEADER: linear, the same matches
# ("Step 1" + n spaces was O(n^2) with backtracking).
_STEP_MARKER = re.compile(r"^[ \t]*+(?P<marker>(?:[*#]++[ \t]*+)?+step[ \t]++(\d++)[ \t]*+(?:\*\*)?+[ \t]*+"
                          r"[:.)])", re.IGNORECASE | re.MULTILINE)


def step_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the steps of a response; `split_steps` is `[text[s:e] for s, e in ...]`.

    A step runs from its "Step i:" marker (included, so a step can be copied verbatim) to the next marker.
    The last step ends at the first blank line or at the first later line that holds a \\boxed{} answer
    (that line is the final answer, not part of the step). Text before the first marker is not a step.
    Trailing whitespace is excluded from every span. Without any marker the whole response (stripped) is
    one step; an empty response has no steps. A truncated response simply ends its last step early.
    """
    found = list(_STEP_MARKER.finditer(text))
    if not found:
        stripped = text.strip()
        if not stripped:
            return []
        start = len(text) - len(text.lstrip())
        return [(start, start + len(stripped))]
    # a step starts at its marker's first non-blank character and ends where the next marker's line starts
    starts = [m.start("marker") for m in found]
    ends = [m.start() for m in found[1:]] + [_last_step_end(text, starts[-1])]
    return [(s, s + len(text[s:e].rstrip())) for s, e in zip(starts, ends)]


def _last_step_end(text: str, start: int) -> int:
    first_line_end = text.find("\n", start)
    if first_line_end == -1:
        return len(text)
    pos = first_line_end + 1
    while pos < len(text):
        line_end = text.find("\n", pos)
        line_end = len(text) if line_end == -1 else line_end
        line = text[pos:line_end]
        if not line.strip() or "\\boxed" in line:
            return pos
        pos = line_end + 1
    return len(text)


def split_steps(text: str) -> list[str]:
    """The steps of a response, each with its "Step i:" marker; see `step_spans` for the rules."""
    return [text[s:e] for s, e in step_spans(text)]


# ---------------------------------------------------------------------------------------------- OpenMathReasoning
@dataclass
class LoadStats:
    rows: int = 0  # rows read
    kept: int = 0  # problems returned
    skipped_bad: int = 0  # bad rows skipped (only with skip_bad=True)
    not_extracted: int = 0  # rows whose problem_type is not "has_answer_extracted"
    duplicates: int = 0  # rows whose problem text (problem_key) was already seen
    answer_conflicts: int = 0  # duplicates whose expected_answer differs from the first row's

    def summary(self) -> str:
        return (f"{self.rows} rows read: {self.kept} problems kept, {self.duplicates} duplicate rows, "
                f"{self.not_extracted} rows without an extracted answer, {self.skipped_bad} bad rows skipped, "
                f"{self.answer_conflicts} duplicates with a different expected_answer (first kept)")


def strip_think(text: str, opened: bool = False) -> str:
    """Remove <think>…</think> traces: closed pairs; everything before an unmatched </think> (its opening tag
    was in the prompt); everything after an unclosed <think> (the trace was cut off).

    opened: the prompt itself ended with an open <think> tag (QwQ-32B's chat template does), so the text starts
    inside the trace: a text without any </think> is then all trace and gives "". With opened=False such a text
    is taken as an answer (a model that did not think). Both template styles give the same answer once the
    trace is closed; they differ only on a trace that never closed.
    """
    if opened:
        text = "<think>" + text
    # closed pairs, each <think> with the first </think> after it (as re.sub of "<think>.*?</think>"), by
    # str.find: linear, where the regex rescanned the rest from every unclosed <think>
    kept, pos = [], 0
    while (open_at := text.find("<think>", pos)) != -1:
        close_at = text.find("</think>", open_at + len("<think>"))
        if close_at == -1:  # no later pair either: the rest is left as it is
            break
        kept.append(text[pos:open_at])
        pos = close_at + len("</think>")
    text = "".join(kept) + text[pos:]
    if "</think>" in text:
        text = text[text.rfind("</think>") + len("</think>"):]
    if "<think>" in text:
        text = text[:text.find("<think>")]
    return text.strip()


def problem_key(text: str) -> str:
    """A problem's identity, wherever problems are deduplicated or checked for contamination: format characters
    (category Cf: U+200B, U+2060, U+FEFF, soft hyphen, bidi marks) removed, then NFKC (fullwidth digits, NBSP;
    superscripts too: "x²" and "x2" are one key), then whitespace runs as one space, none at the ends. Case is
    kept: it carries meaning in mathematics (a set A and its element a). Linear in the text; idempotent."""
    visible = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return " ".join(unicodedata.normalize("NFKC", visible).split())


def problem_id(problem_text: str) -> str:
    return "omr-" + hashlib.sha1(problem_text.encode("utf-8")).hexdigest()[:12]


def iter_rows(path: str | Path, skip_bad: bool = False, stats: LoadStats | None = None,
              columns: Iterable[str] = OMR_COLUMNS) -> Iterator[tuple[int, dict]]:
    """(row number, row) from a JSONL or parquet file; rows are numbered from 1 (JSONL: the line number).

    Parquet needs pyarrow (read in batches) or pandas; JSONL needs only the standard library. A line that
    is not a JSON object raises DataError, or with skip_bad=True is skipped and counted in `stats`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        yield from enumerate(_parquet_rows(path, tuple(columns)), start=1)
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .parquet or .jsonl")
    try:
        handle = path.open("rb")  # decoded line by line below, so that bad UTF-8 is reported with its row
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e}") from e
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")
            except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError; nested too deep
                if not skip_bad:
                    what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "not a JSON object"
                    raise DataError(f"{path}: row {lineno}: {what} ({e})") from e
                if stats is not None:
                    stats.skipped_bad += 1
                    stats.rows += 1
                continue
            yield lineno, row


def _parquet_rows(path: Path, columns: tuple[str, ...]) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            handle = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: cannot read parquet: {e}") from e
        present = [c for c in columns if c in handle.schema_arrow.names]
        done = 0
        batches = handle.iter_batches(batch_size=4096, columns=present)
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # a corrupt page in the middle of the file; pyarrow raises several types
                raise DataError(f"{path}: cannot read parquet after row {done}: {e}") from e
            if batch is None:
                return
            rows = batch.to_pylist()
            done += len(rows)
            yield from rows
    try:
        import pandas as pd
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow or pandas (pip install pyarrow); "
                        "or convert the file to JSONL, which needs no extra package") from None
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pandas raises several types for unreadable files
        raise DataError(f"{path}: cannot read parquet: {e}") from e
    present = [c for c in columns if c in frame.columns]
    yield from frame[present].to_dict("records")


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # (JSON's \\ud800 escape decodes to one; no UTF-8 encodes it)


def text_problem(value, field: str, optional: bool = False) -> str | None:
    """Why a row's `field` is not usable text, or None: a non-blank string (`optional`: or absent, null or empty)
    that is valid Unicode (a lone surrogate fails the tokenizer and file writes)."""
    if value is None or value == "" or not optional and isinstance(value, str) and not value.strip():
        return None if optional else f"field {field!r} is missing or empty"
    if not isinstance(value, str):
        return f"field {field!r} is {type(value).__name__} {value!r:.60}, not a string" + " or null" * optional
    bad = _LONE_SURROGATE.search(value)
    return bad and f"field {field!r} holds a lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}"


def _check_row(row: dict, where: str) -> None:
    for field in OMR_REQUIRED:
        if field not in row:
            raise DataError(f"{where}: field {field!r} is missing (the row has {sorted(row)})")
    for field in ("problem", "expected_answer", "problem_type", "generated_solution"):  # (text_problem)
        problem = text_problem(row[field], field, optional=field in ("problem_type", "generated_solution"))
        if problem:
            raise DataError(f"{where}: {problem}")


def problems_from_rows(rows: Iterable[tuple[str, int, dict]], skip_bad: bool = False,
                       stats: LoadStats | None = None, limit: int | None = None) -> list[Problem]:
    """OpenMathReasoning rows (source name, row number, row) → deduplicated problems with an extracted answer.

    Stops once `limit` problems are kept. Every row that is read is accounted for in `stats`.
    """
    stats = stats if stats is not None else LoadStats()
    by_text: dict[str, Problem] = {}  # problem_key(text) -> its first row's problem
    for source, rowno, row in rows:
        if limit is not None and len(by_text) >= limit:
            break
        stats.rows += 1
        try:
            _check_row(row, f"{source}: row {rowno}")
        except DataError:
            if not skip_bad:
                raise
            stats.skipped_bad += 1
            continue
        if row["problem_type"] != "has_answer_extracted":
            stats.not_extracted += 1
            continue
        text, answer = row["problem"].strip(), row["expected_answer"].strip()
        reference = strip_think(row["generated_solution"] or "") or None
        key = problem_key(text)
        seen = by_text.get(key)
        if seen is not None:
            stats.duplicates += 1
            stats.answer_conflicts += seen.answer != answer
            if seen.reference_solution is None and reference is not None and seen.answer == answer:
                by_text[key] = Problem(seen.id, seen.problem, seen.answer, reference, None, seen.source)
            continue
        origin = row.get("problem_source") or ""
        by_text[key] = Problem(id=problem_id(text), problem=text, answer=answer, reference_solution=reference,
                                source=f"OpenMathReasoning:{origin}" if origin else "OpenMathReasoning")
    stats.kept = len(by_text)
    return list(by_text.values())


def load_openmathreasoning(paths: str | Path | Iterable[str | Path], skip_bad: bool = False,
                           limit: int | None = None) -> tuple[list[Problem], LoadStats]:
    """Problems from local OpenMathReasoning shards (.parquet or .jsonl files, or directories of them)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted([*p.glob("*.parquet"), *p.glob("*.jsonl")])
            if not found:
                raise DataError(f"{p}: directory holds no .parquet or .jsonl file")
            files += found
        else:
            files.append(p)
    stats = LoadStats()

    def rows() -> Iterator[tuple[str, int, dict]]:
        for f in files:
            for rowno, row in iter_rows(f, skip_bad=skip_bad, stats=stats):
                yield str(f), rowno, row

    return problems_from_rows(rows(), skip_bad=skip_bad, stats=stats, limit=limit), stats


def load_openmathreasoning_hub(split: str = "cot", skip_bad: bool = False, limit: int | None = None,
                               dataset_id: str = OMR_HUB_ID) -> tuple[list[Problem], LoadStats]:
    """Problems streamed from the hub through the `datasets` library (needs it installed and hub access)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"loading {dataset_id} from the hub needs the `datasets` package "
                          "(pip install datasets); or pass local .parquet/.jsonl files instead") from None
    stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
    stats = LoadStats()
    rows = ((f"{dataset_id}[{split}]", i, dict(row)) for i, row in enumerate(stream, start=1))
    return problems_from_rows(rows, skip_bad=skip_bad, stats=stats, limit=limit), stats


# ---------------------------------------------------------------------------------------------- difficulty filter


def write_manifest(path: str | Path, train: list[dict], test: list[dict], settings: dict | None = None) -> None:
    """One JSON row per problem with its split; `settings` (how the filter ran: models, engine, dtype, device,
    sampling) is written into every row under "filter", so that each row says how it was measured."""
    with Path(path).open("w", encoding="utf-8") as f:
        for split, rows in (("train", train), ("test", test)):
            for row in rows:
                extra = {"filter": settings} if settings is not None else {}
                f.write(json.dumps({**row, "split": split, **extra}, ensure_ascii=False) + "\n")


SPLITS = ("train", "test")


def load_manifest(path: str | Path, split: str | None = None, answer_problem=None) -> list[Problem]:
    """Problems of a manifest written by `python -m scripts.filter_problems` (optionally one split: 'train' or 'test').
    A row whose split is neither is an error naming the row: it would otherwise drop out of both splits. So is an
    id on two rows (every row is read, whatever `split`): twice in one split it would be trained or graded twice;
    in both splits a held-out problem would be trained on; the same problem text (`problem_key`) in both splits
    likewise. Every field is text (text_problem; reference_solution and source may be null); `answer_problem(answer)`
    says why a gold answer cannot be graded, or None (infra.checks). DataError names the file, the row and the field."""
    problems, first, texts = [], {}, {}  # id -> (row, split); problem_key -> (row, id, split), of its first row
    for rowno, row in iter_rows(path):
        for field in ("id", "problem", "answer", "split", "reference_solution", "source"):
            problem = text_problem(row.get(field), field, optional=field in ("reference_solution", "source"))
            if problem is None and field == "answer" and answer_problem is not None:
                problem = answer_problem(row["answer"])
                problem = problem and f"field 'answer' {row['answer']!r:.60}: {problem}"
            if problem:
                raise DataError(f"{path}: row {rowno}: {problem}")
        if row["split"] not in SPLITS:
            raise DataError(f"{path}: row {rowno}: field 'split' is {row['split']!r}; expected 'train' or 'test'")
        if row["id"] in first:
            rowno0, split0 = first[row["id"]]
            where = (f"in both train and test (rows {rowno0} and {rowno})" if split0 != row["split"] else
                     f"twice in {split0} (rows {rowno0} and {rowno})")
            raise DataError(f"{path}: id {row['id']!r} is {where}; each problem must be on one row")
        first[row["id"]] = (rowno, row["split"])
        text = problem_key(row["problem"])  # the same problem under two ids, one in each split
        if text in texts and texts[text][2] != row["split"]:
            rowno0, id0, split0 = texts[text]
            raise DataError(f"{path}: rows {rowno0} (id {id0!r}, {split0}) and {rowno} (id {row['id']!r}, "
                            f"{row['split']}) hold the same problem; a held-out problem must not be trained on")
        texts.setdefault(text, (rowno, row["id"], row["split"]))
        if split is None or row["split"] == split:
            problems.append(Problem(row["id"], row["problem"], row["answer"], row.get("reference_solution"),
                                    None, row.get("source") or ""))
    return problems
