#!/usr/bin/env bash
# GPU checks (issue #16), in two halves, because the GPU machine has nvcc but no Rust:
#
#   scripts/gpu-check.sh build   # here: the cuda build (nvcc from PyPI wheels), test binary
#                                # and server stripped into .gpu/ (git-ignored), < 64 MiB
#   scripts/gpu-check.sh run     # there: parity tests on the device, decode throughput, and
#                                # the HTTP scenarios, figures into $OUT (or target/gpu)
#
# `run` needs the SmolLM2 file in models/ (carried) for the decode figures; the parity tests
# use the committed tiny fixtures. Results go to benches/GPU.md by hand from $OUT/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
case "$mode" in
build)
  # shellcheck source=scripts/cuda-env.sh
  . scripts/cuda-env.sh
  export CARGO_TARGET_DIR=target/cuda
  cargo build --release --features cuda --bin dora-serve
  cargo test --release --features cuda --test it --no-run 2>&1 | tee target/cuda-it.log
  it=$(sed -n 's/.*Executable tests\/it\/main.rs (\(.*\))/\1/p' target/cuda-it.log | tail -1)
  mkdir -p .gpu
  cp "$it" .gpu/it && cp target/cuda/release/dora-serve .gpu/dora-serve
  strip .gpu/it .gpu/dora-serve
  du -sh .gpu/*
  ;;
run)
  out=${OUT:-target/gpu}
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  # 1. The whole-model parity tests on the device, on the device-generic path (the only one
  #    there): PEFT fixtures, merged vs unmerged vs reference, mixed batches, HTTP paths.
  DORA_TEST_DEVICE=cuda DORA_KERNELS=generic .gpu/it --test-threads 1 \
    parity:: adapters:: engine:: catalog:: api:: http:: validation:: 2>&1 | tee "$out/parity.txt"
  # 2. Decode throughput through the engine on the device.
  bin=.gpu/dora-serve
  model=models/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -s "$model" ]; then
    for n in 1 8 16; do
      f=$(mktemp); for ((i = 0; i < n; i++)); do echo '{"prompt": "Once upon a time", "adapter": null}' >>"$f"; done
      "$bin" generate --model "$model" --device cuda --batch "$f" --max-tokens 64 --ignore-eos --json 2>&1 >/dev/null |
        grep -E 'decode' | sed "s/^/$n seqs: /" | tee -a "$out/decode.txt"
    done
    # 3. The HTTP scenarios: one server on the device, the bench client against it.
    "$bin" serve --model "$model" --device cuda --port 8123 --adapters-dir adapters 2>"$out/serve.log" &
    pid=$!
    for _ in $(seq 1 300); do grep -q listening "$out/serve.log" && break; sleep 0.2; done
    "$bin" bench --quiet --url http://127.0.0.1:8123 --concurrency 8 --duration 20 --adapters 2 \
      2>&1 | tee "$out/bench.txt" || true
    kill $pid
  else
    echo "no $model: decode and HTTP figures skipped" | tee "$out/decode.txt"
  fi
  {
    echo "# GPU checks ($(date -u +%F))"; echo; cat "$out/gpu.txt"; echo
    grep -E '^test result' "$out/parity.txt"; echo; cat "$out/decode.txt"
  } >"$out/gpu.md"
  ;;
*)
  echo "usage: scripts/gpu-check.sh build|run" >&2
  exit 2
  ;;
esac
