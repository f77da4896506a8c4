"""Eq. 3 and A_t against brute force, the chunked path against the plain one, and the sign of one SGD step."""
import math

import pytest
import torch

from conftest import first_order_bound, fp32_rounding, fp64_rounding, log_softmax_rounding
from sd_loss import (chunked_self_distillation_loss, clip_terms, sampled_token_loss, self_distillation_loss,
                     token_advantage, token_divergence, token_entropy, token_logprobs, token_loss_terms, top_share)


def brute_divergence(s_logits, t_logits, kind, beta=0.5):
    """Loop over batch, position and vocabulary with Python floats."""
    B, T, V = s_logits.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            ps = torch.softmax(s_logits[b, t].double(), -1).tolist()
            pt = torch.softmax(t_logits[b, t].double(), -1).tolist()
            pm = [beta * pt[v] + (1 - beta) * ps[v] for v in range(V)]
            kl = lambda p, q: sum(p[v] * (math.log(p[v]) - math.log(q[v])) for v in range(V))
            out[b, t] = {"forward": lambda: kl(pt, ps), "reverse": lambda: kl(ps, pt),
                         "jsd": lambda: beta * kl(pt, pm) + (1 - beta) * kl(ps, pm)}[kind]()
    return out


def terms_scale(s_logits, t_logits):
    """(B, T) Σ_v (p_s + p_t)·|log p_s − log p_t|: bounds the magnitudes of the V terms that forward, reverse and jsd
    (whose mixture's log lies between the two) sum per position."""
    ls, lt = torch.log_softmax(s_logits.double(), -1), torch.log_softmax(t_logits.double(), -1)
    return ((ls.exp() + lt.exp()) * (ls - lt).abs()).sum(-1)


def divergence_rounding(s_logits, t_logits, f):
    """How far an fp32 evaluation of f (the divergence on logits (..., V), or a function of it) may be from the exact
    value: each log-softmax's rounding as a perturbation of its logits (conftest.log_softmax_rounding), carried to f
    to first order, plus the rounding of the sum over V (per position; for a mean over positions, take its mean)."""
    V = s_logits.shape[-1]
    return (first_order_bound(f, (s_logits, t_logits), (log_softmax_rounding(s_logits),
                                                         log_softmax_rounding(t_logits)))
            + fp32_rounding(V, terms_scale(s_logits, t_logits)))


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_divergence_matches_brute_force(kind):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g) * 2, torch.randn(2, 3, 7, generator=g) * 2
    got = token_divergence(s, t, kind, beta=0.3)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    bound = divergence_rounding(s, t, lambda a, b: token_divergence(a, b, kind, beta=0.3))  # (2, 3)
    assert ((got.double() - brute_divergence(s, t, kind, beta=0.3)).abs() <= bound).all()


def test_forward_is_teacher_to_student_not_symmetric():
    s = torch.tensor([[[2.0, 0.0, -1.0]]])
    t = torch.tensor([[[0.0, 1.0, 0.5]]])
    fwd, rev = token_divergence(s, t, "forward"), token_divergence(s, t, "reverse")
    # KL(teacher‖student) = reverse with the roles swapped: the same float ops on the same values, exactly
    assert torch.equal(fwd, token_divergence(t, s, "reverse"))
    # and not the reverse KL: they differ by more than the rounding each may carry
    bound = sum(divergence_rounding(s, t, lambda a, b, k=k: token_divergence(a, b, k)) for k in ("forward", "reverse"))
    assert ((fwd.double() - rev.double()).abs() > bound).all()


def test_forward_kl_zero_iff_equal():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 11, generator=g)
    # a shift of logits is the same distribution: KL = Σ_v p_v·(log p_v − log q_v) of two roundings of the same
    # log-probabilities, at most their difference, log_softmax_rounding of the larger logits
    bound = log_softmax_rounding(z + 3.0)[..., 0]  # (1, 4)
    assert (token_divergence(z, z + 3.0).abs() <= bound).all()
    other = z.clone()
    other[0, 2, 5] += 0.5
    d = token_divergence(z, other)
    assert d[0, 2] > bound[0, 2] and (d[0, [0, 1, 3]].abs() <= bound[0, [0, 1, 3]]).all()


