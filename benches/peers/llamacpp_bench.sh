#!/usr/bin/env bash
# llama.cpp's base-model decode speed on the same CPU and model, for benches/scenarios.sh.
# Builds llama.cpp for the CPU from the tree vendored in PyPI's llama-cpp-python source
# distribution (outside the repo; ~12 min on 2 cores; never committed), converts the Q4_1 GGUF
# to F32 with llama-quantize --allow-requantize, runs llama-batched-bench at 1, 4, 8 and 16
# sequences, and writes benches/peers/llamacpp.json ({"tg": {"1": tok/s, ...}}).
#
#   benches/peers/llamacpp_bench.sh [BUILD_DIR]      (default /tmp/llamacpp)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
build=${1:-/tmp/llamacpp}
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$model" ] || { echo "run scripts/fetch-model.sh first" >&2; exit 1; }
mkdir -p "$build"
if ! command -v cmake >/dev/null; then # cmake from PyPI when the machine has none
  [ -x "$build/venv/bin/cmake" ] || { python3 -m venv "$build/venv" && "$build/venv/bin/pip" install -q cmake; }
  export PATH="$build/venv/bin:$PATH"
fi
if [ ! -x "$build/bin/llama-batched-bench" ]; then
  # Only llama-cpp-python as source: its build tools (cmake, scikit-build-core) come as wheels.
  (cd "$build" && python3 -m pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python -d src)
  tar -xzf "$build"/src/llama_cpp_python-*.tar.gz -C "$build"
  tree=$(ls -d "$build"/llama_cpp_python-*/vendor/llama.cpp)
  cmake -S "$tree" -B "$build/cmake" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$build/cmake" -j"$(nproc)" --target llama-batched-bench llama-quantize >/dev/null
  mkdir -p "$build/bin"
  cp "$build"/cmake/bin/llama-batched-bench "$build"/cmake/bin/llama-quantize "$build/bin/"
fi
f32="$build/SmolLM2-135M-Instruct.F32.gguf"
[ -s "$f32" ] || "$build/bin/llama-quantize" --allow-requantize "$model" "$f32" F32 >/dev/null 2>&1
# Same shape as the scenarios: ~20 prompt tokens, 64 generated, per sequence.
"$build/bin/llama-batched-bench" -m "$f32" -c 4096 -b 2048 -ub 512 -npp 20 -ntg 64 -npl 1,4,8,16 \
  -t "$(nproc)" 2>/dev/null | tee "$build/batched.txt"
python3 - "$build/batched.txt" "$root/benches/peers/llamacpp.json" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    cols = [c.strip() for c in line.split("|")]
    if len(cols) > 8 and cols[1].isdigit():
        # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        rows[cols[3]] = float(cols[8])
json.dump({"tg": rows, "how": "llama-batched-bench, F32, npp 20, ntg 64"}, open(sys.argv[2], "w"), indent=1)
print(rows)
PY
