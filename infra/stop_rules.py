"""The rules that stop a run or refuse a step, with the line that says why and what to change: the critic's
failures over a window of steps (exit 3), an update that is not finite or diverged (undone; exit 5 after
--nonfinite-max in a row), a run that learned nothing (exit 4); and when the policy is evaluated."""
from __future__ import annotations

import json
import math
from collections import Counter, deque
from pathlib import Path

import torch

import lora
import prompts
from infra.dist import Dist, all_reduce_sum
from infra.logs import warn

# train.py's exit codes besides 0 and 128 + a stop signal's number (infra.signals); docs/gpu.md: what each leaves on disk
EXIT_BAD_INPUT, EXIT_CRITIC_DOWN, EXIT_NOTHING_LEARNED, EXIT_DIVERGED, EXIT_NO_ROOM = 2, 3, 4, 5, 6


def evaluation_due(cfg, done: int, steps: int) -> bool:
    """Whether the policy after `done` of `steps` steps is evaluated: every --eval-every steps, and the last."""
    return done % cfg.eval_every == 0 or done == steps


def evaluation_pending(cfg, start: int, steps: int, d: Dist) -> bool:
    """Whether a run resumed at `start` owes the evaluation of that step: an evaluation step with no record in
    eval.jsonl (a signal or a kill at that boundary came after its checkpoint, written first, and before the
    evaluation ended). Read by rank 0, agreed by every rank (the evaluation is a collective)."""
    missing = 0.0
    path = Path(cfg.out_dir) / "eval.jsonl"
    if d.master and start > 0 and evaluation_due(cfg, start, steps):
        logged = {json.loads(line)["step"] for line in path.read_text().splitlines()} if path.exists() else set()
        missing = float(start not in logged)
    return all_reduce_sum(torch.tensor([missing], device=d.device), d).item() > 0


def unusable_as_failures(counts: dict[str, float]) -> dict[str, float]:
    """A step's critic counts with the critiques that reached no teacher (unusable_schema: failed the schema under
    --critic-unstructured skip; unusable_empty: empty) counted as failures of kind "schema" and "empty"."""
    out = {k: v for k, v in counts.items() if not k.startswith("unusable_")}
    for kind in ("schema", "empty"):
        if counts.get(f"unusable_{kind}"):
            out[f"critic_failed_{kind}"] = out.get(f"critic_failed_{kind}", 0.0) + counts[f"unusable_{kind}"]
            out["critic_failed"] = out.get("critic_failed", 0.0) + counts[f"unusable_{kind}"]
    return out


def failure_counts(failures: dict[str, float]) -> Counter:
    """{kind: count} from the critic_failed_<kind> entries of a step's (or window's) counts."""
    return Counter({k.removeprefix("critic_failed_"): v for k, v in failures.items()
                    if k.startswith("critic_failed_")})


def failure_kinds(failures: dict[str, float]) -> str:
    """'refused 3, timeout 1' from the critic_failed_<kind> counts."""
    return ", ".join(f"{k} {v:.0f}" for k, v in failure_counts(failures).most_common())


def critic_fix(cfg, failures: dict[str, float]) -> str:
    """What to change, from the most frequent reason among the critic_failed_<kind> counts."""
    kinds = failure_counts(failures)
    kind = kinds.most_common(1)[0][0] if kinds else "other"
    if kind in ("refused", "connection"):
        return f"the critic server at {cfg.critic_url} does not answer: restart it (or correct --critic-url)"
    if kind == "timeout":
        return (f"critiques take longer than --critic-timeout {cfg.critic_timeout} s: raise it, lower "
                f"--critic-concurrency {cfg.critic_concurrency}, or give the server more capacity")
    if kind in ("http_401", "http_403"):
        return f"the server refuses the API key in ${cfg.critic_api_key_env}"
    if kind.startswith("http_4"):
        return f"the server rejects the requests ({kind}): check --critic-model {cfg.critic_model} and its log"
    if kind.startswith("http_"):
        return f"the server fails ({kind}): see its log (out of memory? a context shorter than the prompts?)"
    if kind == "malformed":
        return f"the answers of {cfg.critic_url} are not OpenAI chat completions: check --critic-url"
    if kind == "oversized":
        return (f"the answers of {cfg.critic_url} are longer than --critic-max-tokens {cfg.critic_max_tokens} tokens "
                f"can decode to: the server ignores max_tokens, or something between it and this run adds to its "
                f"answers (samples.jsonl's critique errors give their sizes)")
    if kind == "bad_key":
        return f"the API key in ${cfg.critic_api_key_env} holds characters that no HTTP header can carry"
    if kind == "schema":
        return (f"the critiques of {cfg.critic_model} do not follow the schema (prompts.critic_messages): check "
                f"--critic-model and --critic-think-in-prompt, or give unstructured text to the teacher with "
                f"--critic-unstructured keep")
    if kind == "empty":
        return ("the critic's answers are empty: a think trace never closed (--critic-think-in-prompt?) or a "
                "reasoning parser that keeps the whole answer in the reasoning field (no </think> in the output)")
    if kind == "control_token":
        return ("problems, references or rollouts hold chat control tokens (e.g. <|im_end|>) that the critic server "
                "would read as its own: see samples.jsonl's critique errors, and clean the data")
    if kind == "length":
        return f"critiques are cut by --critic-max-tokens {cfg.critic_max_tokens}: raise it"
    return "see the warnings above"