def test_fp32_whatever_input_dtype():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 2, 9, generator=g), torch.randn(1, 2, 9, generator=g)
    got = token_divergence(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    # the bf16 inputs are widened first (exactly): the same fp32 ops on the same values
    assert torch.equal(got, token_divergence(s.bfloat16().float(), t.bfloat16().float()))


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_jsd_rejects_ends(beta):
    z = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        token_divergence(z, z, "jsd", beta=beta)


def test_unknown_kind():
    z = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(z, z, "kl")


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_minus_inf_logits_equal_a_smaller_vocabulary_with_finite_gradients(kind):
    # an entry that both models mask with −inf is absent from both distributions: the divergence and its
    # gradient must equal those on the vocabulary without it (and the masked entry gets gradient 0, not NaN)
    s = torch.tensor([[[0.0, 1.0, float("-inf")]]], requires_grad=True)
    t = torch.tensor([[[0.5, 0.0, float("-inf")]]], requires_grad=True)
    s_small = s.detach()[..., :2].clone().requires_grad_()
    t_small = t.detach()[..., :2].clone().requires_grad_()
    # exactly: the masked entry is never the max, and it adds exact zeros (its exp, its KL term, its gradient
    # through the clamp) to each sum over V, which leaves every partial sum as it is; the rest is elementwise
    d, d_small = token_divergence(s, t, kind), token_divergence(s_small, t_small, kind)
    assert torch.equal(d, d_small)
    d.sum().backward()
    d_small.sum().backward()
    for full, small in ((s, s_small), (t, t_small)):
        assert torch.isfinite(full.grad).all()
        assert torch.equal(full.grad[..., :2], small.grad)
        assert full.grad[..., 2].item() == 0.0


def test_token_advantage_is_teacher_minus_student_detached():
    ls = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    lt = torch.tensor([[-0.5, -3.0]])
    A = token_advantage(ls, lt)
    assert torch.equal(A, torch.tensor([[0.5, -1.0]]))  # differences of dyadic fractions: exact
    assert not A.requires_grad


def test_masking_ignores_prompt_and_padding():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    y = torch.zeros(2, 5, dtype=torch.long)
    loss, _ = self_distillation_loss(s, t, y, mask)
    # garbage at masked positions changes nothing
    s2, t2 = s.clone(), t.clone()
    s2[mask == 0] = 100 * torch.randn_like(s2[mask == 0])
    t2[mask == 0] = -100.0
    loss2, _ = self_distillation_loss(s2, t2, y, mask)
    # exactly: each valid position's term is computed from its own row alone, the masked ones (finite) become ±0,
    # and the sum runs over the same (B, T) in the same order
    assert torch.equal(loss, loss2)
    expected = brute_divergence(s, t, "forward")[mask.bool()].mean()
    n = int(mask.sum())  # the mean over n tokens: one more sum of n roundings
    bound = divergence_rounding(s, t, lambda a, b: self_distillation_loss(a, b, y, mask)[0])  # (B, T): V-sum per token
    assert abs(loss.item() - expected.item()) <= bound[mask.bool()].mean().item() + fp32_rounding(n, expected.item())


def test_normalizer_makes_micro_batches_sum_to_full_batch():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    t = torch.randn(4, 6, 8, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    y = torch.zeros(4, 6, dtype=torch.long)
    full, _ = self_distillation_loss(s, t, y, mask)
    n = mask.sum().item()
    parts = sum(self_distillation_loss(s[i:i + 2], t[i:i + 2], y[i:i + 2], mask[i:i + 2], normalizer=n)[0]
                for i in (0, 2))
    # the same per-position terms (each from its own row), summed in another order (N = mask.numel() roundings
    # on the longest chain), divided by n once or twice and added (3 more), on terms whose magnitudes sum to
    # Σ|term|/n
    terms = token_divergence(s, t).detach() * mask  # (B, T)
    assert abs(full.item() - parts.item()) <= fp32_rounding(mask.numel() + 3, terms.abs().sum().item() / n)


def test_metrics_advantage_statistics():
    s = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    t = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1], [0.6, 0.4]]]))
    tokens = torch.tensor([[1, 0, 1]])
    mask = torch.tensor([[1, 1, 1]])
    _, m = self_distillation_loss(s, t, tokens, mask)
    A = [math.log(0.75 / 0.5), 0.0, math.log(0.4 / 0.8)]
    # each A_t: two log-softmaxes (V = 2) of logits that are themselves one rounding of log p; then a mean of 3
    dA = (log_softmax_rounding(s) + log_softmax_rounding(t) + fp32_rounding(1, s.abs() + t.abs())).max().item()
    assert m.adv_mean.item() == pytest.approx(sum(A) / 3, abs=dA + fp32_rounding(3, sum(map(abs, A)) / 3))
    # a count (position 1 has A = 0 exactly: the same log-softmax of the same row) over 3, one fp32 division
    assert m.adv_neg_frac.item() == (torch.tensor(1.0) / 3).item()


