"""Group advantages, the clipped surrogate's gradient inside and outside the trust region, and aggregation."""
import math

import pytest
import torch

from conftest import fp32_rounding
from grpo import group_advantages, grpo_loss, sequence_mean, token_mean


def test_group_advantages_population_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    G = 4
    A = group_advantages(r, group_size=G, eps=0.0)
    for g in range(2):
        rg, Ag = r[G * g:G * g + G], A[G * g:G * g + G]
        mean, std = rg.mean(), ((rg - rg.mean()) ** 2).mean().sqrt()
        # the mean of 0/1 rewards is exact; each std (torch.std's own order against this one) is G + 2 roundings of
        # non-negative terms from the exact value, relatively, and the division one more: A_i within that of |A_i|
        dA = fp32_rounding(G + 3, Ag.abs())  # (G,)
        assert ((Ag - (rg - mean) / std).abs() <= dA).all()
        # the population-std property, mean(A²) = 1 exactly: A² doubles A's relative error, then G + 1 roundings
        assert abs(Ag.pow(2).mean().item() - 1.0) <= fp32_rounding(2 * G + 5, 2.0)
        assert abs(Ag.sum().item()) <= fp32_rounding(2 * G + 3, Ag.abs().sum().item())  # Σ A_i = 0 exactly


def test_group_advantages_eps_and_zero_variance():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    for eps in (0.0, 1e-4):  # groups 2 and 3 have zero variance: 0, not 0/0, even with eps = 0
        A = group_advantages(r, group_size=4, eps=eps)
        assert torch.isfinite(A).all() and torch.equal(A[4:], torch.zeros(8))
    A = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), group_size=2, eps=1e-4)
    assert torch.equal(A[2:], torch.zeros(4))  # all-equal groups: exactly 0
    assert torch.equal(A[:2], torch.zeros(2))  # also all equal (std exactly 0)
    A = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=1e-4)
    # mean and std 0.5 exactly; eps's float32 value, the sum std + eps and the division: 3 roundings of |A|
    exact = torch.tensor([0.5, -0.5], dtype=torch.float64) / (0.5 + 1e-4)
    assert ((A.double() - exact).abs() <= fp32_rounding(3, exact.abs())).all()


def test_group_advantages_bad_shape():
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(7), group_size=4)


def test_on_policy_gradient_equals_plain_policy_gradient():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 5, generator=g).requires_grad_()
    A = torch.tensor([1.5, -0.5, 0.0])
    mask = (torch.rand(3, 5, generator=g) > 0.2).float()
    loss, m = grpo_loss(lp, lp.detach(), A, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    # plain policy gradient of −Σ A·log π / N
    pg_loss = -(A[:, None] * lp * mask).sum() / mask.sum()
    (pg_grad,) = torch.autograd.grad(pg_loss, lp)
    # ρ = exp(0) = 1 exactly, so both gradients are −A·mask/N: 1/N and its product with A, 2 roundings each
    assert ((grad - pg_grad).abs() <= fp32_rounding(2, A.abs()[:, None] / mask.sum())).all()
    assert m.ratio_mean.item() == 1.0 and m.clip_frac.item() == 0.0  # a sum of N ones over N: exact


@pytest.mark.parametrize("A,log_ratio,has_grad", [
    (1.0, 0.5, False),    # A > 0, ρ > 1+ε: clipped, no push further up
    (1.0, -0.5, True),    # A > 0, ρ < 1−ε: still pushed up
    (-1.0, -0.5, False),  # A < 0, ρ < 1−ε: clipped, no push further down
    (-1.0, 0.5, True),    # A < 0, ρ > 1+ε: still pushed down
    (1.0, 0.1, True),     # inside the trust region
    (-1.0, -0.1, True),
])
def test_clipping_stops_gradient_on_the_right_side(A, log_ratio, has_grad):
    old = torch.tensor([[-1.0]])
    lp = (old + log_ratio).requires_grad_()
    loss, m = grpo_loss(lp, old, torch.tensor([A]), torch.ones(1, 1), clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, lp)
    assert (grad.abs().item() > 0) == has_grad
    assert m.clip_frac.item() == (0.0 if has_grad else 1.0)
    if has_grad:  # the gradient is −A·ρ (the derivative of −ρA w.r.t. log π)
        # log ρ = (old + log_ratio) − old: the first sum rounds at the scale |old| + |log_ratio|, an absolute error
        # in log ρ that is a relative one in ρ; then exp, the product with A and 1/N: 5 roundings of |A|·ρ·that scale
        rho = math.exp(log_ratio)
        assert abs(grad.item() + A * rho) <= fp32_rounding(5, abs(A) * rho * (1 + abs(old.item()) + abs(log_ratio)))


def test_clip_eps_high_is_asymmetric():
    old = torch.tensor([[-1.0]])
    lp = (old + 0.25).requires_grad_()  # ρ = 1.28: outside 1.2, inside 1.3
    for eps_high, clipped in ((None, True), (0.3, False)):
        loss, _ = grpo_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 1), 0.2, eps_high)
        (grad,) = torch.autograd.grad(loss, lp)
        assert (grad.item() == 0.0) == clipped


