"""GRPO, the baseline: group-normalized advantages and the clipped surrogate (DeepSeekMath, Shao et al. 2024).

The G rollouts y_1..y_G of a problem get rewards r_i ∈ {0, 1} (final answer correct); every token of rollout i
gets the advantage A_i, and the policy minimizes the clipped surrogate ℓ_t per token, optionally plus
kl_coef·k3_t, an estimate of KL(π_θ ‖ π_ref) (off by default, as in the paper's setup):

    Eq. G1:  A_i = (r_i − mean(r_1..G)) / (std(r_1..G) + eps)
    Eq. G2:  ρ_t = π_θ(y_t | x, y<t) / π_old(y_t | x, y<t),   ℓ_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε_high)·A)
    Eq. G3:  k3_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 ≥ 0

Losses are a SUM divided by `normalizer`, the valid tokens (aggregation "token") or sequences ("sequence") of
the whole optimizer step, all micro-batches and ranks, so that accumulation and DDP equal one big batch (None:
this call's own count).

Departures from the published GRPO:
1. std is the population std (divide by G): every non-constant group then has mean(A²) = 1 up to eps.
   Bessel's version only rescales A by sqrt((G − 1)/G) (0.935 at G = 8): a learning-rate change.
2. A group whose rewards are all equal gets A = 0 exactly (no signal), never NaN, whatever eps is.
3. The default aggregation is "token" (as in DAPO); GRPO's per-sequence mean is aggregation="sequence".
4. ε_high (DAPO's "clip-higher" bound) defaults to ε: the symmetric PPO clip.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class GRPOStats(NamedTuple):
    """Means over the call's valid tokens, detached 0-dim tensors."""
    clip_frac: Tensor  # share of tokens whose clipped branch is active (no gradient)
    ratio_mean: Tensor  # ρ_t
    adv_mean: Tensor  # A on each token


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Eq. G1: A_i within each group of `group_size` consecutive rollouts: (N·G,) -> (N·G,)."""
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # (N, G)
    mean = r.mean(dim=1, keepdim=True)  # (N, 1)
    std = r.std(dim=1, unbiased=False, keepdim=True)  # (N, 1)  population std (see departure 1)
    # Eq. G1; 0 where the group has no variance (departure 2)
    A = torch.where(std > 0, (r - mean) / (std + eps), torch.zeros_like(r))  # (N, G)
    return A.view(-1)  # (N·G,)


def token_mean(x: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """Σ_{b,t} x·mask / (number of valid tokens): every token weighs the same."""
    n = mask.sum() if normalizer is None else torch.tensor(float(normalizer))
    return (x * mask).sum() / n.clamp(min=1)


def sequence_mean(x: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """Σ_b [Σ_t x·mask / len_b] / (number of sequences): every sequence weighs the same."""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,)
    n = per_seq.shape[0] if normalizer is None else normalizer
    return per_seq.sum() / max(float(n), 1.0)


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
              clip_eps: float = 0.2, clip_eps_high: float | None = None, aggregation: str = "token", *,
              ref_logprobs: Tensor | None = None, kl_coef: float = 0.0,
              normalizer: float | None = None) -> tuple[Tensor, GRPOStats]:
    """Eq. G2 ℓ_t (+ kl_coef · Eq. G3 k3_t) aggregated over the mask by `aggregation` (departure 3).
    logprobs, old_logprobs, ref_logprobs, mask: (B, T); advantages: (B,) or (B, T)."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.float()
    A = advantages.float()
    if A.dim() == 1:
        A = A.unsqueeze(-1)  # (B, 1)  the sequence's advantage on each of its tokens
    logprobs = logprobs.float()
    # Eq. G2, ρ_t in log space
    ratio = torch.exp(logprobs - old_logprobs.float().detach())  # (B, T)
    unclipped = ratio * A  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high) * A  # (B, T)
    per_token = -torch.min(unclipped, clipped)  # (B, T)
    if ref_logprobs is not None and kl_coef != 0.0:
        # Eq. G3
        log_r = ref_logprobs.float().detach() - logprobs  # (B, T)
        per_token = per_token + kl_coef * (torch.exp(log_r) - log_r - 1.0)
    if aggregation == "token":
        loss = token_mean(per_token, mask, normalizer)
    elif aggregation == "sequence":
        loss = sequence_mean(per_token, mask, normalizer)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected 'token' or 'sequence'")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped_active = (clipped < unclipped).float()  # (B, T)  the clipped branch (no gradient) is active
        A_tok = A.expand_as(mask)  # (B, T)
        stats = GRPOStats(clip_frac=(clipped_active * mask).sum() / n, ratio_mean=(ratio * mask).sum() / n,
                          adv_mean=(A_tok * mask).sum() / n)
    return loss, stats
