"""Tests of scripts/mechanism.py: the localization scores (AUROC, top-1, negative mass), the position profile, the HTML
page, token/character span mapping, and the driver's A_t against a direct forward pass on a tiny model."""
import json

import numpy as np
import pytest
import torch

import prompts
from conftest import fp32_rounding, fp64_rounding, log_softmax_rounding, logit_rounding
from data import Problem
from demo.exact_critic import ErrorMarks, ExactArithmeticCritic, error_marks_from_spans, token_char_spans
from feedback import Item
from grading import grade
from rollout import Completion
from scripts import mechanism as mechanism_module
from scripts.mechanism import (MECHANISM_CONTEXTS, advantage_by_position, auroc, localization_scores, mechanism,
                               plot_advantage_by_position, render_advantage_html, write_mechanism_report)


def _marks(T, start, end, claim, earlier):
    wc, ec = np.zeros(T, bool), np.zeros(T, bool)
    wc[list(claim)] = True
    ec[list(earlier)] = True
    return ErrorMarks(start, end, wc, ec)


def test_auroc_matches_brute_force_pair_counting():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 5, size=rng.integers(1, 8)).astype(float)  # small range: many ties
        neg = rng.integers(0, 5, size=rng.integers(1, 8)).astype(float)
        brute = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])
        # both are U/(P·N) with U a sum of halves (exact) and one correctly rounded division: the same float64
        assert auroc(pos, neg) == brute
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0 and auroc([1.0], [1.0]) == 0.5


def test_localization_scores_on_synthetic_advantages():
    # rollout 0: 12 tokens, steps [0,4) correct, [4,8) erroneous with claim {6,7}, then [8,12) continuation
    A0 = np.array([0.1, -0.1, 0.2, 0.0, 0.1, 0.0, -2.0, -1.0, -5.0, 0.3, 0.0, -1.0])
    m0 = _marks(12, 4, 8, {6, 7}, range(4))
    # rollout 1: the most negative token before the end of the error is an earlier correct token
    A1 = np.array([-3.0, 0.5, 0.0, -1.0, 1.0, 1.0])
    m1 = _marks(6, 2, 5, {3}, {0, 1})
    s = localization_scores([A0, A1], [m0, m1])
    # top-1 ignores t=8 (after the erroneous step) in rollout 0: argmin over [0,8) is t=6, on the claim
    assert s["per_rollout"]["top1"] == [1.0, 0.0] and s["top1"] == 0.5
    share0 = (2.0 + 1.0) / (0.1 + 2.0 + 1.0 + 5.0 + 1.0)
    share1 = 1.0 / 4.0
    # numpy sums the T = 12 negative masses in its pairwise order, Python left to right; then one division each
    # (and for the mean one sum and one division more)
    for got, share in zip(s["per_rollout"]["neg_mass_share"], (share0, share1)):
        assert abs(got - share) <= fp64_rounding(12 + 1, share)
    assert abs(s["neg_mass_share"] - (share0 + share1) / 2) <= fp64_rounding(12 + 3, (share0 + share1) / 2)
    # AUROC of -A: rollout 0 claim {2, 1} vs earlier {-0.1, 0.1, -0.2, 0} -> 1; rollout 1 claim {1} vs {3, -0.5}
    assert s["per_rollout"]["auroc"] == [1.0, 0.5]  # (exact: see test_auroc_matches_brute_force_pair_counting)
    assert s["auroc_pooled"] == auroc([2.0, 1.0, 1.0], [-0.1, 0.1, -0.2, 0.0, 3.0, -0.5])  # the same scores
    # an error in the first step has no earlier correct tokens: AUROC undefined, left out and counted
    m2 = _marks(3, 0, 2, {1}, [])
    s2 = localization_scores([A0, [0.0, -1.0, 0.0]], [m0, m2])
    assert s2["n_auroc"] == 1 and s2["auroc"] == 1.0 and s2["top1"] == 1.0
    with pytest.raises(ValueError, match="rollout 0"):
        localization_scores([A0[:5]], [m0])


def test_error_marks_are_validated():
    with pytest.raises(ValueError, match="wrong claim"):
        _marks(6, 2, 4, {5}, {0})  # claim outside the erroneous step
    with pytest.raises(ValueError, match="before error_start"):
        _marks(6, 2, 4, {3}, {2})
    with pytest.raises(ValueError, match="bool"):
        ErrorMarks(0, 1, np.array([1, 0]), np.array([0, 0]))


