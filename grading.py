"""Grading: the one \\boxed reader, answer normalization, and math-verify in a worker process with a deadline.

`boxes(text)` is the one reader of \\boxed{...} / \\fbox{...} (the grader, the exact critic and the sampler's stop
rule all read boxes through it). `extract_answer(response)` is the content of the last complete, non-empty box;
`grade(response, gold)` compares it with the gold answer, first by a fast exact path (identical strings, or two
plain integers), otherwise with math-verify (`verify(gold, pred)`, gold first: it is not symmetric).
math-verify's own time limits use SIGALRM, which fails outside the main thread and cannot interrupt a long
C-level computation (e.g. a huge power), so we switch them off and run math-verify in a persistent worker
process owned by an `AnswerChecker`: each check has a deadline; on expiry the worker is killed (and restarted
for the next check) and the check counts as incorrect and is counted in `AnswerChecker.failures`. This works
from any thread (checks are serialized by a lock) and from worker processes (the worker is a `subprocess`, not
a multiprocessing child, so daemonic pool workers may own one). For bulk grading create one checker and reuse
it (`with AnswerChecker() as checker: checker.grade(response, gold)`); `grade(response, gold)` without a
checker starts a one-shot worker (~0.5 s) only when the fast path cannot decide.

Departures from the paper (which does not specify these details):
1. Only the last \\boxed{} answer of a response is graded (not any expression math-verify could find in the
   text); a response without one is unanswered and incorrect.
2. A grade whose check exceeds the time limit (default 5 s) or crashes the worker counts as incorrect.
"""
from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from collections import Counter

# ---------------------------------------------------------------------------------------------- answers
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INTEGER = re.compile(r"[+-]?\d{1,100}")


