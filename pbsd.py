"""Preference-based self-distillation (PBSD): a DPO-style loss on (teacher sample, student sample) pairs.

The optimum of reward-regularized self-distillation, max_π E_{y~π(·|x)}[r] − β·KL(π(·|x) ‖ π_base(·|x, c)), is
π* ∝ π_base(·|x, c)·exp(r/β); inverted as in DPO, the policy defines the implicit reward of Eq. P1, trained on
pairs with the Bradley–Terry loss of Eq. P2 (y_w: the sample with the higher verifier reward):

    Eq. P1:  r_θ(y) = β·[log π_θ(y|x) − log π_base(y|x, c)]      (sequence log-probs: sums over y's tokens)
    Eq. P2:  L = −log σ(r_θ(y_w) − r_θ(y_l))                     (per pair)

A pair is one TEACHER sample y_T ~ π_base(·|x, c) (adapter disabled, prompt x + c) and one STUDENT sample
y_S ~ π_θ(·|x). π_θ scores both after the student prompt x (with gradient: y_T as if the student had written it),
π_base both after x + c (no gradient); train.pbsd_micro_batch computes the four. The loss is a SUM over the
decisive (non-tie) pairs divided by `normalizer`, their number in the whole optimizer step (all micro-batches and
ranks, `decisive_pairs`; None: this call's own), so that accumulation and DDP take the same step as one batch.

Departures and choices (the published description leaves these open; each is tested):
1. Ties (both samples right, or both wrong) are masked out (no gradient) and counted in `tie_frac`, not in the
   normalizer: the verifier gives no preference, and a rule such as "prefer the teacher" would invent one.
2. β = 0.1, DPO's usual value: sequence log-ratios are tens of nats, so margins are O(1–10) and the sigmoid is
   neither flat nor saturated for most pairs.
3. Student sample i is paired with teacher sample i (G = 1 in the paper: one pair per problem), not all G² pairs.
4. length_norm "sum" (default) is the derivation's (π* holds for sums only); "mean" divides each sequence's
   log-prob by its length (as in SimPO): no bias towards short answers, but another objective.
5. Any real-valued reward works (the verifier's is 0/1); the winner is the strictly higher one.
6. The plain sigmoid DPO loss: no label smoothing, no reference-free variant, no SFT term.
7. As π_base scores after x + c, r_θ is not 0 at initialization: β·[log π_base(y|x) − log π_base(y|x, c)]
   favours the teacher's own sample, and the first loss is not log 2. train.py renders the teacher prompt with
   the student's thinking mode (its departure 7), so that y_T is in the student's format.

This file imports nothing from the project: it can be copied alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

LENGTH_NORMS = ("sum", "mean")
# metrics of pbsd_loss that are means over the DECISIVE pairs (the others are means over all pairs)
DECISIVE_PAIR_METRICS = ("pair_acc", "margin_mean")


class PBSDStats(NamedTuple):
    """Statistics of one call's pairs, detached 0-dim tensors (fp64: a fp32 sum divided by a count)."""
    pair_acc: Tensor  # share of the decisive pairs whose margin is > 0 (0 when there are none)
    margin_mean: Tensor  # mean r_θ(y_w) − r_θ(y_l) over the decisive pairs (0 when there are none)
    tie_frac: Tensor  # share of the pairs that tie
    student_win_frac: Tensor  # share of the pairs the student sample wins
    implicit_reward_student: Tensor  # mean r_θ(y_S) over the pairs
    implicit_reward_teacher: Tensor  # mean r_θ(y_T) over the pairs
    n_pairs: Tensor
    n_decisive: Tensor


def sequence_logprob(token_logprobs: Tensor, mask: Tensor, length_norm: str = "sum") -> Tensor:
    """log π(y|·) of each row, (B, T), (B, T) -> (B,), fp32; length_norm: departure 4. An empty response has 0."""
    if token_logprobs.shape != mask.shape:
        raise ValueError(f"token log-probs {tuple(token_logprobs.shape)} and mask {tuple(mask.shape)} must have "
                         "the same shape")
    valid = mask.bool()  # (B, T)
    # log π(y|·) = Σ_t log π(y_t|·, y<t); where() rather than a product so that padding values never leak in
    total = torch.where(valid, token_logprobs.float(), torch.zeros((), device=token_logprobs.device)).sum(-1)  # (B,)
    if length_norm == "sum":
        return total
    if length_norm == "mean":
        return total / valid.sum(-1).clamp(min=1)  # (B,)
    raise ValueError(f"unknown length_norm {length_norm!r}; expected one of {LENGTH_NORMS}")


