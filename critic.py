"""The critic: critiques of the solver's rollouts, parsed and validated, from a server or a local model.

- `parse_critique(raw, n_steps, think_in_prompt)` strips `<think>` traces and validates the schema of
  prompts.critic_messages (one summary line per student step, a case, a pivotal step that is the first
  Incorrect line); text that does not validate is kept with `schema_ok=False`, counted by `critique_metrics`
  as `critic_schema_ok`. Whether such a critique still reaches the teacher is train.py's
  `--critic-unstructured` (skip by default).
- Think traces, both template styles: the tag in the output ("<think>…</think>answer", Qwen3) and the tag in
  the prompt (QwQ-32B's template ends the prompt with "<think>\n", so the output is "…</think>answer").
  A critique cut by the token limit (finish_reason "length") is a failure with error_kind "length" in every
  backend, whichever the style: with the tag in the prompt it has no tag at all and would otherwise pass as
  text. `MAX_TOKENS` is the one default budget.
- Backends, each with `.critique(batch: list[(Problem, response)]) -> list[Critique]`: `ServerCritic` (an
  OpenAI-compatible /v1/chat/completions server, e.g. `vllm serve Qwen/QwQ-32B --enable-prefix-caching`;
  stdlib only), `LocalCritic` (a transformers model, greedy, batched), and exact_critic.ExactArithmeticCritic.
  A ServerCritic failure for one item (down, timeout, HTTP error, malformed answer, cut by the length limit)
  gives a Critique with `error` (a message) and `error_kind` (a short reason to count by) set: it never raises
  into the training loop and never hangs. `ServerCritic.check()` is the preflight before a run: the model
  list, then a one-token completion, through the same request path, with a short timeout; it raises
  `CriticUnavailable` with one line naming the URL and what failed (never the key). LocalCritic runs
  in-process: an exception there (out of memory) is a configuration error and is raised.

Departures from the paper:
1. A critic that runs out of tokens (finish_reason "length") gives no critique: the item is a failure
   (error_kind "length"), counted, never guessed at. The paper gives no budget; ours is MAX_TOKENS (16,384).
   An answer that ended normally but never closed its trace (`think_in_prompt`, or an unclosed "<think>")
   leaves an empty critique, which fails validation.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import data
import prompts
import rollout

# The critic's generation budget, its <think> trace included: one default for ServerCritic, LocalCritic,
# train.py and the difficulty filter. The paper does not give one. A reasoning critic's trace counts against
# it, so it is generous; with the critic prompt (problem, reference solution, a rollout of up to 2,048 tokens)
# it still fits a 32k-token context. An answer cut by this limit is a failure (error_kind "length"), never a
# critique.
MAX_TOKENS = 16384
POLL_S = 0.1  # how often a waiting ServerCritic batch calls its `interrupt` (a stop signal): seconds
# The most bytes read of one answer. A completion of MAX_TOKENS tokens, each at most a few characters that JSON may
# escape to 6 bytes each, and the same again as reasoning_content, is a few MB; a server that sends more is not
# answering a chat completion, and reading on would let it fill memory (times --critic-concurrency).
MAX_ANSWER_BYTES = 16 * 2 ** 20


@dataclass
class Critique:
    text: str  # the feedback c given to the teacher (think trace removed)
    case: str | None = None  # 'A' | 'B' | 'C' | 'D' when the schema validated
    pivot_step: int | None = None  # 1-based index of the first wrong student step
    step_ok: list[bool] | None = None  # one verdict per student step
    schema_ok: bool = False
    error: str | None = None  # the backend failed for this item (text is then empty); a message for people
    # why, for counting: "refused", "timeout", "connection", "http_<status>", "malformed", "length", "empty"
    error_kind: str | None = None
    schema_error: str | None = None  # why the schema did not validate
    # where the wrong claim is in the student's response (exact_critic.ExactArithmeticCritic only; for figures)
    wrong_claim: str | None = None  # e.g. "136"
    wrong_span: tuple[int, int] | None = None  # [start, end) character offsets in the response
    corrected_claim: str | None = None  # e.g. "126"


# ---------------------------------------------------------------------------------------------- the schema
_CASE = re.compile(r"^[ \t]*\**[ \t]*case[ \t]*\**[ \t]*:[ \t]*\**[ \t]*([ABCD])\b", re.IGNORECASE | re.MULTILINE)
_PIVOT = re.compile(r"^[ \t]*\**[ \t]*pivotal step[ \t]*\**[ \t]*:[ \t]*\**[ \t]*(\d+|none)\b",
                    re.IGNORECASE | re.MULTILINE)
_SUMMARY_LINE = re.compile(r"^[ \t]*[-*]?[ \t]*\**[ \t]*step[ \t]+(\d+)[ \t]*\**[ \t]*:[ \t]*\**[ \t]*"
                           r"(correct|incorrect)\b", re.IGNORECASE | re.MULTILINE)


def parse_critique(raw: str, n_steps: int, think_in_prompt: bool = False) -> Critique:
    """Strip think traces and validate the schema against a student solution of `n_steps` steps.

    think_in_prompt: the critic's prompt ended with an open <think> tag (data.strip_think's `opened`)."""
    text = data.strip_think(raw, opened=think_in_prompt)

    def unstructured(why: str) -> Critique:
        return Critique(text=text, schema_ok=False, schema_error=why)

    header = prompts.CORRECTED_SOLUTION_HEADER.search(text)
    if header is None:
        return unstructured("no 'Corrected solution:' line")
    if not text[header.end():].strip():
        return unstructured("the corrected solution is empty")
    head = text[:header.start()]
    case = _CASE.search(head)
    if case is None:
        return unstructured("no 'Case: A|B|C|D' line before the corrected solution")
    pivot = _PIVOT.search(head)
    if pivot is None:
        return unstructured("no 'Pivotal step: N|none' line before the corrected solution")
    summary = _SUMMARY_LINE.findall(head)
    indices = [int(i) for i, _ in summary]
    if indices != list(range(1, n_steps + 1)):
        return unstructured(f"summary lines for steps {indices}, expected 1..{n_steps}")
    step_ok = [verdict.lower() == "correct" for _, verdict in summary]
    pivot_step = None if pivot.group(1).lower() == "none" else int(pivot.group(1))
    first_wrong = next((i for i, ok in enumerate(step_ok, start=1) if not ok), None)
    if pivot_step != first_wrong:
        return unstructured(f"pivotal step {pivot_step} is not the first incorrect step ({first_wrong})")
    case_letter = case.group(1).upper()
    if case_letter == "A" and first_wrong is not None:
        return unstructured("case A with an incorrect step")
    return Critique(text=text, case=case_letter, pivot_step=pivot_step, step_ok=step_ok, schema_ok=True)


def critique_metrics(critiques: list[Critique]) -> dict[str, float]:
    """Batch metrics: critic_schema_ok (fraction that validated), critic_error (fraction the backend failed
    on; these also count as not schema_ok) and the fraction of each case among all critiques."""
    n = len(critiques)
    if n == 0:
        return {}
    metrics = {"critic_schema_ok": sum(c.schema_ok for c in critiques) / n,
               "critic_error": sum(c.error is not None for c in critiques) / n}
    for letter in "ABCD":
        metrics[f"critic_case_{letter}"] = sum(c.case == letter for c in critiques) / n
    return metrics


# ---------------------------------------------------------------------------------------------- server critic
class _RequestFailed(Exception):
    def __init__(self, message: str, retryable: bool, kind: str, detail: str = ""):
        super().__init__(message)
        self.retryable, self.kind, self.detail = retryable, kind, detail  # detail: an HTTP error's body


class CriticUnavailable(Exception):
    """The critic server failed its preflight (`ServerCritic.check`); the message is one line, without the key."""


def _network_failure(e: Exception, url: str) -> _RequestFailed:
    """An exception of http.client / the socket layer as a retryable failure with its kind."""
    reason = e
    if isinstance(reason, ConnectionRefusedError):
        kind = "refused"
    elif isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
        kind = "timeout"
    else:
        kind = "connection"  # reset, closed without an answer, unreachable host, DNS
    return _RequestFailed(f"request to {url} failed: {type(reason).__name__}: {reason}", True, kind)


class _Deadline:
    """A wall-clock limit on one HTTP exchange: at `timeout_s` a daemon timer shuts the connection's socket down, which
    ends a blocked read at once. A socket timeout alone restarts with each byte, so a server that drips its answer
    would never reach it. `batch`: the _Batch it belongs to, which cuts it the same way when the batch is abandoned."""

    def __init__(self, conn: http.client.HTTPConnection, timeout_s: float, batch: _Batch | None = None):
        self.conn, self.batch, self.expired, self.abandoned = conn, batch, False, False
        self.timer = threading.Timer(timeout_s, self.cut)
        self.timer.daemon = True  # (and cancelled when the exchange ends first)

    def cut(self, abandoned: bool = False):
        if abandoned:
            self.abandoned = True
        else:
            self.expired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed by the reader: nothing left to cut
                pass

    def __enter__(self):
        self.timer.start()
        if self.batch is not None:
            self.batch.enter(self)
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        if self.batch is not None:
            self.batch.leave(self)
        self.conn.close()


class _Batch:
    """The exchanges in flight for one ServerCritic.complete, so that abandoning the batch (a stop signal, or its
    worst case reached) cuts them all at once: their threads end within a moment, none is left waiting on a server."""

    def __init__(self):
        self.lock, self.live, self.abandoned = threading.Lock(), set(), threading.Event()

    def enter(self, deadline: _Deadline) -> None:
        with self.lock:
            self.live.add(deadline)
            if self.abandoned.is_set():  # abandoned before this exchange began: cut (its connect sees it below)
                deadline.cut(abandoned=True)

    def leave(self, deadline: _Deadline) -> None:
        with self.lock:
            self.live.discard(deadline)

    def abandon(self) -> None:
        with self.lock:
            self.abandoned.set()
            for deadline in self.live:
                deadline.cut(abandoned=True)


def _request(url: str, body: bytes | None, key: str | None, timeout_s: float, batch: _Batch | None = None) -> bytes:
    """The raw answer to one request: POST of a JSON `body`, or GET when it is None; at most `timeout_s` seconds of
    wall clock for the whole exchange (_Deadline), less if `batch` is abandoned. Redirects are never followed: the
    key goes to `url`'s server only. Raises _RequestFailed: kind "http_<status>" (retryable for 5xx, 408, 429,
    detail = the start of its body; a 3xx names where it pointed), "refused" / "timeout" / "connection"
    (retryable), "abandoned", or "malformed" (not an http(s) URL, an answer over MAX_ANSWER_BYTES; neither
    retried)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _RequestFailed(f"{url} is not an http(s) URL", False, "malformed")
    headers = {} if body is None else {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection(parts.hostname, parts.port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = _Deadline(conn, timeout_s, batch)
    try:
        with deadline:
            conn.connect()
            if deadline.abandoned:  # (cut before its socket existed)
                raise OSError("abandoned")
            conn.request("GET" if body is None else "POST", path, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_ANSWER_BYTES + 1)
            if deadline.expired or deadline.abandoned:  # (a cut read may look like a complete, shorter answer)
                raise OSError("cut at the deadline")
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, cut
        if deadline.abandoned:
            raise _RequestFailed(f"abandoned: the run is stopping (request to {url})", False, "abandoned") from None
        if deadline.expired:
            raise _RequestFailed(f"timed out after {timeout_s} s: no complete answer from {url}", True,
                                 "timeout") from None
        raise _network_failure(e, url) from None
    status = response.status
    if len(raw) > MAX_ANSWER_BYTES:  # (read no further: the connection is closed)
        raise _RequestFailed(f"HTTP {status} from {url}: an answer of more than {MAX_ANSWER_BYTES} bytes, not a chat "
                             f"completion; body starts {raw[:80]!r}", False, "malformed")
    if 300 <= status < 400:
        target = urllib.parse.urlsplit(response.getheader("Location") or "")
        where = f"{target.scheme}://{target.netloc}" if target.netloc else "the same server"
        detail = f"a redirect to {where}, not followed (the API key is sent to --critic-url only)"
        raise _RequestFailed(f"HTTP {status} from {url}: {detail}", False, f"http_{status}", detail)
    if status >= 400:
        detail = raw[:300].decode("utf-8", "replace")
        raise _RequestFailed(f"HTTP {status} from {url}: {detail}", retryable=status >= 500 or status in (408, 429),
                             kind=f"http_{status}", detail=detail)
    return raw


class ServerCritic:
    """Critic behind an OpenAI-compatible chat-completions server (stdlib only: http.client + daemon threads).

    Greedy by default (temperature 0, the paper's critic). The API key is read from the environment variable
    `api_key_env` at each request (never stored on the object, printed, logged, or put into an error message);
    when the variable is unset no Authorization header is sent (a local vLLM without --api-key needs none).
    Each request: at most `timeout_s` seconds per attempt, `max_retries` retries with exponential backoff
    (`backoff_s * 2**attempt`) on connection errors, timeouts, HTTP 5xx/408/429 and malformed answers.
    A batch never waits longer than its worst case of all attempts; an item that fails comes back as a
    Critique with `error` set. `interrupt` (train.py: runtime.StopFlag.check) is called every POLL_S seconds while a
    batch waits; when it raises, the batch is abandoned (its connections cut, no retry) and the exception propagates.

    An answer is used only when its finish_reason is "stop": one cut by `max_tokens` ("length") is a failure
    with error_kind "length" and is not retried (greedy decoding would cut it again); any other finish_reason
    is a malformed answer. think_in_prompt: the server's chat template ends the prompt with an open <think>
    tag (QwQ-32B's does), so an answer without </think> is all trace (data.strip_think).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_tokens: int = MAX_TOKENS,
                 timeout_s: float = 600.0, max_retries: int = 1, backoff_s: float = 2.0, max_workers: int = 32,
                 temperature: float = 0.0, think_in_prompt: bool = False,
                 interrupt: Callable[[], None] | None = None):
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.api_key_env, self.max_tokens = model, api_key_env, max_tokens
        self.timeout_s, self.max_retries, self.backoff_s, self.max_workers = timeout_s, max_retries, backoff_s, max_workers
        self.temperature = temperature  # 0: greedy, the paper's critic; the difficulty filter may sample
        self.think_in_prompt, self.interrupt = think_in_prompt, interrupt

    def __repr__(self) -> str:
        return (f"ServerCritic(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"timeout_s={self.timeout_s}, max_retries={self.max_retries})")

    def critique(self, batch: list[tuple[data.Problem, str]]) -> list[Critique]:
        answers = self.complete([prompts.critic_messages(problem, response) for problem, response in batch])
        out = []
        for (text, error, kind), (_, response) in zip(answers, batch):
            if error is not None:
                out.append(Critique(text="", error=error, error_kind=kind,
                                    schema_error="no critique (backend error)"))
            else:
                out.append(parse_critique(text, len(data.split_steps(response)), self.think_in_prompt))
        return out

    def complete(self, messages_batch: list[list[dict]]) -> list[tuple[str | None, str | None, str | None]]:
        """(text, None, None) or (None, error, error_kind) per conversation, in order; never raises for a failed
        request. The text is the raw answer (think trace included); error_kind "length": cut by max_tokens.
        The requests run on daemon threads (none keeps the process alive after it exits); each attempt has a hard
        wall-clock deadline, so the batch ends within its worst case: rounds of `max_workers` requests, each at most
        (max_retries + 1)·timeout_s plus its backoff. Then, or when `interrupt` raises, whatever is still in flight
        is cut (_Batch.abandon), so no thread outlives the batch by more than a moment."""
        n = len(messages_batch)
        if n == 0:
            return []
        per_request = (self.max_retries + 1) * self.timeout_s + self.backoff_s * (2 ** self.max_retries - 1)
        workers = min(self.max_workers, n)
        worst_case = math.ceil(n / workers) * per_request + 5
        results: list = [None] * n
        queue = iter(range(n))
        lock, batch = threading.Lock(), _Batch()

        def work():
            while not batch.abandoned.is_set():
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                results[i] = self._complete_one(messages_batch[i], batch)  # returns errors, does not raise

        threads = [threading.Thread(target=work, daemon=True, name=f"critic-{j}") for j in range(workers)]
        for t in threads:
            t.start()
        end = time.monotonic() + worst_case
        try:
            for t in threads:
                while t.is_alive() and time.monotonic() < end:
                    t.join(min(POLL_S, max(0.0, end - time.monotonic())))
                    if self.interrupt is not None:
                        self.interrupt()  # raises to abandon the batch (a stop signal)
            answers = list(results)
        finally:
            batch.abandon()
        return [r if r is not None else (None, f"no answer within {worst_case:.0f} s", "timeout") for r in answers]

    def _complete_one(self, messages: list[dict], batch: _Batch) -> tuple[str | None, str | None, str | None]:
        key = os.environ.get(self.api_key_env) or None
        error, kind = "no attempt made", None
        for attempt in range(self.max_retries + 1):
            if attempt > 0 and batch.abandoned.wait(self.backoff_s * 2 ** (attempt - 1)):
                break  # (the backoff, cut short when the batch is abandoned)
            try:
                return self._post(messages, key, batch), None, None
            except _RequestFailed as e:
                error, kind = _redact(f"{e} (attempt {attempt + 1} of {self.max_retries + 1})", key), e.kind
                if not e.retryable:
                    break
        return None, error, kind

    def _post(self, messages: list[dict], key: str | None, batch: _Batch) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        raw = _request(self.url, body, key, self.timeout_s, batch)
        try:
            answer = json.loads(raw)
            choice = answer["choices"][0]
            finish_reason = choice.get("finish_reason")
            # read before the content: a reasoning server may send no content at all for an answer cut short
            if finish_reason == "length":
                raise _RequestFailed(f"the answer from {self.url} was cut at max_tokens={self.max_tokens} "
                                     "(finish_reason 'length'); a truncated critique is not used", False, "length")
            message = choice["message"]
            text = message["content"]
            if finish_reason == "stop" and not (text or "").strip():
                raise _RequestFailed(f"the answer from {self.url} has an empty content (a reasoning parser that "
                                     "kept everything in reasoning_content?)", False, "empty")
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
            if finish_reason != "stop":
                raise ValueError(f"finish_reason is {finish_reason!r}, expected 'stop'")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
            raise _RequestFailed(f"malformed answer from {self.url}: {type(e).__name__}: {e}; "
                                 f"body starts {raw[:120]!r}", True, "malformed") from None
        if isinstance(message.get("reasoning_content"), str):  # a reasoning parser took the trace out of content:
            return "</think>" + text  # content is the critique alone, whichever the template (data.strip_think)
        return text

    def check(self, timeout_s: float = 10.0) -> None:
        """Preflight, before a run spends anything: the server lists `self.model`, and answers a one-token
        completion. Raises CriticUnavailable with one line naming the URL and what failed (never the key)."""
        key = os.environ.get(self.api_key_env) or None
        models_url = self.url.rsplit("/chat/completions", 1)[0] + "/models"
        probe = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "Say OK."}],
                            "temperature": 0.0, "max_tokens": 1}).encode("utf-8")
        for url, body in ((models_url, None), (self.url, probe)):
            try:
                raw = _request(url, body, key, timeout_s)
            except _RequestFailed as e:
                if e.kind in ("http_401", "http_403"):
                    status = e.kind.removeprefix("http_")
                    what = (f"HTTP {status} (unauthorized): the key in ${self.api_key_env} was refused" if key
                            else f"HTTP {status} (unauthorized): it needs an API key in ${self.api_key_env}")
                elif e.kind.startswith("http_"):
                    what = f"HTTP {e.kind.removeprefix('http_')}: {e.detail.strip()[:200]}"
                else:
                    what = {"refused": "connection refused: is the server running at --critic-url?",
                            "timeout": f"no answer within {timeout_s} s"}.get(e.kind, str(e))
                raise CriticUnavailable(_redact(f"critic server {url}: {what}", key)) from None
            try:
                answer = json.loads(raw)
                if body is None:
                    served = [m["id"] for m in answer["data"]]
                elif not isinstance(answer["choices"][0]["message"]["content"], str):
                    raise TypeError("the completion's content is not a string")
            except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
                what = f"not an OpenAI-compatible answer ({type(e).__name__}: {e}); body starts {raw[:80]!r}"
                raise CriticUnavailable(_redact(f"critic server {url}: {what}", key)) from None
            if body is None and self.model not in served:
                raise CriticUnavailable(f"critic server {url}: serves {served[:5]}, not {self.model!r} "
                                        "(--critic-model)")


def _redact(message: str, key: str | None) -> str:
    return message.replace(key, "[redacted]") if key else message


# ---------------------------------------------------------------------------------------------- local critic
class LocalCritic:
    """A critic run locally through transformers: greedy, batched, decoded by rollout.TransformersEngine (its
    stop tokens and left padding).

    `model` is a hub id or local path (loaded by rollout.load_model), or a (model, tokenizer) pair.
    An answer that reaches `max_new_tokens` without an end-of-turn token is a failure with error_kind "length",
    as in ServerCritic. Whether the prompt opened a <think> block is read from the rendered prompt itself.
    `interrupt` is called once per generated token; it raises to abandon the batch (rollout.TransformersEngine).
    """

    def __init__(self, model, max_new_tokens: int = MAX_TOKENS, batch_size: int = 8, thinking: bool = True,
                 dtype=None, device: str = "cpu", interrupt: Callable[[], None] | None = None):
        if isinstance(model, (tuple, list)):
            self.model, self.tokenizer = model
        else:
            self.model, self.tokenizer = rollout.load_model(model, dtype=dtype, device=device)
        self.max_new_tokens, self.thinking = max_new_tokens, thinking
        self.engine = rollout.TransformersEngine(self.model, self.tokenizer, batch_size=batch_size, interrupt=interrupt)

    def critique(self, batch: list[tuple[data.Problem, str]]) -> list[Critique]:
        texts = [prompts.render(self.tokenizer, prompts.critic_messages(p, r), self.thinking) for p, r in batch]
        out = []
        for prompt, (text, finish_reason), (_, r) in zip(texts, self.generate(texts), batch):
            if finish_reason == "length":
                out.append(Critique(text="", error=f"the critique was cut at max_new_tokens={self.max_new_tokens}",
                                    error_kind="length", schema_error="no critique (cut by the length limit)"))
            else:
                out.append(parse_critique(text, len(data.split_steps(r)),
                                          think_in_prompt=prompts.prompt_opens_think(prompt)))
        return out

    def generate(self, texts: list[str]) -> list[tuple[str, str]]:
        """(text, finish_reason) per rendered prompt, greedy; finish_reason "stop" (an end token) or "length"."""
        outs = self.engine.generate(texts, [0] * len(texts), n=1, temperature=0.0,
                                    max_new_tokens=self.max_new_tokens)  # temperature 0: argmax, the seeds unused
        return [(c.text, c.finish_reason) for [c] in outs]
