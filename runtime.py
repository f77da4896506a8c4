"""Plumbing of train.py: processes (torchrun ranks), the out-dir lock, checkpoints, logs, timers, SIGTERM and SIGINT,
critic-failure counts, and the model and generation engine of a run (built, resumed, given each new adapter).

Nothing here touches the math: DDP the plain way (RANK / LOCAL_RANK / WORLD_SIZE, one explicit all-reduce),
checkpoints written to a temporary directory then renamed (a kill leaves the previous one intact), JSONL logs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import lora
import prompts
import rollout


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """RANK / LOCAL_RANK / WORLD_SIZE from torchrun; nccl on GPUs, gloo on CPU; single process otherwise."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


# ---------------------------------------------------------------------------------------------- one run per out-dir
class OutDirBusy(Exception):
    """The out-dir is locked by a run that is alive (or cannot be locked at all); the message is one line."""


class OutDirLock:
    """One run per output directory: `with OutDirLock(out_dir):` holds an fcntl lock on out_dir/.lock, which holds
    the holder's pid, host and start time. The kernel drops the lock when the holder's process ends, however it
    ends (kill -9 included), so a crashed run never blocks the next one; its record, left in the file, is reported.
    A clean exit empties the file. fcntl (POSIX) locks belong to the process, not to children it forks."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    @staticmethod
    def _holder(text: str) -> str:
        try:
            rec = json.loads(text)
            return f"pid {rec['pid']} on host {rec['host']}, started {rec['started']}"
        except (ValueError, KeyError, TypeError):
            return f"an unreadable record {text[:80]!r}"

    def __enter__(self) -> OutDirLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutDirBusy(f"--out-dir {self.path.parent}: {self.path} cannot be written ({e.strerror})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise OutDirBusy(f"--out-dir {self.path.parent}: in use by another run ({self._holder(text)}; lock "
                                 f"{self.path}): wait for it to end, stop it, or choose another --out-dir") from None
            raise OutDirBusy(f"--out-dir {self.path.parent}: {self.path} cannot be locked ({e.strerror}): this file "
                             "system does not support fcntl locks; choose an --out-dir on a local disk") from None
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if text:  # the last holder ended without releasing the lock: its process is gone (the lock was free)
            try:
                rec = json.loads(text)
                gone = rec["host"] != socket.gethostname() or not _pid_alive(int(rec["pid"]))
            except (ValueError, KeyError, TypeError):
                gone = True
            print(f"{self.path}: taken over from a run that ended without releasing it (crashed or killed): "
                  f"{self._holder(text)}" + ("" if gone else " (its pid now belongs to another process)"), flush=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # released cleanly: the next run has nothing to report
            os.close(self.fd)  # (closing drops the lock)
            self.fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step_[0-9]*"), key=lambda p: int(p.name.split("_")[1]))


def rng_state() -> dict:
    """The RNG states as tensors and numbers only, so that they load with torch.load(weights_only=True): a
    checkpoint is data, never code."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """The inverse of rng_state."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(Exception):
    """A checkpoint file that cannot be loaded as data; the message is one line naming the file."""


def load_data(path: Path):
    """torch.load with weights_only=True: tensors, numbers, strings and containers only. Anything else (a pickled
    object, whose unpickling could run code) is refused with CheckpointError, naming the object; a file that is not
    one torch.save wrote whole (truncated, garbage) is CheckpointError "cannot be read", whatever the unpickler
    raised."""
    try:
        with warnings.catch_warnings():  # garbage reads as an odd pickle protocol: the error below says it once
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # the line of torch's message that names what was refused, not its advice to load with weights_only=False
        lines = [x for x in str(e).strip().splitlines() if x.strip() and "weights_only" not in x]
        what = lines[0].strip() if lines else type(e).__name__
        if not any(word in what.lower() for word in ("global", "reduce", "allowlisted")):  # no object named:
            # garbage, e.g. "Unsupported operand 218" (a byte that is no opcode the weights-only unpickler knows)
            raise CheckpointError(f"{path}: cannot be read (not a file of torch.save: {what[:200]})") from None
        raise CheckpointError(f"{path}: refused, it holds more than tensors and numbers (a checkpoint is data, never "
                              f"code; written by another program or an older version?): {what}") from None
    except Exception as e:  # truncated or garbage bytes: the unpickler may raise any type of error
        # (EOFError, IndexError, KeyError, struct.error, UnicodeDecodeError, ...: pickle's documentation lists
        # no closed set), and each means the same thing here: this file does not load
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).strip()[:200]})") from None


