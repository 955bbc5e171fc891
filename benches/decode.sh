#!/usr/bin/env bash
# Decode throughput of the real model through the engine (`generate --batch`), at 1, 4, 8 and
# 16 concurrent sequences: base; one adapter unmerged and merged; a mixed workload over 8
# adapters in each mode. Fixed-length outputs (--ignore-eos) so runs compare.
#
#   scripts/fetch-model.sh && cargo build --release && benches/decode.sh [TOKENS]
#
# Prints a markdown table of aggregate decode tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin=target/release/dora-serve
tokens=${1:-48}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -s "$model" ] || { echo "run scripts/fetch-model.sh first" >&2; exit 1; }
"$bin" adapter random --model "$model" --out "$work/ad" --count 8 --rank 16 2>/dev/null

prompts=("Once upon a time" "The capital of France is" "def fibonacci(n):" "Write a haiku about the sea.")
batch() { # n adapters(0 = base, 1 = one, 8 = mixed)
  local n=$1 k=$2 f="$work/b-$1-$2.jsonl"
  : >"$f"
  for ((i = 0; i < n; i++)); do
    local p=${prompts[$((i % 4))]} a=null
    if [ "$k" -gt 0 ]; then a="\"$work/ad-$((i % k))\""; fi
    printf '{"prompt": "%s", "adapter": %s}\n' "$p" "$a" >>"$f"
  done
  echo "$f"
}
rate() { # file mode
  "$bin" generate --model "$model" --batch "$1" --mode "$2" --max-tokens "$tokens" --ignore-eos --json 2>&1 >/dev/null |
    sed -n 's/.*decode \([0-9.]*\) tok\/s.*/\1/p'
}
echo "| sequences | base | 1 adapter unmerged | 1 adapter merged | 8 adapters unmerged | 8 adapters merged | 8 adapters auto |"
echo "|---|---|---|---|---|---|---|"
for n in 1 4 8 16; do
  b=$(batch "$n" 0); one=$(batch "$n" 1); mix=$(batch "$n" 8)
  echo "| $n | $(rate "$b" unmerged) | $(rate "$one" unmerged) | $(rate "$one" merged) | $(rate "$mix" unmerged) | $(rate "$mix" merged) | $(rate "$mix" auto) |"
done
