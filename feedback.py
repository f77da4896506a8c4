"""From problems to the self-teacher's inputs: the feedback forms, and steps 1-4 of a training step.

FORMS is the one list of feedback forms: per form, how its teacher context c is built from a rollout (and its
critique), its display name, and whether it needs a critic. train.py (steps 1-4 of every step), scripts/teacher_gap.py
(the teacher's samples from the same prompts) and scripts/mechanism.py (A_t under each context) all build c and the teacher
prompt here. The steps, as train.py's docstring numbers them:
  1. `step_problems`: the step's problems, a seeded stream of per-epoch permutations.
  2. `collect_rollouts`: G samples per problem from the student prompt x, graded.
  3. `feedback_contexts`: c of each rollout (None: the rollout is skipped), and the critique counts.
  4. `with_teacher_prompts`: the teacher prompt x + c; `with_teacher_samples` (PBSD, --teacher-samples): one sample
     y_T ~ π_base(·|x, c) per kept rollout, graded.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

import critic
import data
import prompts
import rollout
from demo import exact_critic
from demo import arithmetic


@dataclass(frozen=True)
class Item:
    """One rollout and everything the loss needs about it. Each step returns new Items (dataclasses.replace)."""
    problem: data.Problem
    prompt_ids: list[int]
    completion: rollout.Completion
    reward: float = 0.0
    draw: int = 0  # index of the problem in the step's global problem list (all ranks)
    sample: int = 0  # index of this rollout among the G samples of its problem
    advantage: float = 0.0  # GRPO: A_i of its group
    skipped: bool = False  # no teacher context (a failed or unusable critique): masked out of the loss
    critique: critic.Critique | None = None  # the critic's critique of this rollout (forms that need a critic)
    context: str | None = None  # c, the teacher's context (None: no teacher, or the rollout is skipped)
    teacher_prompt: str | None = None  # x + c, rendered: the self-teacher's prompt
    teacher_ids: list[int] | None = None  # its token ids
    teacher_sample: rollout.Completion | None = None  # y_T ~ π_base(·|x, c) (PBSD, --teacher-samples)
    teacher_reward: float = 0.0
    wrong_claim: np.ndarray | None = None  # (T,) bool: the tokens of y's first wrong claim (diagnostics)


# ---------------------------------------------------------------------------------------------- the feedback forms
@dataclass(frozen=True)
class Form:
    """One feedback form: the options that select it, how its context c is built, how it is named."""
    feedback: str  # its --feedback value, also the framing of its teacher prompt (prompts.teacher_messages)
    display: str  # its row in the results tables
    needs_critic: bool  # c is built from the critic's critique of each rollout
    context: Callable[[Item, critic.Critique | None], str] | None  # (rollout, its critique) -> c; None: no teacher
    refsol_style: str = "reference"  # its --refsol-style (refsol only)

    @property
    def has_teacher(self) -> bool:
        """Whether the form trains toward a self-teacher prompted with c (SD, PBSD); else it is GRPO: a group of G
        rollouts per problem, a reward each, group-normalized advantages."""
        return self.context is not None


def stepalign_context(it: Item, critique: critic.Critique | None) -> str:
    """StepAlignFB: the critic's step-aligned critique of this very rollout."""
    return critique.text


def refsol_context(it: Item, critique: critic.Critique | None) -> str:
    """RefSol: the problem's reference solution in its own wording (the OPSD setup), the same for every rollout."""
    if it.problem.reference_solution is None:
        raise ValueError(f"problem {it.problem.id}: the refsol context needs a reference solution")
    return it.problem.reference_solution


def refsol_steps_context(it: Item, critique: critic.Critique | None) -> str:
    """The format control: a correct solution in the student's step format, written from the problem's exact steps,
    never from the rollout (arithmetic.step_solution; arithmetic data only)."""
    return arithmetic.step_solution(it.problem)


