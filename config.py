"""The run's options: one dataclass, the command line generated from it (`python train.py --help`), the named
presets, and every check that can run before a model loads (options, data, the critic backend's options).

One source of truth per value: each option's default and help text live in its field; a preset only changes
defaults; a resumed run may change only RESUME_MAY_CHANGE.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import critic
import data
import feedback
import prompts
import rollout
import sd_loss
from critic import MAX_TOKENS as CRITIC_MAX_TOKENS  # a name of its own: in Config, `critic` is a field
from demo import exact_critic
from feedback import FEEDBACKS, FORMS, PAPER_FORMS
from infra import checks, fingerprint
from infra.chat_client import key_problem, redact_url, url_problem
from infra.checkpoint import checkpoint_dirs, resumable_checkpoint
from demo import arithmetic
TEACHER_LAYOUTS = prompts.TEACHER_LAYOUTS  # (Config has a field named `critic`)


def opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    preset: str = opt("paper", "a named set of defaults (PRESETS); explicit options override it", ("paper", "demo"))
    feedback: str = opt("stepalign", "the teacher's context c (grpo: no teacher); 'all' runs the paper's three "
                        "in turn", FEEDBACKS + ("all",))
    refsol_style: str = opt("reference", "refsol: c is the problem's reference solution in its own wording "
                            "(reference: the OPSD setup), or a correct solution in the student's step format written "
                            "from the problem's exact steps, never from the student's attempt (steps: the format "
                            "control, arithmetic.step_solution; arithmetic data only), or the first study's one-line "
                            "prose reference (prose: a stress case whose teacher could not teach, "
                            "arithmetic.prose_solution; arithmetic data only)", ("reference", "steps", "prose"))
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
    data: str = opt("data/omr_hard.jsonl", "problems: a manifest written by `python -m scripts.filter_problems` "
                    "(train/test splits), or 'arithmetic'")
    arith_train: int = opt(282, "arithmetic data: number of training problems")
    arith_test: int = opt(30, "arithmetic data: number of held-out problems")
    arith_ops: int = opt(2, "arithmetic data: operations per problem")
    arith_max_operand: int = opt(50, "arithmetic data: largest operand")
    arith_operators: str = opt("+-*", "arithmetic data: operators to draw from")
    arith_example: bool = opt(False, "arithmetic data: prefix each problem with a one-shot worked example")
    critic: str = opt("server", "critic backend for stepalign", ("server", "local", "exact"))
    critic_url: str = opt("http://127.0.0.1:8000/v1", "OpenAI-compatible server (e.g. `vllm serve Qwen/QwQ-32B "
                          "--enable-prefix-caching`); a USER:PASSWORD@ in it is sent as HTTP Basic authentication and "
                          "shown nowhere ([redacted])")
    critic_model: str = opt("Qwen/QwQ-32B", "critic model name (server) or path (local)")
    critic_api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the critic server's API key")
    critic_timeout: float = opt(600.0, "wall-clock seconds per critic request attempt, time in the server's queue "
                                "included (a 16,384-token critique at 30 tokens/s takes 550 s); with the default --critic-retries 1, a hung critic costs "
                                "one step 2 x 600 + 1 s = about 20 minutes, then the stop rule (--critic-fail-max) "
                                "ends the run")
    critic_fail_window: int = opt(5, "steps over which failed critiques are counted (fewer at the start and "
                                  "after --resume)")
    critic_fail_max: float = opt(0.5, "stop (checkpoint, exit 3) when at least this share of the critiques of the "
                                 "last --critic-fail-window steps failed")
    critic_concurrency: int = opt(32, "concurrent critic requests per rank (the server sees up to the ranks' "
                                  "rollouts of a step at once: 32 in the paper's setup)")
    critic_retries: int = opt(1, "retries per critic request (exponential backoff) before the rollout is skipped; "
                              "each adds up to --critic-timeout to a step when the critic hangs")
    critic_max_tokens: int = opt(CRITIC_MAX_TOKENS, "critic generation budget, its <think> trace included; an answer "
                                 "cut by it is a failed critique (critic.MAX_TOKENS)")
    critic_think_in_prompt: bool = opt(True, "server critic: its chat template ends the prompt with an open <think> "
                                       "tag (QwQ-32B's does), so an answer without </think> is all trace")
    critic_temperature: float = opt(0.0, "server critic: sampling temperature; 0 = greedy, the paper's critic. QwQ-32B's "
                                    "model card warns that greedy decoding can repeat endlessly and advises 0.6 "
                                    "(with --critic-top-p 0.95): use it when critiques run to --critic-max-tokens "
                                    "(critic_failed_length in log.jsonl); each request then gets its own seed")
    critic_top_p: float = opt(1.0, "server critic: nucleus sampling mass when --critic-temperature > 0")
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
    vllm_enforce_eager: bool = opt(False, "vLLM engine: no CUDA graphs and no torch.compile (vLLM's enforce_eager): "
                                   "slower, the fallback when graph capture or compilation fails on a GPU")
    vllm_model_runner: str = opt("auto", "vLLM engine on CUDA: its model runner; auto = vLLM 0.32's default (V2, "
                                 "falling back to V1 where V2 lacks a feature), v1 / v2 force one through "
                                 "VLLM_USE_V2_MODEL_RUNNER (vllm/envs.py, vllm/config/vllm.py)", ("auto", "v1", "v2"))
    tf32: bool = opt(True, "on CUDA, TF32 tensor cores for fp32 matmuls: the LoRA branch (its weights stay fp32) and "
                     "the fp32 parts of the loss; bf16 matmuls and every CPU number are unchanged")
    student_thinking: bool = opt(False, "thinking mode of the student's chat template (Qwen3 enable_thinking)")
    teacher_thinking: bool = opt(True, "thinking mode of the teacher's chat template")
    teacher_layout: str = opt("paper", "where c sits in the teacher's prompt: paper = one user turn (problem, c, "
                              "format); turns = the student's chat continued (prompt, attempt y, then c); echo = "
                              "the solution in c as the model's own earlier answer, then 'solve again'; "
                              "repeat = echo with the student prompt as the last turn (prompts.py)",
                              TEACHER_LAYOUTS)
    lora_r: int = opt(64, "LoRA rank r")
    lora_alpha: float = opt(128.0, "LoRA α (scale α/r)")
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "comma-separated modules")
    divergence: str = opt("forward", "SD per-token loss: forward = KL(teacher‖student), Eq. 3; reverse = "
                          "KL(student‖teacher); jsd = Jensen-Shannon, β = 0.5; sampled = −A_t·log π_θ(y_t) on the "
                          "sampled tokens only (the reverse KL's policy-gradient estimator)", sd_loss.LOSS_KINDS)
    div_clip: float = opt(0.0, "SD: per-token clip of forward/reverse/jsd: a token's divergence counts at most this "
                          "much, its gradient scaled down alike (0 = off; the OPSD code uses 0.05)")
    sd_samples: int = opt(1, "SD: rollouts per problem (the paper: 1)")
    grpo_group_size: int = opt(8, "GRPO: rollouts per problem, the group G of the advantage (the paper: 8)")
    grpo_clip: float = opt(0.2, "GRPO clip ε")
    grpo_aggregation: str = opt("token", "GRPO loss aggregation", ("token", "sequence"))
    temperature: float = opt(1.1, "rollout sampling temperature")
    max_new_tokens: int = opt(2048, "rollout length limit")
    lr: float = opt(5e-6, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping (departure 1)")
    nonfinite_max: int = opt(3, "stop (exit 5, checkpoint of the last good weights) after this many steps in a row "
                             "refused because their loss, gradient or updated weights were not finite, or their update "
                             "diverged (infra.stop_rules.refused_update)")
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
    out_dir: str = opt("runs/{preset}/{feedback}", "output directory ({preset}/{feedback} are filled in); with "
                       "--feedback all and no {feedback} in it, each form runs in its own subdirectory OUT_DIR/FORM. "
                       "Never the model's or the data's directory, nor above them (the run writes and deletes files "
                       "in it), nor inside the model's")
    base_eval: str = opt("", "a JSON file of the step-0 evaluation (the base policy): read when it exists (then not "
                         "evaluated again), else written; share it only between runs of one model, seed, held-out set "
                         "and evaluation options (scripts/study.py: one per seed)")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir")
    sample_log_mb: float = opt(256.0, "samples.jsonl beside log.jsonl: each rollout of each step with its critique "
                               "(raw and parsed, or the failure), the teacher's context c, its reward and loss "
                               "(infra/sample_log.py); no more lines once the file would pass this many MiB; 0 = off")
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")
    progress: bool = opt(True, "progress bars on rank 0")


PRESETS: dict[str, dict] = {
    "paper": {},
    # SmolLM2-135M on two-operation chains with a worked example (Avg@4 about 10% at step 0, temperature 0.5, on
    # training problems of a development seed): a wrong attempt can hold correct work before its first wrong claim.
    # max_new_tokens fits every form's context solution (tests/test_config.py); 48 held-out problems × 4 samples,
    # evaluated at steps 0 and 5 (scripts/study.py runs this preset on its pre-registered seeds)
    "demo": dict(feedback="all", model=rollout.SMOLLM2, data="arithmetic", arith_train=30, arith_test=52,
                 eval_problems=48, arith_ops=2, arith_max_operand=9, arith_operators="+-", arith_example=True,
                 critic="exact", engine="transformers", stop_at_boxed=True, vllm_gpu_memory=0.25, lora_r=16,
                 lora_alpha=32.0, temperature=0.5, max_new_tokens=80, lr=2e-4, teacher_layout="repeat",
                 prompts_per_step=6, micro_batch=6, loss_chunk=256, grad_checkpointing=False, dtype="float32",
                 grpo_group_size=4, epochs=1, eval_every=5, eval_samples=4, eval_temperature=0.5),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (python {self.prog} --help lists every option)\n")


def parse_command(argv: list[str] | None, prog: str = "train.py", description: str | None = None, own=None,
                  names=None, preset: str = "paper", defaults: dict | None = None, flags: dict | None = None
                  ) -> tuple[Config, argparse.Namespace]:
    """A command's options: Config's (all of them, or those in `names`), generated from its fields with the preset's
    defaults (--preset picks it when it is one of `names`), then the command's own `defaults`; and the command's own
    options, added by `own(parser)`. `flags`: more flags for an option, e.g. {"arith_ops": ["--n-ops"]}. Returns the
    Config (fields not on this command line keep their defaults) and the command's own options."""
    fields = dataclasses.fields(Config)
    names = [f.name for f in fields] if names is None else list(names)
    if "preset" in names:
        pre = OneLineParser(prog=prog, add_help=False)
        pre.add_argument("--preset", default=preset, choices=list(PRESETS))
        preset = pre.parse_known_args(argv)[0].preset
    values = {**{f.name: f.default for f in fields}, **PRESETS[preset], "preset": preset, **(defaults or {})}
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if own is not None:
        own(parser)
    for f in fields:
        if f.name not in names:
            continue
        kw = dict(default=values[f.name], help=f.metadata["help"])
        if f.type == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[f.type]
            if f.metadata["choices"]:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), *(flags or {}).get(f.name, ()), dest=f.name, **kw)
    args = parser.parse_args(argv)
    cfg = Config(**{**values, **{name: getattr(args, name) for name in names}})
    return cfg, argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in names})


