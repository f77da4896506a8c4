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
  3. feedback c: stepalign → the critic's critique of each rollout; refsol → the problem's reference solution;
     verdict → the verifier's verdict on the rollout's own answer; grpo → the binary reward (answer correct) and
     the group advantages. With --objective pbsd (or --teacher-samples, for the log only), also one teacher
     sample y_T ~ π_base(·|x, c) per rollout, graded.
  4. teacher inputs: the teacher prompt (x + c) followed by the SAME token ids y.
  5. loss: SD — Eq. 3 from final hidden states, teacher = adapter disabled, no gradient (sd_loss.py);
     GRPO — the clipped surrogate (grpo.py); PBSD — the DPO-style loss on (y_S, y_T) pairs (pbsd.py).
     Divided by the number of valid tokens (PBSD: decisive pairs) of the whole step (all micro-batches, all
     ranks), so accumulation and DDP give the same step as one big batch. A step with none is skipped.
  6. backward per micro-batch; LoRA gradients all-reduced (sum) once per step; AdamW step.
  7. the new adapter goes to the generation engine (transformers: the same module, merged for sampling;
     vLLM: saved in PEFT layout and loaded under a fresh name and id, prefix cache reset).
Every `eval_every` steps: n = 12 samples per held-out problem → Pass/Maj/Avg@12 and length in eval.jsonl,
and a checkpoint (adapter, optimizer, RNG, data position), written atomically. Step 0 (the base policy, the
same for every form) is evaluated once per invocation and logged in each run.
Diagnostics in log.jsonl (SD steps): entropy_student / entropy_teacher (mean next-token entropy on the rollout
tokens), div_top1_share (the share of the step's divergence carried by its top 1% tokens), answered (rollouts
with a \boxed{} answer; every run), adv_claim / adv_off_claim (mean A_t on the tokens of the first wrong claim
that the exact arithmetic critic locates, and on the other tokens of those rollouts; arithmetic data) with
claim_located (the share of rollouts where it locates one), and with --teacher-samples teacher_reward /
teacher_answered (the self-teacher's samples from the teacher prompt: the teacher's gap, step by step).
Before anything loads, the options, the data and the critic server are checked (`preflight`). Exit codes:
2 bad input, 3 too many failed critiques over the last steps (checkpoint written, fix and --resume), 4 no
step of a run changed the weights, 143 SIGTERM (checkpoint written).

Departures from the paper:
1. Gradients are clipped to norm `max_grad_norm` (1.0); the paper does not state a value.
2. Evaluation samples at `eval_temperature` (default = the training temperature 1.1); the paper does not
   state its evaluation temperature.
3. GRPO takes one optimizer step per batch of rollouts, so the ratio ρ is 1 and clipping never binds; the
   clipped surrogate is kept so that several epochs per batch are one option away.
4. The demo preset replaces Qwen3-1.7B by SmolLM2-135M-Instruct, OpenMathReasoning by arithmetic chains, the
   QwQ-32B critic by the exact arithmetic critic, and shrinks every size (see PRESETS["demo"]).
5. A rollout whose critique failed (timeout, server error, cut by --critic-max-tokens) is skipped: its tokens
   are masked out of the loss and counted in `skipped_critic`. So is one whose critique fails the schema or is
   empty (`--critic-unstructured skip`, counted per step in `skipped_unstructured_step`): the paper's teacher
   sees only structured corrective feedback (`keep` gives the text to the teacher instead). A step whose loss
   or gradient is not finite is skipped and counted (`skipped_nonfinite`), and so is a step with nothing to
   learn from (`skipped_empty`).
6. DDP without DistributedDataParallel: the LoRA gradients are summed by ONE explicit all-reduce per step after
   the last micro-batch (every rank reaches it every step), not by backward hooks. So a rank may skip the
   backward pass of a micro-batch with no valid rollout, or with a non-finite loss (then every rank drops the
   step), without desynchronizing the ranks.
7. PBSD renders the teacher prompt with the STUDENT's thinking mode, not `teacher_thinking`: the teacher's
   samples y_T are scored after the student prompt, so they must be in the student's format (pbsd.py).
