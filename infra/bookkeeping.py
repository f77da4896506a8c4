"""What a run does after each optimizer step, behind one call (train.py: `books.after_step`): the step's counters, its
log line and its rollouts' lines (samples.jsonl), then, in this order, the checkpoint, the exit on a stop signal, the evaluation, and the stop rules
(the critic down, too many refused updates in a row)."""
from __future__ import annotations

from collections import deque
from pathlib import Path
from collections.abc import Callable

from feedback import form_of, group_size
from infra import diagnostics
from infra.dist import Dist, sum_over_ranks
from infra.logs import Logger, progress_bar, warn
from infra.sample_log import SampleLog
from infra.signals import StopFlag
from infra.stop_rules import (EXIT_CRITIC_DOWN, EXIT_DIVERGED, critic_down, critic_down_error, diverged_error,
                              evaluation_due, unusable_as_failures)


class Bookkeeping:
    """A run's state besides the weights and the optimizer: `counters` (the skipped steps and rollouts, saved in every
    checkpoint), the progress bar, the critic's failures over the last --critic-fail-window steps, and the number of
    updates refused in a row (not finite or diverged)."""

    def __init__(self, cfg, name: str, d: Dist, log: Logger, counters: dict, start: int, steps: int,
                 max_positions: int):
        self.cfg, self.name, self.d, self.log, self.counters = cfg, name, d, log, counters
        self.steps, self.max_positions, self.form = steps, max_positions, form_of(cfg)
        self.bar = progress_bar(cfg, d, steps, start)  # rank 0 with --progress; else None
        self.window = deque(maxlen=cfg.critic_fail_window)  # failed critiques of the last steps (all ranks)
        self.diverged = 0  # consecutive steps refused as not finite or diverged
        self.samples = SampleLog(cfg.out_dir, cfg.sample_log_mb, d)  # samples.jsonl: each rollout, its critique

    def after_step(self, done: int, items: list, losses: list, stats: dict, skipped: str | None, grad_norm: float,
                   timer, seconds: float, stop: StopFlag, save: Callable[[], None],
                   evaluate: Callable[[], None]) -> None:
        """The bookkeeping of step `done` (1-based) once its update is taken or refused (`skipped`: its counter):
        the log line; a checkpoint when a signal arrived, an evaluation is due or the critic is down; the signal's
        exit; the evaluation; then exit 5 after --nonfinite-max refused updates in a row (their checkpoint holds the
        last good weights) or exit 3 when the critic is down."""
        cfg, d, counters = self.cfg, self.d, self.counters
        if skipped:
            counters[skipped] += 1
        self.diverged = self.diverged + 1 if skipped in ("skipped_nonfinite", "skipped_diverged") else 0
        sums = diagnostics.metric_sums(cfg, losses) | diagnostics.step_diagnostics(cfg, items, losses, d)
        counts = sum_over_ranks({k: v for k, v in stats.items()
                                 if k.startswith(("critic_failed", "unusable_", "wrong_", "skipped_context"))}, d)
        failures = {k: v for k, v in counts.items() if not k.startswith(("wrong_", "skipped_context"))}
        counters["skipped_critic"] += int(unusable_as_failures(failures).get("critic_failed", 0))  # all ranks
        if counts.get("skipped_context_step"):  # (all ranks) loudly, each step it happens
            counters["skipped_context"] += int(counts["skipped_context_step"])
            if d.master:
                warn(f"[{self.name}] step {done}: {counts['skipped_context_step']:.0f} rollouts skipped: their "
                     f"teacher prompt (x + c) and y exceed the window of {cfg.model} ({self.max_positions} tokens)",
                     self.bar)
        record = diagnostics.step_record(cfg, done, items, sums, stats, counters, timer, seconds, grad_norm,
                                         d) | counts
        self.log.write("log.jsonl", record)
        self.samples.write(done, items, losses, grpo=not self.form.has_teacher, bar=self.bar)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward']:.2f}")
        down = None
        if self.form.needs_critic:  # one critique per rollout
            self.window.append(unusable_as_failures(failures))  # a critique that fails the schema or is empty counts
            down = critic_down(cfg, self.name, cfg.prompts_per_step * group_size(cfg), self.window, done, d,
                               self.bar)
        stopping, evaluating = stop.agreed(d), evaluation_due(cfg, done, self.steps)  # (the save and exit agree)
        if stopping or evaluating or down:  # the checkpoint before the evaluation: a signal does not wait for it
            save()
        if stopping:  # (an evaluation step's evaluation runs after --resume)
            stop.exit(Path(cfg.out_dir), done, d)
        if evaluating:
            evaluate()
        if self.diverged >= cfg.nonfinite_max:
            save()  # the weights of the last good step
            if d.master:
                warn(diverged_error(cfg, self.name, done, self.diverged, counters), self.bar)
            raise SystemExit(EXIT_DIVERGED)
        if down:
            if d.master:
                warn(critic_down_error(cfg, self.name, done, self.steps, down), self.bar)
            raise SystemExit(EXIT_CRITIC_DOWN)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