def refsol_prose_context(it: Item, critique: critic.Critique | None) -> str:
    """A stress case (--refsol-style prose): the first study's reference, one line of prose foreign to the student's
    format, whose teacher could not teach (arithmetic.prose_solution; arithmetic data only)."""
    return arithmetic.prose_solution(it.problem)


def verdict_context(it: Item, critique: critic.Critique | None) -> str:
    """Verdict: the verifier's verdict on this rollout's own final answer, nothing more."""
    return prompts.verdict_text(it.completion.text, correct=it.reward > 0)


# name (the run's name, the key of every table) -> form; GRPO has no teacher: its c is the group advantages
FORMS: dict[str, Form] = {
    "stepalign": Form("stepalign", "StepAlignFB", True, stepalign_context),
    "refsol": Form("refsol", "RefSol", False, refsol_context),
    "refsol_steps": Form("refsol", "RefSol, step format", False, refsol_steps_context, refsol_style="steps"),
    "refsol_prose": Form("refsol", "RefSol, prose (stress case)", False, refsol_prose_context, refsol_style="prose"),
    "verdict": Form("verdict", "Verdict", False, verdict_context),
    "grpo": Form("grpo", "GRPO", False, None),
}
FEEDBACKS = tuple(dict.fromkeys(f.feedback for f in FORMS.values()))  # the --feedback choices
PAPER_FORMS = ("stepalign", "refsol", "grpo")  # the paper's three, in the order --feedback all runs them


def form_name(cfg) -> str:
    """The key in FORMS of the config's form: --feedback, and for refsol --refsol-style."""
    style = cfg.refsol_style if cfg.feedback == "refsol" else "reference"
    return next(name for name, f in FORMS.items() if (f.feedback, f.refsol_style) == (cfg.feedback, style))


def form_of(cfg) -> Form:
    """The config's form, the object every other place asks (has_teacher, needs_critic, display)."""
    return FORMS[form_name(cfg)]


def form_options(name: str) -> list[str]:
    """The train.py options that select form `name`."""
    form = FORMS[name]
    return ["--feedback", form.feedback] + (["--refsol-style", form.refsol_style] if form.refsol_style != "reference"
                                            else [])


def with_form(cfg, name: str):
    """The config with the options that select form `name`."""
    return dataclasses.replace(cfg, feedback=FORMS[name].feedback, refsol_style=FORMS[name].refsol_style)


def form_messages(name: str, it: Item, critique: critic.Critique | None, layout: str = "paper") -> list[dict]:
    """The self-teacher's chat messages under form `name`: the problem x and the c its entry in FORMS builds from
    this rollout (and its critique), in the teacher layout `layout` (prompts.teacher_messages)."""
    form = FORMS[name]
    return prompts.teacher_messages(it.problem, form.feedback, form.context(it, critique), layout, it.completion.text)


def group_size(cfg) -> int:
    """G, the rollouts per problem: GRPO's group, or SD's samples (1 in the paper)."""
    return cfg.sd_samples if form_of(cfg).has_teacher else cfg.grpo_group_size


# ---------------------------------------------------------------------------------------------- steps 1-4
def step_problems(train_set: list[data.Problem], cfg, step: int) -> list[data.Problem]:
    """Step 1: the problems of global step `step`, a stream of seeded per-epoch permutations cut into steps."""
    n, P = len(train_set), cfg.prompts_per_step
    out = []
    for i in range(step * P, (step + 1) * P):
        epoch, pos = divmod(i, n)
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        out.append(train_set[perm[pos]])
    return out


