#!/usr/bin/env bash
# Decode speed and memory of base weights kept as stored (`--dtype auto`), against llama.cpp on
# the very same GGUF files, in interleaved rounds: each round runs, for every file,
# llama-batched-bench (16 prompt tokens, 64 generated, 1/8/16 sequences, 2 threads; its S_TG
# column) and then `dora-serve generate --batch` at the same counts (an 18-token prompt, 64
# generated, --ignore-eos), recording dora-serve's peak RSS and KV cache at 16 sequences. The files are
# SmolLM2-135M-Instruct re-made by llama.cpp's llama-quantize from its F32 copy (the F32 file
# itself is the dense reference).
#
#   benches/peers/llamacpp_build.sh && cargo build --release && benches/peers/formats_vs_llamacpp.sh [ROUNDS] [OUT] [FILE...]
#
# FILEs default to SmolLM2 in F32, Q8_0, Q4_K_M and Q4_1 (made here); the 1B model's files come
# from scripts/make-bench-model.sh. Writes benches/data/OUT.json (OUT defaults to
# formats_vs_llamacpp) and regenerates benches/DECODE.md. COUNTS (default "1 8 16") and TOKENS
# (default 64) change the sequence counts and generated tokens, for models too slow for them;
# RSS is recorded at the largest count. DORA_ARGS adds flags to dora-serve's runs (e.g.
# DORA_ARGS=--int8-activations); they are recorded with the figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
counts=${COUNTS:-1 8 16}
tokens=${TOKENS:-64}
read -r -a dora_args <<<"${DORA_ARGS:-}"
name=${2:-formats_vs_llamacpp}
shift $(($# < 2 ? $# : 2))
build=${LLAMACPP:-/tmp/llamacpp}
bin=target/release/dora-serve
src="$build/SmolLM2-135M-Instruct.F32.gguf"
[ -x "$build/bin/llama-batched-bench" ] && [ -s "$src" ] ||
  { echo "run benches/peers/llamacpp_build.sh first" >&2; exit 1; }
[ -x "$bin" ] || { echo "run cargo build --release first" >&2; exit 1; }
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  for q in F32 Q8_0 Q4_K_M Q4_1; do
    f="$build/SmolLM2-135M-Instruct.$q.gguf"
    [ -s "$f" ] || "$build/bin/llama-quantize" --allow-requantize "$src" "$f" "$q" >/dev/null 2>&1
    files+=("$f")
  done
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prompt="The quick brown fox jumps over the lazy dog, and then it runs far away into the"
for n in $counts; do
  for ((i = 0; i < n; i++)); do printf '{"prompt": "%s", "adapter": null}\n' "$prompt"; done >"$work/b$n.jsonl"
done
: >"$work/rounds.jsonl"
for ((r = 1; r <= rounds; r++)); do
  line=""
  for f in "${files[@]}"; do
    q=$(basename "$f" .gguf)
    l=$("$build/bin/llama-batched-bench" -m "$f" -c 4096 -b 2048 -ub 512 -npp 16 -ntg "$tokens" \
      -npl "${counts// /,}" -t "$(nproc)" 2>/dev/null |
      awk -F'|' '/^\| +16 /{gsub(/ /,"",$4); gsub(/ /,"",$9); printf "\"%s\": %s, ", $4, $9}')
    d=""
    for n in $counts; do
      out=$(/usr/bin/time -f 'rss_kb %M' "$bin" generate --model "$f" --batch "$work/b$n.jsonl" \
        --max-tokens "$tokens" --ignore-eos --json ${dora_args[@]+"${dora_args[@]}"} 2>&1 >/dev/null)
      d+="\"$n\": $(sed -n 's/.*decode \([0-9.]*\) tok.*/\1/p' <<<"$out"), "
      rss=$(sed -n 's/^rss_kb \([0-9]*\)$/\1/p' <<<"$out")
      kv=$(sed -n 's/.*KV cache peak \([0-9.]*\) MB.*/\1/p' <<<"$out")
    done
    line+="\"$q\": {\"llamacpp\": {${l%, }}, \"dora\": {${d%, }}, \"dora_rss_kb_max\": $rss${kv:+, \"dora_kv_mb_max\": $kv}}, "
  done
  echo "{${line%, }}" | tee -a "$work/rounds.jsonl"
done
python3 - "$work/rounds.jsonl" "$rounds" "$build" "$name" "${files[@]}" <<'PY'
import json, os, subprocess, sys
path, rounds, build, name, *files = sys.argv[1:]
env = "" if (os.environ.get("COUNTS"), os.environ.get("TOKENS")) == (None, None) else \
    f"COUNTS='{os.environ.get('COUNTS', '1 8 16')}' TOKENS={os.environ.get('TOKENS', '64')} "
dora_args = os.environ.get("DORA_ARGS", "").strip()
env = (f"DORA_ARGS='{dora_args}' " if dora_args else "") + env
args = "" if name == "formats_vs_llamacpp" and all(os.path.dirname(f) == build for f in files) else f" {name} " + " ".join(files)
def cpu_name():
    """The vector extension the kernels take, and the CPU's vendor, family and model (the same
    extension runs at different widths: Intel's AVX-512 has two 512-bit FMA units, AMD Zen 4
    splits each 512-bit operation into two 256-bit halves)."""
    info = open("/proc/cpuinfo").read()
    first = dict(l.split(":", 1) for l in info.split("\n\n")[0].splitlines() if ":" in l)
    fields = {k.strip(): v.strip() for k, v in first.items()}
    isa = "AVX-512" if " avx512f " in info.replace("\n", " ") else "AVX2 without AVX-512"
    vendor = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(fields.get("vendor_id"), fields.get("vendor_id", "?"))
    zen = {(25, 17): "Zen 4", (25, 1): "Zen 3", (25, 33): "Zen 3", (25, 97): "Zen 4", (26, 2): "Zen 5"}
    fam, model = int(fields.get("cpu family", 0)), int(fields.get("model", 0))
    name = zen.get((fam, model)) if vendor == "AMD" else None
    return f"{isa}, {vendor} family {fam} model {model}" + (f" ({name})" if name else "")


data = {
    "command": f"{env}benches/peers/formats_vs_llamacpp.sh {rounds}{args}",
    "tokens": int(os.environ.get("TOKENS", "64")),
    "dora_args": dora_args,
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip(),
    "llamacpp": open(os.path.join(build, "bin", "VERSION")).read().strip(),
    "cpu": cpu_name(),
    "threads": os.cpu_count(),
    "files": {os.path.basename(f)[:-5]: {"name": os.path.basename(f), "bytes": os.path.getsize(f)} for f in files},
    "rounds": [json.loads(l) for l in open(path)],
}
json.dump(data, open(f"benches/data/{name}.json", "w"), indent=1)
PY
python3 benches/report.py
