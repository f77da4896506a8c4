"""Tests of pbsd.py: the DPO-style loss against a hand computation, its gradient direction, ties, the normalizer,
and length normalization. (The micro-batch loss with a model, train.pbsd_micro_batch: tests/test_train.py.)"""
import math

import pytest
import torch

from conftest import fp32_rounding
from pbsd import decisive_pairs, implicit_reward, pair_outcomes, pbsd_loss, sequence_logprob


def neg_log_sigmoid(m: float) -> float:
    return math.log1p(math.exp(-m))


def loss_rounding(margins, dm) -> float:
    """How far pbsd_loss's float32 L = Σ −log σ(m_i) / k over k decisive pairs may be from its exact value: each
    margin off by dm_i moves its term by σ(−m_i)·dm_i; −log σ (exp, log1p, a subtraction) rounds on operands of
    magnitude ℓ_i + |m_i|, then the sum over k and the division. (The example's sequence sums are of dyadic
    numbers: exact.)"""
    m = torch.tensor(margins, dtype=torch.float64)  # (k,)
    ell = torch.nn.functional.softplus(-m)  # (k,)  −log σ(m)
    return ((torch.sigmoid(-m) * torch.as_tensor(dm)).sum() + fp32_rounding(len(m) + 4, (ell + m.abs()).sum())).item() \
        / len(m)


def margin_rounding(r_S, r_T) -> torch.Tensor:
    """dm of m = r_θ(y_S) − r_θ(y_T) with r = β·(log π_θ − log π_base) and exact log-prob sums: β's float32 value and
    the product round each r, the subtraction m."""
    r_S, r_T = torch.tensor(r_S, dtype=torch.float64), torch.tensor(r_T, dtype=torch.float64)
    return fp32_rounding(3, r_S.abs() + r_T.abs() + (r_S - r_T).abs())


def test_sequence_logprob_sum_mean_and_padding():
    logp = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, float("nan"), 7.0]])  # padding holds junk
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(sequence_logprob(logp, mask), torch.tensor([-3.0, -0.5]))
    assert torch.equal(sequence_logprob(logp, mask, "mean"), torch.tensor([-1.5, -0.5]))
    assert torch.equal(sequence_logprob(torch.zeros(1, 2), torch.zeros(1, 2)), torch.zeros(1))  # empty response
    with pytest.raises(ValueError, match="length_norm"):
        sequence_logprob(logp, mask, "max")
    with pytest.raises(ValueError, match="same shape"):
        sequence_logprob(logp, mask[:, :2])


def test_implicit_reward_and_outcomes():
    base = torch.tensor([-4.0, -1.0], requires_grad=True)
    r = implicit_reward(torch.tensor([-3.0, -2.0]), base, beta=0.5)
    assert torch.equal(r, torch.tensor([0.5, -0.5])) and not r.requires_grad  # base side detached (½·±1: exact)
    assert pair_outcomes(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])).tolist() == \
        [1.0, -1.0, 0.0, 0.0]
    assert decisive_pairs([1, 0, 1, 0], [0, 1, 1, 0]) == 2
    with pytest.raises(ValueError, match="positive"):
        implicit_reward(torch.zeros(1), torch.zeros(1), beta=0.0)
    with pytest.raises(ValueError, match="same length"):
        pair_outcomes(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        pair_outcomes(torch.tensor([float("nan")]), torch.zeros(1))


def example():
    """Three pairs: the student sample wins, the teacher sample wins, a tie (both right)."""
    p_S = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [-1.0, 0.0, 0.0]])  # (3, 3) log π_θ(y_S,t|x)
    b_S = torch.tensor([[-2.0, -2.5, 0.0], [-1.0, -1.0, -1.0], [-3.0, 0.0, 0.0]])  # (3, 3) log π_base(y_S,t|x,c)
    m_S = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    p_T = torch.tensor([[-3.0, -1.0], [-4.0, -2.0], [-1.0, -1.0]])  # (3, 2) log π_θ(y_T,t|x)
    b_T = torch.tensor([[-1.0, -1.0], [-0.5, -0.5], [-2.0, -2.0]])  # (3, 2) log π_base(y_T,t|x,c)
    m_T = torch.tensor([[1, 1], [1, 1], [1, 1]])
    return p_S, b_S, m_S, p_T, b_T, m_T, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])


