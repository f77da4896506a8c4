"""The training loop: on-policy self-distillation with critic feedback, or GRPO, through one code path.

    torchrun --nproc_per_node 4 train.py --feedback stepalign     # the paper's setup (4×H100, vLLM, a critic server)
    python train.py --preset demo                                 # SmolLM2-135M on a CPU: the paper's three forms
    torchrun --nproc_per_node 2 train.py --preset demo            # the same demo with DDP over 2 CPU processes (gloo)
    python train.py --preset demo --engine vllm                   # rollouts on vLLM (CPU: VLLM_CPU=1 bash setup.sh)
    python train.py --help                                        # every option, generated from Config

One optimizer step, in order:
  1. problems: `prompts_per_step` problems of a fixed, seeded order (epoch permutations); each rank takes
     every world_size-th of them.
  2. rollouts: G samples per problem from the student prompt x (G = 1 for SD, 8 for GRPO), on-policy,
     seeded by (seed, step, problem, sample).
  3. feedback c of the run's form (feedback.FORMS): the critic's critique (stepalign), the reference solution
     (refsol), the verifier's verdict on the rollout (verdict); grpo: the group advantages of the 0/1 rewards.
  4. teacher inputs: the teacher prompt (x + c) followed by the SAME token ids y. With --objective pbsd (or
     --teacher-samples, for the log only), also one sample y_T ~ π_base(·|x, c) per rollout, graded.
  5. loss: SD — Eq. 3 from final hidden states, teacher = adapter disabled, no gradient (sd_loss.py);
     GRPO — the clipped surrogate (grpo.py); PBSD — the DPO-style loss on (y_S, y_T) pairs (pbsd.py).
     Divided by the number of valid tokens (PBSD: decisive pairs) of the whole step (all micro-batches, all
     ranks), so accumulation and DDP give the same step as one big batch. A step with none is skipped.
  6. backward per micro-batch; LoRA gradients all-reduced (sum) once per step; AdamW step.
  7. the new adapter goes to the generation engine (transformers: the same module, merged for sampling;
     vLLM: saved in PEFT layout and loaded under a fresh name and id, prefix cache reset).
Every `eval_every` steps: n = 12 samples per held-out problem → Pass/Maj/Avg@12 and length in eval.jsonl,
and a checkpoint (adapter, optimizer, RNG, data position), written atomically. Step 0 (the base policy, the
same for every form) is evaluated once per invocation (or read from --base-eval) and logged in each run.
Steps 1-4 and the feedback forms: feedback.py; the evaluation: evaluate.py; diagnostics of each step in log.jsonl:
infra/diagnostics.py. Options and presets: config.py; the policy (model, LoRA, AdamW, the engine's adapter): policy.py;
processes, checkpoints, logs, signals and stop rules: infra/.
Before anything loads, the options, the data and the critic server are checked (`preflight`). Exit codes: EXIT_*
in infra/stop_rules.py, 143 SIGTERM, 130 SIGINT, 129 SIGHUP (infra.signals); what each leaves on disk: docs/gpu.md.

Departures from the paper:
1. Gradients are clipped to norm `max_grad_norm` (1.0); the paper does not state a value.
2. Evaluation samples at `eval_temperature` (default = the training temperature 1.1); the paper does not
   state its evaluation temperature.
3. GRPO takes one optimizer step per batch of rollouts, so the ratio ρ is 1 and clipping never binds; the
   clipped surrogate is kept so that several epochs per batch are one option away.
4. The demo preset replaces Qwen3-1.7B by SmolLM2-135M-Instruct, OpenMathReasoning by arithmetic chains, the
   QwQ-32B critic by the exact arithmetic critic, and shrinks every size (see PRESETS["demo"]). Its teacher
   prompt is the "repeat" layout (prompts.py departure 6): with the paper's, the 135M self-teacher stops
   answering; with "echo" (departure 5), the student learned to restate the problem, with wrong numbers
   (docs/earlier_preset/ablation.md, the rows that chose it).
5. A rollout whose critique failed (timeout, server error, cut by --critic-max-tokens) is skipped: its tokens
   are masked out of the loss and counted in `skipped_critic`. So is one whose critique fails the schema or is
   empty (`--critic-unstructured skip`, counted per step in `skipped_unstructured_step`): the paper's teacher
   sees only structured corrective feedback (`keep` gives the text to the teacher instead). A step whose loss,
   gradient or update is not finite is skipped and counted (`skipped_nonfinite`; an update is undone), and so are
   a diverged update (`skipped_diverged`, infra.stop_rules.refused_update) and a step with nothing to learn
   (`skipped_empty`). Critiques that fail the schema or are empty count toward --critic-fail-max.
6. DDP without DistributedDataParallel: the LoRA gradients are summed by ONE explicit all-reduce per step after
   the last micro-batch (every rank reaches it every step), not by backward hooks. So a rank may skip the
   backward pass of a micro-batch with no valid rollout, or with a non-finite loss (then every rank drops the
   step), without desynchronizing the ranks.
7. PBSD renders the teacher prompt with the STUDENT's thinking mode, not `teacher_thinking`: the teacher's
   samples y_T are scored after the student prompt, so they must be in the student's format (pbsd.py).
8. Choices the paper leaves open: (a) both objectives draw 32 prompts per step; GRPO samples G = 8 rollouts per
   prompt (256 per step) and SD one (32): the paper's "1/8 the prompts per step" is read as SD using 1/8 of
   GRPO's rollouts, not as GRPO drawing 8x the prompts. (b) AdamW weight decay 0.0 (`--weight-decay`).
   (c) The best checkpoint per metric is taken over trained checkpoints (step >= 1); the base policy (step 0)
   is a row of its own in the table (infra/report.py), so a run that never beats it shows below it. (d) The critic's budget, critic.MAX_TOKENS.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import evaluate
import feedback
import grading
import grpo
import lora
import pbsd
import rollout
import sd_loss
from config import (Config, ConfigError, form_config, load_problems, make_critic, parse_config, preflight, run_name,
                    total_steps)
from demo import exact_critic
from feedback import PAPER_FORMS, Item, check_prompt_lengths, form_of, group_size
from infra import diagnostics, fingerprint, report
from infra.bookkeeping import Bookkeeping
from infra.chat_client import CriticUnavailable
from infra.checkpoint import (CheckpointError, OutDirBusy, OutDirLock, SaveError, check_room, checkpoint_bytes,
                              config_json, options_line, save_checkpoint, start_out_dir)
from infra.dist import Dist, all_reduce_sum, setup_distributed
from infra.logs import EscapesOutDir, Logger, Timer
from infra.signals import StopFlag, Stopped
from infra.stop_rules import (EXIT_BAD_INPUT, EXIT_NO_ROOM, EXIT_NOTHING_LEARNED, divergence_probe,
                              evaluation_pending, nothing_learned, probe_policy, refused_update)
from policy import make_vllm_engine, push_adapter, sampling, start_policy


# ---------------------------------------------------------------------------------------------- step 5: the losses
def sd_micro_batch(cfg, model, mb: list[Item], pad_id: int, normalizer: float, timer):
    """Eq. 3 on one micro-batch: the student π_θ(·|x, y<t) (adapter on) and the self-teacher π_base(·|x, c, y<t)
    (adapter disabled, no gradient), both read at the positions that predict the same rollout ids y.
    Returns (loss, sd_loss.SDStats, mask (B, T))."""
    ys = [it.completion.token_ids for it in mb]
    student = rollout.score_positions([it.prompt_ids for it in mb], ys, pad_id)
    keep = torch.tensor([0.0 if it.skipped else 1.0 for it in mb])[:, None]  # (B, 1)
    mask = student.mask * keep  # (B, T)
    # skipped rows (no context) are scored after the student prompt only to keep the batch rectangular; mask = 0
    teacher = rollout.score_positions([it.teacher_ids or it.prompt_ids for it in mb], ys, pad_id)
    if not torch.equal(teacher.tokens, student.tokens):
        raise RuntimeError("student and teacher sequences do not carry the same rollout tokens y")
    W = model.get_output_embeddings().weight  # (V, D)
    with timer("teacher"), torch.no_grad(), lora.adapters_disabled(model):
        h_t = rollout.final_hidden(model, teacher)  # (B, T, D)  π_base(·|x, c, y<t)
    with timer("student"):
        h_s = rollout.final_hidden(model, student)  # (B, T, D)  π_θ(·|x, y<t)
    with timer("loss"):
        # Eq. 3: L = Σ_t KL(π_base(·|x, c, y<t) ‖ π_θ(·|x, y<t)) · mask_t / normalizer
        loss, stats = sd_loss.chunked_self_distillation_loss(h_s, h_t, W, student.tokens.to(h_s.device),
                                                             mask.to(h_s.device), cfg.divergence,
                                                             chunk_size=cfg.loss_chunk, clip=cfg.div_clip,
                                                             normalizer=normalizer)
    return loss, stats, mask


def grpo_micro_batch(cfg, model, mb: list[Item], pad_id: int, normalizer: float, timer):
    """GRPO's clipped surrogate on one micro-batch, one optimizer step per batch (π_old = π_θ, departure 3).
    Returns (loss, grpo.GRPOStats, mask (B, T))."""
    with timer("student"):
        logp, mask = rollout.score_sequences(model, [it.prompt_ids for it in mb], [it.completion.token_ids for it in mb],
                                             pad_id, cfg.loss_chunk)  # (B, T)  log π_θ(y_t | x, y<t)
        A = torch.tensor([it.advantage for it in mb], device=logp.device)  # (B,)
        loss, stats = grpo.grpo_loss(logp, logp.detach(), A, mask, clip_eps=cfg.grpo_clip,
                                     aggregation=cfg.grpo_aggregation, normalizer=normalizer)
    return loss, stats, mask


def pbsd_micro_batch(cfg, model, mb: list[Item], pad_id: int, normalizer: float, timer):
    """PBSD on the micro-batch's kept rollouts, one pair (y_S, y_T) each (pbsd.py). Both samples are scored twice,
    in two forward passes of 2B rows: the policy after the student prompt x (with gradient) and the base model
    after the teacher prompt x + c, the prompt y_T was drawn from (adapter disabled, no gradient).
    Returns (loss, pbsd.PBSDStats, mask (2B, T))."""
    kept = [it for it in mb if not it.skipped]
    B = len(kept)
    samples = [it.completion.token_ids for it in kept] + [it.teacher_sample.token_ids for it in kept]  # y_S; y_T
    with timer("student"):
        # log π_θ(y | x): BOTH samples after the student prompt x
        policy_logp, mask = rollout.score_sequences(model, [it.prompt_ids for it in kept] * 2, samples, pad_id,
                                                    cfg.loss_chunk)  # (2B, T)
        # log π_base(y | x, c): both samples after the teacher prompt x + c, self-teacher = adapter disabled
        with torch.no_grad(), lora.adapters_disabled(model):
            base_logp, _ = rollout.score_sequences(model, [it.teacher_ids for it in kept] * 2, samples, pad_id,
                                                   cfg.loss_chunk)  # (2B, T)
        r_S = torch.tensor([it.reward for it in kept], dtype=torch.float32, device=policy_logp.device)  # (B,)
        r_T = torch.tensor([it.teacher_reward for it in kept], dtype=torch.float32, device=policy_logp.device)
        loss, stats = pbsd.pbsd_loss(policy_logp[:B], base_logp[:B], mask[:B], policy_logp[B:], base_logp[B:],
                                     mask[B:], r_S, r_T, beta=cfg.pbsd_beta, length_norm=cfg.pbsd_length_norm,
                                     normalizer=normalizer)
    return loss, stats, mask


def step_normalizer(cfg, items: list[Item], d: Dist) -> float:
    """What the step's loss is divided by, counted over all micro-batches and ranks: the valid rollout tokens;
    GRPO with sequence aggregation: the sequences; PBSD: the decisive pairs (pbsd.py, departure 1)."""
    kept = [it for it in items if not it.skipped]
    if cfg.objective == "pbsd":
        count = pbsd.decisive_pairs([it.reward for it in kept], [it.teacher_reward for it in kept])
    elif not form_of(cfg).has_teacher and cfg.grpo_aggregation == "sequence":
        count = len(kept)
    else:
        count = sum(len(it.completion.token_ids) for it in kept)
    return all_reduce_sum(torch.tensor([float(count)], device=d.device), d).item()


def optimizer_step(cfg, model, params: list, optimizer, bad: float, normalizer: float, probe: torch.Tensor,
                   before: tuple | None, d: Dist) -> tuple[str | None, float, tuple | None]:
    """Step 6 after the backward passes: ONE all-reduce of the LoRA gradients and the `bad` flag, clip, AdamW.
    Returns (None, or the counter of a skipped step: skipped_empty, nothing to learn from on any rank, where AdamW's
    momentum would still move the weights; skipped_nonfinite, a loss or gradient not finite; or an update that
    infra.stop_rules.refused_update refuses on `probe` (1, L), not finite or diverged: then the weights and AdamW's state are
    restored), the norm (or NaN) and infra.stop_rules.probe_policy of the weights it leaves. `before`: that of the weights it
    starts from (None: computed here), so each step runs one probe forward, after its update."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([bad], device=d.device)])
    all_reduce_sum(flat, d)
    skipped, grad_norm = None, float("nan")
    if normalizer == 0:
        skipped = "skipped_empty"
    elif flat[-1].item() == 0 and torch.isfinite(flat).all():
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        weights, state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
        before = before or probe_policy(model, probe, d)
        optimizer.step()
        skipped, after = refused_update(model, probe, before, d)
        if skipped:  # (the restored weights are those `before` was computed on, bit for bit)
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.copy_(w)
            optimizer.load_state_dict(state)
        else:
            before = after
    else:
        skipped = "skipped_nonfinite"
    optimizer.zero_grad(set_to_none=True)
    return skipped, grad_norm, before


