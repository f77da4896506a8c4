"""The step's log line (log.jsonl): its metrics summed over micro-batches and ranks, and the diagnostics of SD steps.

Diagnostics (ours, not the paper's): entropy_student / entropy_teacher (mean next-token entropy on the rollout
tokens, from sd_loss), div_top1_share (the share of the step's divergence carried by its top 1% tokens, over every
rank's tokens), answered (rollouts with a \\boxed{} answer; every run), adv_claim / adv_off_claim (mean A_t on the
tokens of the first wrong claim that the exact arithmetic critic locates, and on the other tokens of those rollouts;
arithmetic data) with claim_located (the share of rollouts where it locates one), and with --teacher-samples
teacher_reward / teacher_answered (the self-teacher's samples from the teacher prompt: the teacher's gap, step by
step).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

import critic
import grading
import pbsd
import sd_loss
from demo import exact_critic
from feedback import FORMS, form_name
from infra.dist import Dist, all_reduce_sum

# metrics that average over a subset of the tokens: the count each averages over (weights the step's mean)
TOKEN_SUBSET_COUNTS = {"adv_claim": "n_claim_tokens", "adv_off_claim": "n_off_claim_tokens"}


def wrong_claims(tokenizer, items: list, critiques: list[critic.Critique] | None = None) -> list[np.ndarray | None]:
    """The tokens (T,) bool of each rollout's first wrong claim as the exact arithmetic critic locates it
    (Critique.wrong_span, characters, mapped to the rollout's own ids as in the mechanism figure). critiques: the
    exact critic's critiques of these rollouts when the step already has them (stepalign with --critic exact);
    otherwise they are computed here. None where it locates none (a correct rollout, or an error without an equation
    to pin), and None where the engine's text is not the decode of its ids (a detokenizer that differs): a
    diagnostic never stops a run; both lower `claim_located`."""
    if critiques is None:
        critiques = exact_critic.ExactArithmeticCritic().critique([(it.problem, it.completion.text) for it in items])
    claims = []
    for it, q in zip(items, critiques, strict=True):
        claim = None
        if q.wrong_span is not None:
            try:
                spans = exact_critic.token_char_spans(tokenizer, it.completion.token_ids, it.completion.text)
            except ValueError:
                spans = None
            if spans is not None:
                claim = exact_critic.error_marks_from_spans(spans, it.completion.text, q.wrong_span).wrong_claim
        claims.append(claim)
    return claims


def wrong_claim_metrics(A: torch.Tensor, mask: torch.Tensor, claims: list[np.ndarray | None]) -> dict[str, float]:
    """Mean A_t on the wrong claims' tokens (adv_claim) and on the other valid tokens of the same rollouts
    (adv_off_claim), with the token counts they average over (n_claim_tokens, n_off_claim_tokens); rows whose
    claim is None are left out. A: (B, T) A_t, mask: (B, T), claims: B arrays (T_b,) bool or None. {} if none."""
    on = torch.zeros(A.shape, dtype=torch.bool)  # (B, T)
    located = torch.zeros(A.shape, dtype=torch.bool)  # (B, T)
    for b, claim in enumerate(claims):
        if claim is not None:
            on[b, :len(claim)] = torch.from_numpy(claim)
            located[b] = True
    valid = mask.bool().cpu()  # (B, T)
    on, off = on & valid, located & valid & ~on  # (B, T), (B, T)
    if not on.any():
        return {}
    A = A.detach().float().cpu()
    out = {"adv_claim": A[on].mean().item(), "n_claim_tokens": float(on.sum())}
    if off.any():
        out |= {"adv_off_claim": A[off].mean().item(), "n_off_claim_tokens": float(off.sum())}
    return out


def metric_sums(cfg, losses: list[tuple]) -> dict[str, float]:
    """The step's metric sums from its micro-batches, converted to floats here, once per step. losses: (items, loss,
    stats, mask) of each micro-batch that took a backward pass. "loss" is the sum of the micro-batch losses (each
    already divided by the step's normalizer); each statistic k, a micro-batch mean, is weighted by what it averages
    over (the valid tokens for SD and GRPO; pairs, or decisive pairs, for PBSD; the claim's tokens for adv_claim),
    with the weights summed in "k/weight", so that the step's value is its mean over the whole step."""
    sums: dict[str, float] = {}
    for mb, loss, stats, mask in losses:
        kept = [it for it in mb if not it.skipped]
        m = {k: float(v) for k, v in stats._asdict().items() if v.dim() == 0}
        if cfg.objective == "pbsd":
            m.pop("n_pairs")
            n_decisive = m.pop("n_decisive")
            weight = {k: n_decisive if k in pbsd.DECISIVE_PAIR_METRICS else float(len(kept)) for k in m}
        else:
            weight = dict.fromkeys(m, float(sum(len(it.completion.token_ids) for it in kept)))
        if cfg.objective == "sd" and cfg.feedback != "grpo":
            claims = wrong_claim_metrics(stats.token_advantage, mask, [it.wrong_claim for it in mb])
            weight |= {k: claims.pop(n) for k, n in TOKEN_SUBSET_COUNTS.items() if n in claims}
            m |= claims
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * weight[k]
            sums[f"{k}/weight"] = sums.get(f"{k}/weight", 0.0) + weight[k]
    return sums


def step_diagnostics(cfg, items: list, losses: list[tuple], d: Dist) -> dict[str, float]:
    """The step's diagnostics as (sum, k/weight) entries of the metric sums (step_record divides them after the
    all-reduce): answered, claim_located, teacher_reward and teacher_answered (SD with --teacher-samples), and
    div_top1_share, computed from every rank's per-token divergences (every rank adds the same value, weight 1)."""
    out = {"answered": float(sum(grading.extract_answer(it.completion.text) is not None for it in items)),
           "answered/weight": float(len(items))}
    if cfg.feedback == "grpo":
        return out
    if cfg.data == "arithmetic":
        out |= {"claim_located": float(sum(it.wrong_claim is not None for it in items)),
                "claim_located/weight": float(len(items))}
    sampled = [it for it in items if it.teacher_sample is not None]
    if cfg.objective == "sd" and cfg.teacher_samples:  # (PBSD logs teacher_reward in step_record)
        out |= {"teacher_reward": sum(it.teacher_reward for it in sampled),
                "teacher_reward/weight": float(len(sampled)),
                "teacher_answered": float(sum(grading.extract_answer(it.teacher_sample.text) is not None
                                              for it in sampled)),
                "teacher_answered/weight": float(len(sampled))}
    if cfg.objective == "sd":
        divergences = [stats.token_divergence[mask.to(stats.token_divergence.device).bool()].cpu()
                       for _, _, stats, mask in losses]  # (N_mb,) the valid tokens' divergences
        local = torch.cat(divergences) if divergences else torch.zeros(0)  # (N_rank,)
        every = [local]
        if d.world > 1:  # every rank takes part in the gather, also one whose micro-batches were all skipped
            every = [None] * d.world
            dist.all_gather_object(every, local)
        step_div = torch.cat(every)  # (N,)
        if step_div.numel():
            out |= {"div_top1_share": sd_loss.top_share(step_div, 0.01), "div_top1_share/weight": 1.0}
    return out


def step_record(cfg, step, items, sums, stats, counters, timer, seconds, grad_norm, d: Dist) -> dict:
    """The step's JSONL line, every value summed over ranks then normalized."""
    n_items = len(items)
    n_tokens = sum(len(it.completion.token_ids) for it in items)
    keys = {k for k in sums if k != "loss" and not k.endswith("/weight")}
    if d.world > 1:  # a rank whose micro-batches were all skipped has no metrics: agree on the names first
        every = [None] * d.world
        dist.all_gather_object(every, keys)
        keys = set().union(*every)
    keys = sorted(keys)
    local = [sums.get("loss", 0.0), n_items, n_tokens, sum(it.reward for it in items),
             sum(it.skipped for it in items), stats.get("critic_schema_ok", 0.0),
             sum(it.teacher_reward for it in items), stats.get("critic_failed", 0.0),
             stats.get("skipped_unstructured", 0.0), stats.get("kept_unstructured", 0.0)] \
        + [sums.get(k, 0.0) for k in keys] + [sums.get(f"{k}/weight", 0.0) for k in keys]
    t = all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=d.device), d).tolist()
    loss, n_items, n_tokens, reward, skipped, schema_ok, teacher_reward, failed, skipped_unstr, kept_unstr = t[:10]
    values, weights = t[10:10 + len(keys)], t[10 + len(keys):]
    record = {"step": step, "loss": loss, "reward": reward / n_items, "response_length": n_tokens / n_items,
              "skipped_critic_step": skipped, "grad_norm": grad_norm, **counters,
              "tokens_per_s": n_tokens / max(seconds, 1e-9), "seconds": seconds,
              **{f"time_{k}": v for k, v in timer.seconds.items()}}
    if FORMS[form_name(cfg)].needs_critic:  # among the critiques the backend returned; the counts are this step's
        record["critic_schema_ok"] = schema_ok / max(n_items - failed, 1)
        record["skipped_unstructured_step"], record["kept_unstructured_step"] = skipped_unstr, kept_unstr
    if cfg.objective == "pbsd":
        record["teacher_reward"] = teacher_reward / max(n_items - skipped, 1)
    record |= {k: v / max(w, 1e-9) for k, v, w in zip(keys, values, weights)}
    return record

