"""The paper's results table and plots, from the evaluations a run logged.

The training loop appends one JSON object per evaluation to RUN_DIR/eval.jsonl,
    {"step": int, "feedback": str, "k": int, "pass@k": float, "maj@k": float, "avg@k": float, "length": float}
with the metrics as fractions in [0, 1] (the table prints percentages). `load_evals` reads them (a path is a
run, or a parent whose subdirectories are runs); `results_table` gives, for each feedback form, the best value
of each metric and the step where it was reached; `steps_table` Avg@k at every evaluated step; `plot_metrics`
one PNG per metric over steps with one line per feedback form. Command: `python evaluate.py RUN_DIR ...`.

Departures from the paper (which does not specify these details):
1. Best value per metric over every evaluated step, step 0 (the base policy) included, ties going to the
   earliest step. "Length" has no better direction; the table reports it at the step of the best Avg@k.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from feedback import FORMS

METRICS = ("pass@k", "maj@k", "avg@k")
# the rows' order: the paper's table (GRPO, RefSol, StepAlignFB), the format control beside RefSol, then the rest
ROW_ORDER = ("grpo", "refsol", "refsol_steps", "stepalign")
DISPLAY = {name: form.display for name, form in FORMS.items()} | {
    f"pbsd-{name}": f"PBSD ({form.display})" for name, form in FORMS.items() if form.context is not None}


@dataclass
class EvalRecord:
    run: str  # the run directory
    step: int
    feedback: str
    k: int
    values: dict[str, float]  # "pass@k", "maj@k", "avg@k" as fractions, "length" in tokens


def _read_eval_jsonl(path: Path) -> list[EvalRecord]:
    records: dict[int, tuple[int, EvalRecord]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        for name, kind in (("step", int), ("feedback", str), ("k", int)):
            if not isinstance(row.get(name), kind) or isinstance(row.get(name), bool):
                raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {row.get(name)!r}")
        values = {}
        for name in (*METRICS, "length"):
            v = row.get(name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{where}: field {name!r} must be a finite number, got {v!r}")
            if name in METRICS and not 0.0 <= v <= 1.0:
                raise ValueError(f"{where}: field {name!r} must be a fraction in [0, 1], got {v!r}")
            values[name] = float(v)
        if row["step"] in records:
            raise ValueError(f"{where}: step {row['step']} already logged at line {records[row['step']][0]}")
        records[row["step"]] = (lineno, EvalRecord(str(path.parent), row["step"], row["feedback"], row["k"], values))
    return [r for _, r in sorted(records.values(), key=lambda x: x[1].step)]


def load_evals(paths: Sequence[str | Path]) -> list[EvalRecord]:
    """Records of every run: a path is a run (it holds eval.jsonl) or a parent whose subdirectories are runs."""
    records = []
    for path in map(Path, paths):
        if (path / "eval.jsonl").is_file():
            files = [path / "eval.jsonl"]
        else:
            files = sorted(p / "eval.jsonl" for p in path.iterdir() if (p / "eval.jsonl").is_file()) \
                if path.is_dir() else []
            if not files:
                raise FileNotFoundError(f"{path}: no eval.jsonl in it nor in any of its subdirectories")
        for f in files:
            recs = _read_eval_jsonl(f)
            if not recs:
                raise ValueError(f"{f}: no evaluation logged")
            if len({(r.feedback, r.k) for r in recs}) != 1:
                raise ValueError(f"{f}: one run must log one feedback form and one k, got "
                                 f"{sorted({(r.feedback, r.k) for r in recs})}")
            records += recs
    return records


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
    """label -> metric -> (best value, step). Max for pass/maj/avg, ties -> earliest step; "length" at best avg@k."""
    labels = _labels(records)
    table = {}
    for run, label in labels.items():
        recs = sorted((r for r in records if r.run == run), key=lambda r: r.step)
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


def results_table(records: Sequence[EvalRecord]) -> str:
    """The paper-style markdown table: best value (%) per metric and, in brackets, the step it was reached."""
    ks = sorted({r.k for r in records})
    kk = _k_label(records)
    lines = [f"| Feedback | Pass@{kk} | Maj@{kk} | Avg@{kk} | Length |", "|---|---|---|---|---|"]
    for label, row in best_by_metric(records).items():
        cells = [f"{100 * v:.2f} ({s})" for v, s in (row[m] for m in METRICS)]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['length'][0]:.0f} ({row['length'][1]}) |")
    if len(ks) > 1:
        lines.append("")
        lines.append("k per run: " + ", ".join(f"{label}: {next(r.k for r in records if r.run == run)}"
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
        lines.append(f"| {label} | " + " | ".join(f"{100 * at[s]:.2f}" if s in at else "–" for s in steps) + " |")
    return "\n".join(lines) + "\n"


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
            ax.plot([r.step for r in recs], [scale * r.values[m] for r in recs], marker="o", label=label)
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