def test_token_vs_sequence_aggregation_with_different_lengths():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # integer sums and counts are exact in float32: one correctly rounded division each, the same as here
    assert token_mean(x, mask).item() == (torch.tensor(8.0) / 5).item()  # every token weighs the same
    assert sequence_mean(x, mask).item() == (1 + 4) / 2  # every sequence weighs the same (4/4, 4/1, 5/2: exact)
    lp = torch.zeros(2, 4, requires_grad=True)
    A = torch.tensor([1.0, 1.0])
    for agg, per_token_weight in (("token", [1 / 5, 1 / 5]), ("sequence", [1 / 8, 1 / 2])):
        loss, _ = grpo_loss(lp, lp.detach(), A, mask, aggregation=agg)
        (grad,) = torch.autograd.grad(loss, lp)
        # the backward's 1/N (or 1/len_b·1/B) is the one rounding, every other factor is ±1, ½ or ρ = 1: the
        # float32 of the exact weight
        assert grad[0, 0].item() == -torch.tensor(per_token_weight[0]).item()
        assert grad[1, 0].item() == -torch.tensor(per_token_weight[1]).item()
        assert grad[1, 1].item() == 0.0


def test_normalizer_makes_micro_batches_sum_to_full_batch():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(4, 6, generator=g).requires_grad_()
    old = lp.detach() + 0.1 * torch.randn(4, 6, generator=g)
    A = torch.randn(4, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    for agg, n in (("token", mask.sum().item()), ("sequence", 4)):
        full, _ = grpo_loss(lp, old, A, mask, aggregation=agg)
        parts = sum(grpo_loss(lp[i:i + 2], old[i:i + 2], A[i:i + 2], mask[i:i + 2], aggregation=agg,
                              normalizer=n)[0] for i in (0, 2))
        # the same per-token ℓ_t (elementwise, bit-identical), summed in another order: a chain of at most
        # B·T + 3 roundings (the sums, the per-sequence division, the normalizer, the parts' sum) of terms
        # |ℓ_t| ≤ |A|·max(ρ, 1 + ε)
        rho = (lp.detach() - old).exp()  # (B, T)
        scale = (A.abs()[:, None] * torch.maximum(rho, torch.tensor(1.2)) * mask).sum() / n
        assert (full - parts).abs() <= fp32_rounding(mask.numel() + 3, scale)


def test_k3_kl_penalty_off_by_default_and_correct_when_on():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    A = torch.tensor([0.0])
    off, _ = grpo_loss(lp, lp.detach(), A, mask, ref_logprobs=ref)
    assert off.item() == 0.0
    on, _ = grpo_loss(lp, lp.detach(), A, mask, ref_logprobs=ref, kl_coef=0.1)
    d = (ref - lp.detach())
    expected = 0.1 * (d.exp() - d - 1).mean()
    # the same k3 per token, then (·0.1, sum, /2) against (sum, /2, ·0.1); +0 to the surrogate's −0: exact
    assert abs(on.item() - expected.item()) <= fp32_rounding(4, expected.item())
    # grpo_loss's k3 term is an unbiased estimator of KL(π_θ‖π_ref): its exact expectation over y ~ π_θ on a small
    # categorical, one token per outcome y weighted by π_θ(y) through the mask (token_mean = Σ k3·p / Σ p)
    p = torch.tensor([[0.2, 0.5, 0.3]])  # π_θ(y)
    q = torch.tensor([[0.4, 0.4, 0.2]])  # π_ref(y)
    expected_k3, _ = grpo_loss(p.log(), p.log(), torch.tensor([0.0]), p, ref_logprobs=q.log(), kl_coef=1.0)
    # exactly, under the float32 p and q (whose sums need not be 1): E[k3] = (Σq − Σp + Σ p·log(p/q)) / Σp
    p64, q64 = p.double(), q.double()
    kl = ((q64.sum() - p64.sum() + (p64 * (p64 / q64).log()).sum()) / p64.sum()).item()
    # per outcome: two logs, their difference, exp, two subtractions (operands ρ, |log r|, 1), ·p; the sum over V
    # and the division by Σp
    scale = (p64 * (q64 / p64 + q64.log().abs() + p64.log().abs() + 1)).sum().item()
    assert abs(expected_k3.item() - kl) <= fp32_rounding(p.shape[-1] + 8, scale)


def test_per_token_advantages_accepted():
    lp = torch.zeros(1, 3, requires_grad=True)
    A = torch.tensor([[1.0, -1.0, 2.0]])
    loss, m = grpo_loss(lp, lp.detach(), A, torch.ones(1, 3))
    (grad,) = torch.autograd.grad(loss, lp)
    # 1/3 rounded once on both sides; A ∈ {±1, 2} scales it exactly
    assert torch.equal(grad, -A / 3)
    assert m.adv_mean.item() == (torch.tensor(2.0) / 3).item()  # an exact sum 2 over an exact count 3


def test_unknown_aggregation():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(z, z, torch.zeros(1), torch.ones(1, 1), aggregation="mean")
