"""infra/diagnostics.py: the exact critic's wrong claim mapped to the rollout's tokens, and the mean A_t on it."""
import torch

import feedback
from infra import diagnostics
from rollout import Completion


def test_wrong_claim_advantage_on_a_hand_made_rollout(smol_tokenizer):
    """The exact critic's wrong claim, mapped to tokens, and the mean A_t on it and on the rest of the rollout."""
    from demo.arithmetic import arithmetic_problems
    from rollout import Completion
    problem = arithmetic_problems(1, seed=0, n_ops=2)[0]
    lhs, value = problem.steps[0].rsplit("=", 1)  # "25 - 2 ", " 23"
    wrong_value = str(int(value) + 1)
    text = f"Step 1: {lhs}= {wrong_value}\n\\boxed{{{wrong_value}}}"
    ids = smol_tokenizer(text, add_special_tokens=False).input_ids
    correct_text = f"Step 1: {problem.steps[0]}\n\\boxed{{{problem.answer}}}"
    correct_ids = smol_tokenizer(correct_text, add_special_tokens=False).input_ids
    items = [feedback.Item(problem, [1], Completion(ids, text, "stop")),
             feedback.Item(problem, [1], Completion(correct_ids, correct_text, "stop"))]
    claims = diagnostics.wrong_claims(smol_tokenizer, items)
    assert claims[1] is None  # a right answer: no wrong claim to locate
    claim = claims[0]
    # independently: the tokens whose decoded text overlaps the first occurrence of the wrong value after "="
    start = text.index("= " + wrong_value) + 2
    ends = [len(smol_tokenizer.decode(ids[:t + 1])) for t in range(len(ids))]
    starts = [0] + ends[:-1]
    expected = [s_ < start + len(wrong_value) and e > start and s_ < e for s_, e in zip(starts, ends)]
    assert claim.tolist() == expected and claim.any()
    T = max(len(ids), len(correct_ids))
    A = torch.arange(2 * T, dtype=torch.float32).view(2, T)  # (2, T)
    mask = torch.zeros(2, T)
    mask[0, :len(ids)] = 1
    mask[1, :len(correct_ids)] = 1
    m = diagnostics.wrong_claim_metrics(A, mask, claims)
    on = [t for t in range(len(ids)) if expected[t]]
    off = [t for t in range(len(ids)) if not expected[t]]  # (row 1 has no located claim: left out)
    # exact: A holds small integers, whose fp32 sum is exact in any order, and torch's mean on the CPU is that sum
    # divided by the count, one correctly rounded fp32 division, as here
    fp32_mean = lambda ts: (torch.tensor(float(sum(ts))) / len(ts)).item()  # noqa: E731
    assert m["adv_claim"] == fp32_mean(on) and m["n_claim_tokens"] == len(on)
    assert m["adv_off_claim"] == fp32_mean(off) and m["n_off_claim_tokens"] == len(off)
    assert diagnostics.wrong_claim_metrics(A, mask, [None, None]) == {}
