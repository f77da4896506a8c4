"""Generation (seeding, greedy vs transformers' generate, stop handling) and scoring alignment."""
import os

import pytest
import torch

from conftest import log_softmax_rounding, logit_rounding, tiny_llama
from rollout import (Completion, ScoreBatch, TransformersEngine, VLLMEngine, final_hidden, sample_seed,
                     score_positions, stop_token_ids, token_logprobs_from_hidden)

# A Qwen3-style template (our own), with the thinking switch: enable_thinking=False appends an empty trace.
QWEN3_STYLE_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}")


def chat_prompt(tokenizer, text) -> list[int]:
    """A one-turn chat prompt's ids, as every caller of an engine gives them (prompts.encode)."""
    import prompts
    return prompts.encode(tokenizer, [{"role": "user", "content": text}], thinking=False)


def test_sample_seed_is_deterministic_and_distinct():
    assert sample_seed(0, 3, "p1", 0) == sample_seed(0, 3, "p1", 0)
    assert len({sample_seed(0, 3, "p1", j) for j in range(100)}) == 100
    assert 0 <= sample_seed("x") < 2**63


def test_greedy_matches_transformers_generate(tiny_smol):
    model, tok = tiny_smol
    engine = TransformersEngine(model, tok, batch_size=8)
    prompts = [chat_prompt(tok, "What is 2 + 2?"), chat_prompt(tok, "Add 17 and 25, then multiply by 3.")]
    outs = engine.generate(prompts, seeds=[0, 1], n=1, temperature=0, max_new_tokens=12)
    for prompt, [c] in zip(prompts, outs):
        ids = torch.tensor([prompt])  # (1, L)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, eos_token_id=sorted(engine.stop_ids), pad_token_id=engine.pad_id)
        assert c.token_ids == ref[0, ids.shape[1]:].tolist()  # left padding changes nothing


def test_sampling_does_not_depend_on_batch_split(tiny_smol):
    model, tok = tiny_smol
    prompts = [chat_prompt(tok, f"Problem {i}: compute {i} * 7.") for i in range(4)]
    seeds = [sample_seed(0, 0, f"p{i}") for i in range(4)]
    together = TransformersEngine(model, tok, batch_size=12).generate(prompts, seeds, n=3, temperature=1.0,
                                                                      max_new_tokens=10)
    one_by_one = TransformersEngine(model, tok, batch_size=1)
    for i in (3, 1):  # another order, another batch composition
        alone = one_by_one.generate([prompts[i]], [seeds[i]], n=3, temperature=1.0, max_new_tokens=10)[0]
        assert [c.token_ids for c in alone] == [c.token_ids for c in together[i]]
    # samples of one prompt differ from each other (their seeds differ)
    assert len({tuple(c.token_ids) for c in together[0]}) > 1


def test_finish_reason_and_stop_token(tiny_smol):
    model, tok = tiny_smol
    stop = sorted(stop_token_ids(model, tok))
    bias = torch.zeros(model.config.vocab_size)
    bias[stop[0]] = 11.0  # e^11 against ~49k near-uniform logits: p(end of turn) ≈ 0.5
    model.lm_head.bias = torch.nn.Parameter(bias)
    engine = TransformersEngine(model, tok)
    outs = engine.generate([chat_prompt(tok, "hi")], [0], n=2, temperature=1.0, max_new_tokens=8)[0]
    lengths = [len(c.token_ids) for c in outs]
    for c in outs:
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in engine.stop_ids and all(t not in engine.stop_ids for t in c.token_ids[:-1])
        else:
            assert len(c.token_ids) == 8
    assert max(lengths) <= 8
    assert any(c.finish_reason == "stop" for c in outs)


def test_an_ended_sample_leaves_the_batch_and_the_others_decode_as_alone(smollm2):
    """Samples end at different steps: each leaves the batch when it ends, with its cache rows, and every sample is
    the one it is when decoded alone. Greedy, so that each token depends on the sample's own cache (a sampled token
    of a random model barely does); the stop set ends sample i at its token 2 + 3i or earlier."""
    model, tok = smollm2
    prompts = [chat_prompt(tok, q) for q in ("What is 2 + 3?", "Name a colour.", "Say hello in French.",
                                             "Count from one to five.")]
    alone = TransformersEngine(model, tok, batch_size=1)
    free = [alone.generate([p], [0], temperature=0, max_new_tokens=12)[0][0].token_ids for p in prompts]
    alone.stop_ids = {ids[2 + 3 * i] for i, ids in enumerate(free[:3])}
    together = TransformersEngine(model, tok, batch_size=4)
    together.stop_ids = alone.stop_ids
    batched = [c.token_ids for [c] in together.generate(prompts, [0] * 4, temperature=0, max_new_tokens=12)]
    assert len({len(ids) for ids in batched}) >= 3  # the batch did shrink, more than once
    assert batched == [alone.generate([p], [0], temperature=0, max_new_tokens=12)[0][0].token_ids for p in prompts]