def _brace_pairs(text: str) -> dict[int, int]:
    """Position of each '{' -> position of its matching '}', in one pass (escaped \\{ \\} \\\\ are skipped)."""
    pairs, open_at, i = {}, [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character (\{, \}, \\) never opens or closes a group
            i += 2
            continue
        if ch == "{":
            open_at.append(i)
        elif ch == "}" and open_at:
            pairs[open_at.pop()] = i
        i += 1
    return pairs


def boxes(text: str) -> list[tuple[int, int | None]]:
    """THE \\boxed reader: the content span [start, end) of each \\boxed{...} or \\fbox{...} of `text`, in order;
    end is None for an unclosed box (a truncated response).

    Accepted: `\\boxed{...}`, `\\boxed {...}`, `\\fbox{...}`, with nested braces and escaped braces (\\{ \\}).
    Not accepted: `\\boxed 5` (no braces). Linear in len(text): the braces are matched once for the whole text,
    not once per box (with many unclosed boxes that was quadratic).
    """
    opens = [m.end() - 1 for m in _BOX_OPEN.finditer(text)]  # the '{' of each box
    if not opens:
        return []
    pairs = _brace_pairs(text)
    return [(start + 1, pairs[start] if start in pairs else None) for start in opens]


def answer_span(response: str) -> tuple[int, int] | None:
    """The content span of the box the grader reads: the last complete, non-empty one (unclosed and empty boxes
    are skipped); None when there is none."""
    for start, end in reversed(boxes(response)):
        # a box that strips to nothing holds only whitespace, so such boxes are disjoint: O(len) in total
        if end is not None and response[start:end].strip():
            return start, end
    return None


def extract_answer(response: str) -> str | None:
    """The graded answer: the content of `answer_span`, stripped; None when the response has no answer."""
    span = answer_span(response)
    return None if span is None else response[span[0]:span[1]].strip()


def normalize_answer(answer: str) -> str:
    """Whitespace and one pair of enclosing $...$ removed: the key under which identical answers group."""
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    return s


def fast_equivalent(gold: str, pred: str) -> bool | None:
    """Decide without math-verify when it is trivial: identical strings, or two plain integers; else None."""
    g, p = normalize_answer(gold), normalize_answer(pred)
    if g == p:
        return True
    if _INTEGER.fullmatch(g) and _INTEGER.fullmatch(p):
        return int(g) == int(p)
    return None


# ---------------------------------------------------------------------------------------------- checker
_WORKER_MAIN = ("import importlib.util, sys\n"
                "spec = importlib.util.spec_from_file_location('_grading_checker_worker', sys.argv[1])\n"
                "module = importlib.util.module_from_spec(spec)\n"
                "sys.modules[spec.name] = module\n"
                "spec.loader.exec_module(module)\n"
                "module._checker_worker_loop(int(sys.argv[2]))\n")


def _as_boxed(answer: str) -> str:
    return f"\\boxed{{{normalize_answer(answer)}}}"


def _checker_worker_loop(memory_limit_mb: int) -> None:
    """Worker process: JSON lines {"id", "gold", "pred", "reference"} on stdin -> {"id", "ok"} or {"id", "error"} on stdout."""
    import logging
    import resource

    from math_verify import parse, verify

    if memory_limit_mb > 0:  # a pathological answer must not eat the machine before the deadline kills us
        limit = memory_limit_mb * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # our parent enforces the time limit; math-verify warns once that its own is off
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = os.fdopen(os.dup(1), "w")  # the protocol channel; anything a library prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(json.dumps({"id": -1, "ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        gold = parse(_as_boxed(req["gold"]), parsing_timeout=None)
        if not gold and not req["reference"]:  # comparing two model answers: unparsable -> not equivalent
            reply = {"id": req["id"], "ok": False}
        elif not gold:
            reply = {"id": req["id"], "error": f"math-verify cannot parse the gold answer {req['gold']!r}"}
        else:
            pred = parse(_as_boxed(req["pred"]), parsing_timeout=None)
            # verify(gold, pred): gold first, it is not symmetric
            reply = {"id": req["id"], "ok": bool(verify(gold, pred, timeout_seconds=None))}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class AnswerChecker:
    """math-verify in a persistent worker process, with a deadline per check. Thread-safe; use as a context manager.

    `equivalent(gold, pred)` -> True / False; a check that times out or crashes the worker returns False and is
    counted in `failures` ("timeout" / "crashed"); the worker is then restarted on the next check.
    A reference gold answer that math-verify cannot parse raises ValueError (a data error, not a wrong answer);
    with reference=False (two model answers compared, as in Maj@k) it is simply not equivalent.
    """

    def __init__(self, timeout_s: float = 5.0, startup_timeout_s: float = 60.0, memory_limit_mb: int = 4096):
        self.timeout_s, self.startup_timeout_s, self.memory_limit_mb = timeout_s, startup_timeout_s, memory_limit_mb
        self.failures: Counter[str] = Counter()
        self.n_checks = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] | None = None
        self._next_id = 0

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._stop_worker()

    def _start_worker(self) -> None:
        proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, os.path.abspath(__file__),
                                 str(self.memory_limit_mb)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:  # reads the worker's replies so that the caller can wait with a deadline
            with proc.stdout:
                for line in proc.stdout:
                    lines.put(line)
            lines.put(None)  # end of stream: the worker exited

        threading.Thread(target=pump, daemon=True).start()
        self._proc, self._lines = proc, lines
        reply = self._read(self.startup_timeout_s)
        if reply is None or not reply.get("ready"):
            self._stop_worker()
            what = f"did not start within {self.startup_timeout_s} s" if reply is None else "exited at startup"
            raise RuntimeError(f"the math-verify worker ({sys.executable}) {what}; its error, if any, is on stderr")

    def _stop_worker(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            try:  # stdout is closed by the reader thread when it sees the end of stream
                self._proc.stdin.close()
            except BrokenPipeError:  # a line left unflushed to the killed worker: nothing to deliver
                pass
        self._proc, self._lines = None, None

    def _read(self, timeout_s: float) -> dict | None:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            return None
        return {"id": -2, "crashed": True} if line is None else json.loads(line)

    def equivalent(self, gold: str, pred: str, reference: bool = True) -> bool:
        fast = fast_equivalent(gold, pred)
        if fast is not None:
            return fast
        with self._lock:
            self.n_checks += 1
            if self._proc is None:
                self._start_worker()
            self._next_id += 1
            req_id = self._next_id
            try:
                self._proc.stdin.write(json.dumps({"id": req_id, "gold": gold, "pred": pred, "reference": reference}) + "\n")
                self._proc.stdin.flush()
            except BrokenPipeError:
                reply = {"id": -2, "crashed": True}
            else:
                reply = self._read(self.timeout_s)
            if reply is None or reply.get("crashed"):
                self.failures["timeout" if reply is None else "crashed"] += 1
                self._stop_worker()
                return False
            if reply["id"] != req_id:
                raise RuntimeError(f"math-verify worker answered request {reply['id']}, expected {req_id}")
            if "error" in reply:
                raise ValueError(reply["error"])
            return reply["ok"]

    def grade(self, response: str, gold: str) -> bool:
        """Is the last boxed answer of `response` equivalent to `gold`? Unanswered -> False."""
        answer = extract_answer(response)
        return answer is not None and self.equivalent(gold, answer)


def grade(response: str, gold: str, checker: AnswerChecker | None = None) -> bool:
    """Is the last boxed answer of `response` equivalent to `gold`? Safe in any thread or process.

    Without `checker`, a one-shot worker is started only when the fast path cannot decide; pass a checker
    (or use `AnswerChecker.grade`) when grading many responses.
    """
    answer = extract_answer(response)
    if answer is None:
        return False
    if checker is not None:
        return checker.equivalent(gold, answer)
    fast = fast_equivalent(gold, answer)
    if fast is not None:
        return fast
    with AnswerChecker() as one_shot:
        return one_shot.equivalent(gold, answer)