8. Choices the paper leaves open: (a) both objectives draw 32 prompts per step; GRPO samples G = 8 rollouts per
   prompt (256 per step) and SD one (32): the paper's "1/8 the prompts per step" is read as SD using 1/8 of
   GRPO's rollouts, not as GRPO drawing 8x the prompts. (b) AdamW weight decay 0.0 (`--weight-decay`).
   (c) Step 0, the base policy, is eligible as the best checkpoint of a metric (report.py's table), so a
   run that never beats the base policy reports its step 0. (d) The critic's budget, critic.MAX_TOKENS.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import urllib.parse
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import critic
import data
import evaluate
import exact_critic
import grading
import grpo
import lora
import mechanism
import pbsd
import prompts
import report
import rollout
import sd_loss
from critic import MAX_TOKENS as CRITIC_MAX_TOKENS  # a name of its own: in Config, `critic` is a field

FEEDBACKS = ("stepalign", "refsol", "verdict", "grpo")
PAPER_FEEDBACKS = ("stepalign", "refsol", "grpo")  # what --feedback all runs
TEACHER_LAYOUTS = prompts.TEACHER_LAYOUTS  # (Config has a field named `critic`)


def opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    preset: str = opt("paper", "a named set of defaults (PRESETS); explicit options override it", ("paper", "demo"))
    feedback: str = opt("stepalign", "the teacher's context c (grpo: no teacher); 'all' runs the paper's three "
                        "in turn", FEEDBACKS + ("all",))
    objective: str = opt("sd", "loss with a teacher context: sd = Eq. 3 (sd_loss.py); pbsd = preference pairs of "
                         "a teacher and a student sample (pbsd.py)", ("sd", "pbsd"))
    pbsd_beta: float = opt(0.1, "PBSD: β of the implicit reward β·log(π_θ/π_base)")
    pbsd_length_norm: str = opt("sum", "PBSD: sequence log-prob as a sum or a mean over tokens", ("sum", "mean"))
    teacher_samples: bool = opt(False, "SD: also draw one sample y_T ~ π_base(·|x, c) per rollout from the teacher "
                                "prompt (adapter off) and log its correctness and answered rate (teacher_reward, "
                                "teacher_answered); changes no weight but costs one more generation pass per step "
                                "(demo, measured: 20 to 70 percent more time per SD step), so it is off in both presets")
    model: str = opt("Qwen/Qwen3-1.7B", "solver (and self-teacher) weights: hub id, local path, or "
                     "'smollm2-135m-instruct' (the packaged demo model)")
    data: str = opt("data/omr_hard.jsonl", "problems: a manifest written by `python filter_problems.py` "
                    "(train/test splits), or 'arithmetic'")
    arith_train: int = opt(282, "arithmetic data: number of training problems")
    arith_test: int = opt(30, "arithmetic data: number of held-out problems")
    arith_ops: int = opt(2, "arithmetic data: operations per problem")
    arith_max_operand: int = opt(50, "arithmetic data: largest operand")
    arith_operators: str = opt("+-*", "arithmetic data: operators to draw from")
    arith_example: bool = opt(False, "arithmetic data: prefix each problem with a one-shot worked example")
    critic: str = opt("server", "critic backend for stepalign", ("server", "local", "exact"))
    critic_url: str = opt("http://127.0.0.1:8000/v1", "OpenAI-compatible server (e.g. `vllm serve Qwen/QwQ-32B "
                          "--enable-prefix-caching`)")
    critic_model: str = opt("Qwen/QwQ-32B", "critic model name (server) or path (local)")
    critic_api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the critic server's API key")
    critic_timeout: float = opt(900.0, "seconds per critic request before it counts as failed")
    critic_fail_window: int = opt(5, "steps over which failed critiques are counted (fewer at the start and "
                                  "after --resume)")
    critic_fail_max: float = opt(0.5, "stop (checkpoint, exit 3) when at least this share of the critiques of the "
                                 "last --critic-fail-window steps failed")
    critic_concurrency: int = opt(32, "concurrent critic requests")
    critic_retries: int = opt(3, "retries per critic request (exponential backoff) before the rollout is skipped")
    critic_max_tokens: int = opt(CRITIC_MAX_TOKENS, "critic generation budget, its <think> trace included; an answer "
                                 "cut by it is a failed critique (critic.MAX_TOKENS)")
    critic_think_in_prompt: bool = opt(True, "server critic: its chat template ends the prompt with an open <think> "
                                       "tag (QwQ-32B's does), so an answer without </think> is all trace")
    critic_unstructured: str = opt("skip", "a critique that fails the schema or is empty: skip = its rollout is "
                                   "skipped and counted (the paper's teacher sees only structured critiques); keep "
                                   "= its text goes to the teacher as unstructured feedback (an empty one is still "
                                   "skipped)", ("skip", "keep"))
    engine: str = opt("vllm", "rollout engine", ("vllm", "transformers"))
    stop_at_boxed: bool = opt(False, "end a sample after its first complete \\boxed{} (vLLM: cut there, rollout.py)")
    vllm_gpu_memory: float = opt(0.35, "vLLM engine: on a GPU, the fraction of GPU memory vLLM may take (it shares the "
                                 "GPU with training); on a CPU (vLLM's CPU build), the fraction of the machine's "
                                 "memory that vLLM's worker may hold in all, weights and activations included (its "
                                 "KV cache gets the rest), per rank; under torchrun the worker is the rank's process")
    vllm_kv_cache_gib: float = opt(0.0, "vLLM engine: KV cache size in GiB per rank (0: vLLM sizes it from "
                                   "--vllm-gpu-memory); on a CPU, a fixed size keeps several engines on one machine "
                                   "within its memory")
    student_thinking: bool = opt(False, "thinking mode of the student's chat template (Qwen3 enable_thinking)")
    teacher_thinking: bool = opt(True, "thinking mode of the teacher's chat template")
    teacher_layout: str = opt("paper", "where c sits in the teacher's prompt: paper = one user turn (problem, c, "
                              "format); turns = the student's chat continued (prompt, attempt y, then c)",
                              TEACHER_LAYOUTS)
    lora_r: int = opt(64, "LoRA rank r")
    lora_alpha: float = opt(128.0, "LoRA α (scale α/r)")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "comma-separated modules")
    divergence: str = opt("forward", "SD divergence: forward = KL(teacher‖student), Eq. 3",
                          ("forward", "reverse", "jsd"))
    sd_samples: int = opt(1, "SD: rollouts per problem (the paper: 1)")
    grpo_group_size: int = opt(8, "GRPO: rollouts per problem, the group G of the advantage (the paper: 8)")
    grpo_clip: float = opt(0.2, "GRPO clip ε")
    grpo_aggregation: str = opt("token", "GRPO loss aggregation", ("token", "sequence"))
    temperature: float = opt(1.1, "rollout sampling temperature")
    max_new_tokens: int = opt(2048, "rollout length limit")
    lr: float = opt(5e-6, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping (departure 1)")
    prompts_per_step: int = opt(32, "problems per optimizer step, across all ranks")
    micro_batch: int = opt(4, "rollouts per forward/backward pass on one rank")
    loss_chunk: int = opt(1024, "positions per chunk of the memory-bounded loss")
    grad_checkpointing: bool = opt(True, "activation checkpointing in the model")
    dtype: str = opt("bfloat16", "model dtype (LoRA weights stay fp32)", tuple(rollout.DTYPES))
    epochs: int = opt(7, "passes over the training problems")
    max_steps: int = opt(0, "stop after this many steps (0 = epochs decide)")
    eval_every: int = opt(10, "evaluate and checkpoint every N steps and at the end (step 0: evaluated only)")
    eval_samples: int = opt(12, "samples per held-out problem (the k of Pass/Maj/Avg@k)")
    eval_temperature: float = opt(1.1, "evaluation sampling temperature (departure 2)")
    eval_problems: int = opt(0, "evaluate on the first N held-out problems (0 = all)")
    seed: int = opt(0, "run seed: data order and every sampling seed derive from it")
    out_dir: str = opt("runs/{preset}/{feedback}", "output directory ({preset}/{feedback} are filled in)")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")
    progress: bool = opt(True, "progress bars on rank 0")


PRESETS: dict[str, dict] = {
    "paper": {},
    # SmolLM2-135M: Avg@4 23% at step 0 on these one-operation problems with a worked example, temperature 0.5
    # (README, the demo's table); sizes chosen so that the three forms train and evaluate in < 15 min on 2 cores
    "demo": dict(feedback="all", model=rollout.SMOLLM2, data="arithmetic", arith_train=30, arith_test=16,
                 arith_ops=1, arith_max_operand=20, arith_operators="+-", arith_example=True, critic="exact",
                 engine="transformers", stop_at_boxed=True, vllm_gpu_memory=0.25, lora_r=16, lora_alpha=32.0,
                 temperature=0.5, max_new_tokens=48, lr=2e-4,
                 prompts_per_step=6, micro_batch=6, loss_chunk=256, grad_checkpointing=False, dtype="float32",
                 grpo_group_size=4, epochs=1, eval_every=3, eval_samples=4, eval_temperature=0.5),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"train.py: error: {message} (python train.py --help lists every option)\n")


def parse_config(argv: list[str] | None = None) -> Config:
    """Command line generated from Config's fields; a preset's values become the defaults."""
    pre = OneLineParser(add_help=False)
    pre.add_argument("--preset", default="paper", choices=list(PRESETS))
    preset = pre.parse_known_args(argv)[0].preset
    defaults = {**{f.name: f.default for f in dataclasses.fields(Config)}, **PRESETS[preset], "preset": preset}
    parser = OneLineParser(description=__doc__.split("\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        kw = dict(default=defaults[f.name], help=f.metadata["help"])
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[f.type]
            if f.metadata["choices"]:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    return Config(**vars(parser.parse_args(argv)))


def run_name(cfg: Config) -> str:
    """The row of the results table: the feedback form, prefixed by the objective when it is not Eq. 3."""
    return cfg.feedback if cfg.objective == "sd" else f"{cfg.objective}-{cfg.feedback}"


def group_size(cfg: Config) -> int:
    return cfg.grpo_group_size if cfg.feedback == "grpo" else cfg.sd_samples


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """RANK / LOCAL_RANK / WORLD_SIZE from torchrun; nccl on GPUs, gloo on CPU; single process otherwise."""
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ConfigError(ValueError):
    """Bad options or inputs, found before anything is loaded: one line per problem, naming the option."""


EXIT_BAD_INPUT, EXIT_CRITIC_DOWN, EXIT_NOTHING_LEARNED, EXIT_SIGTERM = 2, 3, 4, 143


def config_problems(cfg: Config, world: int = 1) -> list[str]:
    """Every option's allowed range and the choices that depend on each other (`choices` are argparse's).
    One line per problem: the option, its value, what is allowed. Reads no file but the paths' existence."""
    bad = []

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            bad.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: {allowed}")

    for f in dataclasses.fields(Config):  # nan and inf pass a comparison with a bound, so they are refused first
        if f.type == "float" and not math.isfinite(getattr(cfg, f.name)):
            need(False, f.name, "must be a finite number")
    finite = {f.name for f in dataclasses.fields(Config) if f.type != "float" or math.isfinite(getattr(cfg, f.name))}
    ranges = [  # (option, allowed?, what is allowed)
        ("pbsd_beta", cfg.pbsd_beta > 0, "must be > 0"),
        ("arith_train", cfg.arith_train >= 1, "must be >= 1"),
        ("arith_test", cfg.arith_test >= 1, "must be >= 1"),
        ("arith_ops", cfg.arith_ops >= 1, "must be >= 1"),
        ("arith_max_operand", cfg.arith_max_operand >= 2, "must be >= 2"),
        ("arith_operators", bool(cfg.arith_operators) and set(cfg.arith_operators) <= set("+-*"),
         "must be one or more of the characters + - *"),
        ("critic_timeout", cfg.critic_timeout > 0, "must be > 0 seconds"),
        ("critic_fail_window", cfg.critic_fail_window >= 1, "must be >= 1 step"),
        ("critic_fail_max", 0 < cfg.critic_fail_max <= 1, "must be a share in (0, 1]"),
        ("critic_concurrency", cfg.critic_concurrency >= 1, "must be >= 1"),
        ("critic_retries", cfg.critic_retries >= 0, "must be >= 0"),
        ("critic_max_tokens", cfg.critic_max_tokens >= 1, "must be >= 1"),
        ("vllm_gpu_memory", 0 < cfg.vllm_gpu_memory <= 1, "must be a fraction in (0, 1]"),
        ("lora_r", cfg.lora_r >= 1, "must be >= 1"),
        ("lora_alpha", cfg.lora_alpha > 0, "must be > 0"),
        ("lora_targets", all(t.strip() for t in cfg.lora_targets.split(",")),
         "must be comma-separated module names, none empty"),
        ("sd_samples", cfg.sd_samples >= 1, "must be >= 1"),
        ("grpo_group_size", cfg.grpo_group_size >= 2, "must be >= 2 (a group of one has no advantage)"),
        ("grpo_clip", cfg.grpo_clip > 0, "must be > 0"),
        ("temperature", cfg.temperature > 0, "must be > 0 (rollouts are samples of the policy)"),
        ("max_new_tokens", cfg.max_new_tokens >= 1, "must be >= 1"),
        ("lr", cfg.lr > 0, "must be > 0"),
        ("weight_decay", cfg.weight_decay >= 0, "must be >= 0"),
        ("max_grad_norm", cfg.max_grad_norm > 0, "must be > 0"),
        ("prompts_per_step", cfg.prompts_per_step >= 1, "must be >= 1"),
        ("micro_batch", cfg.micro_batch >= 1, "must be >= 1 (any size: the loss is normalized over the step)"),
        ("loss_chunk", cfg.loss_chunk >= 1, "must be >= 1"),
        ("epochs", cfg.epochs >= 1, "must be >= 1"),
        ("max_steps", cfg.max_steps >= 0, "must be >= 0 (0: --epochs decide)"),
        ("eval_every", cfg.eval_every >= 1, "must be >= 1"),
        ("eval_samples", cfg.eval_samples >= 1, "must be >= 1 (it is both n and the k of Pass/Maj/Avg@k)"),
        ("eval_temperature", cfg.eval_temperature >= 0, "must be >= 0 (0: greedy)"),
        ("eval_problems", cfg.eval_problems >= 0, "must be >= 0 (0: all)"),
        ("seed", cfg.seed >= 0, "must be >= 0"),
        ("critic_api_key_env", re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.critic_api_key_env) is not None,
         "must be the name of an environment variable"),
    ]
    for name, ok, allowed in ranges:
        if name in finite:
            need(ok, name, allowed)
    if cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world:
        need(False, "prompts_per_step", f"must divide by the number of ranks ({world})")
    url = urllib.parse.urlsplit(cfg.critic_url)
    need(url.scheme in ("http", "https") and bool(url.hostname), "critic_url", "must be http(s)://HOST[:PORT]/v1")
    try:
        out = cfg.out_dir.format(preset=cfg.preset, feedback=cfg.feedback)
        need(not Path(out).is_file(), "out_dir", "is a file; it must be a directory")
    except (KeyError, IndexError, ValueError) as e:
        need(False, "out_dir", f"may hold only {{preset}} and {{feedback}} ({type(e).__name__}: {e})")
    if cfg.objective == "pbsd" and cfg.feedback in ("grpo", "all"):
        bad.append(f"--objective pbsd with --feedback {cfg.feedback}: pbsd needs a teacher context: "
                   "--feedback stepalign, refsol or verdict")
    if cfg.data != "arithmetic" and not Path(cfg.data).is_file():
        bad.append(f"--data {cfg.data}: no such file (write one with `python filter_problems.py ...` "
                   "or use --data arithmetic)")
    local_critic = cfg.feedback in ("stepalign", "all") and cfg.critic == "local"
    for name, used in (("model", True), ("critic_model", local_critic)):
        path = getattr(cfg, name)
        looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).parent.exists()
        if used and looks_local and not Path(path).expanduser().is_dir():
            need(False, name, "no such directory")
        elif used and looks_local and not (Path(path).expanduser() / "config.json").is_file():
            need(False, name, "the directory has no config.json (not a saved model)")
    if cfg.feedback in ("stepalign", "all") and cfg.critic == "exact" and cfg.data != "arithmetic":
        bad.append("--critic exact only knows arithmetic problems: use --critic server or --critic local")
    if cfg.vllm_kv_cache_gib < 0:
        need(False, "vllm_kv_cache_gib", "must be a size in GiB, or 0 to size the cache by --vllm-gpu-memory")
    return bad


def check_inputs(cfg: Config, world: int = 1) -> None:
    """Fail before any model is loaded or GPU time is spent: ConfigError with one line per problem."""
    bad = config_problems(cfg, world)
    if bad:
        raise ConfigError("\n".join(bad))
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"--engine vllm: {rollout.VLLM_MISSING}")


