"""A hardened client of an OpenAI-compatible /v1/chat/completions server (stdlib only: http.client and daemon
threads), for the critic (critic.ServerCritic) and the difficulty filter.

What it guarantees, whatever the server does: every exchange has a wall-clock deadline (a server that drips its
answer is cut), a batch ends within its worst case of all attempts and at once when its `interrupt` raises (a stop
signal), no answer larger than MAX_ANSWER_BYTES is read, redirects are never followed (the API key goes to the
URL's server only), and the key is never stored, printed, logged or put into an error message, whatever its bytes (a
key that no HTTP header can carry is refused by `key_problem`, before a header holds it); nor is a password in the URL
(`http://user:pass@host/v1`: sent as HTTP Basic authentication, shown as `http://[redacted]@host/v1`). A failed request
comes back as (None, error, error_kind), never as an exception into the training loop. An answer's text is valid
Unicode (`valid_text`: a lone surrogate, which JSON's \\ud800 escape can carry, is replaced and counted).
"""
from __future__ import annotations

import base64
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

POLL_S = 0.1  # how often a waiting ServerCritic batch calls its `interrupt` (a stop signal): seconds


# The most bytes read of one answer. A completion of critic.MAX_TOKENS tokens, each at most a few characters that JSON may
# escape to 6 bytes each, and the same again as its reasoning trace, is a few MB; a server that sends more is not
# answering a chat completion, and reading on would let it fill memory (times --critic-concurrency).
MAX_ANSWER_BYTES = 16 * 2 ** 20
# The most characters an answer of max_tokens tokens may hold, per token: 8 times what real text averages (about 4)
MAX_CHARS_PER_TOKEN = 32
# Where a chat answer holds the trace a reasoning parser took out of content: vLLM 0.32's name, then the older one
REASONING_FIELDS = ("reasoning", "reasoning_content")


_USERINFO = re.compile(r"(?<=://)[^/?#]*@")  # the `user:pass@` of a URL (a password may hold '@': up to the last)
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # (a valid pair is one character once decoded)


def redact_url(url: str) -> str:
    """`url` with its userinfo (user:password@) replaced by [redacted]@: how a URL is shown in any output or file."""
    return _USERINFO.sub("[redacted]@", url, count=1) if isinstance(url, str) else url


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a server's base URL (one phrase, the URL itself not repeated), or None."""
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in url):
        return "holds a space or a control character"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be http(s)://HOST[:PORT]/v1"
    try:
        parts.port  # (urllib raises for a port outside 0-65535 or not a number)
    except ValueError as e:
        return f"has a bad port ({e})"
    if (parts.username or parts.password) and not (parts.username or "").isascii():
        return "its user name must be ASCII"
    return None


def key_problem(key: str) -> str | None:
    """Why `key` cannot be sent as a Bearer token (one phrase that never holds the key), or None: it must be
    printable ASCII without spaces (RFC 6750's token; http.client refuses a control character in a header, and its
    error would print the header, key included)."""
    for i, ch in enumerate(key):
        if not 0x21 <= ord(ch) <= 0x7E:
            what = "a space" if ch == " " else f"the character U+{ord(ch):04X}"
            return (f"it holds {what} at position {i + 1} of {len(key)} (a trailing newline or \\r?); an API key is "
                    "printable ASCII without spaces")
    return None


def valid_text(text: str) -> tuple[str, int]:
    """(text as valid Unicode, the number of lone surrogates replaced by U+FFFD). Outside text enters here once: a
    lone surrogate cannot be encoded as UTF-8, so a tokenizer or a file write would fail on it later."""
    return _LONE_SURROGATE.subn("\ufffd", text)


class RequestFailed(Exception):
    def __init__(self, message: str, retryable: bool, kind: str, detail: str = ""):
        super().__init__(message)
        self.retryable, self.kind, self.detail = retryable, kind, detail  # detail: an HTTP error's body