def parse_config(argv: list[str] | None = None, description: str | None = None) -> Config:
    """train.py's command line: every Config field is an option; a preset's values become the defaults."""
    return parse_command(argv, description=description)[0]


def run_name(cfg: Config) -> str:
    """The row of the results table: the feedback form (feedback.FORMS; refsol_steps: the format control), prefixed
    by the objective when it is not Eq. 3."""
    form = feedback.form_name(cfg)
    return form if cfg.objective == "sd" else f"{cfg.objective}-{form}"


class ConfigError(ValueError):
    """Bad options or inputs, found before anything is loaded: one line per problem, naming the option."""


def config_problems(cfg: Config, world: int = 1) -> list[str]:
    """Every option's allowed range and the choices that depend on each other (`choices` are argparse's).
    One line per problem: the option, its value, what is allowed. Reads no file but the paths' existence."""
    bad = []

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:  # (the value as shown: a password in --critic-url is redacted)
            bad.append(f"--{name.replace('_', '-')} {redact_url(getattr(cfg, name))}: {allowed}")

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
        ("critic_timeout", 0 < cfg.critic_timeout <= 86400, "must be > 0 seconds and at most a day (86400)"),
        ("critic_fail_window", cfg.critic_fail_window >= 1, "must be >= 1 step"),
        ("critic_fail_max", 0 < cfg.critic_fail_max <= 1, "must be a share in (0, 1]"),
        ("critic_concurrency", cfg.critic_concurrency >= 1, "must be >= 1"),
        # the backoff before retry i is 2 s * 2^(i-1): 10 retries already wait 34 minutes in all
        ("critic_retries", 0 <= cfg.critic_retries <= 10, "must lie in [0, 10] (the backoff doubles per retry)"),
        ("nonfinite_max", cfg.nonfinite_max >= 1, "must be >= 1 step"),
        ("critic_max_tokens", cfg.critic_max_tokens >= 1, "must be >= 1"),
        ("critic_temperature", 0 <= cfg.critic_temperature <= 2, "must lie in [0, 2]"),
        ("critic_top_p", 0 < cfg.critic_top_p <= 1, "must lie in (0, 1]"),
        ("sample_log_mb", cfg.sample_log_mb >= 0, "must be >= 0 MiB (0: no samples.jsonl)"),
        ("vllm_gpu_memory", 0 < cfg.vllm_gpu_memory <= 1, "must be a fraction in (0, 1]"),
        ("lora_r", cfg.lora_r >= 1, "must be >= 1"),
        ("lora_alpha", cfg.lora_alpha > 0, "must be > 0"),
        ("lora_targets", all(t.strip() for t in cfg.lora_targets.split(",")),
         "must be comma-separated module names, none empty"),
        ("sd_samples", cfg.sd_samples >= 1, "must be >= 1"),
        ("div_clip", cfg.div_clip >= 0, "must be >= 0 (0 = no clip)"),
        ("div_clip", cfg.div_clip == 0 or cfg.divergence != "sampled",
         "clips the full-vocabulary divergences; --divergence sampled has none to clip"),
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
        # rank r seeds numpy with seed + r, which numpy takes below 2^32 only
        ("seed", 0 <= cfg.seed <= 2 ** 32 - world, f"must lie in [0, 2^32 - {world}] (numpy's seeds are 32-bit)"),
        ("critic_api_key_env", need_name(cfg.critic_api_key_env), "must be the name of an environment variable"),
    ]
    for name, ok, allowed in ranges:
        if name in finite:
            need(ok, name, allowed)
    if cfg.prompts_per_step >= 1 and cfg.prompts_per_step % world:
        need(False, "prompts_per_step", f"must divide by the number of ranks ({world})")
    need(url_problem(cfg.critic_url) is None, "critic_url", url_problem(cfg.critic_url) or "")
    server_critic = cfg.feedback in ("stepalign", "all") and cfg.critic == "server"
    key = os.environ.get(cfg.critic_api_key_env) if need_name(cfg.critic_api_key_env) else None
    if server_critic and key and key_problem(key):  # (the key itself is never printed)
        need(False, "critic_api_key_env", f"the key in ${cfg.critic_api_key_env} {key_problem(key)[3:]}")
    if server_critic and key and urllib.parse.urlsplit(cfg.critic_url).username is not None:
        need(False, "critic_url", f"holds a user name and ${cfg.critic_api_key_env} holds a key: give the server one "
             "credential (the URL's is sent as HTTP Basic authentication, the key as a Bearer token)")
    for allowed in checks.out_dir_pattern_problems(cfg.out_dir, cfg.preset, cfg.feedback):
        need(False, "out_dir", allowed)
    try:
        run_dirs = [Path(form_config(cfg, form).out_dir) for form in forms_of(cfg)]
    except (KeyError, IndexError, ValueError):  # (refused above, naming the pattern)
        run_dirs = []
    bad += [f"--out-dir {cfg.out_dir}: {line}" for line in checks.out_dir_problems(cfg, run_dirs)]
    if cfg.objective == "pbsd" and cfg.feedback in ("grpo", "all"):
        bad.append(f"--objective pbsd with --feedback {cfg.feedback}: pbsd needs a teacher context: "
                   "--feedback stepalign, refsol or verdict")
    if cfg.data != "arithmetic" and not Path(cfg.data).is_file():
        bad.append(f"--data {cfg.data}: no such file (write one with `python -m scripts.filter_problems ...` "
                   "or use --data arithmetic)")
    if (cfg.critic_temperature > 0 or cfg.critic_top_p < 1) and cfg.critic != "server":
        bad.append(f"--critic-temperature {cfg.critic_temperature} / --critic-top-p {cfg.critic_top_p}: only the "
                   f"server critic samples (--critic {cfg.critic} decodes greedily)")
    local_critic = cfg.feedback in ("stepalign", "all") and cfg.critic == "local"
    for name, used in (("model", True), ("critic_model", local_critic)):
        path = getattr(cfg, name)
        looks_local = path.startswith((".", "/", "~")) or os.sep in path and Path(path).parent.exists()
        if used and looks_local and not Path(path).expanduser().is_dir():
            need(False, name, "no such directory")
        elif used and looks_local and not (Path(path).expanduser() / "config.json").is_file():
            need(False, name, "the directory has no config.json (not a saved model)")
    if cfg.refsol_style in ("steps", "prose") and cfg.data != "arithmetic":
        need(False, "refsol_style", f"{cfg.refsol_style} needs problems with exact steps: --data arithmetic")
    if cfg.feedback in ("stepalign", "all") and cfg.critic == "exact" and cfg.data != "arithmetic":
        bad.append("--critic exact only knows arithmetic problems: use --critic server or --critic local")
    if cfg.vllm_kv_cache_gib < 0:
        need(False, "vllm_kv_cache_gib", "must be a size in GiB, or 0 to size the cache by --vllm-gpu-memory")
    return bad