def critic_down(cfg, name: str, n: int, window: deque, done: int, d: Dist, bar) -> str | None:
    """Warn about the failed critiques of the step just done (window[-1], of n, all ranks); return the reason to
    stop when at least --critic-fail-max of the critiques of the steps in `window` failed, else None."""
    failures = window[-1]
    if failures.get("critic_failed") and d.master:
        warn(f"[{name}] step {done}: the critic failed on {failures['critic_failed']:.0f} of {n} rollouts "
             f"({failure_kinds(failures)}); they are skipped", bar)
    recent = sum((Counter(f) for f in window), Counter())
    if recent["critic_failed"] >= cfg.critic_fail_max * n * len(window):  # (the last step too: exit 3, not 0)
        return (f"{recent['critic_failed']:.0f} of {n * len(window)} critiques failed over the last {len(window)} "
                f"steps ({failure_kinds(recent)}), at least --critic-fail-max {cfg.critic_fail_max}. Fix: "
                f"{critic_fix(cfg, recent)}")
    return None


def diverged_error(cfg, name: str, done: int, diverged: int, counters: dict) -> str:
    """The error line of a run stopped after --nonfinite-max refused steps in a row (exit 5)."""
    return (f"train.py: error: [{name}] stopped at step {done}: its last {diverged} steps were refused "
            f"(--nonfinite-max {cfg.nonfinite_max}; in the run, skipped_nonfinite {counters['skipped_nonfinite']}: a "
            f"loss, gradient or update not finite; skipped_diverged {counters['skipped_diverged']}: an update that "
            f"grew the residual stream past 1/u or moved the policy farther than log V); the weights are those of the "
            f"last good step, checkpointed in {Path(cfg.out_dir)}. Fix: a lower --lr ({cfg.lr}) or --max-grad-norm "
            f"({cfg.max_grad_norm})")


def critic_down_error(cfg, name: str, done: int, steps: int, down: str) -> str:
    """The error line of a run stopped by the critic's stop rule (critic_down's reason; exit 3)."""
    then = ("continue with the same command and --resume" if done < steps else
            "this was the last step: its evaluation used these steps' weights")
    return (f"train.py: error: [{name}] stopped at step {done}: {down}. A checkpoint of step {done} is in "
            f"{Path(cfg.out_dir)}: {then}.")


def nothing_learned(run: str, counters: dict, steps: int, log_path: Path) -> str:
    """The error line of a run none of whose steps changed the weights (exit 4), with the counts that say why."""
    return (f"run {run} took no optimizer step in its {steps} steps (skipped_empty {counters['skipped_empty']}: "
            f"nothing to learn from; skipped_nonfinite {counters['skipped_nonfinite']}; skipped_diverged "
            f"{counters['skipped_diverged']}; rollouts skipped for the "
            f"critic {counters['skipped_critic']}): its evaluations are of the base policy; see {log_path}")


def divergence_probe(tokenizer, problem, thinking: bool) -> torch.Tensor:
    """(1, L) token ids of the divergence probe: the student prompt of `problem` (train.py: the first training
    problem, the same in every step and after --resume, so one step's probe_policy is the next step's `before`)."""
    return torch.tensor([prompts.encode(tokenizer, prompts.student_messages(problem), thinking)])