def load_problems(cfg: Config) -> tuple[list[data.Problem], list[data.Problem]]:
    if cfg.data == "arithmetic":
        # train and test come from different seeds, so they share no problem by construction of the stream
        kw = dict(n_ops=cfg.arith_ops, max_operand=cfg.arith_max_operand, ops=cfg.arith_operators,
                  worked_example=cfg.arith_example)
        train = data.arithmetic_problems(cfg.arith_train, seed=cfg.seed * 2 + 1, **kw)
        test = data.arithmetic_problems(cfg.arith_test, seed=cfg.seed * 2 + 2, **kw)
        seen = {p.problem for p in train}
        test = [p for p in test if p.problem not in seen]
    else:
        train, test = data.load_manifest(cfg.data, "train"), data.load_manifest(cfg.data, "test")
        for split, problems in (("train", train), ("test", test)):
            if not problems:
                raise data.DataError(f"{cfg.data}: no row with split {split!r}: a run needs at least one training "
                                     "and one held-out problem")
    if not test:  # (arithmetic) every held-out problem was also drawn for training
        raise ConfigError(f"--arith-test {cfg.arith_test}: every held-out problem is also a training problem; "
                          "raise --arith-max-operand or --arith-ops")
    if cfg.feedback == "refsol":
        missing = [p.id for p in train if not p.reference_solution]
        if missing:
            raise ConfigError(f"--feedback refsol: {len(missing)} training problems of {cfg.data} have no "
                              f"reference solution (first: {missing[0]})")
    if cfg.eval_problems > len(test):
        raise ConfigError(f"--eval-problems {cfg.eval_problems}: must be at most the {len(test)} held-out problems "
                          f"of --data {cfg.data} (0: all)")
    if total_steps(cfg, len(train)) < 1:
        raise ConfigError(f"--epochs {cfg.epochs} x {len(train)} training problems // --prompts-per-step "
                          f"{cfg.prompts_per_step} is 0 steps: lower --prompts-per-step or raise --epochs")
    return train, (test[:cfg.eval_problems] if cfg.eval_problems else test)


