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

import re
from collections.abc import Callable
from dataclasses import dataclass

import data
import prompts
import rollout
from infra.chat_client import ChatClient

# The critic's generation budget, its <think> trace included: one default for ServerCritic, LocalCritic,
# train.py and the difficulty filter. The paper does not give one. A reasoning critic's trace counts against
# it, so it is generous; with the critic prompt (problem, reference solution, a rollout of up to 2,048 tokens)
# it still fits a 32k-token context. An answer cut by this limit is a failure (error_kind "length"), never a
# critique.
MAX_TOKENS = 16384


@dataclass
class Critique:
    text: str  # the feedback c given to the teacher (think trace removed)
    case: str | None = None  # 'A' | 'B' | 'C' | 'D' when the schema validated
    pivot_step: int | None = None  # 1-based index of the first wrong student step
    step_ok: list[bool] | None = None  # one verdict per student step
    schema_ok: bool = False
    error: str | None = None  # the backend failed for this item (text is then empty); a message for people
    # why, for counting: "refused", "timeout", "connection", "http_<status>", "malformed", "oversized", "length",
    # "empty"
    error_kind: str | None = None
    schema_error: str | None = None  # why the schema did not validate
    # where the wrong claim is in the student's response (exact_critic.ExactArithmeticCritic only; for figures)
    wrong_claim: str | None = None  # e.g. "136"
    wrong_span: tuple[int, int] | None = None  # [start, end) character offsets in the response
    corrected_claim: str | None = None  # e.g. "126"
    raw: str = ""  # the critic's answer as it came, think trace included (samples.jsonl); "" for a failure


# ---------------------------------------------------------------------------------------------- the schema
# Possessive quantifiers (*+ ++ ?+), as prompts.CORRECTED_SOLUTION_HEADER: linear in the critique whatever its
# shape, the same lines matched (each run of optional classes ends at a character none of them holds).
_CASE = re.compile(r"^[ \t]*+\**+[ \t]*+case[ \t]*+\**+[ \t]*+:[ \t]*+\**+[ \t]*+([ABCD])\b",
                   re.IGNORECASE | re.MULTILINE)
_PIVOT = re.compile(r"^[ \t]*+\**+[ \t]*+pivotal step[ \t]*+\**+[ \t]*+:[ \t]*+\**+[ \t]*+(\d++|none)\b",
                    re.IGNORECASE | re.MULTILINE)
_SUMMARY_LINE = re.compile(r"^[ \t]*+[-*]?+[ \t]*+\**+[ \t]*+step[ \t]++(\d++)[ \t]*+\**+[ \t]*+:"
                           r"[ \t]*+\**+[ \t]*+(correct|incorrect)\b", re.IGNORECASE | re.MULTILINE)


def parse_critique(raw: str, n_steps: int, think_in_prompt: bool = False) -> Critique:
    """Strip think traces and validate the schema against a student solution of `n_steps` steps.

    think_in_prompt: the critic's prompt ended with an open <think> tag (data.strip_think's `opened`).
    Linear in len(raw), whatever its shape (tests/test_parsing.py): an answer as large as the client accepts
    (infra/chat_client.MAX_ANSWER_BYTES, 16 MiB) parses in under half a second on one core, so the input needs
    no bound here and a signal waits no longer than that for a parse."""
    text = data.strip_think(raw, opened=think_in_prompt)

    def unstructured(why: str) -> Critique:
        return Critique(text=text, schema_ok=False, schema_error=why, raw=raw)

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
    try:  # int() refuses more digits than sys.get_int_max_str_digits() (ValueError); no step has that many
        indices = [int(i) for i, _ in summary]
        pivot_step = None if pivot.group(1).lower() == "none" else int(pivot.group(1))
    except ValueError:
        return unstructured("a step number of more digits than any step has")
    if indices != list(range(1, n_steps + 1)):
        return unstructured(f"summary lines for steps {indices}, expected 1..{n_steps}")
    step_ok = [verdict.lower() == "correct" for _, verdict in summary]
    first_wrong = next((i for i, ok in enumerate(step_ok, start=1) if not ok), None)
    if pivot_step != first_wrong:
        return unstructured(f"pivotal step {pivot_step} is not the first incorrect step ({first_wrong})")
    case_letter = case.group(1).upper()
    if case_letter == "A" and first_wrong is not None:
        return unstructured("case A with an incorrect step")
    return Critique(text=text, case=case_letter, pivot_step=pivot_step, step_ok=step_ok, schema_ok=True, raw=raw)


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


