#!/usr/bin/env bash
# Does the GPU install resolve? A dry run of `pip install -r requirements.txt -r requirements-gpu.txt` (nothing is
# installed; pip downloads the packages' metadata), then the versions that matter for the paper's run.
#
#   bash bench/resolve_requirements.sh            # with the python of .venv, else python3
#
# On a GPU machine pip takes the CUDA build of torch that vLLM pins (torch 2.13: CUDA 13, an R580 or newer driver);
# on a machine whose pip is pointed at a local CPU wheel of torch (these CI machines) it takes that one, which
# resolves the same set otherwise. Exit status: pip's (non-zero when the set does not resolve).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
"$py" -m pip install -q --dry-run --ignore-installed --report "$report" -r requirements.txt -r requirements-gpu.txt
"$py" - "$report" <<'PY'
import json, sys
names = {"torch", "transformers", "vllm", "math-verify", "numpy", "safetensors", "triton", "flashinfer-python"}
got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
print("resolves: " + ", ".join(f"{n} {got[n]}" for n in sorted(names) if n in got))
PY
