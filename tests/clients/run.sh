#!/usr/bin/env bash
# Start dora-serve on the tiny fixture model with two fixture adapters, run the official
# openai client against it, stop the server. Needs a venv with `openai` (PYTHON, default
# python3) and a built binary (BIN, default target/debug/dora-serve).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
BIN=${BIN:-target/debug/dora-serve}
store=$(mktemp -d)
log=$(mktemp)
cp -r tests/fixtures/adapters/dora-all-r8 tests/fixtures/adapters/lora-r8 "$store/"
"$BIN" serve --model tests/fixtures/tiny-llama --adapters-dir "$store" --port 0 --served-model-name tiny-llama 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$store" "$log"' EXIT
url=""
for _ in $(seq 1 100); do
  url=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$log")
  [ -n "$url" ] && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$url" ] || { echo "server did not start"; cat "$log"; exit 1; }
"$PYTHON" tests/clients/openai_client.py "$url/v1"
# API fuzzing against the committed spec (issue #7): no 5xx, every status, content type and
# body as openapi.yaml documents. `positive_data_acceptance` is left out: validity of adapter
# bytes, filesystem paths and which adapters exist cannot be written in a schema.
# Gated on schemathesis's exit status and on its JUnit report (every test case counted, none
# failed or errored), not on its human-readable output.
st="$(dirname "$PYTHON")/schemathesis"
[ -x "$st" ] || { echo "schemathesis is not installed in the test venv ($st)"; exit 1; }
junit="$store/schemathesis-junit.xml"
status=0
# One worker: with several threads, CPython 3.11's ast module (which hypothesis uses) raises
# "SystemError: AST constructor recursion depth mismatch" now and then (CPython issue 106905,
# fixed in later versions): a schemathesis runtime error, not a finding about the server.
"$st" run openapi.yaml --url "$url" --checks all --exclude-checks positive_data_acceptance \
  --max-examples "${SCHEMATHESIS_EXAMPLES:-25}" --workers 1 --seed 1 --no-color \
  --report junit --report-junit-path "$junit" || status=$?
kill -0 $pid || { echo "the server died under schemathesis"; cat "$log"; exit 1; }
"$PYTHON" - "$junit" "$status" <<'PY'
import sys
import xml.etree.ElementTree as ET
path, status = sys.argv[1], int(sys.argv[2])
root = ET.parse(path).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
count = lambda key: sum(int(s.get(key, 0)) for s in suites)
tests, failures, errors = count("tests"), count("failures"), count("errors")
print(f"schemathesis: {tests} operations tested, {failures} failed, {errors} errored (exit status {status})")
for case in root.iter("testcase"):
    for bad in list(case.findall("failure")) + list(case.findall("error")):
        print(f"  {case.get('name')}: {(bad.get('message') or bad.text or '').strip()[:500]}")
sys.exit(0 if status == 0 and tests > 0 and failures == 0 and errors == 0 else 1)
PY