def make_critic(cfg: Config):
    if cfg.critic == "exact":
        return exact_critic.ExactArithmeticCritic()
    if cfg.critic == "server":
        return critic.ServerCritic(cfg.critic_url, cfg.critic_model, api_key_env=cfg.critic_api_key_env,
                                   max_tokens=cfg.critic_max_tokens, timeout_s=cfg.critic_timeout,
                                   max_workers=cfg.critic_concurrency, max_retries=cfg.critic_retries,
                                   think_in_prompt=cfg.critic_think_in_prompt)
    return critic.LocalCritic(cfg.critic_model, max_new_tokens=cfg.critic_max_tokens)


def step_problems(train: list[data.Problem], cfg: Config, step: int) -> list[data.Problem]:
    """Problems of global step `step`: a stream of seeded per-epoch permutations, cut into fixed-size steps."""
    n, P = len(train), cfg.prompts_per_step
    out = []
    for i in range(step * P, (step + 1) * P):
        epoch, pos = divmod(i, n)
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        out.append(train[perm[pos]])
    return out


def total_steps(cfg: Config, n_train: int) -> int:
    steps = cfg.epochs * n_train // cfg.prompts_per_step
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


# ---------------------------------------------------------------------------------------------- one step
@dataclass
class Item:
    """One rollout and everything the loss needs about it."""
    problem: data.Problem
    prompt_ids: list[int]
    completion: rollout.Completion
    reward: float = 0.0
    advantage: float = 0.0
    teacher_ids: list[int] | None = None  # x + c, the self-teacher's prompt
    teacher_sample: rollout.Completion | None = None  # PBSD: y_T ~ π_base(·|x, c)
    teacher_reward: float = 0.0
    skipped: bool = False
    draw: int = 0  # index of the problem in the step's global problem list (all ranks)
    sample: int = 0  # index of this rollout among the G samples of its problem
    wrong_claim: np.ndarray | None = None  # (T,) bool: the tokens of y's first wrong claim (diagnostics)


def collect_rollouts(cfg, engine, tokenizer, checker, draws: list[tuple[int, data.Problem]], step,
                     timer) -> list[Item]:
    """Step 2: G on-policy samples per problem, with their rewards. `draws` are (index in the step's global
    problem list, problem): the seed derives from (run seed, step, index, problem, sample), so a rollout does
    not depend on which rank draws it, and a problem drawn twice in one step gets two different rollouts."""
    G = group_size(cfg)
    student_prompts = [prompts.render(tokenizer, prompts.student_messages(p), cfg.student_thinking) for _, p in draws]
    seeds = [rollout.sample_seed(cfg.seed, "train", step, i, p.id) for i, p in draws]
    with timer("rollout"):
        outs = engine.generate(student_prompts, seeds, n=G, temperature=cfg.temperature,
                               max_new_tokens=cfg.max_new_tokens)
    items = []
    for (i, p), prompt, samples in zip(draws, student_prompts, outs):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        for j, c in enumerate(samples):
            items.append(Item(p, ids, c, reward=float(checker.grade(c.text, p.answer)), draw=i, sample=j))
    return items


def critique_context(c: critic.Critique, policy: str) -> str | None:
    """The teacher's context c from one critique, or None (its rollout is skipped): a failed critique (backend
    error, cut by the length limit) always; one that failed the schema under policy "skip"; an empty one under
    "keep" (there is nothing to give the teacher)."""
    if policy not in ("skip", "keep"):
        raise ValueError(f"critic_unstructured={policy!r}; expected 'skip' or 'keep'")
    if c.error is not None:
        return None
    if c.schema_ok:
        return c.text
    return c.text if policy == "keep" and c.text.strip() else None


def feedback_contexts(cfg, critic_backend, items: list[Item], timer, stats: dict) -> list[str | None]:
    """Step 3: the context c of each rollout (None when the rollout is skipped: see `critique_context`)."""
    if cfg.feedback == "stepalign":
        with timer("critic"):
            critiques = critic_backend.critique([(it.problem, it.completion.text) for it in items])
        contexts = [critique_context(c, cfg.critic_unstructured) for c in critiques]
        unstructured = [(c, ctx) for c, ctx in zip(critiques, contexts) if c.error is None and not c.schema_ok]
        stats["critic_failed"] = float(sum(c.error is not None for c in critiques))
        for kind, count in Counter(c.error_kind or "other" for c in critiques if c.error is not None).items():
            stats[f"critic_failed_{kind}"] = float(count)  # why: refused, timeout, http_<status>, malformed, length
        stats["critic_schema_ok"] = float(sum(c.schema_ok for c in critiques if c.error is None))
        stats["skipped_unstructured"] = float(sum(ctx is None for _, ctx in unstructured))
        stats["kept_unstructured"] = float(sum(ctx is not None for _, ctx in unstructured))
        return contexts
    if cfg.feedback == "refsol":
        return [it.problem.reference_solution for it in items]
    if cfg.feedback == "verdict":  # the verifier's verdict on this very attempt, nothing more
        return [prompts.verdict_text(it.completion.text, correct=it.reward > 0) for it in items]
    raise ValueError(f"feedback {cfg.feedback!r} has no teacher context")


def attach_feedback(cfg, critic_backend, engine, tokenizer, checker, items: list[Item], step: int,
                    timer) -> dict[str, float]:
    """Steps 3–4: GRPO's group advantages, or the teacher's prompt x + c for each rollout (y is appended later);
    for PBSD also the teacher's own sample y_T ~ π_base(·|x, c) and its reward."""
    if cfg.feedback == "grpo":
        A = grpo.group_advantages(torch.tensor([it.reward for it in items]), group_size(cfg))
        for it, a in zip(items, A.tolist()):
            it.advantage = a
        return {}
    stats: dict[str, float] = {}
    # PBSD scores y_T after the STUDENT prompt, so y_T must be in the student's format (pbsd.py docstring)
    thinking = cfg.teacher_thinking if cfg.objective == "sd" else cfg.student_thinking
    teacher_prompts = []
    for it, c in zip(items, feedback_contexts(cfg, critic_backend, items, timer, stats)):
        it.skipped = c is None
        prompt = "" if c is None else prompts.render(
            tokenizer, prompts.teacher_messages(it.problem, cfg.feedback, c, cfg.teacher_layout, it.completion.text),
            thinking)
        it.teacher_ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else None
        teacher_prompts.append(prompt)
    if cfg.data == "arithmetic":
        locate_wrong_claims(tokenizer, items)
    if cfg.objective == "pbsd" or cfg.teacher_samples:
        kept = [(it, prompt) for it, prompt in zip(items, teacher_prompts) if not it.skipped]
        seeds = [rollout.sample_seed(cfg.seed, "teacher", step, it.draw, it.problem.id, it.sample) for it, _ in kept]
        with timer("teacher_sample"):
            outs = engine.generate([prompt for _, prompt in kept], seeds, n=1, temperature=cfg.temperature,
                                   max_new_tokens=cfg.max_new_tokens, adapter=False) if kept else []
        for (it, _), [sample] in zip(kept, outs):
            it.teacher_sample = sample
            it.teacher_reward = float(checker.grade(sample.text, it.problem.answer))
    return stats