class SaveError(Exception):
    """A checkpoint that could not be written (disk full, quota, permissions); one line naming the path and the
    disk, the previous checkpoint intact. Also: too little room for checkpoints before training starts."""


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def checkpoint_bytes(params: list, optimizer) -> int:
    """An estimate of one checkpoint's size: the LoRA weights (fp32) plus AdamW's two moments of each (fp32), the
    RNG states and JSON files in a 1 MiB allowance."""
    n = sum(p.numel() for p in params)
    return 3 * 4 * n + 2 ** 20


def check_room(out_dir: Path, one_checkpoint: int, n: int = 2) -> None:
    """SaveError before training starts when the disk of out_dir has no room for n checkpoints of the estimated
    size (a save writes the new checkpoint beside the previous one before it replaces anything)."""
    free = shutil.disk_usage(out_dir).free
    if free < n * one_checkpoint:
        raise SaveError(f"--out-dir {out_dir}: its disk has {gib(free)} free, less than room for {n} checkpoints "
                        f"of about {gib(one_checkpoint)} each (LoRA weights and AdamW state): free some space or "
                        "choose an --out-dir on another disk")


def save_checkpoint(cfg, model, optimizer, step: int, counters: dict, d: Dist) -> None:
    """Adapter (PEFT layout), optimizer, RNG states, data position: to a temporary directory, then renamed.

    A kill during the save leaves the previous checkpoint intact (and at worst a stray .tmp directory). A write
    that fails (OSError: disk full, quota) removes the temporary directory and raises SaveError naming the disk."""
    final = Path(cfg.out_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(f".tmp_{final.name}")
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if d.world > 1:
        dist.barrier()
    try:
        torch.save(rng_state(), tmp / f"rng_rank{d.rank}.pt")
        if d.master:
            lora.save_adapter(model, str(tmp), base_model_name_or_path=cfg.model)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "counters": counters}, indent=1))
            (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = checkpoint_dirs(Path(cfg.out_dir))
        kept = f"the previous checkpoint {earlier[-1]} is intact" if earlier else "there is no earlier checkpoint"
        raise SaveError(f"{final}: the checkpoint of step {step} could not be written ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); the disk of "
                        f"{cfg.out_dir} has {gib(shutil.disk_usage(cfg.out_dir).free)} free; {kept}") from None
    if d.world > 1:
        dist.barrier()
    if d.master:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if d.world > 1:
        dist.barrier()


def truncate_log(path: Path, step: int) -> None:
    """Keep the JSONL lines of steps <= `step` (a run killed between two checkpoints logged steps past it).
    A last line without its newline is a write cut by a kill: it is dropped."""
    if path.exists():
        text = path.read_text()
        complete = text[:text.rfind("\n") + 1]
        lines = [line for line in complete.splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def load_json(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object of a checkpoint with the given keys, or CheckpointError naming the file and what is wrong."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).strip()[:200]})") from None
    if not isinstance(value, dict) or any(k not in value for k in keys):
        raise CheckpointError(f"{path}: not a JSON object with the keys {list(keys)}")
    return value


def read_checkpoint(path: Path, rank: int = 0) -> tuple[dict, dict | None, dict]:
    """Every file of a checkpoint read as data, nothing applied: (optimizer state, this rank's RNG states or None,
    state.json). The adapter is read too (safetensors) so that a checkpoint that passes is whole; CheckpointError
    names the first file that is missing or does not load (truncated, garbage, code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in (lora.ADAPTER_WEIGHTS_NAME, lora.ADAPTER_CONFIG_NAME, "optimizer.pt", "state.json", "config.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
    meta = load_json(path / "state.json", ("step", "counters"))
    load_json(path / "config.json")
    load_json(path / lora.ADAPTER_CONFIG_NAME, ("r", "lora_alpha", "target_modules"))
    try:
        load_file(path / lora.ADAPTER_WEIGHTS_NAME)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / lora.ADAPTER_WEIGHTS_NAME}: cannot be read ({type(e).__name__}: "
                              f"{str(e).strip()[:200]})") from None
    optimizer_state = load_data(path / "optimizer.pt")
    rng_file = path / f"rng_rank{rank}.pt"
    return optimizer_state, (load_data(rng_file) if rng_file.exists() else None), meta


def resumable_checkpoint(out_dir: Path, rank: int = 0) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of out_dir whose files all load as data (read_checkpoint), and one line per newer
    checkpoint passed over, naming its bad file and why. (None, lines): no checkpoint, or none loads."""
    passed = []
    for path in reversed(checkpoint_dirs(out_dir)):
        try:
            read_checkpoint(path, rank)
        except CheckpointError as e:
            passed.append(str(e))
            continue
        return path, passed
    return None, passed


def load_checkpoint(path: Path, model, optimizer, d: Dist) -> tuple[int, dict]:
    """Adapter, optimizer, RNG states and data position of a checkpoint, every file read as data only
    (read_checkpoint) before anything is applied. Raises CheckpointError naming the file that is refused."""
    optimizer_state, rng, meta = read_checkpoint(path, d.rank)
    rng_file = path / f"rng_rank{d.rank}.pt"
    lora.load_adapter(model, str(path))
    optimizer.load_state_dict(optimizer_state)
    if rng is None:  # saved with fewer ranks; only dropout draws from these (sampling has its own seeds)
        print(f"rank {d.rank}: {path} has no {rng_file.name}; keeping this rank's fresh RNG states", flush=True)
    else:
        try:
            set_rng_state(rng)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{rng_file}: not an RNG state of this version ({type(e).__name__}: {e})") from None
    return meta["step"], meta["counters"]


# ---------------------------------------------------------------------------------------------- the run
class Stopped(Exception):
    """Raised by StopFlag.check once a stop signal has arrived: the engine (once per token) and the critic client
    (while a batch waits) abandon their work with it; train.py catches it where no weight has changed since the
    last completed step, checkpoints that step and exits."""


class StopFlag:
    """Set by SIGTERM or SIGINT (Ctrl-C) while the run is inside `with StopFlag()`; `check` (passed to the engine and
    the critic as their `interrupt`) raises Stopped once it is set, so in-flight generation and critic requests end
    within moments; `agreed` reads it at step boundaries (all-reduced, so all ranks stop together). Under torchrun
    the signal must reach every rank (torchrun forwards SIGTERM; Ctrl-C reaches the process group). `signum` is the
    first signal this process received. A second SIGINT raises KeyboardInterrupt at once (no checkpoint; the last
    one written stays intact)."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

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
        """Once the checkpoint of `step` is written: SIGTERM exits 143, SIGINT 130 (128 + the signal's number); a rank
        stopped by another rank's signal: 143."""
        signum = self.signum or signal.SIGTERM
        if d.master:
            print(f"{signal.Signals(signum).name}: checkpoint written at step {step} in {out_dir}; continue with "
                  "--resume", flush=True)
        raise SystemExit(130 if signum == signal.SIGINT else 143)


def evaluation_due(cfg, done: int, steps: int) -> bool:
    """Whether the policy after `done` of `steps` steps is evaluated: every --eval-every steps, and the last."""
    return done % cfg.eval_every == 0 or done == steps


def evaluation_pending(cfg, start: int, steps: int, d: Dist) -> bool:
    """Whether a run resumed at `start` owes the evaluation of that step: an evaluation step with no record in
    eval.jsonl (a signal or a kill at that boundary came after its checkpoint, written first, and before the
    evaluation ended). Read by rank 0, agreed by every rank (the evaluation is a collective)."""
    missing = 0.0
    path = Path(cfg.out_dir) / "eval.jsonl"
    if d.master and start > 0 and evaluation_due(cfg, start, steps):
        logged = {json.loads(line)["step"] for line in path.read_text().splitlines()} if path.exists() else set()
        missing = float(start not in logged)
    return all_reduce_sum(torch.tensor([missing], device=d.device), d).item() > 0


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


def sum_over_ranks(counts: dict[str, float], d: Dist) -> dict[str, float]:
    """Counts summed over ranks; each rank may hold different keys (e.g. critic_failed_timeout on one only)."""
    if d.world == 1:
        return dict(counts)
    every = [None] * d.world
    dist.all_gather_object(every, counts)
    total: dict[str, float] = {}
    for rank_counts in every:
        for k, v in rank_counts.items():
            total[k] = total.get(k, 0.0) + v
    return total


def unusable_as_failures(counts: dict[str, float]) -> dict[str, float]:
    """A step's critic counts with the critiques that reached no teacher (unusable_schema: failed the schema under
    --critic-unstructured skip; unusable_empty: empty) counted as failures of kind "schema" and "empty"."""
    out = {k: v for k, v in counts.items() if not k.startswith("unusable_")}
    for kind in ("schema", "empty"):
        if counts.get(f"unusable_{kind}"):
            out[f"critic_failed_{kind}"] = out.get(f"critic_failed_{kind}", 0.0) + counts[f"unusable_{kind}"]
            out["critic_failed"] = out.get("critic_failed", 0.0) + counts[f"unusable_{kind}"]
    return out


def failure_counts(failures: dict[str, float]) -> Counter:
    """{kind: count} from the critic_failed_<kind> entries of a step's (or window's) counts."""
    return Counter({k.removeprefix("critic_failed_"): v for k, v in failures.items()
                    if k.startswith("critic_failed_")})


def failure_kinds(failures: dict[str, float]) -> str:
    """'refused 3, timeout 1' from the critic_failed_<kind> counts."""
    return ", ".join(f"{k} {v:.0f}" for k, v in failure_counts(failures).most_common())


def critic_fix(cfg, failures: dict[str, float]) -> str:
    """What to change, from the most frequent reason among the critic_failed_<kind> counts."""
    kinds = failure_counts(failures)
    kind = kinds.most_common(1)[0][0] if kinds else "other"
    if kind in ("refused", "connection"):
        return f"the critic server at {cfg.critic_url} does not answer: restart it (or correct --critic-url)"
    if kind == "timeout":
        return (f"critiques take longer than --critic-timeout {cfg.critic_timeout} s: raise it, lower "
                f"--critic-concurrency {cfg.critic_concurrency}, or give the server more capacity")
    if kind in ("http_401", "http_403"):
        return f"the server refuses the API key in ${cfg.critic_api_key_env}"
    if kind.startswith("http_4"):
        return f"the server rejects the requests ({kind}): check --critic-model {cfg.critic_model} and its log"
    if kind.startswith("http_"):
        return f"the server fails ({kind}): see its log (out of memory? a context shorter than the prompts?)"
    if kind == "malformed":
        return f"the answers of {cfg.critic_url} are not OpenAI chat completions: check --critic-url"
    if kind == "schema":
        return (f"the critiques of {cfg.critic_model} do not follow the schema (prompts.critic_messages): check "
                f"--critic-model and --critic-think-in-prompt, or give unstructured text to the teacher with "
                f"--critic-unstructured keep")
    if kind == "empty":
        return ("the critic's answers are empty: a think trace never closed (--critic-think-in-prompt?) or a "
                "reasoning parser that keeps the whole answer in reasoning_content")
    if kind == "length":
        return f"critiques are cut by --critic-max-tokens {cfg.critic_max_tokens}: raise it"
    return "see the warnings above"


def critic_down(cfg, name: str, n: int, window: deque, done: int, d: Dist, bar) -> str | None:
    """Warn about the failed critiques of the step just done (window[-1], of n, all ranks); return the reason to
    stop when at least --critic-fail-max of the critiques of the steps in `window` failed, else None."""
    failures = window[-1]
    if failures.get("critic_failed") and d.master:
        warn(f"[{name}] step {done}: the critic failed on {failures['critic_failed']:.0f} of {n} rollouts "
             f"({failure_kinds(failures)}); they are skipped", bar)
    recent = sum((Counter(f) for f in window), Counter())
    if recent["critic_failed"] >= cfg.critic_fail_max * n * len(window):  # (the last step too: exit 3, not 0)
        return (f"{recent['critic_failed']:.0f} of {n * len(window)} critiques failed over the last {len(window)} "
                f"steps ({failure_kinds(recent)}), at least --critic-fail-max {cfg.critic_fail_max}. Fix: "
                f"{critic_fix(cfg, recent)}")
    return None


def diverged_error(cfg, name: str, done: int, diverged: int, counters: dict) -> str:
    """The error line of a run stopped after --nonfinite-max refused steps in a row (exit 5)."""
    return (f"train.py: error: [{name}] stopped at step {done}: its last {diverged} steps were refused "
            f"(--nonfinite-max {cfg.nonfinite_max}; in the run, skipped_nonfinite {counters['skipped_nonfinite']}: a "
            f"loss, gradient or update not finite; skipped_diverged {counters['skipped_diverged']}: an update that "
            f"grew the residual stream past 1/u or moved the policy farther than log V); the weights are those of the "
            f"last good step, checkpointed in {Path(cfg.out_dir)}. Fix: a lower --lr ({cfg.lr}) or --max-grad-norm "
            f"({cfg.max_grad_norm})")


def critic_down_error(cfg, name: str, done: int, steps: int, down: str) -> str:
    """The error line of a run stopped by the critic's stop rule (critic_down's reason; exit 3)."""
    then = ("continue with the same command and --resume" if done < steps else
            "this was the last step: its evaluation used these steps' weights")
    return (f"train.py: error: [{name}] stopped at step {done}: {down}. A checkpoint of step {done} is in "
            f"{Path(cfg.out_dir)}: {then}.")


def divergence_probe(tokenizer, problem, thinking: bool) -> torch.Tensor:
    """(1, L) token ids of the divergence probe: the student prompt of `problem` (train.py: the first training
    problem, the same in every step and after --resume, so one step's probe_policy is the next step's `before`)."""
    text = prompts.render(tokenizer, prompts.student_messages(problem), thinking)
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


PROBE_POSITIONS = 64  # K: the probe positions whose next-token distributions refused_update compares


def probe_policy(model, probe: torch.Tensor, d: Dist) -> tuple[torch.Tensor, float]:
    """The policy on `probe` (1, L) token ids, no gradient, in O(K·V) memory: (log π(·|probe<t) in fp32 at the last
    K = PROBE_POSITIONS positions (K, V), the largest |h| of the residual stream entering each layer and the final
    norm, over all L positions). Neither the (L, V) logits nor every layer's (L, D) hidden states are kept: at
    Qwen3's V = 151,936 and L = 4k, the fp32 log-probs alone took 2.5 GB; K = 64 takes 39 MB."""
    decoder = model.get_decoder()
    largest = []  # max |h| entering each layer, then the final norm

    def record(module, args):
        largest.append(args[0].detach().abs().max().float())

    hooks = [m.register_forward_pre_hook(record) for m in [*decoder.layers, decoder.norm]]
    try:
        with torch.no_grad():
            logits = model(input_ids=probe.to(d.device), logits_to_keep=PROBE_POSITIONS, use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return torch.log_softmax(logits.float(), -1), torch.stack(largest).max().item()  # (K, V)


def delta_finite(m: lora.LoRALinear) -> bool:
    """Whether A, B and ΔW = (α/r)·B A in fp32 are finite, without forming ΔW when a bound proves it: every entry of
    ΔW, and every partial sum of its r terms, is at most (α/r)·r·max|B|·max|A| in magnitude (computed in float64)."""
    A, B = m.lora_A.weight, m.lora_B.weight
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        return False
    bound = m.scaling * m.r * B.abs().max().double().item() * A.abs().max().double().item()
    return bound < torch.finfo(torch.float32).max or bool(torch.isfinite(m.delta_weight()).all())


def refused_update(model, probe: torch.Tensor, before: tuple[torch.Tensor, float], d: Dist
                   ) -> tuple[str | None, tuple[torch.Tensor, float] | None]:
    """Why the update just taken must be undone, agreed over ranks, or None; and probe_policy after it (None when a
    LoRA weight is not finite), the next update's `before` if this one stands. `before`: probe_policy before it.
    skipped_nonfinite: a LoRA weight, ΔW = (α/r)·B A in fp32 (what `sampling` merges), the residual stream on
    `probe` (1, L) or the policy's logits there are not finite (a finite adapter can still overflow the activations).
    skipped_diverged, a finite divergence (at --lr 1e6 every weight moves by ~lr in one AdamW step), either
    (a) the residual stream grew more than 1/u (u the unit roundoff of the model's dtype): the pretrained model's
        own part of it is below one rounding, the adapter has replaced the model; or
    (b) the policy moved farther than the uniform distribution is from it, mean_t KL(π_old ‖ π_new) > log V over
        the probe's last K positions: for any p, KL(p ‖ uniform) = log V − H(p) ≤ log V, so such a step lost more
        than forgetting everything would. K positions suffice: the update moves the weights every position passes
        through, and each of the last K conditions on the whole probe; a divergence confined to earlier positions
        still shows in (a), which reads every position.
    A learning step comes nowhere near either: the tests' tiny model grows it ≤ 10× per step at lr 1e-1, 4·10⁴× at lr 1,
    ~1e8× at lr 1e2 and ~1e20× at 1e6; its policy moves ≤ 0.03 nats per token."""
    ok = all(delta_finite(m) for m in lora.lora_layers(model).values())
    far, after = False, None
    if ok:
        (logp_old, residual_old), after = before, probe_policy(model, probe, d)  # (K, V)
        logp_new, residual_new = after
        ok = bool(torch.isfinite(logp_new).all()) and math.isfinite(residual_new)
        if ok:
            kl = (logp_old.exp() * (logp_old - logp_new)).sum(-1)  # (K,)  KL(π_old ‖ π_new) per position
            u = torch.finfo(model.dtype).eps / 2
            far = residual_new > residual_old / u or kl.mean().item() > math.log(logp_old.shape[-1])
    flags = all_reduce_sum(torch.tensor([0.0 if ok else 1.0, float(far)], device=d.device), d)
    return "skipped_nonfinite" if flags[0] > 0 else "skipped_diverged" if flags[1] > 0 else None, after


# ---------------------------------------------------------------------------------------------- model and engine
def build_model(cfg, d: Dist):
    model, tokenizer = rollout.load_model(cfg.model, dtype=rollout.DTYPES[cfg.dtype], device=d.device)
    lora.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets.split(",")))
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, tokenizer


def make_vllm_engine(cfg, d: Dist) -> rollout.VLLMEngine:
    """One vLLM engine per process, shared by the runs of one invocation (--feedback all): under torchrun each rank
    holds its own (external_launcher, rollout.py), and vLLM's teardown ends the process group, so it is built
    once and closed last."""
    return rollout.make_engine("vllm", cfg.model, dtype=cfg.dtype, seed=cfg.seed, max_lora_rank=cfg.lora_r,
                               gpu_memory_utilization=cfg.vllm_gpu_memory, kv_cache_gib=cfg.vllm_kv_cache_gib,
                               world_size=d.world, stop_at_boxed=cfg.stop_at_boxed)


def start_policy(cfg, d: Dist):
    """The model with a fresh adapter, identical on every rank, and its AdamW; then the per-rank RNG offsets.
    Returns (model, tokenizer, LoRA parameters, optimizer)."""
    torch.manual_seed(cfg.seed)  # the same LoRA initialization on every rank...
    model, tokenizer = build_model(cfg, d)
    params = [p for p in model.parameters() if p.requires_grad]
    if d.world > 1:
        for p in params:  # ...and rank 0's copy, as DDP does, so the ranks cannot drift apart
            dist.broadcast(p.data, src=0)
    torch.manual_seed(cfg.seed + d.rank)  # per-rank offset: only dropout would use it; sampling has its own seeds
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    return model, tokenizer, params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def start_out_dir(cfg, d: Dist, model, optimizer) -> tuple[int, dict]:
    """The run's output directory: a checkpoint save cut by a kill removed; with --resume the latest checkpoint
    loaded and the log lines written after it dropped; else fresh logs and config.json. Returns (first step,
    counters)."""
    out_dir = Path(cfg.out_dir)
    counters = {"skipped_critic": 0, "skipped_nonfinite": 0, "skipped_diverged": 0, "skipped_empty": 0,
                "skipped_context": 0}
    if d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stray in sorted((out_dir / "checkpoints").glob(".tmp_step_*")):  # a save cut by a kill
            shutil.rmtree(stray)
            print(f"removed {stray}: a checkpoint whose save was interrupted", flush=True)
    if d.world > 1:
        dist.barrier()  # (no rank reads the checkpoints before the strays are gone)
    if cfg.resume and checkpoint_dirs(out_dir):
        latest, passed = resumable_checkpoint(out_dir, d.rank)
        for line in passed:  # loudly: a newer checkpoint that does not load is passed over, never hidden
            if d.master:
                print(f"train.py: warning: --resume passes over a checkpoint that does not load: {line}",
                      file=sys.stderr, flush=True)
        if latest is None:
            raise CheckpointError(passed[-1] if len(passed) == 1 else
                                  f"none of the {len(passed)} checkpoints in {out_dir / 'checkpoints'} loads (each "
                                  f"named above): move them aside to start afresh")
        if d.world > 1:  # every rank must continue from the same step (a rank's own RNG file may be the bad one)
            names = [None] * d.world
            dist.all_gather_object(names, latest and latest.name)
            if len(set(names)) > 1:
                raise CheckpointError(f"{out_dir / 'checkpoints'}: the newest checkpoint that loads differs between "
                                      f"the ranks ({names}): a rank's rng_rank*.pt is damaged (named above)")
        step, saved = load_checkpoint(latest, model, optimizer, d)
        if d.master:
            for name in ("log.jsonl", "eval.jsonl"):  # lines written after the checkpoint are written again
                truncate_log(out_dir / name, step)
            print(f"resumed from {latest} (step {step})", flush=True)
        return step, counters | saved
    if cfg.resume and d.master:
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; starting at step 0", flush=True)
    if d.master:
        for name in ("log.jsonl", "eval.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return 0, counters


def push_adapter(cfg, d: Dist, model, engine, step: int) -> None:
    """Step 7: the generation engine samples from the current policy. The transformers engine shares the module
    (`sampling` merges it); vLLM gets the adapter under a fresh name and id (rollout.VLLMEngine.set_adapter)."""
    if cfg.engine != "vllm":
        return
    # the ranks hold identical LoRA weights: rank 0 writes one copy, every rank's engine loads it
    root = Path(cfg.out_dir) / "adapters"
    adapter_dir = root / f"step_{step:06d}"
    if d.master:
        lora.save_adapter(model, str(adapter_dir), base_model_name_or_path=cfg.model)
    if d.world > 1:
        dist.barrier()
    engine.set_adapter(str(adapter_dir))
    if d.world > 1:
        dist.barrier()
    if d.master:  # older adapters were loaded by the engines already and are never used again
        for old in root.glob("step_*"):
            if old != adapter_dir:
                shutil.rmtree(old)


@contextlib.contextmanager
def sampling(cfg, model):
    """The transformers engine samples from this very module: merged, the same policy runs faster. The merge is in
    fp32 (lora.py, departure 7): merged into bf16 weights, a small ΔW would round away and the rollouts and
    evaluations would come from roughly the base policy. vLLM holds its own weights (push_adapter): nothing to do."""
    if cfg.engine != "transformers":
        yield
        return
    lora.merge(model, dtype=torch.float32)
    try:
        yield
    finally:
        lora.unmerge(model)


def nothing_learned(run: str, counters: dict, steps: int, log_path: Path) -> str:
    """The error line of a run none of whose steps changed the weights (exit 4), with the counts that say why."""
    return (f"run {run} took no optimizer step in its {steps} steps (skipped_empty {counters['skipped_empty']}: "
            f"nothing to learn from; skipped_nonfinite {counters['skipped_nonfinite']}; skipped_diverged "
            f"{counters['skipped_diverged']}; rollouts skipped for the "
            f"critic {counters['skipped_critic']}): its evaluations are of the base policy; see {log_path}")