# ---------------------------------------------------------------------------------------------- the run
def train(cfg: Config, d: Dist, checker, base_eval: dict | None = None,
          vllm_engine: rollout.VLLMEngine | None = None) -> tuple[Path, dict, int]:
    """One run of one feedback form: steps 1–7 of the module docstring in a loop. Returns its output directory, its
    counters and its number of steps. base_eval and vllm_engine (--engine vllm) are shared by the runs of one
    invocation: the base policy (step 0) is evaluated once (or read from --base-eval), one engine gets each run's
    adapter."""
    out_dir = Path(cfg.out_dir)
    train_set, test_set = load_problems(cfg)
    form = form_of(cfg)
    stop = StopFlag()  # the engine and the critic poll stop.check: a signal abandons their work (infra.signals.Stopped)
    critic_backend = make_critic(cfg, stop.check) if form.needs_critic else None  # before any GPU time
    model, tokenizer, params, optimizer = start_policy(cfg, d)
    run_print = fingerprint.run_fingerprint(cfg, train_set, test_set)  # the model's files (loaded: here) and the data
    max_positions = model.config.max_position_embeddings  # the model's window: every prompt and its sample fit in it
    check_prompt_lengths(cfg, tokenizer, train_set + test_set, max_positions)
    if cfg.engine == "vllm" and vllm_engine is None:
        raise ValueError("--engine vllm: train takes the process's engine (make_vllm_engine)")
    engine = vllm_engine if cfg.engine == "vllm" else rollout.make_engine(
        "transformers", cfg.model, model, tokenizer, stop_at_boxed=cfg.stop_at_boxed, interrupt=stop.check)
    log = Logger(out_dir, d.master, cfg.tensorboard)
    start, counters = start_out_dir(cfg, d, model, optimizer)
    check_room(out_dir, checkpoint_bytes(params, optimizer))  # before any step: room for two checkpoints
    steps = total_steps(cfg, len(train_set))
    push_adapter(cfg, d, model, engine, start)
    if start == 0:  # the base policy (B = 0), the same for every form: evaluated once per invocation or --base-eval
        base_eval = {} if base_eval is None else base_eval
        if "result" not in base_eval:
            with sampling(cfg, model):
                base_eval["result"] = evaluate.evaluate_policy(cfg, engine, tokenizer, checker, test_set, 0, d)
            evaluate.save_base_eval(cfg, base_eval["result"], test_set)
        evaluate.log_eval(cfg, log, base_eval["result"] and {**base_eval["result"], "feedback": run_name(cfg)})
    books = Bookkeeping(cfg, run_name(cfg), d, log, counters, start, steps, max_positions)
    probe = divergence_probe(tokenizer, train_set[0], cfg.student_thinking)  # (1, L), the same after --resume
    on_probe = None  # infra.stop_rules.probe_policy of the current weights, once computed
    with stop:
        if evaluation_pending(cfg, start, steps, d):  # stopped at this boundary before its evaluation: run it first
            evaluate.evaluate_in_training(cfg, model, engine, tokenizer, checker, test_set, start, d, log, stop)
        for step in range(start, steps):
            timer, t0 = Timer(), time.perf_counter()
            # 1. problems: this rank's share of the step's seeded draw
            drawn = feedback.step_problems(train_set, cfg, step)
            draws = [(i, drawn[i]) for i in range(d.rank, len(drawn), d.world)]
            with contextlib.suppress(Stopped):  # a signal abandons steps 2-4 at once (infra.signals.StopFlag.check)
                # 2. rollouts: G samples per problem from the student prompt x, graded
                with sampling(cfg, model):
                    items = feedback.collect_rollouts(cfg, engine, tokenizer, checker, draws, step, timer)
                # 3. feedback c: GRPO's group advantages, or each rollout's context
                stats = {}
                if not form.has_teacher:
                    A = grpo.group_advantages(torch.tensor([it.reward for it in items]), group_size(cfg))  # (N·G,)
                    items = [dataclasses.replace(it, advantage=a) for it, a in zip(items, A.tolist())]
                else:
                    contexts, critiques, stats = feedback.feedback_contexts(cfg, critic_backend, items, timer)
                    # 4. teacher inputs: the prompt x + c (y is appended as ids); PBSD: a sample y_T ~ π_base(·|x, c)
                    items, stats["skipped_context_step"] = feedback.with_teacher_prompts(
                        cfg, tokenizer, items, contexts, max_positions, critiques, stop.check)
                    if cfg.objective == "pbsd" or cfg.teacher_samples:
                        items = feedback.with_teacher_samples(cfg, engine, checker, items, step, timer)
                    if cfg.data == "arithmetic":  # (diagnostics) the exact critic's critiques when the step has them
                        exact = critiques if isinstance(critic_backend, exact_critic.ExactArithmeticCritic) else None
                        items = [dataclasses.replace(it, wrong_claim=claim) for it, claim in
                                 zip(items, diagnostics.wrong_claims(tokenizer, items, exact))]
            if stop.agreed(d):  # no weight has changed in this step yet: a checkpoint of `step` steps is exact
                save_checkpoint(cfg, model, optimizer, step, books.counters, d, run_print)
                stop.exit(out_dir, step, d)
            # 5. loss per micro-batch, divided by the count of the whole step (all micro-batches, all ranks)
            normalizer = step_normalizer(cfg, items, d)
            model.train()
            losses, bad = [], 0.0
            micro_batch_loss = (pbsd_micro_batch if cfg.objective == "pbsd" else
                                sd_micro_batch if form.has_teacher else grpo_micro_batch)
            for i in range(0, len(items), cfg.micro_batch):
                mb = items[i:i + cfg.micro_batch]
                if all(it.skipped for it in mb):
                    continue  # nothing to learn from (gradients are synced once below, not per backward pass)
                loss, mb_stats, mask = micro_batch_loss(cfg, model, mb, tokenizer.pad_token_id, normalizer, timer)
                if not torch.isfinite(loss):
                    bad = 1.0  # no backward for it; the whole step is dropped below, on every rank
                    continue
                # 6. backward per micro-batch; then one all-reduce of the LoRA gradients and one AdamW step
                with timer("backward"):
                    loss.backward()
                losses.append((mb, loss.detach(), mb_stats, mask))
            with timer("optimizer"):
                skipped, grad_norm, on_probe = optimizer_step(cfg, model, params, optimizer, bad, normalizer, probe,
                                                              on_probe, d)
            # 7. the new adapter to the generation engine
            done = step + 1
            with timer("push"):
                push_adapter(cfg, d, model, engine, done)
            # the log line; the checkpoint, a signal's exit, the evaluation, the stop rules (infra/bookkeeping.py)
            books.after_step(done, items, losses, stats, skipped, grad_norm, timer, time.perf_counter() - t0, stop,
                             save=lambda: save_checkpoint(cfg, model, optimizer, done, books.counters, d, run_print),
                             evaluate=lambda: evaluate.evaluate_in_training(cfg, model, engine, tokenizer, checker,
                                                                            test_set, done, d, log, stop))
    books.close()
    return out_dir, books.counters, steps


