#!/usr/bin/env bash
# The GPU check: one call on a bare GPU machine (no network) installs the project, runs the GPU tests and the
# qwen2.5-3b benchmark, and writes everything into $OUT (default gpu_check_out/). Every part has its own
# timeout; together they fit in 9 minutes, so a 15-minute device lease leaves room for start-up and a rerun of
# a failed part (the command each part prints).
#
#   bash scripts/gpu_check.sh           # on the GPU machine (wheels from scripts/gpu_wheels.sh travel in .whl/)
#   bash scripts/gpu_check.sh --plan    # print the parts, their timeouts and commands; run nothing
#   bash scripts/gpu_check.sh --cpu     # CPU rehearsal (CI): the same parts, tiny shapes, this venv
#
# On the CPU the per-part limits are looser (a shared 2-core CI box is slow to import torch); they only catch
# hangs there. The whole script body is one function, parsed before it runs.
#
# Files in $OUT (at most 8 come back from a device call): install.log, nvidia-smi.txt, pytest_gpu.log,
# bench.log, bench.json (every stage's rows merged), summary.txt (each part's exit status and seconds).
# A part that fails or times out is recorded and the next part still runs; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

main() {
mode=gpu
for arg in "$@"; do
  case "$arg" in
    --plan) plan=1 ;;
    --cpu) mode=cpu ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (expected --plan, --cpu or nothing)" >&2; exit 2 ;;
  esac
done
plan=${plan:-0}
out=${OUT:-gpu_check_out}
site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
if [ "$mode" = gpu ]; then
  py=${PYTHON:-python3}
  bench_args=(--preset qwen2.5-3b)
else
  py=${PYTHON:-python}
  bench_args=(--preset tiny --quick)  # tiny shapes, smallest case of each stage
fi
stages="policy_loss linear_logprobs rollout train_step"
# Seconds per part. GPU: sum <= 540 (train_step: fused vs eager, then tree vs flat packs); each bench stage's limit includes torch import and Triton compilation.
if [ "$mode" = gpu ]; then
  declare -gA limit=([install]=60 [nvidia-smi]=10 [pytest-gpu]=100 [world]=30 [policy_loss]=55
                     [linear_logprobs]=55 [rollout]=50 [train_step]=175 [merge]=5)
else
  declare -gA limit=([install]=60 [nvidia-smi]=5 [pytest-gpu]=240 [world]=240 [policy_loss]=180
                     [linear_logprobs]=180 [rollout]=450 [train_step]=600 [merge]=60)
fi
order="install nvidia-smi pytest-gpu world $stages merge"
# The embedded world, its tokenizer and its MiniLM index, built once into the cache before the stages that
# use them (rollout, train_step), so that their limits cover their own work.
warm_world="from rexrag_fast.train.world_model import load_world_small; from rexrag_fast.retrieval import \
LocalRetriever; load_world_small(seed=0); print(len(LocalRetriever.for_world()), 'documents indexed')"

# The test files that hold gpu-marked tests (collecting only these keeps the part short).
gpu_test_files() { grep -l -E "mark\.gpu|pytest\.mark\.gpu" tests/test_*.py; }

command_of() {
  case "$1" in
    install)
      if [ "$mode" = gpu ]; then
        echo "unpack .whl/wheels.tar.xz if present; $py -m pip install --no-index --no-deps --target $site" \
             ".whl/*.whl; PYTHONPATH=$site; $py -m pip install --no-deps --no-build-isolation -e ."
      else
        echo "$py -c 'import rexrag_fast._C' (the venv's build; CI installed it with scripts/install.sh)"
      fi ;;
    nvidia-smi) echo "nvidia-smi -q" ;;
    world) echo "$py -c 'load_world_small(seed=0); LocalRetriever.for_world()'" ;;
    pytest-gpu) echo "$py -m pytest -m gpu -q -rs --continue-on-collection-errors -p no:cacheprovider" \
                     "$(gpu_test_files | tr '\n' ' ')" ;;
    merge) echo "$py bench/throughput.py --merge $out/stages/*.json --json $out/bench.json" ;;
    *) echo "$py bench/throughput.py ${bench_args[*]} --only $1 --json $out/stages/$1.json" ;;
  esac
}

