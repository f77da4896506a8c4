"""Self-distillation loss (Eq. 3) and the per-token advantage A_t.

The student π_θ(·|x, y<t) (LoRA on) and the self-teacher π_base(·|x, c, y<t) (the same weights with the
adapter disabled, prompted with the feedback c) both score the student's own rollout y. The loss is the
per-token divergence between their next-token distributions over the full vocabulary, on the rollout
positions only:

    Eq. 3:  L = mean_t KL( π_base(·|x, c, y<t) ‖ π_θ(·|x, y<t) )
    A_t     = log π_base(y_t|x, c, y<t) − log π_θ(y_t|x, y<t)                 (detached)

Conventions used by every function here:
- `*_logits[b, t]` is the distribution over y_t (the caller has already shifted by one), so logits,
  log-probs, tokens and mask are all indexed by rollout position t.
- `mask[b, t]` is 1 on the rollout tokens y and 0 on prompt and padding positions.
- Losses are a SUM over valid positions divided by `normalizer`, the number of valid tokens in the whole
  optimizer step (all micro-batches, all ranks). Left as None it is this call's own `mask.sum()`. Passing
  the global count is what makes gradient accumulation and DDP take the same step as one big batch.
- Divergences are computed in fp32 whatever the input dtype. The teacher side is detached: no gradient flows
  into the self-teacher.

Departures from the paper:
1. The sampled-token form (kind "sampled", `sampled_token_loss`) is provided next to the full-vocabulary KL:
       sampled:  L = Σ_t −A_t · log π_θ(y_t|x, y<t) / normalizer
   GRPO's gradient with a per-token advantage: the on-policy estimator of the per-token *reverse* KL gradient,
   E_{y_t~π_θ}[−A_t ∇log π_θ(y_t)] = ∇KL(π_θ ‖ π_base) at position t, exact only when y was sampled at
   temperature 1 (the paper samples at 1.1, the demo at 0.5). Its logged divergence is the exact reverse KL.
2. `reverse` and `jsd` divergences, and a per-token clip (`clip_terms`, the OPSD code clips at 0.05), are
   offered for ablations; `forward` without a clip is the paper's and the default:
       jsd:   β·KL(T‖M) + (1−β)·KL(S‖M),  M = β·T + (1−β)·S,  0 < β < 1 (at the ends it is identically 0)
       clip:  term_t · min(1, clip / term_t), the factor detached (the gradient is scaled, its direction kept)
3. `chunked_self_distillation_loss` computes the same loss from final hidden states without ever holding
   (B, T, V) logits: a memory device, not a change to the objective (values and gradients match).
4. Diagnostics (ours, not the paper's): the mean entropy of the student's and the teacher's next-token
   distributions on the rollout tokens (`token_entropy`), and the share of a step's divergence carried by its
   top 1% tokens (`top_share`, from the per-token divergences the chunked loss returns).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a‖b) = Σ_v a_v (log a_v − log b_v) over the last dim; terms with a_v = 0 contribute 0."""
    p_a = logp_a.exp()
    terms = torch.where(p_a > 0, p_a * (logp_a - logp_b), torch.zeros_like(p_a))  # (..., V)
    return terms.sum(-1)  # (...)


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, kind: str = "forward",
                     beta: float = 0.5) -> Tensor:
    """Per-position divergence of the next-token distributions, (B, T, V) -> (B, T): forward (Eq. 3), reverse
    or jsd (departure 2)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    # A −inf logit (a masked vocabulary entry) has log-prob −inf; clamping it to the most negative finite fp32
    # keeps its probability exactly 0 and every gradient finite (0·(−inf) is NaN in the backward pass).
    floor = torch.finfo(torch.float32).min
    logp_s = torch.log_softmax(student_logits.float(), dim=-1).clamp(min=floor)  # (B, T, V)
    logp_t = torch.log_softmax(teacher_logits.float(), dim=-1).clamp(min=floor)  # (B, T, V)
    if kind == "forward":
        return _kl(logp_t, logp_s)  # (B, T)  Eq. 3: KL(teacher‖student)
    if kind == "reverse":
        return _kl(logp_s, logp_t)  # (B, T)  KL(student‖teacher)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1 (at the ends it is identically 0), got beta={beta}")
        # jsd's M (departure 2), in log space
        logp_m = torch.logsumexp(torch.stack([logp_t + math.log(beta),
                                              logp_s + math.log(1.0 - beta)]), dim=0)  # (B, T, V)
        return beta * _kl(logp_t, logp_m) + (1.0 - beta) * _kl(logp_s, logp_m)  # (B, T)  jsd (departure 2)
    raise ValueError(f"unknown divergence kind {kind!r}; expected 'forward', 'reverse' or 'jsd'")


LOSS_KINDS = ("forward", "reverse", "jsd", "sampled")


def clip_terms(terms: Tensor, clip: float) -> Tensor:
    """Departure 2's clip of non-negative loss terms; clip = 0 leaves them as they are."""
    if clip <= 0:
        return terms
    # clip (departure 2)
    scale = torch.clamp(clip / terms.detach().clamp(min=torch.finfo(torch.float32).tiny), max=1.0)
    return terms * scale