# Control tokens of the chat formats a served critic uses (ChatML: Qwen, QwQ; and the <|...|> family of others):
# outside text holding one would become the template's own token on the server (tokenizers parse them in text)
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z_]{1,40}\|>")


def control_tokens(*texts: str) -> list[str]:
    """The control-token strings (`<|im_end|>`, `<|endoftext|>`, ...) found in the texts, in order."""
    return [m.group(0) for text in texts for m in _CONTROL_TOKEN.finditer(text)]


class ServerCritic(ChatClient):
    """The critic behind an OpenAI-compatible chat-completions server (e.g. `vllm serve Qwen/QwQ-32B`), through the
    hardened client of infra/chat_client.py: greedy by default (temperature 0, the paper's critic; when it samples,
    each critique's seed derives from `seed` and the rollout). A request that fails gives a Critique with `error` and
    `error_kind` set. think_in_prompt: the server's chat template ends the prompt with an open <think> tag (QwQ-32B's
    does), so an answer without </think> is all trace (data.strip_think)."""

    def __init__(self, base_url: str, model: str, max_tokens: int = MAX_TOKENS, think_in_prompt: bool = False,
                 seed: int = 0, **client_options):
        super().__init__(base_url, model, max_tokens, **client_options)
        self.think_in_prompt, self.seed = think_in_prompt, seed

    def critique(self, batch: list[tuple[data.Problem, str]]) -> list[Critique]:
        """One critique per (problem, rollout). The server renders and tokenizes the chat messages itself, reading
        any control-token string in them as the template's own (vLLM has no way to say otherwise): a problem,
        reference or rollout holding one (`control_tokens`) is not sent; its critique fails with error_kind
        "control_token", counted, its rollout skipped."""
        unsafe = [control_tokens(problem.problem, problem.reference_solution or "", response)
                  for problem, response in batch]
        sent = [item for item, found in zip(batch, unsafe) if not found]
        # a sampled critique's seed: from the run seed and the rollout itself, so not from which rank asks, nor when
        seeds = [rollout.sample_seed(self.seed, "critic", problem.id, response) for problem, response in sent]
        answers = iter(self.complete([prompts.critic_messages(problem, response) for problem, response in sent],
                                     seeds))
        out = []
        for found, (_, response) in zip(unsafe, batch):
            text, error, kind = next(answers) if not found else (
                None, f"not sent: the problem, reference or rollout holds {found[0]!r}, which the critic server "
                      "would read as its chat template's control token", "control_token")
            if error is not None:
                out.append(Critique(text="", error=error, error_kind=kind,
                                    schema_error="no critique (backend error)"))
            else:
                out.append(parse_critique(text, len(data.split_steps(response)), self.think_in_prompt))
        return out


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
        messages = [prompts.critic_messages(p, r) for p, r in batch]
        texts, ids = zip(*[prompts.render_and_encode(self.tokenizer, m, self.thinking) for m in messages])
        out = []
        for prompt, (text, finish_reason), (_, r) in zip(texts, self.generate(ids), batch):
            if finish_reason == "length":
                out.append(Critique(text="", error=f"the critique was cut at max_new_tokens={self.max_new_tokens}",
                                    error_kind="length", schema_error="no critique (cut by the length limit)"))
            else:
                out.append(parse_critique(text, len(data.split_steps(r)),
                                          think_in_prompt=prompts.prompt_opens_think(prompt)))
        return out

    def generate(self, prompt_ids: list[list[int]]) -> list[tuple[str, str]]:
        """(text, finish_reason) per prompt (its token ids, prompts.encode), greedy; finish_reason "stop" (an end
        token) or "length"."""
        outs = self.engine.generate(prompt_ids, [0] * len(prompt_ids), n=1, temperature=0.0,
                                    max_new_tokens=self.max_new_tokens)  # temperature 0: argmax, the seeds unused
        return [(c.text, c.finish_reason) for [c] in outs]