def test_length_finish(tiny_smol):
    model, tok = tiny_smol
    c = TransformersEngine(model, tok).generate([tok("Once upon a time").input_ids], [0], n=1, temperature=1.0,
                                                  max_new_tokens=5)[0][0]
    assert isinstance(c, Completion) and (c.finish_reason == "length") == (len(c.token_ids) == 5)


def test_vllm_engine_clear_error_without_vllm(monkeypatch):
    """Whether or not vllm is installed here: without it, the error says what to install on GPU and on CPU."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match=r"requirements-gpu\.txt.*VLLM_CPU=1 bash setup\.sh"):
        VLLMEngine("some/model")


def test_vllm_engine_kwargs_keep_the_kv_cache_size_under_torchrun():
    """--vllm-kv-cache-gib reaches vLLM with one process and under torchrun (there the launcher's arguments are
    added to the others, issue 20: they used to replace them)."""
    from rollout import vllm_engine_kwargs
    common = dict(model="m", enable_lora=True, dtype="float32", seed=3, max_lora_rank=16, enable_prefix_caching=True,
                  gpu_memory_utilization=0.25, enforce_eager=False)
    launcher = dict(distributed_executor_backend="external_launcher", tensor_parallel_size=1, data_parallel_size=2)
    kv = dict(kv_cache_memory_bytes=3 * 2**29)
    assert vllm_engine_kwargs("m", 10, 0.25, "float32", 3, 1, 0.0) == common
    assert vllm_engine_kwargs("m", 10, 0.25, "float32", 3, 1, 1.5) == common | kv
    assert vllm_engine_kwargs("m", 10, 0.25, "float32", 3, 2, 0.0) == common | launcher
    assert vllm_engine_kwargs("m", 10, 0.25, "float32", 3, 2, 1.5) == common | kv | launcher
    assert vllm_engine_kwargs("m", 10, 0.25, "float32", 3, 1, 0.0, enforce_eager=True) == common | {
        "enforce_eager": True}  # --vllm-enforce-eager: no CUDA graphs, no torch.compile
    with pytest.raises(ValueError, match="rank at most 512"):
        vllm_engine_kwargs("m", 513, 0.25, "float32", 3, 1, 0.0)


def test_the_model_runner_choice_reaches_vllm_through_its_environment_variable(monkeypatch):
    """--vllm-model-runner v1 / v2 set VLLM_USE_V2_MODEL_RUNNER to 0 / 1 before vLLM reads it; auto leaves vLLM's
    default. The engine is not built: the variable is set before vllm.LLM is called, which fails on a bad path."""
    import importlib.util
    from rollout import MODEL_RUNNER_ENV, VLLMEngine
    assert MODEL_RUNNER_ENV == {"auto": None, "v1": "0", "v2": "1"}
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (VLLM_CPU=1 bash setup.sh)")
    for choice, value in (("v1", "0"), ("v2", "1"), ("auto", "1")):  # auto: the v2 run's value is left as it was
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1") if choice == "auto" else \
            monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
        with pytest.raises(Exception):
            VLLMEngine("/nonexistent/model", model_runner=choice)
        assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == value


def test_vllm_close_says_what_to_do_where_vllm_moved_its_shutdown():
    """close() uses vLLM's internal engine-client shutdown (vLLM's LLM has no public one): where it is missing, the
    error names the tested version and the pin, instead of an AttributeError from inside vLLM."""
    import rollout
    engine = object.__new__(VLLMEngine)
    engine.llm = object()  # an LLM without llm_engine.engine_core.shutdown
    with pytest.raises(RuntimeError, match=rf"tested with \(vLLM {rollout.VLLM_TESTED}\).*requirements-gpu\.txt"):
        engine.close()


def test_make_engine_checks_its_arguments(tiny_smol):
    import rollout
    engine = rollout.make_engine("transformers", "unused", *tiny_smol, stop_at_boxed=True, batch_size=5)
    assert isinstance(engine, TransformersEngine) and engine.stop_at_boxed and engine.batch_size == 5
    with pytest.raises(ValueError, match="pass the loaded model"):
        rollout.make_engine("transformers", "some/model")
    with pytest.raises(ValueError, match="unknown engine 'hf'"):
        rollout.make_engine("hf", "some/model")


def test_score_positions_layout():
    batch = score_positions([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert isinstance(batch, ScoreBatch)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert batch.positions.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with pytest.raises(ValueError, match="row 0: empty prompt"):
        score_positions([[]], [[1]], pad_id=0)


def test_hidden_and_logprobs_equal_full_forward():
    model = tiny_llama(97, seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (4, 7)]
    ys = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 2)]
    batch = score_positions(prompts, ys, pad_id=0)
    h = final_hidden(model, batch)  # (B, T, D)
    lp = token_logprobs_from_hidden(h, model.lm_head.weight, batch.tokens, chunk_size=3)
    for b, (p, y) in enumerate(zip(prompts, ys)):
        logits = model(torch.tensor([p + y])).logits[0]  # (L, V), one sequence alone, no padding
        ref = torch.log_softmax(logits[len(p) - 1:len(p) - 1 + len(y)], -1)
        ref = ref.gather(-1, torch.tensor(y)[:, None]).squeeze(-1)
        # log π(y_t) = z_y − logsumexp(z): each logit within δz (padded and batched against alone: the matrix
        # products block differently), so ≤ 2δz, plus the two log-softmaxes' own rounding
        bound = 2 * logit_rounding(model, len(p) + len(y)) + log_softmax_rounding(logits).max().item()
        torch.testing.assert_close(lp[b, :len(y)], ref, atol=bound, rtol=0)


@pytest.mark.parametrize("template", ["smollm2", "qwen3_style"])
@pytest.mark.parametrize("student_thinking,teacher_thinking", [(False, True), (True, True), (False, False)])
def test_student_and_teacher_score_identical_rollout_tokens(smol_tokenizer, template, student_thinking,
                                                            teacher_thinking):
    from prompts import encode, render, student_messages, teacher_messages
    from demo.arithmetic import arithmetic_problems
    tok = smol_tokenizer
    if template == "qwen3_style":
        tok = type(tok).from_pretrained(tok.name_or_path)
        tok.chat_template = QWEN3_STYLE_TEMPLATE
    problem = arithmetic_problems(1, seed=0)[0]
    student_prompt = render(tok, student_messages(problem), thinking=student_thinking)
    teacher = teacher_messages(problem, "refsol", problem.reference_solution)
    if template == "qwen3_style":
        assert student_prompt.endswith("<think>\n\n</think>\n\n") == (not student_thinking)
    y = tok("Step 1: 3 + 4 = 7\n\\boxed{7}<|im_end|>", add_special_tokens=False).input_ids
    s_ids = encode(tok, student_messages(problem), thinking=student_thinking)
    t_ids = encode(tok, teacher, thinking=teacher_thinking)
    s, t = score_positions([s_ids], [y], tok.pad_token_id), score_positions([t_ids], [y], tok.pad_token_id)
    # the token after each scored position is y_t, in both sequences
    assert s.input_ids[0, s.positions[0] + 1].tolist() == y
    assert t.input_ids[0, t.positions[0] + 1].tolist() == y
    assert torch.equal(s.tokens, t.tokens) and torch.equal(s.mask, t.mask)
    assert len(t_ids) > len(s_ids)  # the teacher's context is longer (it contains c)


def test_closes_boxed():
    from rollout import closes_boxed
    assert closes_boxed("Step 1: 3 + 4 = 7\n\\boxed{7}")
    assert closes_boxed("\\boxed{\\frac{1}{2}} and more")
    assert not closes_boxed("\\boxed{\\frac{1}{2}")
    assert not closes_boxed("the answer is {7}")
    assert not closes_boxed("\\boxed")


def test_stop_at_boxed_ends_the_sample_at_the_closing_brace(tiny_smol):
    model, tok = tiny_smol
    engine = TransformersEngine(model, tok, stop_at_boxed=True)
    ids = tok("Step 1: 3 + 4 = 7\n\\boxed{7}", add_special_tokens=False).input_ids
    ends = [engine._is_end(ids[:i]) for i in range(1, len(ids) + 1)]
    assert ends[-1] and not any(ends[:-1])
    assert not TransformersEngine(model, tok)._is_end(ids)  # off by default


def test_generate_without_adapter_samples_the_base_policy(smol_tokenizer):
    import lora
    tok = smol_tokenizer
    base = tiny_llama(len(tok), seed=4)
    with_lora = lora.add_lora(tiny_llama(len(tok), seed=4), r=4, alpha=8)
    for layer in lora.lora_layers(with_lora).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=1.0)  # a policy far from the base
    prompt = [chat_prompt(tok, "What is 3 + 4?")]
    kw = dict(seeds=[7], n=2, temperature=1.0, max_new_tokens=8)
    ref = TransformersEngine(base, tok).generate(prompt, **kw)
    off = TransformersEngine(with_lora, tok).generate(prompt, adapter=False, **kw)
    on = TransformersEngine(with_lora, tok).generate(prompt, **kw)
    assert [c.token_ids for c in off[0]] == [c.token_ids for c in ref[0]]
    assert [c.token_ids for c in on[0]] != [c.token_ids for c in ref[0]]