def test_loss_against_hand_computation():
    beta = 0.1
    loss, m = pbsd_loss(*example(), beta=beta)
    # pair 0: r(y_S) = 0.1·(−3 − (−4.5)) = 0.15, r(y_T) = 0.1·(−4 − (−2)) = −0.2; student wins: margin 0.35
    # pair 1: r(y_S) = 0.1·(−1.5 − (−3)) = 0.15, r(y_T) = 0.1·(−6 − (−1)) = −0.5; teacher wins: margin −0.65
    # pair 2: tie, dropped
    expected = (neg_log_sigmoid(0.35) + neg_log_sigmoid(-0.65)) / 2
    dm = margin_rounding([0.15, 0.15], [-0.2, -0.5])  # (2,)
    assert abs(loss.item() - expected) <= loss_rounding([0.35, -0.65], dm)
    # the margins' float32 sum (one more rounding), divided by k in float64
    assert m.pair_acc.item() == 0.5
    assert abs(m.margin_mean.item() - (0.35 - 0.65) / 2) <= (dm.sum().item() + fp32_rounding(1, 0.35 + 0.65)) / 2
    assert m.tie_frac.item() == 1 - 2 / 3 and m.student_win_frac.item() == 1 / 3  # float64 counts: the same ops
    # pair 2: r(y_S) = 0.1·(−1 − (−3)) = 0.2, r(y_T) = 0.1·(−2 − (−4)) = 0.2. Each r: 2 roundings (β, the product);
    # their float32 sum: 2 more
    for got, r in ((m.implicit_reward_student, [0.15, 0.15, 0.2]), (m.implicit_reward_teacher, [-0.2, -0.5, 0.2])):
        assert abs(got.item() - sum(r) / 3) <= fp32_rounding(4, sum(map(abs, r)) / 3)
    assert (m.n_pairs.item(), m.n_decisive.item()) == (3.0, 2.0)


def test_length_normalized_option_against_hand_computation():
    loss, _ = pbsd_loss(*example(), beta=1.0, length_norm="mean")
    # pair 0: r(y_S) = −1.5 − (−2.25) = 0.75, r(y_T) = −2 − (−1) = −1; margin 1.75
    # pair 1: r(y_S) = −0.5 − (−1) = 0.5, r(y_T) = −3 − (−0.5) = −2.5; teacher wins: margin −3
    # β = 1 and every sequence mean is dyadic (−3/2, −4.5/2, −1.5/3, ...): the margins are exact
    assert abs(loss.item() - (neg_log_sigmoid(1.75) + neg_log_sigmoid(-3.0)) / 2) <= loss_rounding([1.75, -3.0], 0.0)