def collect_rollouts(cfg, engine, tokenizer, checker, draws: list[tuple[int, data.Problem]], step,
                     timer) -> list[Item]:
    """Step 2: G on-policy samples per problem, with their rewards. `draws` are (index in the step's global
    problem list, problem): the seed derives from (run seed, step, index, problem, sample), so a rollout does
    not depend on which rank draws it, and a problem drawn twice in one step gets two different rollouts."""
    G = group_size(cfg)
    x = [prompts.encode(tokenizer, prompts.student_messages(p), cfg.student_thinking) for _, p in draws]
    seeds = [rollout.sample_seed(cfg.seed, "train", step, i, p.id) for i, p in draws]
    with timer("rollout"):
        outs = engine.generate(x, seeds, n=G, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    items = []
    for (i, p), ids, samples in zip(draws, x, outs):
        for j, c in enumerate(samples):
            items.append(Item(p, ids, c, reward=float(checker.grade(c.text, p.answer)), draw=i, sample=j))
    return items


def check_prompt_lengths(cfg, tokenizer, problems: list[data.Problem], max_positions: int) -> None:
    """DataError naming the problems whose student prompt plus --max-new-tokens exceeds the model's window of
    `max_positions` tokens (its max_position_embeddings): refused before the first step, not an allocation failure
    in the middle of one."""
    long = []
    for p in problems:
        n = len(prompts.encode(tokenizer, prompts.student_messages(p), cfg.student_thinking))
        if n + cfg.max_new_tokens > max_positions:
            long.append((p.id, n))
    if long:
        (first, n), more = long[0], f" (and {len(long) - 1} more problems)" if len(long) > 1 else ""
        raise data.DataError(f"{cfg.data}: problem {first!r}{more}: its student prompt of {n} tokens plus "
                             f"--max-new-tokens {cfg.max_new_tokens} exceeds the window of {cfg.model} "
                             f"({max_positions} tokens, max_position_embeddings): lower --max-new-tokens or remove the problem")


def critique_usable(c: critic.Critique, policy: str) -> bool:
    """Whether a critique can give the teacher its context: never a failed one (backend error, cut by the length
    limit); one that failed the schema only under policy "keep", and only when it is not empty."""
    if policy not in ("skip", "keep"):
        raise ValueError(f"critic_unstructured={policy!r}; expected 'skip' or 'keep'")
    if c.error is not None:
        return False
    return c.schema_ok or (policy == "keep" and bool(c.text.strip()))


def critique_stats(items: list[Item], critiques: list[critic.Critique], usable: list[bool]) -> dict[str, float]:
    """The step's critique counts: failed (and why), schema ok, wrong attempts whose correct equations the critique
    copies before its fix, and the unusable ones (they count toward the stop rule like failed requests)."""
    unstructured = [ok for c, ok in zip(critiques, usable) if c.error is None and not c.schema_ok]
    stats = {"critic_failed": float(sum(c.error is not None for c in critiques))}
    for kind, count in Counter(c.error_kind or "other" for c in critiques if c.error is not None).items():
        stats[f"critic_failed_{kind}"] = float(count)  # why: critic.Critique.error_kind
    stats["critic_schema_ok"] = float(sum(c.schema_ok for c in critiques if c.error is None))
    # where alignment can matter: wrong attempts whose correct equations the critique copies before its fix
    wrong = [(it, c) for it, c in zip(items, critiques) if c.error is None and c.schema_ok and it.reward == 0]
    stats["wrong_attempts"] = float(len(wrong))
    stats["wrong_correct_prefix"] = float(sum(exact_critic.copied_correct_equations(
        it.completion.text, prompts.corrected_solution(c.text)) > 0 for it, c in wrong))
    stats["skipped_unstructured"] = float(sum(not ok for ok in unstructured))
    # the skipped ones count toward the stop rule like failed requests (infra.stop_rules.unusable_as_failures)
    stats["unusable_empty"] = float(sum(not ok and not c.text.strip() for c, ok in zip(critiques, usable)
                                        if c.error is None and not c.schema_ok))
    stats["unusable_schema"] = stats["skipped_unstructured"] - stats["unusable_empty"]
    stats["kept_unstructured"] = float(sum(unstructured))
    return stats


def feedback_contexts(cfg, critic_backend, items: list[Item], timer
                      ) -> tuple[list[str | None], list[critic.Critique] | None, dict[str, float]]:
    """Step 3: the context c of each rollout, built by its form (FORMS), or None: the rollout is skipped (a critique
    that is not usable, `critique_usable`); the critiques (forms that need a critic; else None), and the step's
    critique counts."""
    form = FORMS[form_name(cfg)]
    if form.context is None:
        raise ValueError(f"feedback {cfg.feedback!r} has no teacher context")
    if not form.needs_critic:
        return [form.context(it, None) for it in items], None, {}
    with timer("critic"):
        critiques = critic_backend.critique([(it.problem, it.completion.text) for it in items])
    usable = [critique_usable(c, cfg.critic_unstructured) for c in critiques]
    contexts = [form.context(it, c) if ok else None for it, c, ok in zip(items, critiques, usable)]
    return contexts, critiques, critique_stats(items, critiques, usable)


def with_teacher_prompts(cfg, tokenizer, items: list[Item], contexts: list[str | None], max_positions: int,
                         critiques: list[critic.Critique] | None = None, interrupt: Callable[[], None] | None = None
                         ) -> tuple[list[Item], int]:
    """Step 4: the teacher's prompt x + c of each rollout (y is appended as ids when it is scored), with c and the
    critique it came from (`critiques`, when the form has a critic) kept on the item; a rollout without a context
    is skipped. PBSD scores y_T after the STUDENT prompt, so y_T must be in the student's format: its teacher prompt
    takes the student's thinking mode (train.py, departure 7). A rollout whose teacher prompt plus y (plus
    --max-new-tokens when y_T is sampled from it) exceeds the model's window of `max_positions` tokens is skipped
    too; returns (items, how many were skipped for that). `interrupt` (a stop signal's check) is called before each
    prompt is tokenized, so a signal does not wait for the whole step's prompts."""
    thinking = cfg.teacher_thinking if cfg.objective == "sd" else cfg.student_thinking
    sampled = cfg.objective == "pbsd" or cfg.teacher_samples
    out, too_long = [], 0
    if critiques is not None:
        items = [dataclasses.replace(it, critique=q) for it, q in zip(items, critiques, strict=True)]
    for it, c in zip(items, contexts, strict=True):
        if c is None:
            out.append(dataclasses.replace(it, skipped=True))
            continue
        if interrupt is not None:
            interrupt()
        messages = prompts.teacher_messages(it.problem, cfg.feedback, c, cfg.teacher_layout, it.completion.text)
        prompt, ids = prompts.render_and_encode(tokenizer, messages, thinking)
        y = len(it.completion.token_ids)
        if len(ids) + (max(y, cfg.max_new_tokens) if sampled else y) > max_positions:
            too_long += 1
            out.append(dataclasses.replace(it, skipped=True))
            continue
        out.append(dataclasses.replace(it, context=c, teacher_prompt=prompt, teacher_ids=ids))
    return out, too_long


def with_teacher_samples(cfg, engine, checker, items: list[Item], step: int, timer) -> list[Item]:
    """Step 4 (PBSD, --teacher-samples): one sample y_T ~ π_base(·|x, c) per kept rollout, adapter off, graded."""
    kept = [it for it in items if not it.skipped]
    seeds = [rollout.sample_seed(cfg.seed, "teacher", step, it.draw, it.problem.id, it.sample) for it in kept]
    with timer("teacher_sample"):  # called on every rank, even with none kept: vLLM's generate is a collective
        outs = engine.generate([it.teacher_ids for it in kept], seeds, n=1, temperature=cfg.temperature,
                               max_new_tokens=cfg.max_new_tokens, adapter=False)
    samples = iter(outs)
    out = []
    for it in items:
        if not it.skipped:
            [y_T] = next(samples)
            it = dataclasses.replace(it, teacher_sample=y_T, teacher_reward=float(checker.grade(y_T.text,
                                                                                                 it.problem.answer)))
        out.append(it)
    return out
