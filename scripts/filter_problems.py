"""The paper's difficulty filter: keep the problems hard for the solver but solved by the critic.

Sample the solver n=16 times per problem; ask the critic about the problems with Avg@16 < 5/16 alone (no other
can pass) and keep those it solves (select_hard); write them with their measured pass rates to a JSONL manifest,
split deterministically (by seed) into train and test (split_train_test; paper: 312 → 282 / 30). The solver samples through the engine
train.py uses, built by rollout.make_engine from the same options (--engine vllm on GPUs or on vLLM's CPU
build, --engine transformers; --dtype; --device); every manifest row records the filter's settings, these
included, under "filter".

    python -m scripts.filter_problems --data shards/*.parquet --solver Qwen/Qwen3-1.7B --critic-url http://localhost:8000 \\
        --critic-model Qwen/QwQ-32B --limit 4000 --out manifest.jsonl   # vLLM, bf16: the defaults
    python -m scripts.filter_problems --data omr.jsonl --solver smollm2-135m-instruct --critic smollm2-135m-instruct \\
        --engine transformers --dtype float32 --limit 50 --max-new-tokens 256 --out manifest.jsonl  # CPU-sized

Cost: the solver's n samples of every candidate (--limit caps the candidates), then --critic-n answers of up to
--critic-max-tokens per hard problem; the filter prints that count and its token bound before the critic starts.

Departures from the paper:
1. The paper does not say at which temperature Avg@16 was measured; the filter samples at the training
   temperature 1.1 by default (`--temperature`).
2. "Solved by the critic" is one greedy critic answer graded against the expected answer (`--critic-n` N > 1
   samples N critic answers at temperature 1.0 instead; a problem then counts as solved if any is right).
   An answer cut by --critic-max-tokens (critic.MAX_TOKENS by default) counts as not solved.
"""
from __future__ import annotations

import random
import sys

import torch

import config
import critic
import data
import grading
import prompts
import rollout


def select_hard(problems: list[data.Problem], solver_correct_counts: list[int], critic_correct: list[bool],
                n: int = 16, threshold: int = 5) -> list[dict]:
    """The paper's filter: keep problems with Avg@n < threshold/n (i.e. fewer than `threshold` of `n` solver
    samples correct) that the critic solves. Returns manifest rows with the measured pass rates."""
    if not len(problems) == len(solver_correct_counts) == len(critic_correct):
        raise ValueError(f"{len(problems)} problems, {len(solver_correct_counts)} solver counts and "
                         f"{len(critic_correct)} critic results: they must match")
    if not 0 < threshold <= n:
        raise ValueError(f"threshold must lie in 1..n={n}, got {threshold}")
    kept = []
    for p, c, ok in zip(problems, solver_correct_counts, critic_correct):
        if not 0 <= c <= n:
            raise ValueError(f"problem {p.id}: {c} correct out of n={n} samples is impossible")
        # Avg@n = c / n < threshold / n  ⇔  c < threshold
        if c < threshold and ok:
            kept.append({"id": p.id, "problem": p.problem, "answer": p.answer,
                         "reference_solution": p.reference_solution, "source": p.source,
                         "solver_correct": c, "n_samples": n, "solver_pass_rate": c / n,
                         "critic_correct": bool(ok)})
    return kept