def test_advantage_by_position_and_its_png(tmp_path):
    # A_t = relative position to the claim start: each bin's mean is known exactly
    A0, m0 = np.arange(10) - 4.0, _marks(10, 3, 6, {4}, range(3))
    A1, m1 = np.arange(6) - 1.0, _marks(6, 1, 3, {1}, [0])
    prof = advantage_by_position([A0, A1], [m0, m1], lo=-4, hi=6, bin_size=2)
    assert prof.bin_start.tolist() == [-4, -2, 0, 2, 4]
    # bins [-4,-2): only rollout 0 (-3.5); [-2,0): rollout 0 has -1.5, rollout 1 only rel -1 -> -1, each
    # rollout weighs the same -> -1.25; [4,6): rollout 0 has 4.5, rollout 1 only rel 4 -> 4.25
    assert prof.mean.tolist() == [-3.5, -1.25, 0.5, 2.5, 4.25]  # means of integers over 1, 2 or 4: exact
    assert prof.n_rollouts.tolist() == [1, 2, 2, 2, 2]
    png = plot_advantage_by_position({"StepAlignFB": prof, "RefSol": prof}, tmp_path / "pos.png")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError):
        advantage_by_position([A0], [m0], lo=0, hi=5, bin_size=2)


def test_html_escapes_tokens_marks_the_error_and_shows_contexts_side_by_side():
    tokens = [["Step", " 1:", " <b>", "&", "</b>", '"q"', "\n", "42"]]
    T = len(tokens[0])
    mk = _marks(T, 6, 8, {7}, range(6))
    advantages = {"StepAlignFB": [np.linspace(-1, 1, T)], "RefSol": [np.zeros(T)], "verdict": [np.ones(T)]}
    page = render_advantage_html(tokens, advantages, [mk], title="A_t <demo>",
                                 scores={"StepAlignFB": {"top1": 1.0}})
    assert "<b>" not in page and "</b>" not in page and "<demo>" not in page
    assert "&lt;b&gt;" in page and "&amp;" in page and "&lt;/b&gt;" in page and "A_t &lt;demo&gt;" in page
    assert '&quot;q&quot;' in page  # quotes inside tokens cannot break out of the attributes
    assert "↵" in page  # the newline token is visible
    for ctx in advantages:
        assert f"<h3>{ctx}</h3>" in page
    assert "repeat(3, 1fr)" in page
    assert page.count('class="tok step claim"') == 3  # the claim token, once per context
    assert page.count("▶") >= 3
    assert "rgba(220, 38, 38" in page and "rgba(22, 163, 74" in page
    assert 'title="t=0  A_t=-1.0000' in page
    with pytest.raises(ValueError, match="context 'RefSol', rollout 0"):
        render_advantage_html(tokens, {"RefSol": [np.zeros(T - 1)]}, [mk])


# ------------------------------------------------------------------------------------------------ figure driver
def _problem():
    return Problem(id="p42", problem="Start with 17. Add 25, then multiply the result by 3. What is the final number?",
                   answer="126", reference_solution="(17 + 25) × 3: adding 25 gives 42; 3 times that is 126. "
                   "Hence \\boxed{126}.", steps=("17 + 25 = 42", "42 * 3 = 126"))


def _completion(tokenizer, text, end_of_turn=True):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids += [tokenizer.convert_tokens_to_ids("<|im_end|>")] if end_of_turn else []
    return Completion(ids, tokenizer.decode(ids, skip_special_tokens=True), "stop")


def _joined(tokenizer, ids, mask):
    return "".join(tokenizer.decode([i]) for i, m in zip(ids, mask) if m)


def test_token_char_spans_cover_the_text_and_marks_point_at_the_wrong_result(smol_tokenizer):
    tok = smol_tokenizer
    c = _completion(tok, "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\n\\boxed{136}")
    spans = token_char_spans(tok, c.token_ids, c.text)
    assert "".join(c.text[s:e] for s, e in spans) == c.text and spans[-1][0] == spans[-1][1]  # <|im_end|>: empty
    assert all(c.text[s:e] == tok.decode([i]) for i, (s, e) in zip(c.token_ids[:-1], spans))
    q = ExactArithmeticCritic().critique_one(_problem(), c.text)
    assert q.wrong_claim == "136" and c.text[slice(*q.wrong_span)] == "136"
    mk = error_marks_from_spans(spans, c.text, q.wrong_span)
    ids = c.token_ids
    assert _joined(tok, ids, mk.wrong_claim) == "136"
    assert mk.wrong_claim.sum() == 3  # SmolLM2 writes one token per digit
    assert "".join(tok.decode([i]) for i in ids[mk.error_start:mk.error_end]) == "Step 2: 42 * 3 = 136"
    assert _joined(tok, ids, mk.earlier_correct) == "Step 1: 17 + 25 = 42"
    # no "Step i:" markers: the erroneous step is the line of the wrong claim, earlier lines are correct steps
    c2 = _completion(tok, "1. 17 + 25 = 42\n2. 42 * 3 = 136\n\\boxed{136}", end_of_turn=False)
    q2 = ExactArithmeticCritic().critique_one(_problem(), c2.text)
    mk2 = error_marks_from_spans(token_char_spans(tok, c2.token_ids, c2.text), c2.text, q2.wrong_span)
    assert _joined(tok, c2.token_ids, mk2.wrong_claim) == "136"
    assert "".join(tok.decode([i]) for i in c2.token_ids[mk2.error_start:mk2.error_end]) == "2. 42 * 3 = 136"
    assert _joined(tok, c2.token_ids, mk2.earlier_correct) == "1. 17 + 25 = 42\n"