def test_no_gradient_into_teacher():
    s = torch.randn(1, 3, 5, requires_grad=True)
    t = torch.randn(1, 3, 5, requires_grad=True)
    loss, _ = self_distillation_loss(s, t, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_sampled_token_loss_gradient_is_minus_advantage():
    ls = torch.tensor([[-1.0, -2.0, -0.3]], requires_grad=True)
    lt = torch.tensor([[-0.5, -3.0, -0.3]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, A = sampled_token_loss(ls, lt, mask)
    loss.backward()
    # ∂L/∂log π_θ(y_t) = −A_t / N on valid tokens; exact: products and quotients of dyadic fractions by 1 and 2
    assert torch.equal(ls.grad, torch.tensor([[-0.5 / 2, 1.0 / 2, 0.0]]))
    assert torch.equal(A, torch.tensor([[0.5, -1.0, 0.0]]))  # A_t = log π_base − log π_θ


def test_sgd_step_on_sampled_loss_moves_logprobs_by_sign_of_advantage():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 6, 10, generator=g).requires_grad_()  # every position is its own parameter
    teacher = torch.randn(1, 6, 10, generator=g)
    y = torch.randint(0, 10, (1, 6), generator=g)
    mask = torch.ones(1, 6)
    before = token_logprobs(logits, y).detach()
    A = token_advantage(before, token_logprobs(teacher, y))
    assert (A > 0).any() and (A < 0).any()
    loss, _ = sampled_token_loss(token_logprobs(logits, y), token_logprobs(teacher, y), mask)
    loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    delta = token_logprobs(logits, y).detach() - before
    assert (delta[A > 0] > 0).all() and (delta[A < 0] < 0).all()


def sd_inputs(B=2, T=7, D=6, V=13, seed=6):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, T, D, generator=g, dtype=torch.float64).float().requires_grad_()
    h_t = torch.randn(B, T, D, generator=g)
    W = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, :2] = 0  # prompt
    mask[1, 5:] = 0  # padding
    return h_s, h_t, W, y, mask


def reference_terms(z_s, z_t, y, kind, clip=0.0, beta=0.5):
    """Float64, neither side detached: (the per-position loss term (B, T), its coefficient c and base b, such that
    sd_loss's gradient of the term is c·∂b/∂z_s: the divergence with c = 1, clipped c = min(1, clip/div), or
    sampled b = log π_θ(y), c = −A with A undetached)."""
    ls, lt = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)  # (B, T, V)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731  KL(a‖b)
    if kind == "sampled":
        ls_y, lt_y = ls.gather(-1, y[..., None])[..., 0], lt.gather(-1, y[..., None])[..., 0]  # (B, T)
        return -(lt_y - ls_y) * ls_y, -(lt_y - ls_y), ls_y
    if kind == "jsd":
        lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)  # (B, T, V)
        div = beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)  # (B, T)
    else:
        div = kl(lt, ls) if kind == "forward" else kl(ls, lt)  # (B, T)
    c = torch.clamp(clip / div, max=1.0) if clip > 0 else torch.ones_like(div)
    return div * c, c, div


