"""The transformers engine's sampling, this tree's against another commit's, on the demo's evaluation prompts.

    python bench/bench_generation.py --before 6d9a6b6            # 16 held-out problems x 4 samples, 2 rounds
    python bench/bench_generation.py --before 6d9a6b6 --problems 48

Both engines sample the same prompts with the same seeds from the same model (SmolLM2-135M-Instruct, the demo's
base policy, merged for sampling as train.py does), rounds interleaved: the script prints each one's seconds, the
ratio (this tree / before) and whether every sampled token is the same. `--before` takes any commit whose
rollout.py has the same TransformersEngine interface; its rollout.py is read with `git show`. An engine whose
generate takes the prompts as text (before prompts.encode) gets the rendered text, whose ids are the same here.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import prompts  # noqa: E402
import rollout  # noqa: E402
import policy  # noqa: E402
from infra import dist  # noqa: E402


def rollout_at(rev: str):
    """The module rollout.py as it is at commit `rev`."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:rollout.py"], check=True, capture_output=True,
                            text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "rollout_before.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("rollout_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["rollout_before"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="the commit to compare with")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = config.parse_config(["--preset", "demo", "--feedback", "refsol", "--seed", "50"])
    _, test_set = config.load_problems(cfg)
    problems = test_set[:a.problems]
    model, tokenizer, _, _ = policy.start_policy(cfg, dist.Dist())
    texts = [prompts.render(tokenizer, prompts.student_messages(p), cfg.student_thinking) for p in problems]
    x = [prompts.encode(tokenizer, prompts.student_messages(p), cfg.student_thinking) for p in problems]
    seeds = [rollout.sample_seed(cfg.seed, "eval", 0, p.id) for p in problems]
    engines = {"before": rollout_at(a.before), "this tree": rollout}
    seconds, tokens = {name: [] for name in engines}, {}
    for r in range(a.rounds):
        for name, module in engines.items():
            engine = module.TransformersEngine(model, tokenizer, batch_size=32, stop_at_boxed=cfg.stop_at_boxed)
            ids = "prompt_ids" in inspect.signature(engine.generate).parameters  # else the text (docstring)
            start = time.perf_counter()
            with policy.sampling(cfg, model):
                out = engine.generate(x if ids else texts, seeds, n=cfg.eval_samples,
                                      temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens)
            seconds[name].append(time.perf_counter() - start)
            tokens[name] = [c.token_ids for samples in out for c in samples]
            print(f"round {r + 1}, {name}: {seconds[name][-1]:.1f} s, {sum(map(len, tokens[name]))} tokens",
                  flush=True)
    ratios = [now / before for before, now in zip(seconds["before"], seconds["this tree"])]
    print(f"\n{len(texts)} prompts x {cfg.eval_samples} samples, {cfg.max_new_tokens} new tokens, torch threads "
          f"{a.threads}: this tree / {a.before} = {statistics.median(ratios):.2f} (rounds: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); the same tokens: {tokens['before'] == tokens['this tree']}")


if __name__ == "__main__":
    main()
