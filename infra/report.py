"""The paper's results table and plots, from the evaluations a run logged.

The training loop appends one JSON object per evaluation to RUN_DIR/eval.jsonl,
    {"step": int, "feedback": str, "k": int, "pass@k": float, "maj@k": float, "avg@k": float, "length": float}
with the metrics as fractions in [0, 1] (the table prints percentages). `load_evals` reads them (a path is a
run, or a parent whose subdirectories are runs); `results_table` gives, for each feedback form, the best value
of each metric and the step where it was reached; `steps_table` Avg@k at every evaluated step; `plot_metrics`
one PNG per metric over steps with one line per feedback form. Command: `python evaluate.py RUN_DIR ...`.
What a run did not write itself is checked, never trusted: a bad line is a ReportError naming file and line (a
last line cut mid-write by a kill is skipped with a warning), and a name or form in a table is escaped (`md_cell`).

Departures from the paper (which does not specify these details):
1. Best value per metric over every evaluated step, step 0 (the base policy) included, ties going to the
   earliest step. "Length" has no better direction; the table reports it at the step of the best Avg@k.
"""
from __future__ import annotations

import json
import math
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from feedback import FORMS

METRICS = ("pass@k", "maj@k", "avg@k")
# the rows' order: the paper's table (GRPO, RefSol, StepAlignFB), the format control beside RefSol, then the rest
ROW_ORDER = ("grpo", "refsol", "refsol_steps", "refsol_prose", "stepalign")
DISPLAY = {name: form.display for name, form in FORMS.items()} | {
    f"pbsd-{name}": f"PBSD ({form.display})" for name, form in FORMS.items() if form.context is not None}


class ReportError(ValueError):
    """An eval file, log or run directory that cannot be read: one line naming the file and line."""


@dataclass
class EvalRecord:
    run: str  # the run directory
    step: int
    feedback: str
    k: int
    values: dict[str, float]  # "pass@k", "maj@k", "avg@k" as fractions, "length" in tokens
    answered: float | None = None  # the share of samples with a \boxed{} answer (None: not logged)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_jsonl(path: Path, on_torn: Callable[[str], None] = _warn) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a JSONL log a run appended to. A last line without its newline is a
    write cut by a kill (a killed run's normal state; infra.checkpoint.truncate_log drops it on --resume): it is
    skipped and reported through `on_torn`. Any other line that is not a JSON object is a ReportError naming the
    file and line. Linear in the file's size."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ReportError(f"{path}: cannot be read ({e.strerror or e})") from None
    lines = raw.split(b"\n")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if lineno == len(lines):  # after the last newline: empty, or a line cut mid-write
            if line.strip():
                on_torn(f"{path}:{lineno}: the last line was cut mid-write (a killed run): skipped")
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ReportError(f"{path}:{lineno}: not a JSON line ({type(e).__name__}: {str(e)[:120]})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{lineno}: a JSON {type(row).__name__}, not an object")
        rows.append((lineno, row))
    return rows


def _number(row: dict, name: str, where: str, lo: float, hi: float = math.inf, kind: type = float,
            optional: bool = False):
    v = row.get(name)
    if v is None and optional:
        return None
    ok = isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool)
    if not ok or not lo <= v <= hi:  # (NaN fails the comparison)
        span = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}]"
        what = "an integer" if kind is int else "a finite number"
        raise ReportError(f"{where}: field {name!r} must be {what} {span}, got {v!r:.60}")
    return kind(v)


