"""The mechanism figure (the paper's per-token advantage analysis): where A_t points on erroneous rollouts.

`mechanism(model, tokenizer, problems, ...)` samples rollouts from the student prompt, critiques them (default:
exact_critic.ExactArithmeticCritic), keeps the erroneous ones whose wrong claim the critic located
(Critique.wrong_span, characters, mapped to the rollout's own token ids by `token_char_spans` +
`error_marks_from_spans`), and scores the SAME ids y under the student prompt and under each teacher context
with rollout.score_sequences, giving per context
    A_t = log π(y_t | x, c, y<t) − log π(y_t | x, y<t)      (sd_loss.token_advantage).
Contexts are a mapping name -> (rollout, critique, layout) -> teacher messages; MECHANISM_CONTEXTS builds them from
feedback.FORMS (stepalign, refsol, refsol_prose, refsol_steps, verdict), as training does. The pure pieces:
`localization_scores`, `advantage_by_position` + `plot_advantage_by_position`, `render_advantage_html`. On the demo
model:
    python -m scripts.mechanism --out docs/mechanism [--n-problems 20] [--seed 0]
writes DIR/advantage.html, DIR/advantage_by_position.png, DIR/localization.json and prints the localization
table (a results directory literally named "mechanism" must be passed to `python evaluate.py` as ./mechanism).

Departures from the paper (which shows the figure qualitatively):
1. The localization scores (top-1, negative-mass share, AUROC) are our quantification of the paper's
   qualitative per-token figure. The table also prints their chance level (A_t blind to the error).
2. The model is scored as it is, as both self-teacher and student, i.e. at initialization (π_θ = π_base);
   the paper's figure is not tied to a training step. "The erroneous step" is the line of the critic's
   pivotal step that holds the wrong claim (the demo model often numbers its lines "1.", "2." without
   "Step i:" markers, which makes the whole response one step); the earlier correct steps are the step text
   before that line. Rollouts whose critique locates no wrong claim (correct ones, and errors without an
   equation to pin) are counted and left out.
"""
from __future__ import annotations

import functools
import html
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

import config
import feedback
import grading
import prompts
import rollout
import sd_loss
from demo import exact_critic
from infra import report
from demo import arithmetic


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score_pos > score_neg) + ½ P(equal), by ranks with ties averaged (Mann–Whitney U / (n_pos·n_neg))."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"auroc needs both classes, got {len(pos)} positives and {len(neg)} negatives")
    scores = np.concatenate([pos, neg])  # (P + N,)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average the 1-based ranks over each run of tied scores
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    # U = Σ rank(pos) − P(P+1)/2;  AUROC = U / (P·N)
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def localization_scores(advantages: Sequence[Sequence[float]], marks: Sequence[exact_critic.ErrorMarks]) -> dict:
    """How well A_t points at the first error, over a set of erroneous rollouts (one context).

    top1: fraction of rollouts where argmin A_t over tokens [0, error_end) is a wrong-claim token
          (ties: the earliest minimum).
    neg_mass_share: mean over rollouts of Σ_{claim} max(−A_t, 0) / Σ_{all t} max(−A_t, 0); rollouts with no
          negative A_t are left out (count in n_neg_mass).
    auroc: mean over rollouts of the AUROC of −A_t, wrong-claim tokens (positives) vs earlier-correct-step
          tokens (negatives); rollouts whose error is in the first step are left out (count in n_auroc).
    auroc_pooled: the same AUROC with the tokens of all rollouts pooled.
    Per-rollout values are returned too (NaN where undefined).
    """
    if len(advantages) != len(marks) or not marks:
        raise ValueError(f"need one exact_critic.ErrorMarks per rollout and at least one: {len(advantages)} vs {len(marks)}")
    top1, share, auc = [], [], []
    pooled_pos, pooled_neg = [], []
    for i, (a, mk) in enumerate(zip(advantages, marks)):
        A = np.asarray(a, dtype=np.float64)  # (T,)
        if A.shape != mk.wrong_claim.shape:
            raise ValueError(f"rollout {i}: {A.shape[0] if A.ndim else A.shape} advantages but "
                             f"{len(mk.wrong_claim)} marked tokens")
        top1.append(float(mk.wrong_claim[int(np.argmin(A[:mk.error_end]))]))
        neg = np.maximum(-A, 0.0)  # (T,) negative advantage mass
        share.append(float(neg[mk.wrong_claim].sum() / neg.sum()) if neg.sum() > 0 else math.nan)
        pos_s, neg_s = -A[mk.wrong_claim], -A[mk.earlier_correct]
        auc.append(auroc(pos_s, neg_s) if len(neg_s) else math.nan)
        pooled_pos.append(pos_s)
        pooled_neg.append(neg_s)
    share_a, auc_a = np.array(share), np.array(auc)
    pooled_neg_all = np.concatenate(pooled_neg)
    return {
        "top1": float(np.mean(top1)),
        "neg_mass_share": float(np.nanmean(share_a)) if (~np.isnan(share_a)).any() else math.nan,
        "auroc": float(np.nanmean(auc_a)) if (~np.isnan(auc_a)).any() else math.nan,
        "auroc_pooled": auroc(np.concatenate(pooled_pos), pooled_neg_all) if len(pooled_neg_all) else math.nan,
        "n_rollouts": len(marks), "n_neg_mass": int((~np.isnan(share_a)).sum()),
        "n_auroc": int((~np.isnan(auc_a)).sum()),
        "per_rollout": {"top1": top1, "neg_mass_share": share, "auroc": auc},
    }