PROBE_POSITIONS = 64  # K: the probe positions whose next-token distributions refused_update compares


def probe_policy(model, probe: torch.Tensor, d: Dist) -> tuple[torch.Tensor, float]:
    """The policy on `probe` (1, L) token ids, no gradient, in O(K·V) memory: (log π(·|probe<t) in fp32 at the last
    K = PROBE_POSITIONS positions (K, V), the largest |h| of the residual stream entering each layer and the final
    norm, over all L positions). Neither the (L, V) logits nor every layer's (L, D) hidden states are kept: at
    Qwen3's V = 151,936 and L = 4k, the fp32 log-probs alone took 2.5 GB; K = 64 takes 39 MB."""
    decoder = model.get_decoder()
    largest = []  # max |h| entering each layer, then the final norm

    def record(module, args):
        largest.append(args[0].detach().abs().max().float())

    hooks = [m.register_forward_pre_hook(record) for m in [*decoder.layers, decoder.norm]]
    try:
        with torch.no_grad():
            logits = model(input_ids=probe.to(d.device), logits_to_keep=PROBE_POSITIONS, use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return torch.log_softmax(logits.float(), -1), torch.stack(largest).max().item()  # (K, V)


def delta_finite(m: lora.LoRALinear) -> bool:
    """Whether A, B and ΔW = (α/r)·B A in fp32 are finite, without forming ΔW when a bound proves it: every entry of
    ΔW, and every partial sum of its r terms, is at most (α/r)·r·max|B|·max|A| in magnitude (computed in float64)."""
    A, B = m.lora_A.weight, m.lora_B.weight
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        return False
    bound = m.scaling * m.r * B.abs().max().double().item() * A.abs().max().double().item()
    return bound < torch.finfo(torch.float32).max or bool(torch.isfinite(m.delta_weight()).all())


def refused_update(model, probe: torch.Tensor, before: tuple[torch.Tensor, float], d: Dist
                   ) -> tuple[str | None, tuple[torch.Tensor, float] | None]:
    """Why the update just taken must be undone, agreed over ranks, or None; and probe_policy after it (None when a
    LoRA weight is not finite), the next update's `before` if this one stands. `before`: probe_policy before it.
    skipped_nonfinite: a LoRA weight, ΔW = (α/r)·B A in fp32 (what `sampling` merges), the residual stream on
    `probe` (1, L) or the policy's logits there are not finite (a finite adapter can still overflow the activations).
    skipped_diverged, a finite divergence (at --lr 1e6 every weight moves by ~lr in one AdamW step), either
    (a) the residual stream grew more than 1/u (u the unit roundoff of the model's dtype): the pretrained model's
        own part of it is below one rounding, the adapter has replaced the model; or
    (b) the policy moved farther than the uniform distribution is from it, mean_t KL(π_old ‖ π_new) > log V over
        the probe's last K positions: for any p, KL(p ‖ uniform) = log V − H(p) ≤ log V, so such a step lost more
        than forgetting everything would. K positions suffice: the update moves the weights every position passes
        through, and each of the last K conditions on the whole probe; a divergence confined to earlier positions
        still shows in (a), which reads every position.
    A learning step comes nowhere near either: the tests' tiny model grows it ≤ 10× per step at lr 1e-1, 4·10⁴× at lr 1,
    ~1e8× at lr 1e2 and ~1e20× at 1e6; its policy moves ≤ 0.03 nats per token."""
    ok = all(delta_finite(m) for m in lora.lora_layers(model).values())
    far, after = False, None
    if ok:
        (logp_old, residual_old), after = before, probe_policy(model, probe, d)  # (K, V)
        logp_new, residual_new = after
        ok = bool(torch.isfinite(logp_new).all()) and math.isfinite(residual_new)
        if ok:
            kl = (logp_old.exp() * (logp_old - logp_new)).sum(-1)  # (K,)  KL(π_old ‖ π_new) per position
            u = torch.finfo(model.dtype).eps / 2
            far = residual_new > residual_old / u or kl.mean().item() > math.log(logp_old.shape[-1])
    flags = all_reduce_sum(torch.tensor([0.0 if ok else 1.0, float(far)], device=d.device), d)
    return "skipped_nonfinite" if flags[0] > 0 else "skipped_diverged" if flags[1] > 0 else None, after