def test_token_char_spans_give_a_split_multibyte_character_to_the_token_that_completes_it(smol_tokenizer):
    tok = smol_tokenizer
    # 🙂 is F0 9F 99 82 in UTF-8; byte-level BPE writes those bytes as the symbols ð Ł Ļ Ĥ: one token per byte
    byte_ids = tok.convert_tokens_to_ids(["ð", "Ł", "Ļ", "Ĥ"])
    head = tok("Step 1: 6 × 7 = 43 ", add_special_tokens=False).input_ids
    ids = head + byte_ids + tok(" ok", add_special_tokens=False).input_ids
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "Step 1: 6 × 7 = 43 🙂 ok"
    spans = token_char_spans(tok, ids, text)
    assert "".join(text[s:e] for s, e in spans) == text
    emoji = text.index("🙂")
    assert [spans[len(head) + k] for k in range(4)] == [(emoji, emoji)] * 3 + [(emoji, emoji + 1)]
    with pytest.raises(ValueError, match="not a prefix"):
        token_char_spans(tok, ids, "something else entirely")


def _direct_logprobs(model, prompt_ids, y):
    """log π(y_t | prompt, y<t) from the full logits of one unpadded sequence (independent of rollout.py), and how
    far the driver's may be from it: each logit within δz of this one (padded and batched against alone, the
    matrix products block differently: conftest.logit_rounding), so 2δz, plus the driver's float32 log-softmax
    (this one is float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + y])).logits[0]  # (L, V)
    logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1].double(), -1)  # (T, V)  row t predicts y_t
    bound = 2 * logit_rounding(model, len(prompt_ids) + len(y)) + log_softmax_rounding(logits).max().item()
    return logp[torch.arange(len(y)), torch.tensor(y)].numpy(), bound  # (T,), float


def _direct_advantage(model, teacher, student, y):
    """A_t = log π(y_t | teacher, y<t) − log π(y_t | student, y<t) directly, and its bound: both log-probs' and the
    driver's float32 subtraction."""
    (lt, dt), (ls, ds) = _direct_logprobs(model, teacher, y), _direct_logprobs(model, student, y)
    return lt - ls, dt + ds + fp32_rounding(1, np.abs(lt) + np.abs(ls))  # (T,), (T,)