def read_evals(path: Path, on_torn: Callable[[str], None] = _warn) -> list[EvalRecord]:
    """The evaluations of one eval.jsonl, by step, each line checked (ReportError naming file, line and field)."""
    records: dict[int, tuple[int, EvalRecord]] = {}
    for lineno, row in read_jsonl(path, on_torn):
        where = f"{path}:{lineno}"
        step, k = _number(row, "step", where, 0, kind=int), _number(row, "k", where, 1, kind=int)
        if not isinstance(row.get("feedback"), str) or not row["feedback"]:
            raise ReportError(f"{where}: field 'feedback' must be a non-empty string, "
                              f"got {row.get('feedback')!r:.60}")
        values = {name: _number(row, name, where, 0.0, 1.0) for name in METRICS}
        values["length"] = _number(row, "length", where, 0.0)
        answered = _number(row, "answered", where, 0.0, 1.0, optional=True)
        if step in records:
            raise ReportError(f"{where}: step {step} already logged at line {records[step][0]}")
        records[step] = (lineno, EvalRecord(str(path.parent), step, row["feedback"], k, values, answered))
    return [r for _, r in sorted(records.values(), key=lambda x: x[1].step)]


def load_evals(paths: Sequence[str | Path], on_torn: Callable[[str], None] = _warn) -> list[EvalRecord]:
    """Records of every run: a path is a run (it holds eval.jsonl) or a parent whose subdirectories are runs.
    ReportError for a path that is neither, or a file that holds no evaluation or a bad line (`read_jsonl`)."""
    records = []
    for path in map(Path, paths):
        if (path / "eval.jsonl").is_file():
            files = [path / "eval.jsonl"]
        else:
            files = sorted(p / "eval.jsonl" for p in path.iterdir() if (p / "eval.jsonl").is_file()) \
                if path.is_dir() else []
            if not files:
                raise ReportError(f"{path}: no eval.jsonl in it nor in any of its subdirectories"
                                  if path.is_dir() else f"{path}: not a run directory" if path.exists()
                                  else f"{path}: no such run directory")
        for f in files:
            recs = read_evals(f, on_torn)
            if not recs:
                raise ReportError(f"{f}: no evaluation logged")
            if len({(r.feedback, r.k) for r in recs}) != 1:
                raise ReportError(f"{f}: one run must log one feedback form and one k, got "
                                  f"{sorted({(r.feedback, r.k) for r in recs})}"[:300])
            records += recs
    return records


# characters that change a Markdown table cell's meaning: backslash escapes, | ends the cell, the rest are inline
# markup (code, HTML, emphasis, links, strikethrough, entities); GFM lets a backslash escape each of them
_MARKDOWN_SPECIAL = re.compile(r"([\\|`<>*_\[\]~&])")


def md_cell(text: str) -> str:
    """Text we did not write (a run's name, a form logged in a file) as one Markdown table cell that shows it as it
    is: the characters of _MARKDOWN_SPECIAL backslash-escaped, and line breaks and other control characters (which
    would end the row) written as escapes, e.g. "\\n"."""
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return "".join(ch.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in text)


def _labels(records: Sequence[EvalRecord]) -> dict[str, str]:
    """run -> row label: the feedback form, plus the run's name when several runs share a form."""
    form_of = {r.run: r.feedback for r in records}
    runs_per_form = Counter(form_of.values())
    order = {name: i for i, name in enumerate(dict.fromkeys(ROW_ORDER + tuple(DISPLAY)))}  # then alphabetical
    labels = {}
    for run, form in sorted(form_of.items(), key=lambda x: (order.get(x[1], len(order)), x[1], x[0])):
        name = DISPLAY.get(form, form)
        labels[run] = name if runs_per_form[form] == 1 else f"{name} ({Path(run).name})"
    return labels


def best_by_metric(records: Sequence[EvalRecord]) -> dict[str, dict[str, tuple[float, int]]]:
    """label -> metric -> (best value, step) over the run's TRAINED checkpoints (step >= 1): the base policy (step 0)
    is not the form's result (a run that never beats it would report it under its name; results_table shows it on a
    row of its own). Max for pass/maj/avg, ties -> earliest step; "length" at best avg@k. A run with no trained
    checkpoint evaluated has no row."""
    labels = _labels(records)
    table = {}
    for run, label in labels.items():
        recs = sorted((r for r in records if r.run == run and r.step > 0), key=lambda r: r.step)
        if not recs:
            continue
        row = {}
        for m in METRICS:
            best = max(recs, key=lambda r: (r.values[m], -r.step))
            row[m] = (best.values[m], best.step)
        at = next(r for r in recs if r.step == row["avg@k"][1])
        row["length"] = (at.values["length"], at.step)
        table[label] = row
    return table


