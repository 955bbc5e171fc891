#!/usr/bin/env bash
# Decode throughput of the real model through the engine (`generate --batch`), at 1, 4, 8 and
# 16 concurrent sequences: base; one adapter unmerged and merged; a mixed workload over 8
# adapters in each mode. Fixed-length outputs (--ignore-eos) so runs compare. Each round runs
# every cell once, in interleaved rounds; the report gives medians and ranges. Also the time to
# merge one adapter (`adapter inspect`), which with the per-step saving of merged over unmerged
# gives auto's crossover (`merge_after`).
#
#   scripts/fetch-model.sh && cargo build --release && benches/decode.sh [ROUNDS] [TOKENS]
#
# Writes benches/data/decode_modes.json and regenerates benches/DECODE.md (benches/report.py).
# KERNELS=generic (or --kernels generic as the first argument) runs candle's tensor ops only,
# the device-generic path a GPU runs, to show what that fallback costs on this CPU.
# MODEL, COUNTS (default "1 4 8 16") and OUT (default decode_modes) measure another model, e.g.
#   MODEL=models/bench/Llama-3.2-1B-shaped.Q4_K_M.gguf COUNTS="1 8" OUT=decode_modes_1b benches/decode.sh 2 32
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
bin=target/release/dora-serve
kernels=${KERNELS:-cpu}
if [ "${1:-}" = "--kernels" ]; then kernels=$2; shift 2; fi
rounds=${1:-3}
tokens=${2:-64}
counts=${COUNTS:-1 4 8 16}
default_out=decode_modes
if [ "$kernels" = generic ]; then default_out=decode_modes_generic; fi
out=${OUT:-$default_out}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -s "$model" ] || { echo "run scripts/fetch-model.sh first" >&2; exit 1; }
[ -x "$bin" ] || { echo "run cargo build --release first" >&2; exit 1; }
mkdir -p benches/data
"$bin" adapter random --model "$model" --out "$work/ad" --count 8 --rank 16 --seed 3 2>/dev/null >/dev/null

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
  "$bin" generate --model "$model" --kernels "$kernels" --batch "$1" --mode "$2" --max-tokens "$tokens" --ignore-eos --json 2>&1 >/dev/null |
    sed -n 's/.*decode \([0-9.]*\) tok\/s.*/\1/p'
}
: >"$work/rounds.jsonl"
for ((r = 1; r <= rounds; r++)); do
  row="{"
  for n in $counts; do
    b=$(batch "$n" 0); one=$(batch "$n" 1); mix=$(batch "$n" 8)
    row+="\"$n\": {\"base\": $(rate "$b" unmerged), \"one_unmerged\": $(rate "$one" unmerged), \"one_merged\": $(rate "$one" merged),"
    row+=" \"mixed_unmerged\": $(rate "$mix" unmerged), \"mixed_merged\": $(rate "$mix" merged), \"mixed_auto\": $(rate "$mix" auto)}, "
  done
  merge=$("$bin" adapter inspect "$work/ad-0" --model "$model" | sed -n 's/^merge: *\([0-9.]*\)s.*/\1/p')
  row+="\"merge_seconds\": $merge}"
  echo "$row" | tee -a "$work/rounds.jsonl"
done
python3 - "$work/rounds.jsonl" "$rounds" "$tokens" "$model" "$out" <<'PY'
import json, os, subprocess, sys
path, rounds, tokens, model, out = sys.argv[1:]
env = " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}" for k in ("MODEL", "COUNTS", "OUT") if (v := os.environ.get(k)))
data = {
    "command": f"{env + ' ' if env else ''}benches/decode.sh {rounds} {tokens}",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip(),
    "model": model, "tokens": int(tokens),
    "adapters": "8 random DoRA r16 adapters on all seven projections (dora-serve adapter random --seed 3)",
    "rounds": [json.loads(l) for l in open(path)],
}
json.dump(data, open(f"benches/data/{out}.json", "w"), indent=1)
PY
python3 benches/report.py