class CriticUnavailable(Exception):
    """The critic server failed its preflight (`ServerCritic.check`); the message is one line, without the key."""


def _network_failure(e: Exception, url: str) -> RequestFailed:
    """An exception of http.client / the socket layer as a retryable failure with its kind."""
    reason = e
    if isinstance(reason, ConnectionRefusedError):
        kind = "refused"
    elif isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
        kind = "timeout"
    else:
        kind = "connection"  # reset, closed without an answer, unreachable host, DNS
    return RequestFailed(f"request to {url} failed: {type(reason).__name__}: {reason}", True, kind)


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


def request(url: str, body: bytes | None, key: str | None, timeout_s: float, batch: _Batch | None = None) -> bytes:
    """The raw answer to one request: POST of a JSON `body`, or GET when it is None; at most `timeout_s` seconds of
    wall clock for the whole exchange (_Deadline), less if `batch` is abandoned. Redirects are never followed: the
    key goes to `url`'s server only. Raises RequestFailed: kind "http_<status>" (retryable for 5xx, 408, 429,
    detail = the start of its body; a 3xx names where it pointed), "refused" / "timeout" / "connection"
    (retryable), "abandoned", "malformed" (not an http(s) URL) or "oversized" (an answer over MAX_ANSWER_BYTES;
    neither retried)."""
    shown = redact_url(url)
    problem = url_problem(url)
    if problem:
        raise RequestFailed(f"{shown}: {problem}", False, "malformed")
    parts = urllib.parse.urlsplit(url)
    headers = {} if body is None else {"Content-Type": "application/json"}
    if key and key_problem(key):
        raise RequestFailed(f"the API key is refused before it is sent: {key_problem(key)}", False, "bad_key")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    elif parts.username is not None:  # credentials in the URL: HTTP Basic authentication (RFC 7617)
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
    url = shown  # (from here on, only in messages)
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
            raise RequestFailed(f"abandoned: the run is stopping (request to {url})", False, "abandoned") from None
        if deadline.expired:
            raise RequestFailed(f"timed out after {timeout_s} s: no complete answer from {url}", True,
                                 "timeout") from None
        raise _network_failure(e, url) from None
    status = response.status
    if len(raw) > MAX_ANSWER_BYTES:  # (read no further: the connection is closed)
        raise RequestFailed(f"HTTP {status} from {url}: an answer of more than {MAX_ANSWER_BYTES} bytes, not a chat "
                             f"completion; body starts {raw[:80]!r}", False, "oversized")
    if 300 <= status < 400:
        target = urllib.parse.urlsplit(response.getheader("Location") or "")
        where = f"{target.scheme}://{target.netloc}" if target.netloc else "the same server"
        detail = f"a redirect to {where}, not followed (the API key is sent to --critic-url only)"
        raise RequestFailed(f"HTTP {status} from {url}: {detail}", False, f"http_{status}", detail)
    if status >= 400:
        detail = raw[:300].decode("utf-8", "replace")
        raise RequestFailed(f"HTTP {status} from {url}: {detail}", retryable=status >= 500 or status in (408, 429),
                             kind=f"http_{status}", detail=detail)
    return raw


def redact(message: str, key: str | None) -> str:
    return message.replace(key, "[redacted]") if key else message


