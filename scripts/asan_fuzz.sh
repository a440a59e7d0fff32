#!/usr/bin/env bash
# Builds rexrag_fast._C with AddressSanitizer + UBSan (CMake option REXRAG_ASAN) into a temporary
# directory and runs the prefix-cache / allocator tests and the differential fuzz tests against it, with the
# sanitizer runtime preloaded into Python. The normal in-place build is never touched, so other work using
# the installed package is not disturbed; the temporary directory is removed at the end.
#
#   scripts/asan_fuzz.sh            # unit tests + hypothesis state machines + short random runs
#   scripts/asan_fuzz.sh -m slow    # extra pytest arguments, e.g. the 1e5-operation runs
#
# Exit status: pytest's (non-zero on any failure or sanitizer report: both sanitizers halt on first error).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CXX="${CXX:-g++}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/rexrag_asan.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "== building rexrag_fast._C with -fsanitize=address,undefined in $WORK"
cp -r "$ROOT/rexrag_fast" "$WORK/rexrag_fast"
rm -f "$WORK"/rexrag_fast/_C*.so
PYBIND11_DIR="$("$PYTHON" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
GEN=()
command -v ninja >/dev/null && GEN=(-GNinja)
cmake -S "$ROOT" -B "$WORK/build" "${GEN[@]}" \
  -DCMAKE_CXX_COMPILER="$CXX" \
  -DCMAKE_BUILD_TYPE=Release \
  -DREXRAG_ASAN=ON \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
  -Dpybind11_DIR="$PYBIND11_DIR" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$WORK/rexrag_fast" >"$WORK/cmake.log" || { cat "$WORK/cmake.log"; exit 1; }
cmake --build "$WORK/build" -j "$(nproc)" >>"$WORK/cmake.log" || { cat "$WORK/cmake.log"; exit 1; }
nm -D "$WORK"/rexrag_fast/_C*.so | grep -q __asan_report || { echo "the extension is not ASan-instrumented"; exit 1; }
nm -D "$WORK"/rexrag_fast/_C*.so | grep -q __ubsan_handle || { echo "the extension is not UBSan-instrumented"; exit 1; }

# Run from a copy of the tests so that `import rexrag_fast` finds the sanitized copy first.
mkdir -p "$WORK/tests"
cp "$ROOT/tests/conftest.py" "$ROOT/tests/cache_model.py" "$ROOT/tests/test_block_allocator.py" \
   "$ROOT/tests/test_prefix_cache.py" "$ROOT/tests/test_prefix_cache_fuzz.py" "$WORK/tests/"
cp "$ROOT/pyproject.toml" "$WORK/"

ASAN_LIB="$("$CXX" -print-file-name=libasan.so)"
UBSAN_LIB="$("$CXX" -print-file-name=libubsan.so)"
[[ -f "$ASAN_LIB" ]] || { echo "libasan.so not found (got '$ASAN_LIB')"; exit 1; }

cd "$WORK"
export LD_PRELOAD="$ASAN_LIB${UBSAN_LIB:+:$UBSAN_LIB}"
# Python itself is not built with ASan and never frees some memory at exit: leak checking would only report
# the interpreter. Every other ASan check stays on and aborts on the first error.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:strict_init_order=1"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
"$PYTHON" -c "import rexrag_fast._C as c, sys; p = c.__file__; print('== sanitized module:', p); \
sys.exit(0 if p.startswith('$WORK') else 'the sanitized build was not picked up')"
echo "== running the cache tests under ASan/UBSan"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_block_allocator.py tests/test_prefix_cache.py \
  tests/test_prefix_cache_fuzz.py "$@"