def test_mechanism_driver_matches_direct_forward_passes(tiny_smol, tmp_path):
    model, tok = tiny_smol
    p = _problem()
    wrong_late = _completion(tok, "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\n\\boxed{136}")
    right = _completion(tok, "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\n\\boxed{126}")
    wrong_early = _completion(tok, "Step 1: 17 + 25 = 41\n\\boxed{41}", end_of_turn=False)  # shorter: padding
    seen = []

    def attempt(it, critique, layout="paper"):  # another context plugs in as one more entry
        seen.append(it.completion.text)
        return [{"role": "user", "content": f"{it.problem.problem}\nAn earlier attempt:\n{it.completion.text}"}]

    contexts = {**MECHANISM_CONTEXTS, "attempt": attempt}
    res = mechanism(model, tok, [p], contexts=contexts, completions=[[wrong_late, right, wrong_early]],
                    batch_size=2)
    assert res.counts["sampled"] == 3 and res.counts["kept"] == 2 and res.counts["case_A"] == 1
    assert res.completions == [wrong_late, wrong_early] and seen == [wrong_late.text, wrong_early.text]
    assert [_joined(tok, c.token_ids, m.wrong_claim) for c, m in zip(res.completions, res.marks)] == ["136", "41"]
    student = tok(prompts.render(tok, prompts.student_messages(p), False), add_special_tokens=False).input_ids
    for name in contexts:
        assert len(res.advantages[name]) == 2
        for c, q, A in zip(res.completions, res.critiques, res.advantages[name]):
            assert A.shape == (len(c.token_ids),)
            it = Item(p, [], c, reward=float(grade(c.text, p.answer)))
            teacher = tok(prompts.render(tok, contexts[name](it, q), True), add_special_tokens=False).input_ids
            direct, bound = _direct_advantage(model, teacher, student, c.token_ids)
            assert (np.abs(A - direct) <= bound).all(), name
    # the stepalign teacher saw this rollout's critique, the refsol teacher the reference solution
    assert prompts.teacher_messages(p, "stepalign", res.critiques[0].text) == \
        MECHANISM_CONTEXTS["stepalign"](Item(p, [], wrong_late), res.critiques[0])
    assert "42 * 3 = 126" in res.critiques[0].text
    # the teacher layout reaches every context: under "echo" the StepAlignFB teacher holds the corrected solution
    res_echo = mechanism(model, tok, [p], contexts={"stepalign": MECHANISM_CONTEXTS["stepalign"]},
                         completions=[[wrong_late]], teacher_layout="echo")
    echo = prompts.teacher_messages(p, "stepalign", res_echo.critiques[0].text, "echo", wrong_late.text)
    assert echo[1] == {"role": "assistant", "content": prompts.corrected_solution(res_echo.critiques[0].text)}
    teacher = tok(prompts.render(tok, echo, True), add_special_tokens=False).input_ids
    direct, bound = _direct_advantage(model, teacher, student, wrong_late.token_ids)
    assert (np.abs(res_echo.advantages["stepalign"][0] - direct) <= bound).all()
    # the verdict teacher saw the grade of this very rollout: its answer and "incorrect", never the gold answer
    verdict_prompt = MECHANISM_CONTEXTS["verdict"](Item(p, [], wrong_late, reward=0.0), res.critiques[0])[0]["content"]
    assert "final answer was 136. This answer is incorrect." in verdict_prompt and "126" not in verdict_prompt

    table, record = write_mechanism_report(res, tok, tmp_path, model_name="tiny")
    assert "| StepAlignFB | 2 |" in table and "| Verdict | 2 |" in table and "| attempt | 2 |" in table
    assert "| chance |" in table
    assert json.loads((tmp_path / "localization.json").read_text())["counts"]["kept"] == 2
    assert (tmp_path / "advantage_by_position.png").stat().st_size > 1000
    page = (tmp_path / "advantage.html").read_text()
    assert page.count('class="tok step claim"') == len(contexts) * (3 + 2)  # contexts × (3 + 2 wrong-result tokens)
    assert page.count('<p class="caption">p42: Start with 17.') == 2


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("options, message", [
    (["--n-problems", "0"], "--n-problems 0: must be >= 1"),
    (["--n-rollouts", "-1"], "--n-rollouts -1: must be >= 1"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--n-ops", "0"], "--arith-ops 0: must be >= 1"),
    (["--seed", "-1"], "--seed -1: must lie in [0, 2^32 - 1]"),
    (["--model", "./no/such/model"], "--model ./no/such/model: no such directory"),
    (["--n-problems", "x"], "argument --n-problems: invalid int value: 'x'"),
])
def test_bad_options_are_one_error_line_before_the_model_loads(tmp_path, capsys, monkeypatch, options, message):
    """Before, each of these loaded the model and then failed with a traceback (or sampled nothing)."""
    monkeypatch.setattr(mechanism_module.rollout, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        mechanism_module.main(["--out", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("python -m scripts.mechanism: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(mechanism_module.rollout, "load_model", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "out").write_text("")
    with pytest.raises(SystemExit) as e:
        mechanism_module.main(["--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--out " in capsys.readouterr().err


def test_context_names_cannot_shift_the_tables_columns_or_inject_html():
    """A context is any mapping key a caller passes: in the Markdown table its `|` and newline are escaped; the HTML
    page escapes it and the captions."""
    s = {"top1": 0.5, "neg_mass_share": 0.25, "auroc": 0.5, "n_auroc": 2, "auroc_pooled": 0.5, "n_rollouts": 2}
    table = mechanism_module.localization_table({"a|b\nc": s}, {"top1": 0.1, "neg_mass_share": 0.2})
    rows = table.splitlines()
    assert len(rows) == 4 and {row.replace("\\|", "").count("|") for row in rows} == {7}
    T = 3
    page = render_advantage_html([["x"] * T], {"<i>ctx</i>": [np.zeros(T)]}, [None], captions=["<b>2 & 3</b>"],
                                 scores={"<i>ctx</i>": {"<s>": 1.0}})
    assert "<i>" not in page and "<b>" not in page and "<s>" not in page
    assert "&lt;i&gt;ctx&lt;/i&gt;" in page and "&lt;b&gt;2 &amp; 3&lt;/b&gt;" in page
