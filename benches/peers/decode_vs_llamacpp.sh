#!/usr/bin/env bash
# Engine decode speed of dora-serve against llama.cpp on the base model, interleaved so both
# see the same machine state (this shared 2-core machine drifts by ±15% over minutes): each
# round runs llama-batched-bench (F32, 20 prompt tokens, 64 generated, 1/4/8/16 sequences)
# and then `dora-serve generate --batch` at the same counts (64 generated, --ignore-eos).
# Both figures are decode-only tokens/s (llama.cpp's S_TG; dora-serve's "decode" line).
#
#   benches/peers/llamacpp_bench.sh && cargo build --release && benches/peers/decode_vs_llamacpp.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
build=${LLAMACPP:-/tmp/llamacpp}
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
bin=target/release/dora-serve
[ -x "$build/bin/llama-batched-bench" ] || { echo "run benches/peers/llamacpp_bench.sh first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for n in 1 4 8 16; do
  for ((i = 0; i < n; i++)); do echo '{"prompt": "Once upon a time", "adapter": null}'; done >"$work/b$n.jsonl"
done
echo "| round | llama.cpp 1 | dora-serve 1 | llama.cpp 4 | dora-serve 4 | llama.cpp 8 | dora-serve 8 | llama.cpp 16 | dora-serve 16 |"
echo "|---|---|---|---|---|---|---|---|---|"
for ((r = 1; r <= rounds; r++)); do
  read -r -a l <<<"$("$build/bin/llama-batched-bench" -m "$build/SmolLM2-135M-Instruct.F32.gguf" -c 4096 \
    -b 2048 -ub 512 -npp 20 -ntg 64 -npl 1,4,8,16 -t "$(nproc)" 2>/dev/null |
    awk -F'|' '/^\| +20 /{gsub(/ /,"",$9); printf "%s ", $9}')"
  row="| $r"
  i=0
  for n in 1 4 8 16; do
    d=$("$bin" generate --model "$model" --batch "$work/b$n.jsonl" --max-tokens 64 --ignore-eos --json 2>&1 >/dev/null |
      sed -n 's/.*decode \([0-9.]*\) tok.*/\1/p')
    row+=" | ${l[$i]} | $d"
    i=$((i + 1))
  done
  echo "$row |"
done