def chunk_rounding(h_s, h_t, W, y, mask, kind, clip=0.0):
    """How far the chunked and the plain path may differ, as (loss, ∂L/∂h_s, ∂L/∂W, token divergence (B, T)): both
    round each logit z = h·W (a D-term dot product), the log-softmaxes and the sums over V, over the N valid
    positions and, in the backward pass, the products G·W (V terms) and Gᵀ·h (N terms) differently. Each rounding
    of z or of a log-softmax is a perturbation of z (δz), carried to first order (conftest.first_order_bound)
    through the float64 reference, where the teacher's side, which sd_loss detaches, has its sensitivity too."""
    h_s, h_t, W = h_s.detach().double(), h_t.double(), W.detach().double()
    z_s, z_t = h_s @ W.T, h_t @ W.T  # (B, T, V)
    D, V, N = W.shape[1], W.shape[0], mask.sum().item()
    dz_s = fp32_rounding(D, h_s.abs() @ W.abs().T) + log_softmax_rounding(z_s)  # (B, T, V)
    dz_t = fp32_rounding(D, h_t.abs() @ W.abs().T) + log_softmax_rounding(z_t)  # (B, T, V)
    m = mask.double()

    def loss(a, b):
        return (reference_terms(a, b, y, kind, clip)[0] * m).sum() / N

    def grad_z(a, b):  # G = ∂L/∂z_s as sd_loss's backward computes it: c · ∂b/∂z_s per position
        a = a.requires_grad_() if not a.requires_grad else a
        _, c, base = reference_terms(a, b, y, kind, clip)
        (g,) = torch.autograd.grad(base.sum(), a, create_graph=True)  # (B, T, V)  positions are independent
        return (c * m / N)[..., None] * g

    def div(a, b):
        return reference_terms(a, b, y, "reverse" if kind == "sampled" else kind)[2]

    sum_v = fp32_rounding(V, terms_scale(z_s, z_t))  # (B, T)  the sum over V of each divergence
    d_loss = first_order_bound(loss, (z_s, z_t), (dz_s, dz_t)) + (sum_v * m).sum() / N \
        + fp32_rounding(N, (reference_terms(z_s, z_t, y, kind, clip)[0].abs() * m).sum() / N)
    G = grad_z(z_s.clone(), z_t).detach()  # (B, T, V)
    dG = first_order_bound(grad_z, (z_s, z_t), (dz_s, dz_t)) + fp32_rounding(V + 4, G.abs().sum(-1, keepdim=True)
                                                                             + (sum_v * m / N)[..., None])
    d_h = dG @ W.abs() + fp32_rounding(V, G.abs() @ W.abs())  # (B, T, D)
    d_W = dG.flatten(0, 1).T @ h_s.abs().flatten(0, 1) \
        + fp32_rounding(N, G.abs().flatten(0, 1).T @ h_s.abs().flatten(0, 1))  # (V, D)
    d_div = first_order_bound(div, (z_s, z_t), (dz_s, dz_t)) + sum_v  # (B, T)
    return d_loss, d_h, d_W, d_div


def entropy_rounding(z, dz):
    """(...) |δH| ≤ Σ_v |∂H/∂z_v|·δz_v, with ∂H/∂z_v = −p_v (log p_v + H) (token_entropy keeps no graph), plus the
    rounding of its sum over V, whose terms −p_v log p_v add up to H ≤ log V."""
    lp = torch.log_softmax(z.double(), -1)  # (..., V)
    p = lp.exp()
    H = -torch.where(p > 0, p * lp, 0.0).sum(-1, keepdim=True)  # (..., 1)
    return torch.where(p > 0, p * (lp + H).abs() * dz, 0.0).sum(-1) + fp32_rounding(z.shape[-1], H[..., 0])


def within(a, b, bound):
    return ((a.double() - b.double()).abs() <= bound).all()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 1000])