def split_train_test(rows: list[dict], n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split by seed, independent of the input order (rows are sorted by id first)."""
    if not 0 <= n_test <= len(rows):
        raise ValueError(f"n_test={n_test} but only {len(rows)} rows")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("rows have duplicate ids; a split by id would be ambiguous")
    ordered = sorted(rows, key=lambda r: r["id"])
    random.Random(seed).shuffle(ordered)
    test, train = ordered[:n_test], ordered[n_test:]
    return sorted(train, key=lambda r: r["id"]), sorted(test, key=lambda r: r["id"])


def count_correct(engine, prompt_ids: list[list[int]], answers: list[str], seeds: list[int], n: int,
                  temperature: float, max_new_tokens: int, grade, batch_size: int = 8,
                  require_stop: bool = False) -> list[int]:
    """Number of correct samples out of n per prompt (its token ids, prompts.encode); `engine.generate` as in
    rollout.py, `grade(text, gold)`.
    require_stop: a sample cut by max_new_tokens (finish_reason "length") counts as wrong."""
    counts = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = slice(start, start + batch_size)
        outs = engine.generate(prompt_ids[chunk], seeds[chunk], n=n, temperature=temperature,
                               max_new_tokens=max_new_tokens, adapter=False)  # the base model: no adapter
        counts += [sum((not require_stop or c.finish_reason == "stop") and grade(c.text, gold) for c in samples)
                   for samples, gold in zip(outs, answers[chunk])]
    return counts


# train.py's options (config.Config) that the filter shares: its defaults, except vLLM's share of the GPU (nothing
# else runs beside the filter's engine)
SHARED = ("temperature", "max_new_tokens", "engine", "dtype", "vllm_gpu_memory", "seed", "critic_model",
          "critic_max_tokens", "critic_think_in_prompt")


def own_options(ap) -> None:
    """The filter's own options (the shared ones come from config.Config)."""
    ap.add_argument("--data", nargs="+", help="local OpenMathReasoning .parquet/.jsonl files or directories")
    ap.add_argument("--hub-split", default=None, help="stream this split (e.g. cot) from the hub via `datasets`")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad rows (counted) instead of failing")
    ap.add_argument("--limit", type=int, default=None, help="keep at most this many candidate problems")
    ap.add_argument("--solver", required=True, help="solver model (rollout.load_model name or path)")
    ap.add_argument("--critic", default=None, help="critic model run locally (rollout.load_model name or path)")
    ap.add_argument("--critic-url", default=None, help="OpenAI-compatible server of the critic instead")
    ap.add_argument("--critic-n", type=int, default=1,
                    help="critic samples, solved if any is correct; 1 = greedy, more are sampled at T=1")
    ap.add_argument("--n", type=int, default=16, help="solver samples per problem (Avg@n)")
    ap.add_argument("--threshold", type=int, default=5, help="keep problems with fewer correct samples than this")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    ap.add_argument("--device", default=None, help="transformers engine and local --critic: torch device "
                    "(default: cuda if available, else cpu, as in train.py); vLLM places itself")
    ap.add_argument("--n-test", type=int, default=30, help="test-set size (the paper: 30 of 312)")
    ap.add_argument("--out", required=True, help="output manifest (JSONL)")


def _filter_command(argv: list[str]) -> None:
    cfg, args = config.parse_command(argv, prog="filter_problems.py", description="the paper's difficulty filter",
                                     own=own_options, names=SHARED, defaults={"vllm_gpu_memory": 0.85})
    for name in SHARED:  # one namespace of options for the rest of the filter
        setattr(args, name, getattr(cfg, name))

    def error(message: str):
        print(f"filter_problems.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    if (args.data is None) == (args.hub_split is None):
        error("give exactly one of --data and --hub-split")
    if (args.critic is None) == (args.critic_url is None):
        error("give exactly one of --critic and --critic-url")
    if args.engine == "vllm" and args.device is not None and args.critic is None:
        error("--device applies to --engine transformers and a local --critic; vLLM places the model itself "
              "(choose GPUs with CUDA_VISIBLE_DEVICES)")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    if args.data is not None:
        problems, stats = data.load_openmathreasoning(args.data, skip_bad=args.skip_bad, limit=args.limit)
    else:
        problems, stats = data.load_openmathreasoning_hub(args.hub_split, skip_bad=args.skip_bad, limit=args.limit)
    print(stats.summary(), flush=True)
    # a problem holding a chat control token (<|im_end|>, ...) would inject a turn into the critic server's prompt,
    # and training never sends it to the critic (critic.ServerCritic): it is left out here, counted
    safe = [p for p in problems if not critic.control_tokens(p.problem, p.reference_solution or "")]
    if len(safe) < len(problems):
        print(f"{len(problems) - len(safe)} problems left out: they hold chat control tokens", flush=True)
        problems = safe
    answers = [p.answer for p in problems]
    seeds = [rollout.sample_seed(args.seed, "filter", p.id) for p in problems]

    model = tokenizer = None  # the vLLM engine loads its own copy, and brings its tokenizer
    if args.engine == "transformers":
        model, tokenizer = rollout.load_model(args.solver, dtype=rollout.DTYPES[args.dtype], device=device)
    engine = rollout.make_engine(args.engine, args.solver, model, tokenizer, dtype=args.dtype, seed=args.seed,
                         gpu_memory_utilization=args.vllm_gpu_memory)
    tokenizer = engine.tokenizer
    solver_prompts = [prompts.encode(tokenizer, prompts.student_messages(p), thinking=False) for p in problems]
    solver_counts = count_correct(engine, solver_prompts, answers, seeds, args.n, args.temperature, args.max_new_tokens,
                                  grading.grade, args.batch_size)
    del engine, model
    # only the problems hard for the solver can pass: the critic sees those alone (its answers are the cost)
    hard = [i for i, c in enumerate(solver_counts) if c < args.threshold]
    print(f"solver: {len(hard)} of {len(problems)} problems below {args.threshold}/{args.n} correct; the critic "
          f"answers each of them {args.critic_n} time(s), at most {len(hard) * args.critic_n * args.critic_max_tokens:,} "
          f"tokens in all (--critic-max-tokens {args.critic_max_tokens})", flush=True)
    hard_problems, hard_answers = [problems[i] for i in hard], [answers[i] for i in hard]
    if args.critic_url is not None:
        server = critic.ServerCritic(args.critic_url, args.critic_model, max_tokens=args.critic_max_tokens,
                                     temperature=0.0 if args.critic_n == 1 else 1.0)
        texts = server.complete([prompts.student_messages(p) for p in hard_problems for _ in range(args.critic_n)],
                                [rollout.sample_seed(args.seed, "filter-critic", p.id, j)
                                 for p in hard_problems for j in range(args.critic_n)])
        opened = args.critic_think_in_prompt
        graded = [text is not None and grading.grade(data.strip_think(text, opened), gold)
                  for (text, _, _), gold in zip(texts, [a for a in hard_answers for _ in range(args.critic_n)])]
        solved = [any(graded[i * args.critic_n:(i + 1) * args.critic_n]) for i in range(len(hard_problems))]
        print(f"critic requests failed: {sum(err is not None for _, err, _ in texts)} of {len(texts)}, "
              f"{sum(kind == 'length' for _, _, kind in texts)} of them cut by --critic-max-tokens", flush=True)
    else:
        critic_model, critic_tokenizer = rollout.load_model(args.critic, dtype=rollout.DTYPES[args.dtype],
                                                            device=device)
        critic_prompts = [prompts.encode(critic_tokenizer, prompts.student_messages(p), thinking=True)
                          for p in hard_problems]
        opened = bool(hard_problems) and prompts.prompt_opens_think(
            prompts.render(critic_tokenizer, prompts.student_messages(hard_problems[0]), thinking=True))
        temperature = 0.0 if args.critic_n == 1 else 1.0
        # an answer cut by the length limit counts as not solved, as with a server (ServerCritic.complete)
        counts = count_correct(rollout.TransformersEngine(critic_model, critic_tokenizer), critic_prompts,
                               hard_answers, [seeds[i] for i in hard], args.critic_n, temperature,
                               args.critic_max_tokens, lambda text, gold: grading.grade(data.strip_think(text, opened),
                                                                                        gold),
                               args.batch_size, require_stop=True)
        solved = [c > 0 for c in counts]
    critic_ok = [False] * len(problems)  # (a problem the solver solves is never sent: it cannot pass)
    for i, ok in zip(hard, solved):
        critic_ok[i] = ok
    print(f"critic solved {sum(critic_ok)} of the {len(hard)} hard problems", flush=True)
    kept = select_hard(problems, solver_counts, critic_ok, n=args.n, threshold=args.threshold)
    if len(kept) <= args.n_test:
        raise SystemExit(f"only {len(kept)} problems passed the filter, not more than --n-test {args.n_test}: "
                         "nothing would be left to train on (use more candidates or a smaller --n-test)")
    train, test = split_train_test(kept, args.n_test, args.seed)
    # how the measurement was made (engine, dtype, device: the pass rates depend on them); the solver's device
    # under vLLM is the platform of its build: CUDA when torch sees a GPU, else vLLM's CPU build
    settings = {**{k: v for k, v in vars(args).items() if k not in ("data", "out", "skip_bad", "limit")},
                "device": device,
                "solver_device": device if args.engine == "transformers" else
                ("cuda" if torch.cuda.is_available() else "cpu")}
    data.write_manifest(args.out, train, test, settings)
    print(f"{len(problems)} candidates → {len(kept)} hard and critic-solved → {len(train)} train / {len(test)} test; "
          f"manifest written to {args.out}", flush=True)


def main(argv: list[str]) -> None:
    try:
        _filter_command(argv)
    except data.DataError as e:  # a bad input file or row: one line naming file, row and field, not a traceback
        print(f"python filter_problems.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
