"""samples.jsonl: what happened to each rollout of each step, beside log.jsonl, so that a first real run can be read.

One line per rollout (all ranks, written by rank 0): the step, the problem's id, the rollout y and its reward, the
critique (the critic's raw answer with its think trace, the parsed fields, or the failure and its kind), the teacher's
context c, whether the rollout was skipped, and what the loss saw of it (SD: its mean per-token divergence and mean
A_t; GRPO: its advantage A_i). `--sample-log-mb` bounds the file (paper scale: a step of 32 rollouts with 16k-token
critiques is a few MB); past the bound no more lines are written, and the run says so once. 0 turns it off.

    jq -c 'select(.critique.error_kind != null) | {step, problem_id, critique}' runs/paper/stepalign/samples.jsonl
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from infra.dist import Dist
from infra.logs import strict_json, warn

FILE = "samples.jsonl"


def per_rollout_loss(losses: list[tuple]) -> dict[int, dict[str, float]]:
    """{id(item): what the loss saw of it} from the step's (micro-batch items, loss, stats, mask (B, T)) entries.
    SD (sd_loss.SDStats): the rollout's mean per-token divergence and mean A_t over its valid tokens. PBSD's rows are
    pairs of samples, not rollouts: nothing per rollout."""
    out = {}
    for mb, _, stats, mask in losses:
        if not hasattr(stats, "token_divergence"):
            continue
        n = mask.sum(-1).clamp(min=1)  # (B,)
        divergence = (stats.token_divergence * mask).sum(-1) / n  # (B,)
        advantage = (stats.token_advantage * mask).sum(-1) / n  # (B,)
        for b, it in enumerate(mb):
            if not it.skipped:
                out[id(it)] = {"divergence": divergence[b].item(), "adv_mean": advantage[b].item()}
    return out


def critique_record(q) -> dict | None:
    if q is None:
        return None
    return {"raw": q.raw, "text": q.text, "case": q.case, "pivot_step": q.pivot_step, "schema_ok": q.schema_ok,
            "schema_error": q.schema_error, "error": q.error, "error_kind": q.error_kind}


def sample_records(step: int, items: list, losses: list[tuple], rank: int, grpo: bool) -> list[dict]:
    """This rank's lines of step `step` (1-based)."""
    seen = per_rollout_loss(losses)
    records = []
    for it in items:
        rec = {"step": step, "rank": rank, "problem_id": it.problem.id, "draw": it.draw, "sample": it.sample,
               "reward": it.reward, "rollout": it.completion.text, "rollout_tokens": len(it.completion.token_ids),
               "skipped": it.skipped, "critique": critique_record(it.critique), "context": it.context}
        if grpo:
            rec["advantage"] = it.advantage
        else:
            rec |= seen.get(id(it), {"divergence": None, "adv_mean": None})
        if it.teacher_sample is not None:
            rec |= {"teacher_sample": it.teacher_sample.text, "teacher_reward": it.teacher_reward}
        records.append(rec)
    return records


class SampleLog:
    """Appends each step's lines to out_dir/samples.jsonl on rank 0, until the file would pass `max_mb`."""

    def __init__(self, out_dir: Path, max_mb: float, d: Dist):
        self.path, self.d = Path(out_dir) / FILE, d
        self.enabled = max_mb > 0
        self.max_bytes = int(max_mb * 2**20)
        self.size = self.path.stat().st_size if d.master and self.path.exists() else 0
        self.full = False

    def write(self, step: int, items: list, losses: list[tuple], grpo: bool, bar=None) -> None:
        """Every rank calls it every step (the lines are gathered to rank 0, a collective)."""
        if not self.enabled:
            return
        records = sample_records(step, items, losses, self.d.rank, grpo)
        if self.d.world > 1:
            every = [None] * self.d.world
            dist.all_gather_object(every, records)
            records = [rec for rank_records in every for rec in rank_records]
        if not self.d.master or self.full:
            return
        lines = "".join(json.dumps(strict_json(rec), allow_nan=False, ensure_ascii=False) + "\n"
                        for rec in sorted(records, key=lambda r: (r["draw"], r["sample"])))
        data = lines.encode("utf-8", "backslashreplace")  # (a lone surrogate in outside text stays visible)
        if self.size + len(data) > self.max_bytes:
            self.full = True
            warn(f"{self.path} reached --sample-log-mb {self.max_bytes / 2**20:g}: no more samples are logged from "
                 f"step {step} on", bar)
            return
        with self.path.open("ab") as f:
            f.write(data)
        self.size += len(data)