def need_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None


def check_inputs(cfg: Config, world: int = 1) -> None:
    """Fail before any model is loaded or GPU time is spent: ConfigError with one line per problem."""
    bad = config_problems(cfg, world)
    if bad:
        raise ConfigError("\n".join(bad))
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"--engine vllm: {rollout.VLLM_MISSING}")


def load_problems(cfg: Config) -> tuple[list[data.Problem], list[data.Problem]]:
    """(training problems, held-out problems); ConfigError or data.DataError for data a run cannot use."""
    if cfg.data == "arithmetic":
        # train and test come from different seeds; a held-out problem also drawn for training (few operands) is
        # dropped, compared by data.problem_key as every contamination check is
        kw = dict(n_ops=cfg.arith_ops, max_operand=cfg.arith_max_operand, ops=cfg.arith_operators,
                  worked_example=cfg.arith_example)
        train = arithmetic.arithmetic_problems(cfg.arith_train, seed=cfg.seed * 2 + 1, **kw)
        test = arithmetic.arithmetic_problems(cfg.arith_test, seed=cfg.seed * 2 + 2, **kw)
        seen = {data.problem_key(p.problem) for p in train}
        test = [p for p in test if data.problem_key(p.problem) not in seen]
    else:
        train, test = (data.load_manifest(cfg.data, split, answer_problem=checks.gold_answer_problem)
                       for split in data.SPLITS)
        for split, problems in (("train", train), ("test", test)):
            if not problems:
                raise data.DataError(f"{cfg.data}: no row with split {split!r}: a run needs at least one training "
                                     "and one held-out problem")
    if not test:  # (arithmetic) every held-out problem was also drawn for training
        raise ConfigError(f"--arith-test {cfg.arith_test}: every held-out problem is also a training problem; "
                          "raise --arith-max-operand or --arith-ops")
    if cfg.feedback == "refsol" and cfg.refsol_style == "reference":
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