def test_gradient_raises_the_winner_relative_to_the_loser():
    """One SGD step on free per-token logits: the winner's sequence log-prob goes up, the loser's down, in both
    directions (student wins, teacher wins); the tie's logits do not move."""
    g = torch.Generator().manual_seed(0)
    B, T_S, T_T, V = 3, 4, 5, 7
    z_S = torch.randn(B, T_S, V, generator=g).requires_grad_()  # (B, T_S, V)  policy logits on y_S
    z_T = torch.randn(B, T_T, V, generator=g).requires_grad_()  # (B, T_T, V)  policy logits on y_T
    y_S, y_T = torch.randint(V, (B, T_S), generator=g), torch.randint(V, (B, T_T), generator=g)
    b_S, b_T = -torch.rand(B, T_S, generator=g) * 3, -torch.rand(B, T_T, generator=g) * 3
    m_S, m_T = torch.ones(B, T_S), torch.ones(B, T_T)
    rewards_S, rewards_T = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])

    def seq_logps():
        lp_S = torch.log_softmax(z_S, -1).gather(-1, y_S[..., None]).squeeze(-1)  # (B, T_S)
        lp_T = torch.log_softmax(z_T, -1).gather(-1, y_T[..., None]).squeeze(-1)  # (B, T_T)
        return lp_S, lp_T

    lp_S, lp_T = seq_logps()
    loss, _ = pbsd_loss(lp_S, b_S, m_S, lp_T, b_T, m_T, rewards_S, rewards_T, beta=0.1)
    loss.backward()
    assert z_S.grad[2].abs().max() == 0 and z_T.grad[2].abs().max() == 0  # tie: no gradient
    before = [t.sum(-1).detach() for t in seq_logps()]
    with torch.no_grad():
        z_S -= 1.0 * z_S.grad
        z_T -= 1.0 * z_T.grad
    after = [t.sum(-1).detach() for t in seq_logps()]
    d_S, d_T = after[0] - before[0], after[1] - before[1]  # (B,), (B,)
    assert d_S[0] > 0 and d_T[0] < 0  # pair 0: the student sample won
    assert d_T[1] > 0 and d_S[1] < 0  # pair 1: the teacher sample won
    assert d_S[2] == 0 and d_T[2] == 0


def test_ties_are_dropped_and_counted():
    p_S, b_S, m_S, p_T, b_T, m_T, r_S, r_T = example()
    p_S, p_T = p_S.clone().requires_grad_(), p_T.clone().requires_grad_()
    loss, m = pbsd_loss(p_S, b_S, m_S, p_T, b_T, m_T, r_S, r_T)
    # the same as the call on the two decisive pairs alone
    alone, _ = pbsd_loss(p_S[:2], b_S[:2], m_S[:2], p_T[:2], b_T[:2], m_T[:2], r_S[:2], r_T[:2])
    # the same margins (elementwise ops, correctly rounded); −log σ, vectorized over 3 pairs or 2, may round
    # differently, and the tie adds an exact 0: each side within loss_rounding of the exact loss
    m_01 = [0.35, -0.65]  # β = 0.1: pair 0, pair 1
    assert abs(loss.item() - alone.item()) <= 2 * loss_rounding(m_01, 0.0)
    loss.backward()
    assert p_S.grad[2].abs().max() == 0 and p_T.grad[2].abs().max() == 0
    # both wrong is a tie too; when every pair ties the loss is 0 but still attached to the graph (a backward
    # pass on every rank), with zero gradients
    p_S.grad = None
    loss, m = pbsd_loss(p_S, b_S, m_S, p_T, b_T, m_T, torch.zeros(3), torch.zeros(3))
    assert loss.item() == 0.0 and loss.requires_grad and m.tie_frac.item() == 1.0 and m.pair_acc.item() == 0.0
    loss.backward()
    assert p_S.grad.abs().max() == 0


def test_normalizer_makes_micro_batches_equal_one_batch():
    args = example()
    full, _ = pbsd_loss(*args)
    n = decisive_pairs(args[6], args[7])
    parts = [pbsd_loss(*[a[i:j] for a in args], normalizer=n)[0] for i, j in ((0, 1), (1, 3))]
    # the same margins; −log σ over 1 or 2 pairs, the sum over 2 in float32 or over the parts in float64
    assert abs(sum(p.item() for p in parts) - full.item()) <= 2 * loss_rounding([0.35, -0.65], 0.0)


def test_shape_errors():
    p_S, b_S, m_S, p_T, b_T, m_T, r_S, r_T = example()
    with pytest.raises(ValueError, match="must match per sample"):
        pbsd_loss(p_S, b_S[:, :2], m_S, p_T, b_T, m_T, r_S, r_T)
    with pytest.raises(ValueError, match="one of each per pair"):
        pbsd_loss(p_S, b_S, m_S, p_T[:2], b_T[:2], m_T[:2], r_S, r_T)