@dataclass
class PositionProfile:
    bin_start: np.ndarray  # (K,) first relative position of each bin (0 = first wrong-claim token); plotted at x
    mean: np.ndarray  # (K,) mean A_t, NaN where no rollout has a token
    n_rollouts: np.ndarray  # (K,) rollouts contributing to each bin


def advantage_by_position(advantages: Sequence[Sequence[float]], marks: Sequence[exact_critic.ErrorMarks], lo: int = -32,
                          hi: int = 32, bin_size: int = 1) -> PositionProfile:
    """Mean A_t by token position relative to the first wrong-claim token, in bins of `bin_size` over [lo, hi).

    Each rollout is averaged within a bin first, then bins are averaged over the rollouts that reach them,
    so every rollout weighs the same.
    """
    if hi <= lo or (hi - lo) % bin_size:
        raise ValueError(f"need lo < hi with (hi - lo) divisible by bin_size; got lo={lo}, hi={hi}, bin={bin_size}")
    K = (hi - lo) // bin_size
    sums, counts = np.zeros(K), np.zeros(K)
    for a, mk in zip(advantages, marks, strict=True):
        A = np.asarray(a, dtype=np.float64)  # (T,)
        rel = np.arange(len(A)) - mk.claim_start  # (T,)
        keep = (rel >= lo) & (rel < hi)
        b = (rel[keep] - lo) // bin_size  # (T',)
        per_bin = np.bincount(b, weights=A[keep], minlength=K) / np.maximum(np.bincount(b, minlength=K), 1)
        present = np.bincount(b, minlength=K) > 0  # (K,)
        sums[present] += per_bin[present]
        counts[present] += 1
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return PositionProfile(lo + bin_size * np.arange(K), mean, counts.astype(int))


