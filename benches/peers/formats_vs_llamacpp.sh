#!/usr/bin/env bash
# Decode speed and memory of base weights kept as stored (`--dtype auto`), against llama.cpp on
# the very same GGUF files, in interleaved rounds: each round runs, for every file,
# llama-batched-bench (16 prompt tokens, 64 generated, 1/8/16 sequences, 2 threads; its S_TG
# column) and then `dora-serve generate --batch` at the same counts (an 18-token prompt, 64
# generated, --ignore-eos), recording dora-serve's peak RSS at 16 sequences. The files are
# SmolLM2-135M-Instruct re-made by llama.cpp's llama-quantize from its F32 copy (the F32 file
# itself is the dense reference).
#
#   benches/peers/llamacpp_build.sh && cargo build --release && benches/peers/formats_vs_llamacpp.sh [ROUNDS] [FORMATS]
#
# FORMATS defaults to "F32 Q8_0 Q4_K_M Q4_1". Writes benches/data/formats_vs_llamacpp.json and
# regenerates benches/DECODE.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
formats=${2:-F32 Q8_0 Q4_K_M Q4_1}
build=${LLAMACPP:-/tmp/llamacpp}
bin=target/release/dora-serve
src="$build/SmolLM2-135M-Instruct.F32.gguf"
[ -x "$build/bin/llama-batched-bench" ] && [ -s "$src" ] ||
  { echo "run benches/peers/llamacpp_build.sh first" >&2; exit 1; }
[ -x "$bin" ] || { echo "run cargo build --release first" >&2; exit 1; }
for q in $formats; do
  f="$build/SmolLM2-135M-Instruct.$q.gguf"
  [ -s "$f" ] || "$build/bin/llama-quantize" --allow-requantize "$src" "$f" "$q" >/dev/null 2>&1
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prompt="The quick brown fox jumps over the lazy dog, and then it runs far away into the"
for n in 1 8 16; do
  for ((i = 0; i < n; i++)); do printf '{"prompt": "%s", "adapter": null}\n' "$prompt"; done >"$work/b$n.jsonl"
done
: >"$work/rounds.jsonl"
for ((r = 1; r <= rounds; r++)); do
  line=""
  for q in $formats; do
    f="$build/SmolLM2-135M-Instruct.$q.gguf"
    l=$("$build/bin/llama-batched-bench" -m "$f" -c 4096 -b 2048 -ub 512 -npp 16 -ntg 64 \
      -npl 1,8,16 -t "$(nproc)" 2>/dev/null |
      awk -F'|' '/^\| +16 /{gsub(/ /,"",$4); gsub(/ /,"",$9); printf "\"%s\": %s, ", $4, $9}')
    d=""
    for n in 1 8 16; do
      out=$(/usr/bin/time -f 'rss_kb %M' "$bin" generate --model "$f" --batch "$work/b$n.jsonl" \
        --max-tokens 64 --ignore-eos --json 2>&1 >/dev/null)
      d+="\"$n\": $(sed -n 's/.*decode \([0-9.]*\) tok.*/\1/p' <<<"$out"), "
      rss=$(sed -n 's/^rss_kb \([0-9]*\)$/\1/p' <<<"$out")
    done
    line+="\"$q\": {\"llamacpp\": {${l%, }}, \"dora\": {${d%, }}, \"dora_rss_kb_16\": $rss}, "
  done
  echo "{${line%, }}" | tee -a "$work/rounds.jsonl"
done
python3 - "$work/rounds.jsonl" "$rounds" "$build" "$formats" <<'PY'
import json, os, subprocess, sys
path, rounds, build, formats = sys.argv[1:]
data = {
    "command": f"benches/peers/formats_vs_llamacpp.sh {rounds}",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip(),
    "llamacpp": open(os.path.join(build, "bin", "VERSION")).read().strip(),
    "files": {q: {"name": f"SmolLM2-135M-Instruct.{q}.gguf",
                  "bytes": os.path.getsize(os.path.join(build, f"SmolLM2-135M-Instruct.{q}.gguf"))}
              for q in formats.split()},
    "rounds": [json.loads(l) for l in open(path)],
}
json.dump(data, open("benches/data/formats_vs_llamacpp.json", "w"), indent=1)
PY
python3 benches/report.py