def test_chunked_equals_plain_values_and_gradients(kind, chunk_size):
    h_s, h_t, W, y, mask = sd_inputs()
    plain, pm = self_distillation_loss(h_s @ W.T, h_t @ W.T, y, mask, kind)
    g_h, g_W = torch.autograd.grad(plain, (h_s, W))
    chunked, cm = chunked_self_distillation_loss(h_s, h_t, W, y, mask, kind, chunk_size=chunk_size)
    c_h, c_W = torch.autograd.grad(chunked, (h_s, W))
    d_loss, d_h, d_W, d_div = chunk_rounding(h_s, h_t, W, y, mask, kind)
    assert within(chunked, plain, d_loss) and within(c_h, g_h, d_h) and within(c_W, g_W, d_W)
    valid, n = mask.bool(), mask.sum().item()
    z_s, z_t = (h_s @ W.T).detach().double(), (h_t @ W.T).double()  # (B, T, V)
    dz = fp32_rounding(W.shape[1], h_s.detach().abs() @ W.detach().abs().T) + log_softmax_rounding(z_s)
    dz_t = fp32_rounding(W.shape[1], h_t.abs() @ W.detach().abs().T) + log_softmax_rounding(z_t)
    dA = (dz + dz_t).amax(-1)  # (B, T)  A_t = log π_T(y_t) − log π_θ(y_t): one log-prob of each
    entropy = lambda z: token_entropy(z)[valid].double().mean()  # noqa: E731
    V = z_s.shape[-1]  # (each entropy sums V terms of total magnitude H ≤ log V, then a mean over n)
    bounds = {"divergence": d_div[valid].mean() + fp32_rounding(n, d_div[valid].abs().mean()),
              "adv_mean": dA[valid].mean() + fp32_rounding(n, cm.token_advantage.abs()[valid].mean()),
              "entropy_student": entropy_rounding(z_s, dz)[valid].mean() + fp32_rounding(V + n, math.log(V)),
              "entropy_teacher": entropy_rounding(z_t, dz_t)[valid].mean() + fp32_rounding(V + n, math.log(V))}
    for key, bound in bounds.items():
        assert abs(getattr(cm, key).item() - getattr(pm, key).item()) <= bound, key
    assert cm.adv_neg_frac == pm.adv_neg_frac  # (no A_t lies within its rounding of 0 here)
    A = token_advantage(token_logprobs(h_s @ W.T, y), token_logprobs(h_t @ W.T, y)) * mask
    assert within(cm.token_advantage, A, dA) and within(pm.token_advantage, A, dA)
    div = token_divergence(h_s @ W.T, h_t @ W.T, kind).detach() * mask  # (B, T)
    assert within(cm.token_divergence, div, d_div) and within(pm.token_divergence, div, d_div)


@pytest.mark.parametrize("kind,clip", [("sampled", 0.0), ("forward", 0.05), ("reverse", 0.3), ("jsd", 0.02)])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_equals_plain_for_the_ablation_terms(kind, clip, chunk_size):
    h_s, h_t, W, y, mask = sd_inputs()
    plain, pm = self_distillation_loss(h_s @ W.T, h_t @ W.T, y, mask, kind, clip=clip)
    g_h, g_W = torch.autograd.grad(plain, (h_s, W))
    chunked, cm = chunked_self_distillation_loss(h_s, h_t, W, y, mask, kind, chunk_size=chunk_size, clip=clip)
    c_h, c_W = torch.autograd.grad(chunked, (h_s, W))
    d_loss, d_h, d_W, d_div = chunk_rounding(h_s, h_t, W, y, mask, kind, clip)
    assert within(chunked, plain, d_loss) and within(c_h, g_h, d_h) and within(c_W, g_W, d_W)
    # the logged divergence is the unclipped one (sampled: the exact reverse KL the sampled form estimates)
    div = token_divergence(h_s @ W.T, h_t @ W.T, "reverse" if kind == "sampled" else kind).detach() * mask
    assert within(cm.token_divergence, div, d_div)