def locate_wrong_claims(tokenizer, items: list[Item]) -> None:
    """Diagnostics: Item.wrong_claim, the tokens of each rollout's first wrong claim as the exact arithmetic critic
    locates it (Critique.wrong_span, characters, mapped to the rollout's own ids as in the mechanism figure); None
    where it locates none (a correct rollout, or an error without an equation to pin), and None where the engine's
    text is not the decode of its ids (a detokenizer that differs): a diagnostic never stops a run; both lower
    `claim_located`."""
    critiques = exact_critic.ExactArithmeticCritic().critique([(it.problem, it.completion.text) for it in items])
    for it, q in zip(items, critiques):
        it.wrong_claim = None
        if q.wrong_span is not None:
            try:
                spans = mechanism.token_char_spans(tokenizer, it.completion.token_ids, it.completion.text)
            except ValueError:
                continue
            it.wrong_claim = mechanism.error_marks_from_spans(spans, it.completion.text, q.wrong_span).wrong_claim


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


# metrics that average over a subset of the tokens: the count each averages over (weights the step's mean)
TOKEN_SUBSET_COUNTS = {"adv_claim": "n_claim_tokens", "adv_off_claim": "n_off_claim_tokens"}


def micro_batch_loss(cfg, model, items: list[Item], pad_id: int, normalizer: float, timer):
    """Step 5 for one micro-batch: the loss (already divided by the step's global normalizer) and metrics."""
    if cfg.objective == "pbsd":
        kept = [it for it in items if not it.skipped]
        with timer("student"):
            loss, m = pbsd.pbsd_micro_batch_loss(
                model, [it.prompt_ids for it in kept], [it.teacher_ids for it in kept],
                [it.completion.token_ids for it in kept], [it.teacher_sample.token_ids for it in kept],
                [it.reward for it in kept], [it.teacher_reward for it in kept], pad_id, beta=cfg.pbsd_beta,
                length_norm=cfg.pbsd_length_norm, normalizer=normalizer, chunk_size=cfg.loss_chunk)
        for count in ("n_pairs", "n_decisive"):  # counts, not means: the step record has its own
            m.pop(count, None)
        return loss, m
    W = model.get_output_embeddings().weight  # (V, D)
    ys = [it.completion.token_ids for it in items]
    student = rollout.score_positions([it.prompt_ids for it in items], ys, pad_id)
    keep = torch.tensor([0.0 if it.skipped else 1.0 for it in items])[:, None]  # (B, 1)
    mask = student.mask * keep  # (B, T)
    if cfg.feedback == "grpo":
        with timer("student"):
            h = rollout.final_hidden(model, student)  # (B, T, D)
            logp = rollout.token_logprobs_from_hidden(h, W, student.tokens, cfg.loss_chunk)  # (B, T)
            A = torch.tensor([it.advantage for it in items], device=logp.device)  # (B,)
            return grpo.grpo_loss(logp, logp.detach(), A, mask.to(logp.device), clip_eps=cfg.grpo_clip,
                                  aggregation=cfg.grpo_aggregation, normalizer=normalizer)
    # skipped rows (no context) are scored after the student prompt only to keep the batch rectangular; mask = 0
    teacher = rollout.score_positions([it.teacher_ids or it.prompt_ids for it in items], ys, pad_id)
    if not torch.equal(teacher.tokens, student.tokens):
        raise RuntimeError("student and teacher sequences do not carry the same rollout tokens y")
    with timer("teacher"), torch.no_grad(), lora.adapters_disabled(model):
        h_t = rollout.final_hidden(model, teacher)  # (B, T, D)  π_base(·|x, c, y<t)
    with timer("student"):
        h_s = rollout.final_hidden(model, student)  # (B, T, D)  π_θ(·|x, y<t)
        loss, m = sd_loss.chunked_self_distillation_loss(h_s, h_t, W, student.tokens.to(h_s.device),
                                                         mask.to(h_s.device), cfg.divergence,
                                                         chunk_size=cfg.loss_chunk, normalizer=normalizer)
    m |= wrong_claim_metrics(m.pop("token_advantage"), mask, [it.wrong_claim for it in items])
    div = m.pop("token_divergence")  # (B, T)
    m["token_divergence"] = div[mask.to(div.device).bool()].cpu()  # (N,) the valid tokens', for div_top1_share
    return loss, m


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_policy(cfg, engine, tokenizer, checker, test, step, d: Dist) -> dict | None:
    """Pass/Maj/Avg@k and length on the held-out problems; each rank samples a slice, rank 0 aggregates."""
    mine = test[d.rank::d.world]
    student_prompts = [prompts.render(tokenizer, prompts.student_messages(p), cfg.student_thinking) for p in mine]
    seeds = [rollout.sample_seed(cfg.seed, "eval", step, p.id) for p in mine]
    outs = engine.generate(student_prompts, seeds, n=cfg.eval_samples, temperature=cfg.eval_temperature,
                           max_new_tokens=cfg.max_new_tokens) if mine else []
    local = [(p.answer, [(c.text, len(c.token_ids)) for c in samples]) for p, samples in zip(mine, outs)]
    gathered = [local]
    if d.world > 1:
        gathered = [None] * d.world
        dist.all_gather_object(gathered, local)
    if not d.master:
        return None
    samples = [s for part in gathered for s in part]
    return {"step": step, "feedback": run_name(cfg),
            **evaluate.evaluate_samples(samples, k=cfg.eval_samples, checker=checker)}


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step_[0-9]*"), key=lambda p: int(p.name.split("_")[1]))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(cfg, model, optimizer, step: int, counters: dict, d: Dist) -> None:
    """Adapter (PEFT layout), optimizer, RNG states, data position: to a temporary directory, then renamed.

    A kill during the save leaves the previous checkpoint intact (and at worst a stray .tmp directory)."""
    final = Path(cfg.out_dir) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(f".tmp_{final.name}")
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if d.world > 1:
        dist.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if d.master:
        lora.save_adapter(model, str(tmp), base_model_name_or_path=cfg.model)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "counters": counters}, indent=1))
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if d.world > 1:
        dist.barrier()
    if d.master:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if d.world > 1:
        dist.barrier()


