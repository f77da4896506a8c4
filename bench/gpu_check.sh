#!/usr/bin/env bash
# The prepared device check of issue 20: the paper's training path on one GPU, with nothing downloaded.
#
#   bash bench/gpu_check.sh                 # one CUDA GPU: Qwen3-1.7B sizes, bf16, NCCL (at most 8 min on one H100)
#   bash bench/gpu_check.sh --device cpu    # the same steps at tiny sizes on a CPU (tests/test_gpu_check.py)
#
# 1. bench/bench_sd_step.py: the SD micro-step at Qwen3-1.7B sizes, T = 2048 rollout tokens, batch 1, 2, 4:
#    tokens/s, MFU and peak GiB (CPU: --tiny).
# 2. bench/random_qwen3.py writes a random-weight Qwen3-shaped model (Qwen3-1.7B's shape; CPU: tiny) with its
#    built-in Qwen3-format tokenizer (or --tokenizer's); train.py runs 3 steps on it under
#    `torchrun --nproc_per_node 1` (NCCL on a GPU, gloo on a CPU) with the transformers engine, bf16 (CPU: fp32),
#    arithmetic problems and the exact critic, then `--resume` runs step 4 from the step-3 checkpoint. The logs are
#    checked: steps 1-4 logged, evaluations at steps 0, 3 and 4, the resume started at step 3.
#    train.py grades answers with math-verify (grading.py): without it this step is skipped, by name, with a line
#    that says why and how to enable it (also in skipped.txt); step 1 still runs and decides the exit status.
# Needs torch and transformers (and numpy, safetensors); math-verify for step 2. Options:
#   --tokenizer DIR  a tokenizer's files for step 2's model (tokenizer.json, tokenizer_config.json, and a chat
#                    template), e.g. the demo model's ~/.cache/sdcf/smollm2-135m-instruct or a real Qwen3's; default:
#                    bench/random_qwen3.py's built-in tokenizer, which needs no files
#   --wheels DIR     install math-verify from wheels in DIR first, offline (pip download math-verify -d DIR,
#                    on a machine with network access)
#   --out DIR        where the logs go, 6 small files, 3 when step 2 is skipped (default $OUT, else a new
#                    temporary folder)
#   --work DIR       where the model and the training run go (default: a temporary folder, removed at the end)
# Environment: PYTHON (default python3).
set -euo pipefail

device=cuda
tokenizer=""
wheels=""
out="${OUT:-}"
work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --tokenizer) tokenizer="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown option $1 (--device cuda|cpu, --tokenizer DIR, --wheels DIR, --out DIR," \
            "--work DIR)" >&2
       exit 2 ;;
  esac
done
py="${PYTHON:-python3}"
root="$(cd "$(dirname "$0")/.." && pwd)"
[ -n "$out" ] || out="$(mktemp -d)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
remove_work=""
[ -n "$work" ] || { work="$(mktemp -d)"; remove_work=1; }
mkdir -p "$work"
work="$(cd "$work" && pwd)"
cd "$root"

tokenizer_args=()
if [ -n "$tokenizer" ]; then
  if [ ! -f "$tokenizer/tokenizer.json" ]; then
    echo "gpu_check.sh: --tokenizer $tokenizer holds no tokenizer.json (leave --tokenizer out for the built-in" \
         "Qwen3-format tokenizer of bench/random_qwen3.py)" >&2
    exit 2
  fi
  tokenizer_args=(--tokenizer "$tokenizer")
fi
if [ -n "$wheels" ]; then
  "$py" -m pip install -q --no-index --find-links "$wheels" math-verify
fi
skip_train=""
if ! "$py" -c "import math_verify" 2>/dev/null; then
  skip_train="gpu_check.sh: step 2 (train.py) skipped: train.py grades answers with math-verify (grading.py), \
which $py cannot import; to run it, give --wheels DIR with math-verify's wheels (pip download math-verify -d DIR, \
on a machine with network access), or pip install math-verify"
fi
case "$device" in
  cuda)
    "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --device cpu'"
    bench_args=()
    model_args=(--device cuda)
    train_args=(--dtype bfloat16 --max-new-tokens 256 --micro-batch 4 --loss-chunk 1024)
    limit=150 ;;
  cpu)
    bench_args=(--tiny)
    model_args=(--tiny)
    train_args=(--dtype float32 --max-new-tokens 8 --micro-batch 2 --loss-chunk 64 --no-grad-checkpointing)
    limit=300
    export CUDA_VISIBLE_DEVICES=""  # train.py trains on CUDA whenever torch sees a GPU
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" ;;
  *) echo "gpu_check.sh: --device $device: expected cuda or cpu" >&2; exit 2 ;;
esac

start=$SECONDS
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
      '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$out/versions.txt"

echo "== 1. bench/bench_sd_step.py ($device)"
timeout 240 "$py" bench/bench_sd_step.py --device "$device" "${bench_args[@]}" | tee "$out/bench_sd_step.md"

echo "== 2. train.py on a random-weight Qwen3-shaped model, torchrun --nproc_per_node 1 ($device)"
if [ -n "$skip_train" ]; then
  echo "$skip_train" | tee "$out/skipped.txt"
  [ -z "$remove_work" ] || rm -rf "$work"
  echo "gpu_check.sh: done in $((SECONDS - start)) s, step 2 skipped (no math-verify); logs in $out"
  exit 0
fi
rm -rf "$work/model" "$work/train"
timeout 120 "$py" bench/random_qwen3.py "${tokenizer_args[@]}" --out "$work/model" "${model_args[@]}"
train() {
  timeout "$limit" "$py" -m torch.distributed.run --nproc_per_node 1 --standalone train.py \
    --model "$work/model" --data arithmetic --arith-train 8 --arith-test 2 --arith-ops 1 --critic exact \
    --feedback stepalign --engine transformers --prompts-per-step 4 --eval-every 3 --eval-samples 2 \
    --no-progress --out-dir "$work/train" "${train_args[@]}" "$@"
}
train --max-steps 3 2>&1 | tee "$out/train_steps_1_3.log"
train --max-steps 4 --resume 2>&1 | tee "$out/train_resume_step_4.log"
cp "$work/train/log.jsonl" "$work/train/eval.jsonl" "$out/"
"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
resumed = "(step 3)" in (out / "train_resume_step_4.log").read_text()
ok = [r["step"] for r in logs] == [1, 2, 3, 4] and [e["step"] for e in evals] == [0, 3, 4] and resumed
for r in logs:
    print(f"step {r['step']}: loss {r['loss']:.4g}  grad_norm {r['grad_norm']:.4g}  seconds {r['seconds']:.1f}  "
          f"tokens/s {r['tokens_per_s']:.0f}")
print("train.py: steps 1-4 logged, evaluations at 0, 3, 4, resumed at step 3:", "yes" if ok else "NO")
sys.exit(0 if ok else 1)
EOF
[ -z "$remove_work" ] || rm -rf "$work"
echo "gpu_check.sh: done in $((SECONDS - start)) s; logs in $out"