def test_sampled_form_is_an_unbiased_estimator_of_the_reverse_kl_gradient():
    """Σ_y π_θ(y) · ∇[−A(y) log π_θ(y)] over the whole vocabulary equals ∇ KL(π_θ ‖ π_T), exactly."""
    g = torch.Generator().manual_seed(3)
    z_s = (torch.randn(1, 1, 6, generator=g) * 1.5).requires_grad_()
    z_t = torch.randn(1, 1, 6, generator=g) * 1.5
    p = torch.softmax(z_s.detach(), -1)[0, 0]  # (V,)
    expected = torch.zeros_like(z_s)
    for v in range(6):
        term, _, _ = token_loss_terms(z_s, z_t, torch.tensor([[v]]), "sampled")
        expected += p[v] * torch.autograd.grad(term.sum(), z_s)[0]
    (reverse_grad,) = torch.autograd.grad(token_divergence(z_s, z_t, "reverse").sum(), z_s)
    # An exact expectation, no sampling: both sides are p ⊙ (log p − log q − KL) in exact arithmetic, and differ by
    # their float32 roundings. Each side's log-softmaxes (and the weights p, computed apart) are perturbations of
    # z_s and z_t (conftest.log_softmax_rounding), carried to first order through float64; then each side sums
    # V terms p_v·|A_v|·(e_v + p) (the loop here, KL's backward there) with the backward's few roundings.
    def grad_of(w, a, b):  # Σ_v p_v(w) · ∇_z[−A_v log π_θ(v)] with A_v = log π_T(v) − log π_θ(v)
        A = torch.log_softmax(b, -1) - torch.log_softmax(a, -1)  # (1, 1, V)
        return -torch.softmax(w, -1) * (A - (torch.softmax(a, -1) * A).sum(-1, keepdim=True))  # (1, 1, V)

    V = z_s.shape[-1]
    dz_s, dz_t = log_softmax_rounding(z_s), log_softmax_rounding(z_t)  # (1, 1, 1)
    bound = 2 * first_order_bound(grad_of, (z_s, z_s, z_t), (dz_s, dz_s, dz_t))  # (1, 1, V)  two sides
    lp, lq = torch.log_softmax(z_s.detach().double(), -1), torch.log_softmax(z_t.double(), -1)  # (1, 1, V)
    pA = lp.exp() * (lq - lp).abs()  # (1, 1, V)
    bound = bound + fp32_rounding(V + 4, pA + lp.exp() * pA.sum(-1, keepdim=True))
    assert ((expected - reverse_grad).abs() <= bound).all()
    # and its value is the per-token policy-gradient loss of `sampled_token_loss`
    y = torch.tensor([[2]])
    term, _, _ = token_loss_terms(z_s, z_t, y, "sampled")
    loss, _ = sampled_token_loss(token_logprobs(z_s, y), token_logprobs(z_t, y), torch.ones(1, 1))
    # exactly: the same −A·log π_θ(y) from the same log-softmaxes, then (there) a product and a quotient by 1
    assert torch.equal(term.sum(), loss)


def test_clip_caps_each_term_and_scales_its_gradient_by_the_same_factor():
    div = torch.tensor([0.01, 0.05, 0.2, 3.0], requires_grad=True)
    clipped = clip_terms(div, 0.05)
    # term · (0.05 / term) in fp32: 0.05 / term is reciprocal-then-multiply (Tensor.__rtruediv__), then one more
    # product: 3 roundings of 0.05 where the factor is below 1 (none where the clamp holds it at 1)
    expected = torch.tensor([0.01, 0.05, 0.05, 0.05])
    assert ((clipped.detach() - expected).abs() <= fp32_rounding(3, expected)).all()
    (grad,) = torch.autograd.grad(clipped.sum(), div)
    # the factor itself: the reciprocal and the product, after fp32's roundings of 0.05 and 0.2 (3.0 is exact;
    # 0.05 / 3.0 here rounds to double, then to fp32): 4 roundings of each quotient
    expected = torch.tensor([1.0, 1.0, 0.25, 0.05 / 3.0])
    assert ((grad - expected).abs() <= fp32_rounding(4, expected)).all()
    assert clip_terms(div, 0.0) is div  # 0 = off, the paper's loss untouched
    with pytest.raises(ValueError, match="sampled"):
        token_loss_terms(torch.randn(1, 2, 5), torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), "sampled",
                         clip=0.05)


def test_chunked_bf16_inputs_compute_in_fp32():
    h_s, h_t, W, y, mask = sd_inputs()
    h_s, h_t, W = h_s.detach().bfloat16(), h_t.bfloat16(), W.detach().bfloat16()
    loss, _ = chunked_self_distillation_loss(h_s, h_t, W, y, mask, chunk_size=4)
    assert loss.dtype == torch.float32
    # the same bf16 matmuls through the plain path (which also computes in fp32): each path rounds each logit to
    # bf16 (unit roundoff 2⁻⁸) of at most Σ_d |h_d·W_vd|, carried to the loss to first order, plus the fp32 rest
    plain, _ = self_distillation_loss(h_s @ W.T, h_t @ W.T, y, mask)
    z_s, z_t = h_s.double() @ W.double().T, h_t.double() @ W.double().T  # (B, T, V)
    dz_s, dz_t = (2 * 2.0 ** -8 * h.double().abs() @ W.double().abs().T for h in (h_s, h_t))  # (B, T, V)
    n = mask.sum().item()
    ref = lambda a, b: (reference_terms(a, b, y, "forward")[0] * mask).sum() / n  # noqa: E731
    bound = first_order_bound(ref, (z_s, z_t), (dz_s, dz_t)) + chunk_rounding(h_s, h_t, W, y, mask, "forward")[0]
    assert within(loss, plain, bound)


