"""Logs of a run: JSONL lines (strict JSON), optional TensorBoard scalars, phase timers, the progress bar, warnings;
and the guard of every file a run writes: nothing outside its out-dir, never through a link (`inside`, `open_inside`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import sys
import time
from pathlib import Path

import torch

from infra.dist import Dist


class Timer:
    """Seconds per named phase of a step: `with timer("rollout"): ...` (CUDA synchronized at the end)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def strict_json(record: dict) -> dict:
    """The record with every non-finite float (NaN: no step taken, or no token to average over) as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class EscapesOutDir(Exception):
    """A path a run would write that leads out of its out-dir (a symbolic link on the way) or onto a file that is not
    its own (not a regular file, or a hard link to another name); the message is one line naming it."""


def inside(out_dir: Path, path: Path) -> Path:
    """`path`, a path under `out_dir`, once no component of it below out_dir is a symbolic link: a run writes only
    inside its out-dir, and a link (planted, or left by another tool) could lead anywhere. EscapesOutDir otherwise."""
    out_dir, path = Path(out_dir), Path(path)
    current = out_dir
    for part in path.relative_to(out_dir).parts:
        current = current / part
        if current.is_symlink():
            raise EscapesOutDir(f"{current}: a symbolic link (to {os.readlink(current)}) inside --out-dir {out_dir}: a "
                                "run writes only inside its out-dir and never through a link; remove it")
    return path


def open_inside(out_dir: Path, path: Path, append: bool = False) -> int:
    """A file descriptor of `path` (under out_dir, see `inside`) opened for writing (truncated, or `append`), never
    through a symbolic link (O_NOFOLLOW), and only onto a regular file with no other name (a hard link would carry
    the write to a file outside). EscapesOutDir otherwise."""
    inside(out_dir, path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_APPEND if append else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:  # ELOOP: a link; ENXIO: a FIFO with no reader; EISDIR
        raise EscapesOutDir(f"{path}: cannot be written as a file of --out-dir {out_dir} ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"a hard link ({info.st_nlink} names)"
        raise EscapesOutDir(f"{path}: {what} inside --out-dir {out_dir}: a run writes only its own files; remove it")
    if not append:
        os.ftruncate(fd, 0)
    return fd


def write_inside(out_dir: Path, path: Path, text: str) -> None:
    """`text` (UTF-8) as the whole content of `path`, through open_inside."""
    with os.fdopen(open_inside(out_dir, path), "w", encoding="utf-8") as f:
        f.write(text)


class Logger:
    """JSONL lines appended to files in `out_dir` (and TensorBoard scalars), on the enabled rank only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.dir = Path(out_dir)
        self.tb = None
        if self.enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SystemExit(f"--tensorboard needs the tensorboard package: pip install tensorboard ({e})")
            self.tb = SummaryWriter(str(inside(self.dir, self.dir / "tb")))

    def write(self, name: str, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(strict_json(record), allow_nan=False)  # strict JSON: no bare NaN or Infinity
        with os.fdopen(open_inside(self.dir, self.dir / name, append=True), "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{name.split('.')[0]}/{k}", v, record["step"])


def progress_bar(cfg, d: Dist, steps: int, start: int):
    """A tqdm bar of the run's steps on rank 0 with --progress; None otherwise."""
    if not (d.master and cfg.progress):
        return None
    from tqdm import tqdm
    return tqdm(total=steps, initial=start, desc=cfg.feedback, unit="step", dynamic_ncols=True)


def warn(message: str, bar=None) -> None:
    """A line on stderr, through the progress bar when there is one (so that the bar does not overwrite it)."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)
