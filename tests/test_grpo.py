"""Group advantages, the clipped surrogate's gradient inside and outside the trust region, and aggregation."""
import pytest
import torch

from grpo import group_advantages, grpo_loss, sequence_mean, token_mean


def test_group_advantages_population_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    A = group_advantages(r, group_size=4, eps=0.0)
    for g in range(2):
        rg = r[4 * g:4 * g + 4]
        mean, std = rg.mean(), ((rg - rg.mean()) ** 2).mean().sqrt()
        torch.testing.assert_close(A[4 * g:4 * g + 4], (rg - mean) / std)
        assert A[4 * g:4 * g + 4].pow(2).mean() == pytest.approx(1.0)  # the population-std property
        assert A[4 * g:4 * g + 4].sum() == pytest.approx(0.0, abs=1e-6)


def test_group_advantages_eps_and_zero_variance():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    for eps in (0.0, 1e-4):  # groups 2 and 3 have zero variance: 0, not 0/0, even with eps = 0
        A = group_advantages(r, group_size=4, eps=eps)
        assert torch.isfinite(A).all() and torch.equal(A[4:], torch.zeros(8))
    A = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), group_size=2, eps=1e-4)
    assert torch.equal(A[2:], torch.zeros(4))  # all-equal groups: exactly 0
    torch.testing.assert_close(A[:2], torch.zeros(2))  # also all equal
    A = group_advantages(torch.tensor([1.0, 0.0]), group_size=2, eps=1e-4)
    torch.testing.assert_close(A, torch.tensor([0.5, -0.5]) / (0.5 + 1e-4))


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
    torch.testing.assert_close(grad, pg_grad)
    assert m.ratio_mean.item() == pytest.approx(1.0) and m.clip_frac.item() == 0.0


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
        assert grad.item() == pytest.approx(-A * torch.tensor(log_ratio).exp().item(), rel=1e-5)


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
    assert token_mean(x, mask).item() == pytest.approx(8 / 5)          # every token weighs the same
    assert sequence_mean(x, mask).item() == pytest.approx((1 + 4) / 2)  # every sequence weighs the same
    lp = torch.zeros(2, 4, requires_grad=True)
    A = torch.tensor([1.0, 1.0])
    for agg, per_token_weight in (("token", [1 / 5, 1 / 5]), ("sequence", [1 / 8, 1 / 2])):
        loss, _ = grpo_loss(lp, lp.detach(), A, mask, aggregation=agg)
        (grad,) = torch.autograd.grad(loss, lp)
        assert grad[0, 0].item() == pytest.approx(-per_token_weight[0])
        assert grad[1, 0].item() == pytest.approx(-per_token_weight[1])
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
        torch.testing.assert_close(full, parts)


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
    assert on.item() == pytest.approx(expected.item())
    # grpo_loss's k3 term is an unbiased estimator of KL(π_θ‖π_ref): its exact expectation over y ~ π_θ on a small
    # categorical, one token per outcome y weighted by π_θ(y) through the mask (token_mean = Σ k3·p / Σ p)
    p = torch.tensor([[0.2, 0.5, 0.3]])  # π_θ(y)
    q = torch.tensor([[0.4, 0.4, 0.2]])  # π_ref(y)
    expected_k3, _ = grpo_loss(p.log(), p.log(), torch.tensor([0.0]), p, ref_logprobs=q.log(), kl_coef=1.0)
    assert expected_k3.item() == pytest.approx((p * torch.log(p / q)).sum().item(), rel=1e-6)


def test_per_token_advantages_accepted():
    lp = torch.zeros(1, 3, requires_grad=True)
    A = torch.tensor([[1.0, -1.0, 2.0]])
    loss, m = grpo_loss(lp, lp.detach(), A, torch.ones(1, 3))
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, -A / 3)
    assert m.adv_mean.item() == pytest.approx(2 / 3)


def test_unknown_aggregation():
    z = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(z, z, torch.zeros(1), torch.ones(1, 1), aggregation="mean")