def test_chunked_frees_logits_between_chunks():
    """The autograd graph of the chunked loss keeps no (N, V) tensor: only the chunk inputs are saved."""
    B, T, D, V = 1, 64, 8, 4096
    g = torch.Generator().manual_seed(7)
    h_s = torch.randn(B, T, D, generator=g, requires_grad=True)
    h_t, W = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    y, mask = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        chunked_self_distillation_loss(h_s, h_t, W, y, mask, chunk_size=8)
    assert max(saved) < T * V / 4  # plain path would save several (T, V) tensors
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        self_distillation_loss(h_s @ W.T, h_t @ W.T, y, mask)
    assert max(saved) >= T * V


# ---------------------------------------------------------------------------------------------- diagnostics
def test_entropy_matches_brute_force_and_ignores_masked_vocabulary():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g) * 2
    logits[0, 1, 2] = float("-inf")  # a masked vocabulary entry: probability 0, contributes 0
    H = token_entropy(logits)  # (2, 3)
    bound = entropy_rounding(logits, log_softmax_rounding(logits.masked_fill(logits.isinf(), 0.0)))  # (2, 3)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t].double(), -1).tolist()
            assert abs(H[b, t].item() + sum(q * math.log(q) for q in p if q > 0)) <= bound[b, t]
    z = torch.zeros(4)  # uniform: log V, within the bound of the brute-force check above
    assert abs(token_entropy(z).item() - math.log(4)) <= entropy_rounding(z, log_softmax_rounding(z)).item()
    assert token_entropy(torch.tensor([0.0, -1e4, -1e4])).item() == 0.0  # one-hot: exp(−1e4) underflows to 0


def test_entropy_metrics_are_means_over_valid_tokens_only():
    h_s, h_t, W, y, mask = sd_inputs()
    _, m = self_distillation_loss(h_s @ W.T, h_t @ W.T, y, mask)
    H_s, H_t = token_entropy(h_s @ W.T), token_entropy(h_t @ W.T)  # (B, T)
    valid, n = mask.bool(), int(mask.sum())  # the same fp32 entropies, averaged in another order
    assert abs(m.entropy_student.item() - H_s[valid].mean().item()) <= fp32_rounding(n, H_s[valid].mean().item())
    assert abs(m.entropy_teacher.item() - H_t[valid].mean().item()) <= fp32_rounding(n, H_t[valid].mean().item())
    # and not the mean over all positions: it differs from that by more than the bound above would allow it
    assert abs(m.entropy_student.item() - H_s.mean().item()) > fp32_rounding(H_s.numel(), H_s.mean().item())


def test_top_share_against_a_direct_sort():
    g = torch.Generator().manual_seed(5)
    for n, frac in ((1, 0.01), (99, 0.01), (100, 0.01), (101, 0.01), (250, 0.05), (7, 1.0)):
        v = torch.rand(n, generator=g) ** 4  # skewed, like per-token divergences
        k = math.ceil(frac * n)
        expected = sum(sorted(v.tolist(), reverse=True)[:k]) / sum(v.tolist())
        # float64 sums of the same k and n values in two orders (torch's, Python's left to right), then one
        # division: relative roundings of the top sum, the total and the quotient, each a share of the result
        bound = fp64_rounding(k, expected) + fp64_rounding(n, expected) + fp64_rounding(1, expected)
        assert abs(top_share(v, frac) - expected) <= bound
    assert top_share(torch.tensor([0.0] * 99 + [3.0])) == 1.0  # one token carries everything
    assert top_share(torch.ones(200)) == 2 / 200  # flat: 2 tokens of 200 carry 1% (exact sums, one division)
    assert math.isnan(top_share(torch.zeros(10)))
    with pytest.raises(ValueError):
        top_share(torch.ones(0))
    with pytest.raises(ValueError):
        top_share(torch.ones(3), frac=0.0)
