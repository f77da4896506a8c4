"""Qwen3's thinking switch through a Qwen3-format template: bench/random_qwen3.py's built-in tokenizer (its template
bench/qwen3_chat_template.jinja), saved with a tiny random Qwen3 and loaded as train.py loads it, renders the
project's real prompts (prompts.py, with config.Config's thinking switches: student off, teacher on); each is checked
as a string and token by token against the ChatML sequence built piece by piece (DESIGN.md, "Qwen3 chat template")."""
import importlib.util
from pathlib import Path

import pytest

import prompts
import rollout
from config import Config
from data import Problem

ROOT = Path(__file__).resolve().parent.parent
ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")  # one id each
PROBLEM = Problem("t1", "Start with 17. Add 25, then multiply the result by 3, then subtract 4. "
                  "What is the final number?", "122", reference_solution="((17 + 25) × 3) − 4 = 122, \\boxed{122}",
                  steps=("17 + 25 = 42", "42 * 3 = 126", "126 - 4 = 122"))
CRITIQUE = prompts.format_critique("D", 2, [True, False], [None, "42 * 3 = 126, not 136"],
                                   "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 4 = 122\n\\boxed{122}")


def load_random_qwen3():
    spec = importlib.util.spec_from_file_location("random_qwen3", ROOT / "bench" / "random_qwen3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """(model, tokenizer): a tiny random Qwen3 with the built-in tokenizer, written by save_random_qwen3 without a
    tokenizer folder and read back by rollout.load_model, as train.py reads --model."""
    out = tmp_path_factory.mktemp("qwen3")
    load_random_qwen3().save_random_qwen3(None, str(out), tiny=True)
    return rollout.load_model(str(out))


def pieces_to_ids(tokenizer, pieces: list[str]) -> list[int]:
    """The expected ids, piece by piece: an added token is its one id; any other piece is encoded as text alone."""
    ids = []
    for piece in pieces:
        if piece in ADDED:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=True).input_ids
    return ids


def check(tokenizer, text: str, pieces: list[str]) -> list[int]:
    """The rendered text is the pieces joined, and its ids (tokenized as feedback.py tokenizes a rendered prompt)
    are the pieces' ids, one by one."""
    assert text == "".join(pieces)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    expected = pieces_to_ids(tokenizer, pieces)
    assert tokenizer.convert_ids_to_tokens(ids) == tokenizer.convert_ids_to_tokens(expected)
    assert ids == expected
    return ids


def turn(role: str, content: str) -> list[str]:
    return ["<|im_start|>", f"{role}\n{content}", "<|im_end|>", "\n"]


def test_the_tokenizer_has_qwen3s_added_tokens(qwen3):
    model, tok = qwen3
    added = {t.content: (i, t.special) for i, t in tok.added_tokens_decoder.items()}
    assert {name: special for name, (_, special) in added.items()} == {
        "<|endoftext|>": True, "<|im_start|>": True, "<|im_end|>": True, "<think>": False, "</think>": False}
    for name, (i, special) in added.items():
        assert tok(name, add_special_tokens=False).input_ids == [i]
        # split_special_tokens=True makes a special token text; the thinking tags stay one id (so in Qwen3)
        assert (tok(name, add_special_tokens=False, split_special_tokens=True).input_ids != [i]) == special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.convert_tokens_to_ids("<|im_end|>") in rollout.stop_token_ids(model, tok)
    assert model.config.vocab_size == len(tok)  # --tiny: the tokenizer's vocabulary


def test_student_prompt_has_thinking_off_and_ends_with_an_empty_thought(qwen3):
    _, tok = qwen3
    assert Config().student_thinking is False  # the paper's setup
    text = prompts.render(tok, prompts.student_messages(PROBLEM), Config().student_thinking)
    content = prompts.student_messages(PROBLEM)[0]["content"]
    ids = check(tok, text, turn("user", content) + ["<|im_start|>", "assistant\n", "<think>", "\n\n", "</think>",
                                                    "\n\n"])
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    nn = tok("\n\n", add_special_tokens=False).input_ids
    assert len(nn) == 1  # as in Qwen3, where "\n\n" is one id: the empty thought is 4 ids
    assert ids[-4:] == [tok.convert_tokens_to_ids("<think>")] + nn + [tok.convert_tokens_to_ids("</think>")] + nn
    assert not prompts.prompt_opens_think(text)
    # a decode that skips special tokens drops the ChatML markers and keeps the thinking tags (not special)
    assert tok.decode(ids, skip_special_tokens=True) == f"user\n{content}\nassistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize("feedback, context", [("stepalign", CRITIQUE), ("refsol", PROBLEM.reference_solution)])
def test_teacher_prompt_has_thinking_on_and_ends_with_the_assistant_turn(qwen3, feedback, context):
    _, tok = qwen3
    assert Config().teacher_thinking is True  # the paper's setup
    messages = prompts.teacher_messages(PROBLEM, feedback, context)
    text = prompts.render(tok, messages, Config().teacher_thinking)
    ids = check(tok, text, turn("user", messages[0]["content"]) + ["<|im_start|>", "assistant\n"])
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "<think>" not in text
    tail = pieces_to_ids(tok, ["<|im_end|>", "\n", "<|im_start|>", "assistant\n"])
    assert ids[-len(tail):] == tail
    # enable_thinking unset is thinking on (Qwen3's default)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text


def test_an_earlier_assistant_turn_loses_its_thought(qwen3):
    """Teacher layout "turns": the attempt y is an assistant turn before the last user turn; rendered, it keeps the
    answer after </think> only, in both thinking modes."""
    _, tok = qwen3
    answer = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\n\\boxed{132}"
    attempt = f"<think>\nFirst add, then multiply.\n</think>\n\n{answer}"
    messages = prompts.teacher_messages(PROBLEM, "stepalign", CRITIQUE, "turns", attempt=attempt)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and messages[1]["content"] == attempt
    history = turn("user", messages[0]["content"]) + turn("assistant", answer) + turn("user", messages[2]["content"])
    check(tok, prompts.render(tok, messages, thinking=True), history + ["<|im_start|>", "assistant\n"])
    check(tok, prompts.render(tok, messages, thinking=False),
          history + ["<|im_start|>", "assistant\n", "<think>", "\n\n", "</think>", "\n\n"])
    # an earlier turn without a thought renders as it is (no empty thought added to history)
    plain = prompts.teacher_messages(PROBLEM, "stepalign", CRITIQUE, "repeat")
    assert [m["role"] for m in plain] == ["user", "assistant", "user"]
    check(tok, prompts.render(tok, plain, thinking=True),
          turn("user", plain[0]["content"]) + turn("assistant", plain[1]["content"]) + turn("user", plain[2]["content"])
          + ["<|im_start|>", "assistant\n"])


def test_assistant_turns_after_the_last_user_turn_keep_their_thought(qwen3):
    """Qwen3's rule for turns after the last user turn: the last message gets <think>\\n{thought}\\n</think>\\n\\n
    (empty if it has none); an earlier one only if it has a thought. With no user turn, all is history."""
    _, tok = qwen3
    user = {"role": "user", "content": "What is 2 + 3?"}

    def render(*assistant):
        return tok.apply_chat_template([user, *({"role": "assistant", "content": c} for c in assistant)],
                                       tokenize=False)

    head = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert render("<think>\nadd\n</think>\n\n5") == head + "<think>\nadd\n</think>\n\n5<|im_end|>\n"
    assert render("5") == head + "<think>\n\n</think>\n\n5<|im_end|>\n"
    assert render("4", "5") == head + "4<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n5<|im_end|>\n"
    assert tok.apply_chat_template([user, {"role": "assistant", "content": "5", "reasoning_content": "add"}],
                                   tokenize=False) == head + "<think>\nadd\n</think>\n\n5<|im_end|>\n"
    no_user = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "<think>x</think>5"}]
    assert tok.apply_chat_template(no_user, tokenize=False) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                                 "<|im_start|>assistant\n5<|im_end|>\n")
    with pytest.raises(Exception, match="not tool"):
        tok.apply_chat_template([user, {"role": "tool", "content": "5"}], tokenize=False)