def make_critic(cfg: Config, interrupt=None):
    """The stepalign critic backend named by --critic, built from its options. `interrupt` (train.py:
    infra.signals.StopFlag.check) is polled while a server or local critic works, and raises to abandon its batch."""
    if cfg.critic == "exact":
        return exact_critic.ExactArithmeticCritic()
    if cfg.critic == "server":
        return critic.ServerCritic(cfg.critic_url, cfg.critic_model, api_key_env=cfg.critic_api_key_env,
                                   max_tokens=cfg.critic_max_tokens, timeout_s=cfg.critic_timeout,
                                   max_workers=cfg.critic_concurrency, max_retries=cfg.critic_retries,
                                   temperature=cfg.critic_temperature, top_p=cfg.critic_top_p, seed=cfg.seed,
                                   think_in_prompt=cfg.critic_think_in_prompt, interrupt=interrupt)
    return critic.LocalCritic(cfg.critic_model, max_new_tokens=cfg.critic_max_tokens, interrupt=interrupt)


def total_steps(cfg: Config, n_train: int) -> int:
    """Optimizer steps of a run: --epochs over the training problems, capped by --max-steps."""
    steps = cfg.epochs * n_train // cfg.prompts_per_step
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


# options that a resumed run may change: where the critic is and how it is waited for, when to stop and to
# checkpoint, what is displayed, memory knobs that leave the step's math as it is (up to float rounding), and the
# step-0 evaluation's file (a resumed run is past step 0)
RESUME_MAY_CHANGE = {"preset", "resume", "progress", "tensorboard", "max_steps", "epochs", "eval_every", "critic_url",
                     "critic_api_key_env", "critic_timeout", "critic_concurrency", "critic_retries",
                     "critic_fail_window", "critic_fail_max", "nonfinite_max", "vllm_gpu_memory", "vllm_kv_cache_gib",
                     "micro_batch", "loss_chunk", "grad_checkpointing", "teacher_samples", "base_eval",
                     # the way out of a run stopped by looping greedy critiques (docs/gpu.md); engine fallbacks
                     "critic_temperature", "critic_top_p", "vllm_enforce_eager", "vllm_model_runner", "tf32",
                     "sample_log_mb"}