if [ "$plan" = 1 ]; then
  total=0
  echo "gpu_check plan (mode $mode, ${bench_args[*]}, OUT=$out):"
  for part in $order; do
    printf '  %-16s %4ss  %s\n' "$part" "${limit[$part]}" "$(command_of "$part")"
    total=$((total + limit[$part]))
  done
  echo "  total            ${total}s"
  exit 0
fi

mkdir -p "$out/stages"
rm -f "$out"/stages/*.json
: > "$out/summary.txt"
failed=()
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/gpu_check_torch_extensions}
[ "$mode" = cpu ] && export DS_ACCELERATOR=cpu

# run_part NAME LOG CMD...: CMD under NAME's timeout, output appended to LOG (and shown), status recorded.
run_part() {
  local name=$1 log=$2
  shift 2
  local t0=$SECONDS rc marker
  marker=$(mktemp)
  echo "== $name (limit ${limit[$name]}s): $(command_of "$name")" | tee -a "$log"
  timeout --kill-after=10 "${limit[$name]}" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMED OUT"; elif [ "$rc" != 0 ]; then status="FAILED rc=$rc"; fi
  printf '%-16s %-14s %4ss of %ss\n' "$name" "$status" "$((SECONDS - t0))" "${limit[$name]}" | tee -a "$out/summary.txt"
  [ "$status" = ok ] || failed+=("$name")
  if [ "$status" = "TIMED OUT" ]; then
    # A JIT build (DeepSpeed's ops, torch extensions) killed mid-way leaves its lock file, and every later
    # load of that op would wait on it forever: remove the locks this part created (timeout killed its builds).
    find "$TORCH_EXTENSIONS_DIR" -name lock -newer "$marker" -print -delete 2>/dev/null \
      | sed 's/^/removed stale JIT-build lock: /' | tee -a "$log"
  fi
  rm -f "$marker"
}

install_gpu() {
  set -e
  local wheels=.whl
  if [ -f .whl/wheels.tar.xz ]; then
    wheels=$(mktemp -d)
    tar -xJf .whl/wheels.tar.xz -C "$wheels"
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl
  # setuptools from $site (the image's may predate the SPDX license field); cmake, ninja, pybind11: the image's.
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pip install --no-deps --no-build-isolation -e .
  PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" -c \
    "import rexrag_fast._C, torch, triton; print('installed; torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.cuda.is_available())"
}

t_start=$SECONDS
if [ "$mode" = gpu ]; then
  run_part install "$out/install.log" bash -c "$(declare -f install_gpu); py=$py site=$site install_gpu"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  run_part nvidia-smi "$out/nvidia-smi.txt" nvidia-smi -q
else
  run_part install "$out/install.log" "$py" -c "import rexrag_fast._C, torch; print('torch', torch.__version__)"
  run_part nvidia-smi "$out/nvidia-smi.txt" bash -c \
    "command -v nvidia-smi >/dev/null && nvidia-smi -q || echo 'no nvidia-smi on this machine (CPU rehearsal)'"
fi
mapfile -t gpu_tests < <(gpu_test_files)
run_part pytest-gpu "$out/pytest_gpu.log" "$py" -m pytest -m gpu -q -rs --continue-on-collection-errors \
  -p no:cacheprovider "${gpu_tests[@]}"
run_part world "$out/bench.log" "$py" -c "$warm_world"
for s in $stages; do
  run_part "$s" "$out/bench.log" "$py" bench/throughput.py "${bench_args[@]}" --only "$s" --json "$out/stages/$s.json"
done
shopt -s nullglob
stage_files=("$out"/stages/*.json)
if [ ${#stage_files[@]} -gt 0 ]; then
  run_part merge "$out/bench.log" "$py" bench/throughput.py --merge "${stage_files[@]}" --json "$out/bench.json"
else
  echo "merge            FAILED: no stage wrote JSON" | tee -a "$out/summary.txt"
  failed+=(merge)
fi
rm -rf "$out/stages"  # merged into bench.json; a device call returns at most 8 files

echo "gpu_check ($mode) done in $((SECONDS - t_start))s; files in $out:" | tee -a "$out/summary.txt"
ls "$out"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED parts: ${failed[*]}" | tee -a "$out/summary.txt"
  exit 1
fi
echo "gpu_check: all parts passed" | tee -a "$out/summary.txt"
}

main "$@"
