"""SIGTERM, SIGINT and SIGHUP during a run: a flag the engine and the critic poll, agreed by every rank at step
boundaries, so a stopped run checkpoints its last complete step and exits 128 + the signal's number: 143 (SIGTERM),
130 (SIGINT), 129 (SIGHUP: the terminal or ssh session closed, which would otherwise end the run with no checkpoint)."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from infra.dist import Dist, all_reduce_sum


class Stopped(Exception):
    """Raised by StopFlag.check once a stop signal has arrived: the engine (once per token) and the critic client
    (while a batch waits) abandon their work with it; train.py catches it where no weight has changed since the
    last completed step, checkpoints that step and exits."""


class StopFlag:
    """Set by SIGTERM, SIGINT (Ctrl-C) or SIGHUP (a closed terminal) while the run is inside `with StopFlag()`; `check` (passed to the engine and
    the critic as their `interrupt`) raises Stopped once it is set, so in-flight generation and critic requests end
    within moments; `agreed` reads it at step boundaries (all-reduced, so all ranks stop together). Under torchrun
    the signal must reach every rank (torchrun forwards SIGTERM; Ctrl-C reaches the process group). `signum` is the
    first signal this process received. A second SIGINT raises KeyboardInterrupt at once (no checkpoint; the last
    one written stays intact)."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.event, self.signum, self.interrupts = threading.Event(), None, 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt("a second SIGINT: stopping without a checkpoint")
        self.signum = self.signum or signum
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        if self.event.is_set():
            raise Stopped(signal.Signals(self.signum).name)

    def agreed(self, d: Dist) -> bool:
        flag = torch.tensor([float(self.requested)], device=d.device)
        return bool(all_reduce_sum(flag, d).item() > 0)

    def exit(self, out_dir: Path, step: int, d: Dist):
        """Once the checkpoint of `step` is written: exit 128 + the signal's number (SIGTERM 143, SIGINT 130,
        SIGHUP 129), as a shell reports a process the signal ended; a rank stopped by another rank's signal: 143."""
        signum = self.signum or signal.SIGTERM
        if d.master:
            print(f"{signal.Signals(signum).name}: checkpoint written at step {step} in {out_dir}; continue with "
                  "--resume", flush=True)
        raise SystemExit(128 + signum)