def same_option(name: str, saved, now) -> bool:
    """A saved option against this run's, for --resume. out_dir is where the checkpoint was just found, so any
    spelling of it (a trailing slash, a relative path, the directory moved since) is the same run; the other paths
    (--model, --data, --critic-model) are compared resolved when they name local files."""
    if name == "out_dir":
        return True
    if name in ("model", "data", "critic_model") and isinstance(saved, str) and Path(now).expanduser().exists():
        return Path(saved).expanduser().resolve() == Path(now).expanduser().resolve()
    return saved == now


def forms_of(cfg: Config) -> tuple[str, ...]:
    """The --feedback forms of an invocation, run in turn."""
    return PAPER_FORMS if cfg.feedback == "all" else (cfg.feedback,)


def form_config(cfg: Config, form: str) -> Config:
    """The config of one run of the invocation: one --feedback form, its own output directory (--feedback all with
    an --out-dir that has no {feedback}: OUT_DIR/FORM, so that no form's run overwrites another's)."""
    run_cfg = dataclasses.replace(cfg, feedback=form)
    pattern = cfg.out_dir
    if cfg.feedback == "all" and "{feedback}" not in pattern:
        pattern = pattern.rstrip("/") + "/{feedback}"
    run_cfg.out_dir = pattern.format(preset=cfg.preset, feedback=run_name(run_cfg))
    return run_cfg


