"""What a run was, beyond its options: fingerprints of the model's weights and of the data, recorded in every
checkpoint (state.json) and in the --base-eval file, and compared by `--resume` and `--base-eval` before a model loads
(config.preflight), so that a file changed at the same path is refused by name instead of resumed silently.

The model's fingerprint: per weight file (*.safetensors, *.bin, *.pt, *.pth, *.gguf) its size and the sha256 of its
first and last MiB, and the sha256 of its config.json. Cheap (2 MiB read per file: a 3.4 GB model costs
milliseconds, not the 10 s of hashing it whole) and enough for what it guards against: another model, revision or
fine-tune saved at the same path. A safetensors file begins with a JSON header naming every tensor's dtype, shape and
byte offsets, followed by the first tensors' data; its last MiB is the last tensors' data; so another architecture
changes the header, and other weights of the same architecture change the first and last tensors' bytes (a change
confined to the middle of a file at an unchanged size is not seen: no re-save or download produces one). The data's
fingerprint: the manifest file's sha256; for --data arithmetic, the sha256 of the generated problems (the options that
generate them are compared as options, and this also sees a change of the generator's code).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import data
import rollout

MIB = 2 ** 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_dir(name_or_path: str) -> Path | None:
    """The local directory of --model without loading or building anything: a local path, the demo model's cache
    folder (rollout.smollm2_path builds it on the first load), or a hub id's cached snapshot; None when there is
    none yet (a hub id never loaded here: the first load downloads it)."""
    if name_or_path == rollout.SMOLLM2:
        path = rollout.cache_dir() / rollout.SMOLLM2
        return path if path.is_dir() else None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(name_or_path, "config.json")
    except ValueError:  # (not a hub id either: a name the model load will refuse)
        return None
    return Path(found).parent if isinstance(found, str) else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_print(path: Path) -> str:
    """'SIZE bytes, sha256 HEX' of the first and last MiB (the whole file when it is at most 2 MiB)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(MIB)
        if size > 2 * MIB:
            f.seek(size - MIB)
        tail = f.read(MIB) if size > MIB else b""
    return f"{size} bytes, sha256 {_sha256(head + tail)[:16]}"


def model_fingerprint(name_or_path: str) -> dict:
    """{file name: file_print} of the model's weight files, and config.json's sha256; {} for a hub id that is not
    here yet (see model_dir)."""
    root = model_dir(name_or_path)
    if root is None:
        return {}
    prints = {f.name: file_print(f) for f in sorted(root.iterdir()) if f.suffix in WEIGHT_SUFFIXES and f.is_file()}
    if (root / "config.json").is_file():
        prints["config.json"] = f"sha256 {_sha256((root / 'config.json').read_bytes())[:16]}"
    return prints


def problems_print(problems: list[data.Problem]) -> str:
    rows = [[p.id, p.problem, p.answer, p.reference_solution, list(p.steps or ())] for p in problems]
    return f"{len(problems)} problems, sha256 {_sha256(json.dumps(rows).encode('utf-8'))[:16]}"


def data_fingerprint(cfg, train: list[data.Problem], test: list[data.Problem]) -> str:
    if cfg.data == "arithmetic":
        return "arithmetic: " + problems_print(train + test)
    return f"{Path(cfg.data).name}: sha256 {_sha256(Path(cfg.data).read_bytes())[:16]}"


def run_fingerprint(cfg, train: list[data.Problem], test: list[data.Problem]) -> dict:
    """What a checkpoint records beside config.json: {"model": model_fingerprint, "data": data_fingerprint}."""
    return {"model": model_fingerprint(cfg.model), "data": data_fingerprint(cfg, train, test)}


EVAL_OPTIONS = ("eval_samples", "eval_temperature", "max_new_tokens", "student_thinking", "stop_at_boxed", "dtype",
                "engine", "seed")


def base_eval_fingerprint(cfg, test: list[data.Problem]) -> dict:
    """What a step-0 evaluation depends on: the model's weights, the held-out problems it sampled (after
    --eval-problems), and the options of its sampling (EVAL_OPTIONS, the seed included)."""
    return {"model": model_fingerprint(cfg.model), "held_out": problems_print(test),
            "options": {name: getattr(cfg, name) for name in EVAL_OPTIONS}}


def model_difference(old: dict, new: dict) -> str | None:
    """The first model file whose fingerprint differs, as 'NAME: OLD vs NEW', or None. A side that is {} (a hub id
    that was not downloaded yet when it was taken) is not compared."""
    if not old or not new:
        return None
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            return f"{name}: {old.get(name, 'absent')} vs {new.get(name, 'absent')}"
    return None


def differences(old, new: dict, option) -> list[str]:
    """One phrase per fingerprint of `new` that `old` (read from a file: any JSON) does not match: which one, old vs
    now. `option(name)` spells an option (e.g. '--eval-samples')."""
    if not isinstance(old, dict):
        return [f"no fingerprint of the run recorded ({type(old).__name__})"]
    out = []
    for key, now in new.items():
        was = old.get(key)
        if key == "model":
            diff = model_difference(was if isinstance(was, dict) else {"(unreadable)": repr(was)[:40]}, now)
            if diff:
                out.append(f"the model's weights differ (--model; {diff})")
        elif key == "options":
            was = was if isinstance(was, dict) else {}
            out += [f"{option(name)} {was.get(name, 'absent')} vs {value}" for name, value in now.items()
                    if was.get(name) != value]
        elif was != now:
            out.append(f"the {'held-out problems' if key == 'held_out' else key} differ ({was} vs {now})")
    return out