def truncate_log(path: Path, step: int) -> None:
    """Keep the JSONL lines of steps <= `step` (a run killed between two checkpoints logged steps past it).
    A last line without its newline is a write cut by a kill: it is dropped."""
    if path.exists():
        text = path.read_text()
        complete = text[:text.rfind("\n") + 1]
        lines = [line for line in complete.splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def load_checkpoint(path: Path, model, optimizer, d: Dist) -> tuple[int, dict]:
    lora.load_adapter(model, str(path))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    rng_file = path / f"rng_rank{d.rank}.pt"
    if not rng_file.exists():  # saved with fewer ranks; only dropout draws from these (sampling has its own seeds)
        print(f"rank {d.rank}: {path} has no {rng_file.name}; keeping this rank's fresh RNG states", flush=True)
    else:
        state = torch.load(rng_file, weights_only=False)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    meta = json.loads((path / "state.json").read_text())
    return meta["step"], meta["counters"]


# ---------------------------------------------------------------------------------------------- the run
class StopFlag:
    """Set by SIGTERM while the run is inside `with StopFlag()`; checked by every rank at step boundaries
    (all-reduced, so all ranks stop together)."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, d: Dist) -> bool:
        flag = torch.tensor([float(self.requested)], device=d.device)
        return bool(all_reduce_sum(flag, d).item() > 0)


class Logger:
    def __init__(self, cfg: Config, d: Dist):
        self.enabled = d.master
        self.dir = Path(cfg.out_dir)
        self.tb = None
        if self.enabled and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SystemExit(f"--tensorboard needs the tensorboard package: pip install tensorboard ({e})")
            self.tb = SummaryWriter(str(self.dir / "tb"))

    def write(self, name: str, record: dict) -> None:
        if not self.enabled:
            return
        with (self.dir / name).open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{name.split('.')[0]}/{k}", v, record["step"])


def build_model(cfg: Config, d: Dist):
    model, tokenizer = rollout.load_model(cfg.model, dtype=rollout.DTYPES[cfg.dtype], device=d.device)
    lora.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets.split(",")))
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, tokenizer


@dataclass
class Run:
    """Everything one training run holds: the model (student and, adapter off, teacher), its engine, data."""
    cfg: Config
    d: Dist
    checker: grading.AnswerChecker
    model: torch.nn.Module
    tokenizer: object
    engine: object
    critic: object
    optimizer: torch.optim.Optimizer
    params: list
    train_set: list
    test_set: list
    log: Logger
    counters: dict

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    def push_adapter(self, step: int) -> None:
        """Step 7: the generation engine samples from the current policy. The transformers engine shares the
        module (the loop merges it for sampling); vLLM gets the adapter under a fresh name and id."""
        if self.cfg.engine != "vllm":
            return
        # the ranks hold identical LoRA weights: rank 0 writes one copy, every rank's engine loads it
        root = self.out_dir / "adapters"
        adapter_dir = root / f"step_{step:06d}"
        if self.d.master:
            lora.save_adapter(self.model, str(adapter_dir), base_model_name_or_path=self.cfg.model)
        if self.d.world > 1:
            dist.barrier()
        self.engine.set_adapter(str(adapter_dir))
        if self.d.world > 1:
            dist.barrier()
        if self.d.master:  # older adapters were loaded by the engines already and are never used again
            for old in root.glob("step_*"):
                if old != adapter_dir:
                    shutil.rmtree(old)

    @contextlib.contextmanager
    def sampling(self):
        """The transformers engine samples from this very module: merged, the same policy runs faster. The merge
        is in fp32 (lora.py, departure 7): merged into bf16 weights, a small ΔW would round away and the rollouts
        and evaluations would come from roughly the base policy. vLLM holds its own copy of the weights (and gets
        the adapter in push_adapter): nothing to do."""
        if self.cfg.engine != "transformers":
            yield
            return
        lora.merge(self.model, dtype=torch.float32)
        try:
            yield
        finally:
            lora.unmerge(self.model)

    def evaluate(self, step: int, base_eval: dict | None = None) -> None:
        """Evaluate the policy of `step` and log it. At step 0 the policy is the base model (B = 0) for every
        feedback form, so `base_eval`, a dict shared by the runs of one invocation, computes it only once."""
        if step == 0 and base_eval is not None and "result" in base_eval:
            result = None if base_eval["result"] is None else {**base_eval["result"], "feedback": run_name(self.cfg)}
        else:
            with self.sampling():
                result = evaluate_policy(self.cfg, self.engine, self.tokenizer, self.checker, self.test_set, step,
                                         self.d)
            if step == 0 and base_eval is not None:
                base_eval["result"] = result
        if result is not None:
            self.log.write("eval.jsonl", result)
            print(f"[{run_name(self.cfg)}] eval step {step}: " + "  ".join(
                f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float)), flush=True)

    def save(self, step: int) -> None:
        save_checkpoint(self.cfg, self.model, self.optimizer, step, self.counters, self.d)

    def rollouts_and_feedback(self, step: int, timer: Timer) -> tuple[list[Item], dict]:
        """Steps 1–4."""
        drawn = step_problems(self.train_set, self.cfg, step)
        draws = [(i, drawn[i]) for i in range(self.d.rank, len(drawn), self.d.world)]
        with self.sampling():
            items = collect_rollouts(self.cfg, self.engine, self.tokenizer, self.checker, draws, step, timer)
        return items, attach_feedback(self.cfg, self.critic, self.engine, self.tokenizer, self.checker, items,
                                      step, timer)

    def optimize(self, items: list[Item], timer: Timer) -> tuple[dict, float]:
        """Steps 5–6: loss and backward per micro-batch, one gradient all-reduce, one AdamW step.

        Returns the weighted metric sums (the weight of metric k in "k/weight") and the gradient norm (NaN if
        skipped)."""
        cfg, d = self.cfg, self.d
        # the loss is divided by the number of valid rollout tokens (or sequences) of the whole step, all ranks
        n_valid = torch.tensor([float(sum(len(it.completion.token_ids) for it in items if not it.skipped))],
                               device=d.device)
        n_seq = torch.tensor([float(sum(not it.skipped for it in items))], device=d.device)
        all_reduce_sum(n_valid, d), all_reduce_sum(n_seq, d)
        n_decisive = torch.tensor([float(pbsd.decisive_pairs([it.reward for it in items if not it.skipped],
                                                             [it.teacher_reward for it in items if not it.skipped]))
                                   if cfg.objective == "pbsd" else 0.0], device=d.device)
        all_reduce_sum(n_decisive, d)
        if cfg.objective == "pbsd":
            normalizer = n_decisive.item()  # pairs with a preference (pbsd.py, departure 1)
        elif cfg.feedback == "grpo" and cfg.grpo_aggregation == "sequence":
            normalizer = n_seq.item()
        else:
            normalizer = n_valid.item()
        sums: dict[str, float] = {}
        divergences = []  # (N_mb,) per-token divergences of each micro-batch
        bad = 0.0
        self.model.train()
        for i in range(0, len(items), cfg.micro_batch):
            mb = items[i:i + cfg.micro_batch]
            if all(it.skipped for it in mb):
                continue  # nothing to learn from (gradients are synced once below, not per backward pass)
            loss, m = micro_batch_loss(cfg, self.model, mb, self.tokenizer.pad_token_id, normalizer, timer)
            if not torch.isfinite(loss):
                bad = 1.0  # no backward for it; the whole step is dropped below, on every rank
                continue
            with timer("student"):
                loss.backward()
            if "token_divergence" in m:
                divergences.append(m.pop("token_divergence"))
            counts = {k: m.pop(n) for k, n in TOKEN_SUBSET_COUNTS.items() if n in m}
            # metrics are micro-batch means: weight each by what it averages over (tokens for SD and GRPO;
            # for PBSD pairs, or decisive pairs), so that the step's value is the mean over the whole step
            kept = [it for it in mb if not it.skipped]
            if cfg.objective == "pbsd":
                n_decisive = pbsd.decisive_pairs([it.reward for it in kept], [it.teacher_reward for it in kept])
                weight = {k: float(n_decisive if k in pbsd.DECISIVE_PAIR_METRICS else len(kept)) for k in m}
            else:
                weight = dict.fromkeys(m, float(sum(len(it.completion.token_ids) for it in kept))) | counts
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * weight[k]
                sums[f"{k}/weight"] = sums.get(f"{k}/weight", 0.0) + weight[k]
        # one all-reduce of the LoRA gradients and the "bad" flag: the sync of the last micro-step
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([bad], device=d.device)])
        all_reduce_sum(flat, d)
        grad_norm = float("nan")
        if normalizer == 0:
            # nothing to learn from on any rank (every rollout skipped, or PBSD pairs all ties): no AdamW step,
            # since its momentum would still move the weights
            self.counters["skipped_empty"] += 1
        elif flat[-1].item() == 0 and torch.isfinite(flat).all():
            offset = 0
            for p in self.params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
                offset += p.numel()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm).item()
            self.optimizer.step()
        else:
            self.counters["skipped_nonfinite"] += 1  # the weights are untouched
        self.optimizer.zero_grad(set_to_none=True)
        return sums | step_diagnostics(cfg, items, divergences, d), grad_norm


def make_vllm_engine(cfg: Config, d: Dist) -> rollout.VLLMEngine:
    """One vLLM engine per process, shared by the runs of one invocation (--feedback all): under torchrun each rank
    holds its own (external_launcher, rollout.py), and vLLM's teardown ends the process group, so it is built
    once and closed last."""
    return rollout.make_engine("vllm", cfg.model, dtype=cfg.dtype, seed=cfg.seed, max_lora_rank=cfg.lora_r,
                               gpu_memory_utilization=cfg.vllm_gpu_memory, kv_cache_gib=cfg.vllm_kv_cache_gib,
                               world_size=d.world, stop_at_boxed=cfg.stop_at_boxed)


def start_run(cfg: Config, d: Dist, checker: grading.AnswerChecker,
              vllm_engine: rollout.VLLMEngine | None = None) -> tuple[Run, int]:
    """Load data and model, build the engine (or take the vLLM one) and critic, and resume if asked.
    Returns (run, first step)."""
    if cfg.prompts_per_step % d.world:
        raise ConfigError(f"--prompts-per-step {cfg.prompts_per_step}: must divide by the number of ranks "
                          f"({d.world})")
    train_set, test_set = load_problems(cfg)
    critic_backend = make_critic(cfg) if cfg.feedback == "stepalign" else None  # before any GPU time is spent
    torch.manual_seed(cfg.seed)  # the same LoRA initialization on every rank...
    model, tokenizer = build_model(cfg, d)
    params = [p for p in model.parameters() if p.requires_grad]
    if d.world > 1:
        for p in params:  # ...and rank 0's copy, as DDP does, so the ranks cannot drift apart
            dist.broadcast(p.data, src=0)
    torch.manual_seed(cfg.seed + d.rank)  # per-rank offset: only dropout would use it; sampling has its own seeds
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.engine == "vllm" and vllm_engine is None:
        raise ValueError("--engine vllm: start_run takes the process's engine (make_vllm_engine)")
    engine = vllm_engine if cfg.engine == "vllm" else rollout.make_engine(
        "transformers", cfg.model, model, tokenizer, stop_at_boxed=cfg.stop_at_boxed)
    run = Run(cfg, d, checker, model, tokenizer, engine, critic_backend, optimizer, params, train_set, test_set,
              Logger(cfg, d), {"skipped_critic": 0, "skipped_nonfinite": 0, "skipped_empty": 0})
    if d.master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        for stray in sorted((run.out_dir / "checkpoints").glob(".tmp_step_*")):  # a save cut by a kill
            shutil.rmtree(stray)
            print(f"removed {stray}: a checkpoint whose save was interrupted", flush=True)
    if d.world > 1:
        dist.barrier()  # (no rank reads the checkpoints before the strays are gone)
    if cfg.resume and checkpoint_dirs(run.out_dir):
        latest = checkpoint_dirs(run.out_dir)[-1]
        step, counters = load_checkpoint(latest, model, optimizer, d)
        run.counters |= counters
        if d.master:
            for name in ("log.jsonl", "eval.jsonl"):  # lines written after the checkpoint are written again
                truncate_log(run.out_dir / name, step)
            print(f"resumed from {latest} (step {step})", flush=True)
        return run, step
    if cfg.resume and d.master:
        print(f"--resume: no checkpoint in {run.out_dir / 'checkpoints'}; starting at step 0", flush=True)
    if d.master:
        for name in ("log.jsonl", "eval.jsonl"):
            (run.out_dir / name).unlink(missing_ok=True)
        (run.out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return run, 0


def train(cfg: Config, d: Dist, checker: grading.AnswerChecker, base_eval: dict | None = None,
          vllm_engine: rollout.VLLMEngine | None = None) -> tuple[Path, dict, int]:
    """One run of one feedback form, steps 1–7 of the module docstring in a loop. Returns its output directory,
    its counters and its number of steps. base_eval: shared by the runs of one invocation, so that the base
    policy (step 0) is evaluated once; vllm_engine: likewise (--engine vllm), it gets this run's adapter before
    anything is sampled. A step with failed critiques prints a warning; when at least `critic_fail_max` of the
    critiques of the last `critic_fail_window` steps failed, the run checkpoints and exits with EXIT_CRITIC_DOWN."""
    run, start = start_run(cfg, d, checker, vllm_engine)
    steps = total_steps(cfg, len(run.train_set))
    run.push_adapter(start)
    if start == 0:
        run.evaluate(0, base_eval)
    bar = None
    if d.master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc=cfg.feedback, unit="step", dynamic_ncols=True)
    window = deque(maxlen=cfg.critic_fail_window)  # failed critiques of the last steps (all ranks)
    with StopFlag() as stop:
        for step in range(start, steps):
            timer, t0 = Timer(), time.perf_counter()
            items, stats = run.rollouts_and_feedback(step, timer)
            if stop.agreed(d):  # no weight has changed in this step yet: a checkpoint of `step` steps is exact
                run.save(step)
                return _stopped(run.out_dir, step, d)
            sums, grad_norm = run.optimize(items, timer)
            failures = sum_over_ranks({k: v for k, v in stats.items() if k.startswith("critic_failed")}, d)
            run.counters["skipped_critic"] += int(failures.get("critic_failed", 0))  # all ranks' failures
            done = step + 1
            run.push_adapter(done)
            record = step_record(cfg, done, items, sums, stats, run.counters, timer, time.perf_counter() - t0,
                                 grad_norm, d) | failures
            run.log.write("log.jsonl", record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", reward=f"{record['reward']:.2f}")
            critic_down = None
            if cfg.feedback == "stepalign":
                n = cfg.prompts_per_step * group_size(cfg)  # one critique per rollout
                window.append(failures)
                if failures.get("critic_failed") and d.master:
                    warn(f"[{run_name(cfg)}] step {done}: the critic failed on {failures['critic_failed']:.0f} of "
                         f"{n} rollouts ({failure_kinds(failures)}); they are skipped", bar)
                recent = sum((Counter(f) for f in window), Counter())
                if recent["critic_failed"] >= cfg.critic_fail_max * n * len(window) and done < steps:
                    critic_down = (f"{recent['critic_failed']:.0f} of {n * len(window)} critiques failed over the "
                                   f"last {len(window)} steps ({failure_kinds(recent)})")
            stopping = stop.agreed(d)  # read once: the save below and the exit must agree
            if done % cfg.eval_every == 0 or done == steps:
                run.evaluate(done)
                run.save(done)
            elif stopping or critic_down:
                run.save(done)
            if stopping:
                return _stopped(run.out_dir, done, d)
            if critic_down:
                if d.master:
                    warn(f"train.py: error: [{run_name(cfg)}] stopped at step {done}: {critic_down}, at least "
                         f"--critic-fail-max {cfg.critic_fail_max}. Fix: {critic_fix(cfg, recent)}. A checkpoint "
                         f"of step {done} is in {run.out_dir}: continue with the same command and --resume.", bar)
                raise SystemExit(EXIT_CRITIC_DOWN)
    if bar is not None:
        bar.close()
    return run.out_dir, run.counters, steps


def _stopped(out_dir: Path, step: int, d: Dist):
    if d.master:
        print(f"SIGTERM: checkpoint written at step {step} in {out_dir}; continue with --resume", flush=True)
    raise SystemExit(EXIT_SIGTERM)


def warn(message: str, bar=None) -> None:
    """A line on stderr, through the progress bar when there is one (so that the bar does not overwrite it)."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def sum_over_ranks(counts: dict[str, float], d: Dist) -> dict[str, float]:
    """Counts summed over ranks; each rank may hold different keys (e.g. critic_failed_timeout on one only)."""
    if d.world == 1:
        return dict(counts)
    every = [None] * d.world
    dist.all_gather_object(every, counts)
    total: dict[str, float] = {}
    for rank_counts in every:
        for k, v in rank_counts.items():
            total[k] = total.get(k, 0.0) + v
    return total


def failure_counts(failures: dict[str, float]) -> Counter:
    """{kind: count} from the critic_failed_<kind> entries of a step's (or window's) counts."""
    return Counter({k.removeprefix("critic_failed_"): v for k, v in failures.items()
                    if k.startswith("critic_failed_")})


def failure_kinds(failures: dict[str, float]) -> str:
    """'refused 3, timeout 1' from the critic_failed_<kind> counts."""
    return ", ".join(f"{k} {v:.0f}" for k, v in failure_counts(failures).most_common())


def critic_fix(cfg: Config, failures: dict[str, float]) -> str:
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
    if kind == "length":
        return f"critiques are cut by --critic-max-tokens {cfg.critic_max_tokens}: raise it"
    return "see the warnings above"


def step_diagnostics(cfg, items: list[Item], divergences: list[torch.Tensor], d: Dist) -> dict[str, float]:
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
    if cfg.feedback == "stepalign":  # among the critiques the backend returned; the counts are this step's
        record["critic_schema_ok"] = schema_ok / max(n_items - failed, 1)
        record["skipped_unstructured_step"], record["kept_unstructured_step"] = skipped_unstr, kept_unstr
    if cfg.objective == "pbsd":
        record["teacher_reward"] = teacher_reward / max(n_items - skipped, 1)
    record |= {k: v / max(w, 1e-9) for k, v, w in zip(keys, values, weights)}
    return record


# options that a resumed run may change: where the critic is and how it is waited for, when to stop and to
# checkpoint, what is displayed, and memory knobs that leave the step's math as it is (up to float rounding)
RESUME_MAY_CHANGE = {"preset", "resume", "progress", "tensorboard", "max_steps", "epochs", "eval_every", "critic_url",
                     "critic_api_key_env", "critic_timeout", "critic_concurrency", "critic_retries",
                     "critic_fail_window", "critic_fail_max", "vllm_gpu_memory", "vllm_kv_cache_gib", "micro_batch",
                     "loss_chunk", "grad_checkpointing", "teacher_samples"}


def form_config(cfg: Config, feedback: str) -> Config:
    """The config of one run of the invocation: one feedback form, its own output directory."""
    run_cfg = dataclasses.replace(cfg, feedback=feedback)
    run_cfg.out_dir = cfg.out_dir.format(preset=cfg.preset, feedback=run_name(run_cfg))
    return run_cfg


def preflight(cfg: Config, world: int) -> None:
    """Everything checkable before a model loads: the options, the data of each run (at least one training and
    one held-out problem, at least one step), its output directory, and the critic server (its model list, then
    a one-token completion). Raises ConfigError, data.DataError or critic.CriticUnavailable."""
    check_inputs(cfg, world)
    forms = PAPER_FEEDBACKS if cfg.feedback == "all" else (cfg.feedback,)
    for feedback in forms:
        run_cfg = form_config(cfg, feedback)
        load_problems(run_cfg)
        earlier = checkpoint_dirs(Path(run_cfg.out_dir))
        if earlier and not cfg.resume:  # a fresh run there would mix its checkpoints with the earlier run's
            raise ConfigError(f"--out-dir {run_cfg.out_dir}: holds checkpoints of an earlier run (latest "
                              f"{earlier[-1].name}): continue it with --resume, or choose another --out-dir")
        if earlier and cfg.resume:  # an exact restart needs the options that shape the training
            saved = json.loads((earlier[-1] / "config.json").read_text())
            changed = [f.name for f in dataclasses.fields(Config) if f.name not in RESUME_MAY_CHANGE
                       and f.name in saved and saved[f.name] != getattr(run_cfg, f.name)]
            if changed:
                raise ConfigError("\n".join(
                    f"--{name.replace('_', '-')} {getattr(run_cfg, name)}: {earlier[-1]} was written with "
                    f"{saved[name]}; --resume continues a run only with the options it started with"
                    for name in changed))
    if "stepalign" in forms and cfg.critic == "server":
        make_critic(cfg).check(timeout_s=min(cfg.critic_timeout, 30.0))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    try:
        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, data.DataError, critic.CriticUnavailable) as e:  # one line each, no traceback
        if os.environ.get("RANK", "0") == "0":
            for line in str(e).splitlines():
                print(f"train.py: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    d = setup_distributed()
    forms = PAPER_FEEDBACKS if cfg.feedback == "all" else (cfg.feedback,)
    run_dirs, base_eval, idle = [], {}, []
    vllm_engine = make_vllm_engine(cfg, d) if cfg.engine == "vllm" else None
    try:
        with grading.AnswerChecker() as checker:  # math-verify in a worker process, with our own time limit
            for feedback in forms:
                run_cfg = form_config(cfg, feedback)
                if d.master:
                    print("config: " + json.dumps(dataclasses.asdict(run_cfg)), flush=True)
                out_dir, counters, steps = train(run_cfg, d, checker, base_eval, vllm_engine)
                run_dirs.append(out_dir)
                if counters["skipped_empty"] + counters["skipped_nonfinite"] >= steps:  # no AdamW step at all
                    idle.append(f"run {run_name(run_cfg)} took no optimizer step in its {steps} steps (skipped_empty "
                                f"{counters['skipped_empty']}: nothing to learn from; skipped_nonfinite "
                                f"{counters['skipped_nonfinite']}; rollouts skipped for the critic "
                                f"{counters['skipped_critic']}): its evaluations are of the base policy; see "
                                f"{out_dir / 'log.jsonl'}")
        if d.master:
            table = report.results_table(report.load_evals(run_dirs))
            print(table)
            for line in idle:
                print(f"train.py: error: {line}", file=sys.stderr, flush=True)
    finally:
        if vllm_engine is not None:
            vllm_engine.close()  # under torchrun this also ends the process group (rollout.VLLMEngine.close)
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    if idle:
        raise SystemExit(EXIT_NOTHING_LEARNED)


if __name__ == "__main__":
    main(sys.argv[1:])