def same_run_on_every_rank(cfg: Config, prints: dict, d: Dist) -> list[str]:
    """One line per option, or fingerprint of the model and data files (infra.fingerprint), that differs between the
    ranks: torchrun's ranks must run one config, else each trains its own run and the all-reduced gradients mix them."""
    mine = (json.loads(config_json(cfg)), prints)  # (a password in --critic-url redacted: it travels to every rank)
    every = [None] * d.world
    dist.all_gather_object(every, mine)
    (options0, prints0), lines = every[0], []
    for rank, (options, rank_prints) in enumerate(every[1:], start=1):
        lines += [f"rank {rank} runs --{k.replace('_', '-')} {options[k]} but rank 0 {v}" for k, v in options0.items()
                  if options.get(k) != v]
        lines += [f"rank {rank}: {diff.replace(' vs ', ' on rank 0 vs ')} ({form})" for form in prints0
                  for diff in fingerprint.differences(prints0[form], rank_prints.get(form, {}), lambda n: n)]
    return [f"{line}: start every rank with the same options and files" for line in lines]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv, description=__doc__.split("\n")[0])
    forms = PAPER_FORMS if cfg.feedback == "all" else (cfg.feedback,)
    locks = contextlib.ExitStack()  # one run per out-dir (infra.checkpoint.OutDirLock), held by rank 0 until the exit
    try:
        prints, warnings = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if os.environ.get("RANK", "0") == "0":
            for line in warnings:
                print(line, file=sys.stderr, flush=True)
            for name in forms:
                locks.enter_context(OutDirLock(Path(form_config(cfg, name).out_dir)))
    except (ConfigError, data.DataError, CriticUnavailable, OutDirBusy) as e:  # one line each, no traceback
        locks.close()
        if os.environ.get("RANK", "0") == "0":
            for line in str(e).splitlines():
                print(f"train.py: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    d = setup_distributed()
    if d.world > 1:
        differ = same_run_on_every_rank(cfg, prints, d)
        if differ:
            for line in differ if d.master else ():
                print(f"train.py: error: {line}", file=sys.stderr, flush=True)
            locks.close()
            dist.destroy_process_group()
            raise SystemExit(EXIT_BAD_INPUT)
    run_dirs, base_eval, idle, vllm_engine = [], evaluate.load_base_eval(cfg, d), [], None
    try:
        vllm_engine = make_vllm_engine(cfg, d) if cfg.engine == "vllm" else None
        with grading.AnswerChecker() as checker:  # math-verify in a worker process, with our own time limit
            for name in forms:
                run_cfg = form_config(cfg, name)
                if d.master:
                    defaults = parse_config(["--preset", run_cfg.preset])  # (every option: its config.json)
                    print(f"[{run_name(run_cfg)}] {options_line(run_cfg, defaults)}", flush=True)
                out_dir, counters, steps = train(run_cfg, d, checker, base_eval, vllm_engine)
                run_dirs.append(out_dir)
                if sum(counters[k] for k in ("skipped_empty", "skipped_nonfinite", "skipped_diverged")) >= steps:
                    idle.append(nothing_learned(run_name(run_cfg), counters, steps, out_dir / "log.jsonl"))
        if d.master:
            table = report.results_table(report.load_evals(run_dirs))
            print(table)
            for line in idle:
                print(f"train.py: error: {line}", file=sys.stderr, flush=True)
    except (CheckpointError, data.DataError, SaveError, EscapesOutDir) as e:  # a checkpoint that is not data only, a
        # prompt longer than the context; no room for checkpoints, or a failed save; a write that would leave the
        # out-dir: one line naming the file or disk, no traceback
        print(f"train.py: error: rank {d.rank}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_ROOM if isinstance(e, SaveError) else EXIT_BAD_INPUT) from None
    finally:
        if vllm_engine is not None:
            vllm_engine.close()  # under torchrun this also ends the process group (rollout.VLLMEngine.close)
        locks.close()
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    if idle:
        raise SystemExit(EXIT_NOTHING_LEARNED)


if __name__ == "__main__":
    main(sys.argv[1:])