def _k_label(records: Sequence[EvalRecord]) -> str:
    """The k of the column headers: the runs' common k, or "k" when runs differ."""
    ks = {r.k for r in records}
    return str(ks.pop()) if len(ks) == 1 else "k"


def base_rows(records: Sequence[EvalRecord]) -> list[tuple[str, EvalRecord]]:
    """The base policy's evaluations (step 0): one row when the runs share it (one invocation or --base-eval), else
    one per distinct evaluation, named by the runs that logged it."""
    rows: dict[tuple, list[EvalRecord]] = {}
    for r in records:
        if r.step == 0:
            rows.setdefault(tuple(sorted(r.values.items())) + (r.k,), []).append(r)
    labels = _labels(records)
    if len(rows) == 1:
        return [("base policy (step 0)", next(iter(rows.values()))[0])]
    return [(f"base policy (step 0, {', '.join(labels[r.run] for r in same)})", same[0]) for same in rows.values()]


def results_table(records: Sequence[EvalRecord]) -> str:
    """The paper-style markdown table: the base policy's row (step 0), then per run the best value (%) per metric
    over its trained checkpoints and, in brackets, the step it was reached."""
    ks = sorted({r.k for r in records})
    kk = _k_label(records)
    lines = [f"| Feedback | Pass@{kk} | Maj@{kk} | Avg@{kk} | Length |", "|---|---|---|---|---|"]
    for label, r in base_rows(records):
        lines.append(f"| {md_cell(label)} | " + " | ".join(f"{100 * r.values[m]:.2f}" for m in METRICS)
                     + f" | {r.values['length']:.0f} |")
    for label, row in best_by_metric(records).items():
        cells = [f"{100 * v:.2f} ({s})" for v, s in (row[m] for m in METRICS)]
        length, at = row["length"]
        lines.append(f"| {md_cell(label)} | " + " | ".join(cells) + f" | {length:.0f} ({at}) |")
    if len(ks) > 1:
        lines.append("")
        lines.append("k per run: " + ", ".join(f"{md_cell(label)}: {next(r.k for r in records if r.run == run)}"
                                               for run, label in _labels(records).items()))
    return "\n".join(lines) + "\n"


def steps_table(records: Sequence[EvalRecord], metric: str = "avg@k") -> str:
    """One metric (%) at every evaluated step, a row per run: what the best-per-metric table hides (e.g. a run
    whose best is its step 0 never improved on the base policy). A step a run did not evaluate is "–"."""
    labels = _labels(records)
    steps = sorted({r.step for r in records})
    name = metric.replace("@k", f"@{_k_label(records)}")
    lines = [f"| {name.capitalize()} by step | " + " | ".join(str(s) for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for run, label in labels.items():
        at = {r.step: r.values[metric] for r in records if r.run == run}
        lines.append(f"| {md_cell(label)} | " + " | ".join(f"{100 * at[s]:.2f}" if s in at else "–" for s in steps)
                     + " |")
    return "\n".join(lines) + "\n"


def _plot_label(label: str) -> str:
    """A label shown as it is in a legend: "$" starts no mathtext, and a leading "_" (which hides it) gets a space."""
    label = label.replace("$", r"\$")
    return " " + label if label.startswith("_") else label


def plot_metrics(records: Sequence[EvalRecord], out_dir: str | Path) -> list[Path]:
    """One PNG per metric over steps, one line per feedback form. Returns the written paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _labels(records)
    paths = []
    for m in (*METRICS, "length"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, label in labels.items():
            recs = sorted((r for r in records if r.run == run), key=lambda r: r.step)
            scale = 1.0 if m == "length" else 100.0
            ax.plot([r.step for r in recs], [scale * r.values[m] for r in recs], marker="o",
                    label=_plot_label(label))
        ax.set_xlabel("step")
        ax.set_ylabel("mean answer length (tokens)" if m == "length" else f"{m.capitalize()} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{m.replace('@', '_at_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
