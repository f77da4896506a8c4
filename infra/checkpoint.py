"""The output directory of a run: one run per directory (an fcntl lock), checkpoints written to a temporary
directory then renamed (a kill leaves the previous one intact), loaded as data only (weights_only), --resume. Every
file is written inside the out-dir and never through a link (infra.logs.inside); state.json records the run's
fingerprints (infra.fingerprint), and a state.json of the wrong shape is passed over like a truncated file."""
from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pickle
import random
import shutil
import socket
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import lora
from infra.chat_client import redact_url
from infra.dist import Dist
from infra.logs import inside, write_inside


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
            # never through a link (it would truncate its target), never a FIFO or device (O_NONBLOCK: no wait)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:  # (ELOOP: a symbolic link)
            raise OutDirBusy(f"--out-dir {self.path.parent}: {self.path} cannot be written ({e.strerror}); a lock "
                             "is a regular file of the out-dir, never a link: remove it") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            raise OutDirBusy(f"--out-dir {self.path.parent}: {self.path} is not a regular file of its own (a device, "
                             "FIFO or hard link), so it is not written; remove it")
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


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    found = [p for p in (out_dir / "checkpoints").glob("step_[0-9]*") if p.name[len("step_"):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len("step_"):]))


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


def config_json(cfg) -> str:
    """config.json of a run: its options, a password in --critic-url redacted (never written to any file)."""
    options = dataclasses.asdict(cfg)
    options["critic_url"] = redact_url(options["critic_url"])
    return json.dumps(options, indent=1)


def options_line(cfg, defaults) -> str:
    """The options in which `cfg` differs from `defaults` (its preset's), as a command line: the short form of
    config.json that a run prints (a password in --critic-url redacted)."""
    changed = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != getattr(defaults, f.name)]
    return " ".join(f"--{name.replace('_', '-')}" if value is True else f"--no-{name.replace('_', '-')}"
                    if value is False else f"--{name.replace('_', '-')} {redact_url(str(value))}"
                    for name, value in [("preset", cfg.preset)] + changed)


def save_checkpoint(cfg, model, optimizer, step: int, counters: dict, d: Dist, fingerprint: dict | None = None
                    ) -> None:
    """Adapter (PEFT layout), optimizer, RNG states, data position and the run's fingerprints (infra.fingerprint):
    to a temporary directory, then renamed.

    A kill during the save leaves the previous checkpoint intact (and at worst a stray .tmp directory). A write
    that fails (OSError: disk full, quota) removes the temporary directory and raises SaveError naming the disk."""
    final = inside(cfg.out_dir, Path(cfg.out_dir) / "checkpoints" / f"step_{step:06d}")
    tmp = inside(cfg.out_dir, final.with_name(f".tmp_{final.name}"))
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
            (tmp / "state.json").write_text(json.dumps({"step": step, "counters": counters,
                                                        "fingerprint": fingerprint or {}}, indent=1))
            (tmp / "config.json").write_text(config_json(cfg))
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
        write_inside(path.parent, path, "".join(line + "\n" for line in lines))


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
    problem = state_problem(meta, path)
    if problem:
        raise CheckpointError(f"{path / 'state.json'}: {problem}")
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


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def state_problem(meta: dict, path: Path) -> str | None:
    """Why state.json of the checkpoint directory `path` is not one that save_checkpoint wrote, or None: its step
    must be the directory's (step_000004: 4), its counters non-negative integers by name, its fingerprint an object."""
    want = int(path.name.split("_")[1]) if path.name.split("_")[-1].isdigit() else None
    if not _count(meta["step"]) or (want is not None and meta["step"] != want):
        return f"step is {meta['step']!r}, not the step {want} of its directory"
    counters = meta["counters"]
    if not isinstance(counters, dict) or not all(isinstance(k, str) and _count(v) for k, v in counters.items()):
        return f"counters are not non-negative integers by name ({json.dumps(counters)[:80]})"
    if not isinstance(meta.get("fingerprint", {}), dict):
        return f"fingerprint is not an object ({json.dumps(meta['fingerprint'])[:80]})"
    return None


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


def start_out_dir(cfg, d: Dist, model, optimizer) -> tuple[int, dict]:
    """The run's output directory: a checkpoint save cut by a kill removed; with --resume the latest checkpoint
    loaded and the log lines written after it dropped; else fresh logs and config.json. Returns (first step,
    counters)."""
    out_dir = Path(cfg.out_dir)
    counters = {"skipped_critic": 0, "skipped_nonfinite": 0, "skipped_diverged": 0, "skipped_empty": 0,
                "skipped_context": 0}
    if d.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stray in sorted(inside(out_dir, out_dir / "checkpoints").glob(".tmp_step_*")):
            inside(out_dir, stray)  # a save cut by a kill
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
            for name in ("log.jsonl", "eval.jsonl", "samples.jsonl"):  # lines after the checkpoint are written again
                truncate_log(out_dir / name, step)
            print(f"resumed from {latest} (step {step})", flush=True)
        return step, counters | saved
    if cfg.resume and d.master:
        print(f"--resume: no checkpoint in {out_dir / 'checkpoints'}; starting at step 0", flush=True)
    if d.master:
        for name in ("log.jsonl", "eval.jsonl", "samples.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
        write_inside(out_dir, out_dir / "config.json", config_json(cfg))
    return 0, counters