class ChatClient:
    """A client of one model behind an OpenAI-compatible chat-completions server.

    The API key is read from the environment variable `api_key_env` at each request (never stored on the object,
    printed, logged, or put into an error message); when the variable is unset no Authorization header is sent (a
    local vLLM without --api-key needs none). Each request: at most `timeout_s` seconds per attempt, `max_retries`
    retries with exponential backoff (`backoff_s * 2**attempt`) on connection errors, timeouts, HTTP 5xx/408/429
    and malformed answers. A batch never waits longer than its worst case of all attempts; an item that fails comes
    back as (None, error, error_kind). `interrupt` (train.py: infra.signals.StopFlag.check) is called every POLL_S
    seconds while a batch waits; when it raises, the batch is abandoned (its connections cut, no retry) and the
    exception propagates.

    An answer is used only when its finish_reason is "stop": one cut by `max_tokens` ("length") is a failure with
    error_kind "length" and is not retried (greedy decoding would cut it again); any other finish_reason is a
    malformed answer. Decoding: `temperature` 0 is greedy (then `top_p` and the seeds are not sent); above 0, each
    request samples with `top_p` and its own seed (`complete`'s seeds), so a sampled answer can be reproduced.
    """

    def __init__(self, base_url: str, model: str, max_tokens: int, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 600.0, max_retries: int = 1, backoff_s: float = 2.0, max_workers: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, interrupt: Callable[[], None] | None = None):
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.shown_url = redact_url(self.url)  # (the URL in messages: without a password it may hold)
        self._count = threading.Lock()
        self.repaired = 0  # answers whose text held lone surrogates, replaced (valid_text); counted, not failed
        self.model, self.api_key_env, self.max_tokens = model, api_key_env, max_tokens
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_workers, self.temperature, self.top_p, self.interrupt = max_workers, temperature, top_p, interrupt

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(url={self.shown_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
                f"timeout_s={self.timeout_s}, max_retries={self.max_retries})")

    def complete(self, messages_batch: list[list[dict]], seeds: list[int] | None = None
                 ) -> list[tuple[str | None, str | None, str | None]]:
        """(text, None, None) or (None, error, error_kind) per conversation, in order; never raises for a failed
        request. seeds: one per conversation, sent when the client samples (temperature > 0); default 0 each. The text is the raw answer (think trace included); error_kind "length": cut by max_tokens.
        The requests run on daemon threads (none keeps the process alive after it exits); each attempt has a hard
        wall-clock deadline, so the batch ends within its worst case: rounds of `max_workers` requests, each at most
        (max_retries + 1)·timeout_s plus its backoff. Then, or when `interrupt` raises, whatever is still in flight
        is cut (_Batch.abandon), so no thread outlives the batch by more than a moment."""
        n = len(messages_batch)
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} conversations")
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
                seed = 0 if seeds is None else seeds[i]
                results[i] = self._complete_one(messages_batch[i], seed, batch)  # returns errors, does not raise

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

    def _complete_one(self, messages: list[dict], seed: int, batch: _Batch
                      ) -> tuple[str | None, str | None, str | None]:
        key = os.environ.get(self.api_key_env) or None
        error, kind = "no attempt made", None
        for attempt in range(self.max_retries + 1):
            if attempt > 0 and batch.abandoned.wait(self.backoff_s * 2 ** (attempt - 1)):
                break  # (the backoff, cut short when the batch is abandoned)
            try:
                return self._post(messages, seed, key, batch), None, None
            except RequestFailed as e:
                error, kind = redact(f"{e} (attempt {attempt + 1} of {self.max_retries + 1})", key), e.kind
                if not e.retryable:
                    break
        return None, error, kind

    def _post(self, messages: list[dict], seed: int, key: str | None, batch: _Batch) -> str:
        fields = {"model": self.model, "messages": messages, "temperature": self.temperature,
                  "max_tokens": self.max_tokens}
        if self.temperature > 0:  # (vLLM: below 1e-5 is greedy, and top_p and the seed are ignored)
            fields |= {"top_p": self.top_p, "seed": seed}
        body = json.dumps(fields).encode("utf-8")
        raw = request(self.url, body, key, self.timeout_s, batch)
        try:
            answer = json.loads(raw)
            choice = answer["choices"][0]
            finish_reason = choice.get("finish_reason")
            # read before the content: a reasoning server may send no content at all for an answer cut short
            if finish_reason == "length":
                raise RequestFailed(f"the answer from {self.shown_url} was cut at max_tokens={self.max_tokens} "
                                     "(finish_reason 'length'); a truncated critique is not used", False, "length")
            message = choice["message"]
            text = message["content"]
            if finish_reason == "stop" and not (text or "").strip():
                raise RequestFailed(f"the answer from {self.shown_url} has an empty content (a reasoning parser that "
                                     "kept everything in the reasoning field?)", False, "empty")
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
            if finish_reason != "stop":
                raise ValueError(f"finish_reason is {finish_reason!r}, expected 'stop'")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
            raise RequestFailed(f"malformed answer from {self.shown_url}: {type(e).__name__}: {e}; "
                                 f"body starts {raw[:120]!r}", True, "malformed") from None
        # A reasoning parser (vLLM's --reasoning-parser) took the trace out of content, into `reasoning` (vLLM 0.32:
        # ChatMessage.reasoning, vllm/entrypoints/openai/chat_completion/protocol.py) or `reasoning_content` (its
        # older name, still sent by other servers): content is then the critique alone, whichever the template.
        trace = next((message[f] for f in REASONING_FIELDS if isinstance(message.get(f), str)), None)
        # No tokenizer writes more than MAX_CHARS_PER_TOKEN characters a token on average over an answer (real text:
        # about 4): a longer one is not what max_tokens tokens decode to. Refused here, before it becomes a teacher
        # prompt whose tokenization (one call, seconds for megabytes) a stop signal would have to wait for.
        chars = len(text) + len(trace or "")
        if chars > self.max_tokens * MAX_CHARS_PER_TOKEN:
            raise RequestFailed(f"the answer from {self.shown_url} has {chars} characters, more than max_tokens="
                                f"{self.max_tokens} tokens decode to (at most {MAX_CHARS_PER_TOKEN} a token): not a "
                                "completion of this request", False, "oversized")
        text, replaced = valid_text(text)  # outside text becomes valid Unicode here, once
        if replaced:
            with self._count:
                self.repaired += 1
        if trace is not None:
            return "</think>" + text  # (data.strip_think keeps what follows the tag)
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
                raw = request(url, body, key, timeout_s)
            except RequestFailed as e:
                if e.kind == "bad_key":
                    what = f"the key in ${self.api_key_env} is refused before it is sent: {key_problem(key)}"
                elif e.kind in ("http_401", "http_403"):
                    status = e.kind.removeprefix("http_")
                    what = (f"HTTP {status} (unauthorized): the key in ${self.api_key_env} was refused" if key
                            else f"HTTP {status} (unauthorized): it needs an API key in ${self.api_key_env}")
                elif e.kind.startswith("http_"):
                    what = f"HTTP {e.kind.removeprefix('http_')}: {e.detail.strip()[:200]}"
                else:
                    what = {"refused": "connection refused: is the server running at --critic-url?",
                            "timeout": f"no answer within {timeout_s} s"}.get(e.kind, str(e))
                raise CriticUnavailable(redact(f"critic server {redact_url(url)}: {what}", key)) from None
            try:
                answer = json.loads(raw)
                if body is None:
                    served = [m["id"] for m in answer["data"]]
                else:
                    message = answer["choices"][0]["message"]
                    # a reasoning server's one token is trace: vLLM 0.32 with --reasoning-parser deepseek_r1 then
                    # sends content null and the token in `reasoning` (no </think> yet), a well-formed answer
                    if not (isinstance(message["content"], str)
                            or message["content"] is None and any(isinstance(message.get(field), str)
                                                                  for field in REASONING_FIELDS)):
                        raise TypeError("the completion's content is not a string, and no reasoning field is")
            except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
                what = f"not an OpenAI-compatible answer ({type(e).__name__}: {e}); body starts {raw[:80]!r}"
                raise CriticUnavailable(redact(f"critic server {redact_url(url)}: {what}", key)) from None
            if body is None and self.model not in served:
                raise CriticUnavailable(f"critic server {redact_url(url)}: serves {served[:5]}, not {self.model!r} "
                                        "(--critic-model)")
