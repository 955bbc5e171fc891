#!/usr/bin/env bash
# The whole test suite: the Rust tests, then the OpenAPI document's validity and a real
# OpenAI client against a live server (both in a Python venv this script makes; only PyPI is
# needed, no torch, no model download).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets 2>&1
venv=${DORA_TEST_VENV:-target/test-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check openai openapi-spec-validator pyyaml schemathesis
"$venv/bin/python" - <<'PY'
import yaml
from openapi_spec_validator import validate
validate(yaml.safe_load(open("openapi.yaml")))
print("openapi.yaml is a valid OpenAPI 3.1 document")
PY
cargo build --bin dora-serve 2>&1
PYTHON="$venv/bin/python" BIN=target/debug/dora-serve tests/clients/run.sh