def token_loss_terms(student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, kind: str = "forward",
                     beta: float = 0.5, clip: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Each position's loss term, its divergence (logged) and A_t: (..., V) -> 3 × (...)."""
    if kind == "sampled" and clip > 0:
        raise ValueError("clip applies to the full-vocabulary divergences, not to the sampled form")
    with torch.no_grad():
        logp_y_t = token_logprobs(teacher_logits, tokens)  # (...)
    if kind == "sampled":
        logp_y_s = token_logprobs(student_logits, tokens)  # (...)  with gradient
        A = token_advantage(logp_y_s, logp_y_t)  # (...)  detached
        with torch.no_grad():
            div = token_divergence(student_logits, teacher_logits, "reverse")  # (...)
        return -A * logp_y_s, div, A  # sampled form (departure 1)
    div = token_divergence(student_logits, teacher_logits, kind, beta)  # (...)
    with torch.no_grad():
        A = token_advantage(token_logprobs(student_logits, tokens), logp_y_t)  # (...)
    return clip_terms(div, clip), div.detach(), A


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of each next-token distribution, fp32, no gradient: (..., V) -> (...)."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
        p = logp.exp()  # (..., V)
        # H(π) = −Σ_v π_v log π_v; a −inf logit has π_v = 0 and contributes 0 (not 0·(−inf) = NaN)
        return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # (...)


def top_share(values: Tensor, frac: float = 0.01) -> float:
    """Share of Σ values carried by the ceil(frac·N) largest (departure 4): (N,) -> float, NaN if Σ values = 0."""
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"top_share needs a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"top_share needs 0 < frac <= 1, got {frac}")
    v = values.detach().double()  # (N,)
    n_top = math.ceil(frac * v.numel())
    total = v.sum()
    if total <= 0:
        return float("nan")
    return (v.topk(n_top).values.sum() / total).item()


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log π(y_t) of the sampled tokens: (B, T, V), (B, T) -> (B, T), fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def token_advantage(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """(B, T), (B, T) -> (B, T)."""
    # A_t
    return (teacher_logprobs.float() - student_logprobs.float()).detach()  # (B, T)


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum()


def _normalizer(mask: Tensor, normalizer: float | None) -> float | Tensor:
    n = mask.sum() if normalizer is None else normalizer
    return n.clamp(min=1) if isinstance(n, Tensor) else max(float(n), 1.0)


class SDStats(NamedTuple):
    """Statistics of one Eq. 3 call, detached tensors: means over the call's valid tokens (0-dim, fp32), and the
    per-token A_t and divergence (B, T), 0 off the mask."""
    divergence: Tensor
    adv_mean: Tensor
    adv_neg_frac: Tensor
    entropy_student: Tensor
    entropy_teacher: Tensor
    token_advantage: Tensor
    token_divergence: Tensor


def sampled_token_loss(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor,
                       normalizer: float | None = None) -> tuple[Tensor, Tensor]:
    """Departure 1's sampled form from token log-probs (B, T). Returns (loss, A_t (B, T))."""
    mask = mask.float()
    A = token_advantage(student_logprobs, teacher_logprobs)  # (B, T)
    # sampled form (departure 1)
    loss = _masked_sum(-A * student_logprobs.float(), mask) / _normalizer(mask, normalizer)
    return loss, A


def self_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, mask: Tensor,
                           kind: str = "forward", *, beta: float = 0.5, clip: float = 0.0,
                           normalizer: float | None = None) -> tuple[Tensor, SDStats]:
    """Eq. 3 (or kind's loss) on logits (B, T, V); tokens, mask: (B, T). The reference for the chunked loss."""
    mask = mask.float()
    terms, div, A = token_loss_terms(student_logits, teacher_logits.detach(), tokens, kind, beta, clip)  # 3 × (B, T)
    loss = _masked_sum(terms, mask) / _normalizer(mask, normalizer)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = SDStats(divergence=_masked_sum(div, mask) / n, adv_mean=_masked_sum(A, mask) / n,
                        adv_neg_frac=_masked_sum((A < 0).float(), mask) / n,
                        entropy_student=_masked_sum(token_entropy(student_logits), mask) / n,
                        entropy_teacher=_masked_sum(token_entropy(teacher_logits), mask) / n,
                        token_advantage=A * mask, token_divergence=div * mask)
    return loss, stats


def _chunk_terms(h_s: Tensor, h_t: Tensor, y: Tensor, weight: Tensor, kind: str, beta: float,
                 clip: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One chunk of N rollout positions: (N, D), (N, D), (N,), (V, D) -> loss terms (N,), divergence (N,),
    A_t (N,), and the entropies of the student's and the teacher's distributions (N,), (N,)."""
    z_s = (h_s @ weight.T).float()  # (N, V)  student logits
    with torch.no_grad():
        z_t = (h_t @ weight.T).float()  # (N, V)  teacher logits
    terms, div, A = token_loss_terms(z_s, z_t, y, kind, beta, clip)  # 3 × (N,)
    return terms, div, A, token_entropy(z_s), token_entropy(z_t)  # 5 × (N,)


def chunked_self_distillation_loss(student_hidden: Tensor, teacher_hidden: Tensor, lm_head_weight: Tensor,
                                   tokens: Tensor, mask: Tensor, kind: str = "forward", *,
                                   chunk_size: int = 1024, beta: float = 0.5, clip: float = 0.0,
                                   normalizer: float | None = None) -> tuple[Tensor, SDStats]:
    """Eq. 3 from final (post-norm) hidden states (B, T, D), position t predicting y_t, and the shared head (V, D).

    The valid positions are gathered and processed in chunks, each under activation checkpointing (the backward
    recomputes its logits), so the loss holds O(chunk_size × V) extra memory, not O(B × T × V) (departure 3).
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same shape")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    valid = mask.bool()  # (B, T)
    h_s = student_hidden[valid]  # (N, D)
    h_t = teacher_hidden.detach()[valid]  # (N, D)
    y = tokens[valid]  # (N,)
    loss_sum = student_hidden.new_zeros((), dtype=torch.float32)
    A_flat = torch.zeros(y.shape[0], dtype=torch.float32, device=y.device)  # (N,)
    div_detached = torch.zeros_like(A_flat)  # (N,)
    H_s, H_t = torch.zeros_like(A_flat), torch.zeros_like(A_flat)  # (N,), (N,)
    for start in range(0, y.shape[0], chunk_size):
        end = min(start + chunk_size, y.shape[0])
        terms, div, A, ent_s, ent_t = checkpoint(_chunk_terms, h_s[start:end], h_t[start:end], y[start:end],
                                                 lm_head_weight, kind, beta, clip, use_reentrant=False)  # 5 × (n,)
        loss_sum = loss_sum + terms.sum()
        A_flat[start:end] = A
        H_s[start:end], H_t[start:end] = ent_s, ent_t
        div_detached[start:end] = div.detach()
    loss = loss_sum / _normalizer(mask.float(), normalizer)
    A_full = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)  # (B, T)
    A_full[valid] = A_flat
    div_full = torch.zeros_like(A_full)  # (B, T)
    div_full[valid] = div_detached
    n = max(y.shape[0], 1)
    return loss, SDStats(divergence=div_detached.sum() / n, adv_mean=A_flat.sum() / n,
                         adv_neg_frac=(A_flat < 0).float().sum() / n, entropy_student=H_s.sum() / n,
                         entropy_teacher=H_t.sum() / n, token_advantage=A_full, token_divergence=div_full)