def plot_advantage_by_position(profiles: Mapping[str, PositionProfile], path: str | Path,
                               title: str = "Mean A_t around the first error") -> Path:
    """One line per context: mean A_t against position relative to the first wrong-claim token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, prof in profiles.items():
        ax.plot(prof.bin_start, prof.mean, marker=".", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axvline(0, color="black", lw=0.8, ls="--")
    ax.axhline(0, color="gray", lw=0.6)
    ax.set_xlabel("token position relative to the first wrong-claim token")
    ax.set_ylabel("mean A_t (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}
_CSS = """
body { font-family: sans-serif; margin: 1.5em; }
.grid { display: grid; gap: 1em; }
.ctx { border: 1px solid #ccc; padding: 0.5em; }
.ctx h3 { margin: 0 0 0.3em; font-size: 1em; }
section h2 { margin: 1em 0 0.2em; font-size: 1.15em; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.8; }
.tok { border-radius: 2px; }
.step { border-bottom: 2px solid #555; }
.claim { outline: 2px solid #000; }
.marker { color: #b00; font-weight: bold; font-size: 0.8em; }
.ws { color: #888; }
.caption { color: #444; margin: 0.2em 0 0.5em; }
table.scores td, table.scores th { padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; }
"""


def _token_html(tok: str) -> str:
    """Escape a token; render newline, tab and CR as visible symbols (a newline also breaks the line)."""
    if tok == "":
        return '<span class="ws">∅</span>'
    out = []
    for ch in tok:
        if ch in _VISIBLE:
            out.append(f'<span class="ws">{_VISIBLE[ch]}</span>' + ("\n" if ch == "\n" else ""))
        else:
            out.append(html.escape(ch))
    return "".join(out)


def _color(a: float, scale: float) -> str:
    """Red for A_t < 0, green for A_t > 0, opacity ∝ |A_t| / scale (capped at 1)."""
    alpha = min(abs(a) / scale, 1.0) * 0.85
    rgb = "220, 38, 38" if a < 0 else "22, 163, 74"
    return f"rgba({rgb}, {alpha:.3f})"


def render_advantage_html(tokens: Sequence[Sequence[str]], advantages: Mapping[str, Sequence[Sequence[float]]],
                          marks: Sequence[exact_critic.ErrorMarks | None], title: str = "Per-token advantage A_t",
                          scores: Mapping[str, Mapping[str, float]] | None = None,
                          scale: float | None = None, captions: Sequence[str] | None = None) -> str:
    """A standalone HTML page: each rollout shown once per context, side by side, tokens coloured by A_t.

    tokens[i]: the decoded tokens of rollout i; advantages[context][i]: its A_t under that context
    (e.g. {"StepAlignFB": ..., "RefSol": ...}); marks[i]: its first error (or None). The erroneous step is
    underlined, the wrong claim boxed, and a ▶ marks where the step starts. Hovering a token shows t and A_t.
    One colour scale for the whole page (default: the 98th percentile of |A_t|), so contexts compare.
    scores: optional context -> {score name: value}, shown as a table on top.
    captions: optional one line of text per rollout (e.g. the problem and the wrong claim), shown under its title.
    """
    if not advantages:
        raise ValueError("render_advantage_html needs at least one context")
    if len(marks) != len(tokens):
        raise ValueError(f"{len(tokens)} rollouts but {len(marks)} marks")
    if captions is not None and len(captions) != len(tokens):
        raise ValueError(f"{len(tokens)} rollouts but {len(captions)} captions")
    for ctx, per in advantages.items():
        if len(per) != len(tokens):
            raise ValueError(f"context {ctx!r}: {len(per)} rollouts of A_t but {len(tokens)} rollouts of tokens")
        for i, a in enumerate(per):
            if len(a) != len(tokens[i]):
                raise ValueError(f"context {ctx!r}, rollout {i}: {len(a)} advantages for {len(tokens[i])} tokens")
    if scale is None:
        mags = np.abs(np.concatenate([np.asarray(a, dtype=np.float64) for per in advantages.values() for a in per]))
        scale = float(np.quantile(mags, 0.98)) if len(mags) else 1.0
    scale = scale if scale > 0 else 1.0
    esc = html.escape
    parts = [f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>",
             f"<p>Red: A_t &lt; 0, green: A_t &gt; 0; full colour at |A_t| ≥ {scale:.3g}. Underlined: the first "
             "erroneous step (▶ marks its start); boxed: its wrong claim. Hover a token for its value.</p>"]
    if scores:
        names = list(dict.fromkeys(n for s in scores.values() for n in s))
        parts.append('<table class="scores"><tr><th>context</th>' + "".join(f"<th>{esc(n)}</th>" for n in names)
                     + "</tr>")
        for ctx, s in scores.items():
            cells = "".join(f"<td>{s[n]:.3f}</td>" if isinstance(s.get(n), float)
                            else f"<td>{esc(str(s.get(n, '')))}</td>" for n in names)
            parts.append(f"<tr><td>{esc(ctx)}</td>{cells}</tr>")
        parts.append("</table>")
    for i, toks in enumerate(tokens):
        mk = marks[i]
        caption = f'<p class="caption">{esc(captions[i])}</p>' if captions is not None else ""
        parts.append(f'<section><h2>Rollout {i}</h2>{caption}<div class="grid" '
                     f'style="grid-template-columns: repeat({len(advantages)}, 1fr)">')
        for ctx, per in advantages.items():
            A = np.asarray(per[i], dtype=np.float64)  # (T,)
            spans = []
            for t, (tok, a) in enumerate(zip(toks, A)):
                cls = ["tok"]
                if mk is not None and mk.error_start <= t < mk.error_end:
                    cls.append("step")
                if mk is not None and mk.wrong_claim[t]:
                    cls.append("claim")
                if mk is not None and t == mk.error_start:
                    spans.append('<span class="marker" title="first erroneous step">▶</span>')
                tip = esc(f"t={t}  A_t={a:+.4f}  token={tok!r}", quote=True)
                spans.append(f'<span class="{" ".join(cls)}" style="background: {_color(a, scale)}" '
                             f'title="{tip}">{_token_html(tok)}</span>')
            parts.append(f'<div class="ctx"><h3>{esc(ctx)}</h3><div class="tokens">{"".join(spans)}</div></div>')
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- the driver
# A context builder: (the rollout as a feedback.Item, its critique, the teacher layout) -> the self-teacher's chat
# messages. The figure's columns are feedback forms of feedback.FORMS, which build c as training does; another
# builder is one more entry in the mapping passed to `mechanism`.
ContextFn = Callable[[feedback.Item, object, str], list]
FIGURE_FORMS = ("stepalign", "refsol", "refsol_prose", "refsol_steps", "verdict")  # the figure's columns, in order
MECHANISM_CONTEXTS: dict[str, ContextFn] = {name: functools.partial(feedback.form_messages, name)
                                            for name in FIGURE_FORMS}


def score_rollouts(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                   pad_id: int, batch_size: int = 8, chunk_size: int = 256) -> list[np.ndarray]:
    """log π(y_t | prompt, y<t) of every rollout token, one (T_i,) float array per rollout, no gradient."""
    out, was_training = [], model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(prompt_ids), batch_size):
                ys = [list(y) for y in completion_ids[b:b + batch_size]]
                logp, _ = rollout.score_sequences(model, [list(p) for p in prompt_ids[b:b + batch_size]], ys,
                                                  pad_id, chunk_size)  # (B, T)
                out += [logp[i, :len(y)].float().cpu().numpy() for i, y in enumerate(ys)]
    finally:
        model.train(was_training)
    return out


@dataclass
class MechanismResult:
    """The erroneous rollouts whose wrong claim was located, and A_t of each under every context."""
    problems: list  # (R,) data.Problem of each kept rollout
    completions: list  # (R,) rollout.Completion
    critiques: list  # (R,) critic.Critique
    marks: list[exact_critic.ErrorMarks]  # (R,)
    advantages: dict[str, list[np.ndarray]]  # context -> (R,) arrays of A_t, each (T_i,)
    counts: dict[str, int]  # rollouts sampled / by critique case / kept / skipped and why


def mechanism(model, tokenizer, problems: Sequence, n_rollouts: int = 4, *, temperature: float = 0.5,
              max_new_tokens: int = 48, seed: int = 0, stop_at_boxed: bool = True,
              contexts: Mapping[str, ContextFn] = MECHANISM_CONTEXTS, critic_backend=None,
              completions: Sequence[Sequence] | None = None, student_thinking: bool = False,
              teacher_thinking: bool = True, teacher_layout: str = "paper", batch_size: int = 8) -> MechanismResult:
    """A_t of the base policy's own erroneous rollouts under each teacher context (the paper's per-token figure).

    1. Sample `n_rollouts` per problem from the student prompt (or take `completions`, one list per problem).
    2. Critique each with `critic_backend` (default: the exact arithmetic critic); keep the rollouts whose
       critique locates a wrong claim (Critique.wrong_span) and mark it on the tokens (exact_critic.ErrorMarks).
    3. Score the SAME token ids y under the student prompt and under each context's teacher prompt.
       The model is the base policy: it is both the self-teacher π_base and the student π_θ at
       initialization, so A_t = log π(y_t | x, c, y<t) − log π(y_t | x, y<t) with one set of weights.
    """
    if completions is None:
        engine = rollout.TransformersEngine(model, tokenizer, batch_size=32, stop_at_boxed=stop_at_boxed)
        student_prompts = [prompts.encode(tokenizer, prompts.student_messages(p), student_thinking)
                           for p in problems]
        seeds = [rollout.sample_seed(seed, "mechanism", p.id) for p in problems]
        completions = engine.generate(student_prompts, seeds, n=n_rollouts, temperature=temperature,
                                      max_new_tokens=max_new_tokens)
    if len(completions) != len(problems):
        raise ValueError(f"{len(problems)} problems but completions for {len(completions)}")
    critic_backend = exact_critic.ExactArithmeticCritic() if critic_backend is None else critic_backend
    pairs = [(p, c) for p, comps in zip(problems, completions) for c in comps]
    critiques = critic_backend.critique([(p, c.text) for p, c in pairs])
    counts = Counter(sampled=len(pairs))
    kept: list[tuple] = []
    for (p, c), q in zip(pairs, critiques):
        counts[f"case_{q.case}"] += 1
        if q.error is None and q.case in ("C", "D"):  # wrong: alignment can matter where correct work comes first
            counts["wrong"] += 1
            counts["wrong_correct_prefix"] += exact_critic.copied_correct_equations(
                c.text, prompts.corrected_solution(q.text)) > 0
        if q.error is not None:
            counts["skipped_critic_failed"] += 1
        elif q.wrong_span is None:
            counts["no_wrong_claim"] += 1  # correct, or an error the critic could not pin to a span
        else:
            spans = exact_critic.token_char_spans(tokenizer, c.token_ids, c.text)
            kept.append((p, c, q, exact_critic.error_marks_from_spans(spans, c.text, q.wrong_span)))
    counts["kept"] = len(kept)
    if not kept:
        return MechanismResult([], [], [], [], {name: [] for name in contexts}, dict(counts))

    ys = [c.token_ids for _, c, _, _ in kept]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    student = score_rollouts(model, [prompts.encode(tokenizer, prompts.student_messages(p), student_thinking)
                                     for p, *_ in kept],
                             ys, pad_id, batch_size)  # log π(y_t | x, y<t)
    items = [feedback.Item(p, [], c, reward=float(grading.grade(c.text, p.answer))) for p, c, _, _ in kept]
    advantages = {}
    for name, build in contexts.items():
        teacher = score_rollouts(model, [prompts.encode(tokenizer, build(it, q, teacher_layout), teacher_thinking)
                                         for it, (_, _, q, _) in zip(items, kept)],
                                 ys, pad_id, batch_size)  # log π(y_t | x, c, y<t)
        # Eq. A_t = log π_base(y_t | x, c, y<t) − log π_θ(y_t | x, y<t)
        advantages[name] = [sd_loss.token_advantage(torch.from_numpy(s), torch.from_numpy(t)).numpy()
                            for s, t in zip(student, teacher)]
    return MechanismResult([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept],
                           [k[3] for k in kept], advantages, dict(counts))


def chance_scores(marks: Sequence[exact_critic.ErrorMarks]) -> dict[str, float]:
    """What the scores would be for A_t that ignores the error: top-1 of a uniformly random token among
    [0, error_end), and the claim's share of the rollout's tokens (the share of a uniform negative mass)."""
    return {"top1": float(np.mean([m.wrong_claim[:m.error_end].sum() / m.error_end for m in marks])),
            "neg_mass_share": float(np.mean([m.wrong_claim.mean() for m in marks])), "auroc": 0.5}


def localization_table(scores: Mapping[str, Mapping], chance: Mapping[str, float]) -> str:
    """The markdown table of the localization scores per context, with the chance level as the last row."""
    lines = ["| context | rollouts | top-1 | neg-mass share | AUROC (rollouts) | pooled AUROC |",
             "|---|---|---|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {report.md_cell(report.DISPLAY.get(name, name))} | {s['n_rollouts']} | {s['top1']:.3f} | "
                     f"{s['neg_mass_share']:.3f} | {s['auroc']:.3f} ({s['n_auroc']}) | {s['auroc_pooled']:.3f} |")
    lines.append(f"| chance | | {chance['top1']:.3f} | {chance['neg_mass_share']:.3f} | 0.500 | 0.500 |")
    return "\n".join(lines) + "\n"


COMMAND_OPTIONS = ("model", "seed", "temperature", "max_new_tokens", "arith_ops", "teacher_layout")  # train.py's


def command_problems(cfg: config.Config, args) -> list[str]:
    """One line per bad option of the command: its own, and train.py's that it takes (config.config_problems' lines
    of those options)."""
    bad = [f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1" for name in ("n_problems", "n_rollouts")
           if getattr(args, name) < 1]
    if Path(args.out).exists() and not Path(args.out).is_dir():
        bad.append(f"--out {args.out}: is a file; it must be a directory")
    flags = tuple(f"--{name.replace('_', '-')} " for name in COMMAND_OPTIONS)
    return bad + [line for line in config.config_problems(cfg) if line.startswith(flags)]


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m scripts.mechanism --out DIR`: the per-token figure on the demo model, written to DIR. The model,
    sampling, problem and teacher-layout options are train.py's (config.py), with the demo preset's defaults."""
    def own(ap):
        ap.add_argument("--out", required=True, help="directory for advantage.html, advantage_by_position.png, "
                                                     "localization.json")
        ap.add_argument("--n-problems", type=int, default=20, help="arithmetic problems to sample from")
        ap.add_argument("--n-rollouts", type=int, default=4, help="rollouts per problem")

    cfg, args = config.parse_command(
        None if argv is None else list(argv), prog="python -m scripts.mechanism", own=own, preset="demo",
        description="A_t of the demo model's erroneous rollouts under each feedback form.",
        names=COMMAND_OPTIONS, flags={"arith_ops": ["--n-ops"]})
    out = Path(args.out)
    bad = command_problems(cfg, args)
    if not bad:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            bad.append(f"--out {args.out}: cannot be made ({e.strerror or e})")
    if bad:  # before the model loads: one line each, no traceback
        for line in bad:
            print(f"python -m scripts.mechanism: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    model, tokenizer = rollout.load_model(cfg.model)
    # the seed draws the problems and seeds the sampling
    problems = arithmetic.arithmetic_problems(args.n_problems, seed=cfg.seed, n_ops=cfg.arith_ops,
                                        max_operand=cfg.arith_max_operand, ops=cfg.arith_operators,
                                        worked_example=cfg.arith_example)
    res = mechanism(model, tokenizer, problems, args.n_rollouts, temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, teacher_layout=cfg.teacher_layout)
    if not res.marks:
        raise SystemExit(f"no erroneous rollout with a located wrong claim among {res.counts}; "
                         "use more --n-problems")
    settings = {"out": args.out, "model": cfg.model, "n_problems": args.n_problems, "n_rollouts": args.n_rollouts,
                "seed": cfg.seed, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
                "n_ops": cfg.arith_ops, "teacher_layout": cfg.teacher_layout}
    table, record = write_mechanism_report(res, tokenizer, out, model_name=cfg.model, config=settings)
    print(f"{len(res.marks)} erroneous rollouts with a located wrong claim (of {res.counts['sampled']} sampled; "
          f"counts {res.counts})\n")
    print(table)
    print(f"wrote {out / 'advantage.html'}, {out / 'advantage_by_position.png'}, {out / 'localization.json'}")
    return record


def write_mechanism_report(res: MechanismResult, tokenizer, out: str | Path, model_name: str = "the model",
                           config: Mapping | None = None) -> tuple[str, dict]:
    """DIR/advantage.html, DIR/advantage_by_position.png, DIR/localization.json; returns (markdown table, record)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = {name: localization_scores(A, res.marks) for name, A in res.advantages.items()}
    chance = chance_scores(res.marks)
    table = localization_table(scores, chance)
    labels = {name: report.DISPLAY.get(name, name) for name in res.advantages}
    profiles = {labels[n]: advantage_by_position(A, res.marks, lo=-16, hi=16) for n, A in res.advantages.items()}
    plot_advantage_by_position(profiles, out / "advantage_by_position.png",
                               title=f"Mean A_t around the first wrong claim ({len(res.marks)} rollouts)")
    tokens = [[tokenizer.decode([i]) for i in c.token_ids] for c in res.completions]
    summary = {labels[n]: {k: s[k] for k in ("top1", "neg_mass_share", "auroc", "auroc_pooled", "n_rollouts")}
               for n, s in scores.items()}
    captions = [f"{p.id}: {p.problem.rsplit(chr(10), 1)[-1]} (answer {p.answer}); critique case {q.case}, "
                f"wrong claim {q.wrong_claim!r} -> {q.corrected_claim!r}"
                for p, q in zip(res.problems, res.critiques)]
    page = render_advantage_html(tokens, {labels[n]: A for n, A in res.advantages.items()}, res.marks,
                                 title=f"Per-token advantage A_t of {model_name}'s erroneous rollouts",
                                 scores=summary, captions=captions)
    (out / "advantage.html").write_text(page)
    record = {"config": dict(config or {}), "counts": res.counts, "chance": chance, "scores": scores,
              "rollouts": [{"problem_id": p.id, "text": c.text, "case": q.case, "wrong_claim": q.wrong_claim,
                            "corrected_claim": q.corrected_claim,
                            "advantages": {n: A[i].round(5).tolist() for n, A in res.advantages.items()}}
                           for i, (p, c, q) in enumerate(zip(res.problems, res.completions, res.critiques))]}
    (out / "localization.json").write_text(json.dumps(_json_safe(record), indent=1, allow_nan=False) + "\n")
    return table, record


def _json_safe(x):
    """NaN (an undefined score) becomes null, so that the file is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


if __name__ == "__main__":
    main()
