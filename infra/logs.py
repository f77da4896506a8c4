"""Logs of a run: JSONL lines (strict JSON), optional TensorBoard scalars, phase timers, the progress bar, warnings."""
from __future__ import annotations

import contextlib
import json
import math
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
            self.tb = SummaryWriter(str(self.dir / "tb"))

    def write(self, name: str, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(strict_json(record), allow_nan=False)  # strict JSON: no bare NaN or Infinity
        with (self.dir / name).open("a") as f:
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
