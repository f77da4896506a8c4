"""Checks of a run's files before a model loads (config.preflight): where its out-dirs may be, that its gold answers
can be graded, and that a --resume checkpoint or a --base-eval file was made by the same run (infra.fingerprint)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import grading
from infra import fingerprint

RUN_FILES = (".lock", "config.json", "log.jsonl", "eval.jsonl", "checkpoints", "adapters", "tb")  # what a run writes


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def out_dir_problems(cfg, run_dirs: list[Path]) -> list[str]:
    """Why the run's out-dirs (one per form) would write where they must not: the model's directory (a local path) or
    the data file's directory, or a directory holding either (a run deletes checkpoints and adapters in its own), or
    inside the model's directory (a saved model is not a place for runs); a run's file in it that is a symbolic link
    (it could lead anywhere: infra.logs.inside refuses it again at every write). An out-dir inside the data file's
    directory is allowed (a manifest beside its runs): no file a run writes there can have the manifest's path."""
    out = []
    model = fingerprint.model_dir(cfg.model)
    theirs = [("--model", model.resolve(), True)] if model is not None else []
    if cfg.data != "arithmetic" and Path(cfg.data).is_file():
        theirs.append(("--data", Path(cfg.data).resolve().parent, False))
    for run_dir in run_dirs:
        where = run_dir.resolve()  # (symbolic links followed: where the files would land)
        for name, path, not_inside in theirs:
            if where == path or path.is_relative_to(where) or (not_inside and where.is_relative_to(path)):
                how = "is" if where == path else "holds" if path.is_relative_to(where) else "is inside"
                out.append(f"{run_dir} {how} the directory {path} of {name}: choose an --out-dir of its own")
        for name in RUN_FILES:
            if (run_dir / name).is_symlink():
                out.append(f"{run_dir / name} is a symbolic link: a run writes only inside its out-dir and never "
                           "through a link; remove it")
    return out


def gold_answer_problem(answer: str) -> str | None:
    """Why a gold answer cannot be graded, or None: its \\boxed{} form must read back as itself through grading's
    one reader (a blank answer, '}{' or an unbalanced brace would never match any sample)."""
    read = grading.extract_answer("\\boxed{" + answer + "}")
    return None if read == answer.strip() else f"its \\boxed{{}} form reads back as {read!r:.40}, not as itself"


def resume_problems(latest: Path, saved, now: dict) -> tuple[list[str], str | None]:
    """(one line per fingerprint of the run that the checkpoint `latest` does not match, a warning or None). A
    checkpoint of an older version has no fingerprint: it resumes, with the warning that nothing was compared."""
    if saved is None or saved == {}:
        return [], (f"train.py: warning: --resume: {latest} records no fingerprint of the model and the data (written "
                    "by an older version): they are not compared")
    return [f"--resume: {latest}: {diff}; resume with the model and data the run started with, or start a new run "
            "in another --out-dir" for diff in fingerprint.differences(saved, now, option)], None


def base_eval_problems(cfg, test: list) -> list[str]:
    """Why the --base-eval file that exists cannot be this run's step 0, one line each: not a file a run wrote
    (evaluate.save_base_eval: {"fingerprint", "result"}), or written for another model, seed, held-out set or
    evaluation options (fingerprint.base_eval_fingerprint)."""
    path = Path(cfg.base_eval) if cfg.base_eval else None
    if path is None or not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # (RecursionError: JSON nested too deep)
        saved = None
    result = saved.get("result") if isinstance(saved, dict) else None
    if not (isinstance(result, dict) and result.get("step") == 0 and result.get("k") == cfg.eval_samples):
        older = isinstance(saved, dict) and "step" in saved and "result" not in saved
        return [f"--base-eval {path}: must be a step-0 evaluation written by a run (JSON, step 0, k = --eval-samples "
                f"{cfg.eval_samples})" + ("; this one has no fingerprint (an older version): delete it" * older)]
    return [f"--base-eval {path}: written for another run: {diff}; delete it to evaluate the base policy again, or "
            "use the options it was written with" for diff in
            fingerprint.differences(saved.get("fingerprint"), fingerprint.base_eval_fingerprint(cfg, test), option)]


def out_dir_pattern_problems(out_dir: str, preset: str, feedback: str) -> list[str]:
    """What is wrong with --out-dir as a pattern and a place to make a directory: [] when nothing is."""
    try:
        out = Path(out_dir.format(preset=preset, feedback=feedback))
    except (KeyError, IndexError, ValueError) as e:
        return [f"may hold only {{preset}} and {{feedback}} ({type(e).__name__}: {e})"]
    if out.is_file():
        return ["is a file; it must be a directory"]
    above = next((p for p in out.absolute().parents if p.exists()), None)  # the nearest existing parent
    if above is not None and not above.is_dir():
        return [f"{above} is a file, so no directory can be made under it"]
    if above is not None and not out.exists() and not os.access(above, os.W_OK | os.X_OK):
        return [f"{above} is not writable, so the directory cannot be made there"]
    return []