def implicit_reward(policy_seq_logp: Tensor, base_seq_logp: Tensor, beta: float) -> Tensor:
    """Eq. P1, the base side detached: (B,), (B,) -> (B,)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    # Eq. P1
    return beta * (policy_seq_logp.float() - base_seq_logp.float().detach())  # (B,)


def pair_outcomes(student_rewards: Tensor, teacher_rewards: Tensor) -> Tensor:
    """Who wins each pair: +1 the student sample, −1 the teacher sample, 0 a tie (departure 1). (B,), (B,) -> (B,)."""
    r_S, r_T = torch.as_tensor(student_rewards).float(), torch.as_tensor(teacher_rewards).float()
    if r_S.dim() != 1 or r_S.shape != r_T.shape:
        raise ValueError(f"student rewards {tuple(r_S.shape)} and teacher rewards {tuple(r_T.shape)} must be 1-D "
                         "tensors of the same length (one reward per pair)")
    if not (torch.isfinite(r_S).all() and torch.isfinite(r_T).all()):
        raise ValueError("rewards must be finite")
    return torch.sign(r_S - r_T)  # (B,)


def decisive_pairs(student_rewards, teacher_rewards) -> int:
    """The number of non-tie pairs, from the rewards alone (so before any forward pass)."""
    return int((pair_outcomes(torch.as_tensor(student_rewards), torch.as_tensor(teacher_rewards)) != 0).sum())


def pbsd_loss(policy_logp_S: Tensor, base_logp_S: Tensor, mask_S: Tensor,
              policy_logp_T: Tensor, base_logp_T: Tensor, mask_T: Tensor,
              student_rewards: Tensor, teacher_rewards: Tensor, beta: float = 0.1, length_norm: str = "sum",
              normalizer: float | None = None) -> tuple[Tensor, PBSDStats]:
    """Eq. P2 summed over the decisive pairs / normalizer. Per-token log-probs and masks: (B, T_S) for the student
    sample, (B, T_T) for the teacher sample, scored as the module docstring says; rewards: (B,)."""
    if policy_logp_S.shape != base_logp_S.shape or policy_logp_T.shape != base_logp_T.shape:
        raise ValueError(f"policy and base log-probs must match per sample: student {tuple(policy_logp_S.shape)} vs "
                         f"{tuple(base_logp_S.shape)}, teacher {tuple(policy_logp_T.shape)} vs "
                         f"{tuple(base_logp_T.shape)}")
    if policy_logp_S.shape[0] != policy_logp_T.shape[0]:
        raise ValueError(f"{policy_logp_S.shape[0]} student samples but {policy_logp_T.shape[0]} teacher samples: "
                         "one of each per pair")
    r_S = implicit_reward(sequence_logprob(policy_logp_S, mask_S, length_norm),
                          sequence_logprob(base_logp_S, mask_S, length_norm), beta)  # (B,)  r_θ(y_S)
    r_T = implicit_reward(sequence_logprob(policy_logp_T, mask_T, length_norm),
                          sequence_logprob(base_logp_T, mask_T, length_norm), beta)  # (B,)  r_θ(y_T)
    s = pair_outcomes(student_rewards, teacher_rewards).to(r_S.device)  # (B,)  +1 student wins, −1 teacher wins
    decisive = s != 0  # (B,)
    # Eq. P2's margin r_θ(y_w) − r_θ(y_l) (s = +1: y_S is y_w)
    margin = s * (r_S - r_T)  # (B,)
    # Eq. P2; ties add 0 (departure 1), through where(), which keeps the loss in the graph when every pair ties
    # (every rank runs its backward pass)
    per_pair = torch.where(decisive, -F.logsigmoid(margin), torch.zeros_like(margin))  # (B,)
    n = decisive.sum() if normalizer is None else normalizer
    loss = per_pair.sum() / (n.clamp(min=1) if isinstance(n, Tensor) else max(float(n), 1.0))
    with torch.no_grad():
        B, k = s.shape[0], decisive.sum()  # k: () int64
        stats = PBSDStats(
            pair_acc=((margin > 0) & decisive).float().sum().double() / k.clamp(min=1),
            margin_mean=torch.where(decisive, margin, torch.zeros_like(margin)).sum().double() / k.clamp(min=1),
            tie_frac=1.0 - k.double() / max(B, 1),
            student_win_frac=(s > 0).float().sum().double() / max(B, 1),
            implicit_reward_student=r_S.sum().double() / max(B, 1),
            implicit_reward_teacher=r_T.sum().double() / max(B, 1),
            n_pairs=torch.tensor(float(B), dtype=torch.float64),
            n_decisive=k.double(),
        )
    return loss, stats