def preflight(cfg: Config, world: int) -> tuple[dict, list[str]]:
    """Everything checkable before a model loads: the options, the data of each run (at least one training and
    one held-out problem, at least one step), its output directory, with --resume the options and fingerprints of
    its checkpoint, the --base-eval file, and the critic server (its model list, then a one-token completion).
    Returns ({form: its run's fingerprint (infra.fingerprint.run_fingerprint)}, warnings). Raises ConfigError,
    data.DataError or infra.chat_client.CriticUnavailable."""
    check_inputs(cfg, world)
    prints, warnings = {}, []
    for form in forms_of(cfg):
        run_cfg = form_config(cfg, form)
        train_set, test_set = load_problems(run_cfg)
        prints[form] = fingerprint.run_fingerprint(run_cfg, train_set, test_set)
        earlier = checkpoint_dirs(Path(run_cfg.out_dir))
        if earlier and not cfg.resume:  # a fresh run there would mix its checkpoints with the earlier run's
            raise ConfigError(f"--out-dir {run_cfg.out_dir}: holds checkpoints of an earlier run (latest "
                              f"{earlier[-1].name}): continue it with --resume, or choose another --out-dir")
        if earlier and cfg.resume:  # an exact restart needs the options that shape the training
            latest, passed = resumable_checkpoint(Path(run_cfg.out_dir))  # (start_out_dir warns about `passed`)
            if latest is None:
                raise ConfigError("\n".join(f"--resume: {line}" for line in passed) + (
                    "" if len(passed) == 1 else f"\n--resume: none of the checkpoints in {run_cfg.out_dir} loads"))
            saved = json.loads((latest / "config.json").read_text())
            changed = [f.name for f in dataclasses.fields(Config) if f.name not in RESUME_MAY_CHANGE
                       and f.name in saved and not same_option(f.name, saved[f.name], getattr(run_cfg, f.name))]
            if changed:
                raise ConfigError("\n".join(
                    f"--{name.replace('_', '-')} {getattr(run_cfg, name)}: {latest} was written with "
                    f"{saved[name]}; --resume continues a run only with the options it started with"
                    for name in changed))
            state = json.loads((latest / "state.json").read_text())
            lines, warning = checks.resume_problems(latest, state.get("fingerprint"), prints[form])
            if lines:
                raise ConfigError("\n".join(lines))
            warnings += [warning] if warning else []
        if form == forms_of(cfg)[0]:  # (the held-out set is the same for every form)
            bad = checks.base_eval_problems(cfg, test_set)
            if bad:
                raise ConfigError("\n".join(bad))
    if any(FORMS[form].needs_critic for form in forms_of(cfg)) and cfg.critic == "server":
        make_critic(cfg).check(timeout_s=min(cfg.critic_timeout, 30.0))
    return prints, warnings
