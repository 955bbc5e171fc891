#!/usr/bin/env bash
# Time to first token on long prompts, against llama.cpp's prompt processing on the very same
# GGUF files, in interleaved rounds. Each round runs, for every file:
#   - llama-batched-bench -npp LENS -ntg 1 -npl 1 (2 threads, -b 2048 -ub 512): its T_PP column;
#   - dora-serve through HTTP (`serve --dtype auto --prefix-cache-bytes 0`, started once per
#     file): a non-streamed completion of max_tokens 1 whose prompt is LEN random token ids, timed
#     by curl from sending to the last byte (so TTFT plus one sampled token and the response).
# Then, once per round on each file, the prefix cache: a server with the cache on gets a
# CACHED-token prompt (default 2048), then the same prompt plus 50 new tokens; the second
# request's time is the cached TTFT, next to the uncached time of a prompt of the same length.
# And the cost to other streams: TPOT p99 of 8 closed-loop streams (`dora-serve bench`, 32
# tokens each, BENCH_S seconds, default 30) alone, then with one 4096-token prompt sent 3 s in
# (and that prompt's own time), on the default scheduler and with `--prefill-share SHARE`
# (default 0.25).
#
#   benches/peers/llamacpp_build.sh && cargo build --release && benches/peers/prefill_vs_llamacpp.sh [ROUNDS] [FILE...]
#
# FILEs default to SmolLM2 in F32 and Q4_K_M (made here by llama-quantize from the F32 copy).
# LENS (default "512 2048 4096 8000"; SmolLM2 has 8192 positions) changes the prompt lengths.
# Writes benches/data/OUT.json (OUT defaults to prefill_vs_llamacpp; benches/report.py renders
# prefill_vs_llamacpp, prefill_1b_vs_llamacpp, prefill_int8_vs_llamacpp and
# prefill_1b_int8_vs_llamacpp) and regenerates benches/PREFILL.md. DORA_ARGS adds flags to every
# dora-serve server (e.g. DORA_ARGS=--int8-activations); they are recorded with the figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
shift $(($# < 1 ? $# : 1))
lens=${LENS:-512 2048 4096 8000}
cached=${CACHED:-2048}
BENCH_S=${BENCH_S:-30}
SHARE=${SHARE:-0.25}
out=${OUT:-prefill_vs_llamacpp}
read -r -a dora_args <<<"${DORA_ARGS:-}"
build=${LLAMACPP:-/tmp/llamacpp}
bin=target/release/dora-serve
src="$build/SmolLM2-135M-Instruct.F32.gguf"
[ -x "$build/bin/llama-batched-bench" ] && [ -s "$src" ] ||
  { echo "run benches/peers/llamacpp_build.sh first" >&2; exit 1; }
[ -x "$bin" ] || { echo "run cargo build --release first" >&2; exit 1; }
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  for q in F32 Q4_K_M; do
    f="$build/SmolLM2-135M-Instruct.$q.gguf"
    [ -s "$f" ] || "$build/bin/llama-quantize" --allow-requantize "$src" "$f" "$q" >/dev/null 2>&1
    files+=("$f")
  done
fi
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT
# Prompt bodies: LEN random ids in [1000, 40000) (inside SmolLM2's 49152), new ones per round so
# that nothing could be reused between rounds even with a cache.
bodies() { # ROUND
  python3 - "$work" "$1" "$cached" $lens <<'PY'
import json, random, sys
work, rnd, cached, *lens = sys.argv[1:]
rng = random.Random(int(rnd))
ids = lambda n: [rng.randrange(1000, 40000) for _ in range(n)]
for n in lens:
    json.dump({"prompt": ids(int(n)), "max_tokens": 1}, open(f"{work}/p{n}.json", "w"))
shared = ids(int(cached))
json.dump({"prompt": shared, "max_tokens": 1}, open(f"{work}/warm.json", "w"))
json.dump({"prompt": shared + ids(50), "max_tokens": 1}, open(f"{work}/hit.json", "w"))
json.dump({"prompt": ids(int(cached) + 50), "max_tokens": 1}, open(f"{work}/miss.json", "w"))
json.dump({"prompt": ids(4096), "max_tokens": 1}, open(f"{work}/long.json", "w"))
PY
}
serve() { # FILE PORT [ARGS...]
  local f=$1 port=$2
  shift 2
  "$bin" serve --model "$f" --port "$port" --dtype auto ${dora_args[@]+"${dora_args[@]}"} "$@" \
    >"$work/serve$port.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    sleep 0.2
  done
  cat "$work/serve$port.log" >&2
  return 1
}
post() { # PORT BODY → seconds
  curl -sf -o "$work/out.json" -w '%{time_total}' -H 'content-type: application/json' \
    --data-binary "@$2" "http://127.0.0.1:$1/v1/completions"
}
streams() { # LOADS... → appends "LOAD": {...} to $tp (server on $port)
  for load in "$@"; do
    : >"$work/long_times"
    if [ "$load" != alone ]; then # one 4096-token prompt, 3 s into the run
      (sleep 3 && post "$port" "$work/long.json" >"$work/long_times") &
      loop=$!
    fi
    "$bin" bench --url "http://127.0.0.1:$port" --concurrency 8 --max-tokens 32 --prompt-words 16 \
      --duration "$BENCH_S" --warmup 2 --seed "$r" --quiet --json "$work/$load.json" >/dev/null
    [ "$load" != alone ] && wait $loop
    tp+="\"$load\": $(python3 - "$work/$load.json" "$work/long_times" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = [float(x) for x in open(sys.argv[2]) if x.strip()]
print(json.dumps({"tpot_p99_s": r["tpot_s"]["p99"], "output_tokens_per_s": r["output_tokens_per_s"],
                  "long_prompt_s": t[0] if t else None}))
PY
), "
  done
}
: >"$work/rounds.jsonl"
for ((r = 1; r <= rounds; r++)); do
  bodies "$r"
  line=""
  port=18600
  for f in "${files[@]}"; do
    q=$(basename "$f" .gguf)
    max=$(tr ' ' '\n' <<<"$lens" | sort -n | tail -1)
    l=$("$build/bin/llama-batched-bench" -m "$f" -c $((max + 64)) -b 2048 -ub 512 \
      -npp "${lens// /,}" -ntg 1 -npl 1 -t "$(nproc)" 2>/dev/null |
      awk -F'|' '$2 ~ /^ +[0-9]+ +$/ {gsub(/ /,"",$2); gsub(/ /,"",$6); printf "\"%s\": %s, ", $2, $6}')
    port=$((port + 1))
    serve "$f" "$port" --prefix-cache-bytes 0
    post "$port" "$work/warm.json" >/dev/null # first-request warm-up
    d="" tp=""
    for n in $lens; do d+="\"$n\": $(post "$port" "$work/p$n.json"), "; done
    miss=$(post "$port" "$work/miss.json")
    streams alone prefill
    kill "${pids[-1]}" && wait "${pids[-1]}" 2>/dev/null || true
    port=$((port + 1))
    serve "$f" "$port"
    post "$port" "$work/warm.json" >/dev/null
    hit=$(post "$port" "$work/hit.json")
    grep -q '"cached_tokens":'"$cached" "$work/out.json" ||
      { echo "expected $cached cached tokens: $(cat "$work/out.json")" >&2; exit 1; }
    kill "${pids[-1]}" && wait "${pids[-1]}" 2>/dev/null || true
    port=$((port + 1))
    serve "$f" "$port" --prefix-cache-bytes 0 --prefill-share "$SHARE"
    post "$port" "$work/warm.json" >/dev/null
    streams "prefill_share_$SHARE"
    kill "${pids[-1]}" && wait "${pids[-1]}" 2>/dev/null || true
    line+="\"$q\": {\"llamacpp_pp_s\": {${l%, }}, \"dora_ttft_s\": {${d%, }}, "
    line+="\"dora_uncached_s\": $miss, \"dora_cached_s\": $hit, \"streams8\": {${tp%, }}}, "
  done
  echo "{${line%, }}" | tee -a "$work/rounds.jsonl"
done
python3 - "$work/rounds.jsonl" "$rounds" "$build" "$cached" "$out" "${files[@]}" <<'PY'
import json, os, subprocess, sys
path, rounds, build, cached, out, *files = sys.argv[1:]
dora_args = os.environ.get("DORA_ARGS", "").strip()
env = f"DORA_ARGS='{dora_args}' " if dora_args else ""
env += "" if out == "prefill_vs_llamacpp" else f"OUT={out} "
env += "" if os.environ.get("LENS") is None else f"LENS='{os.environ['LENS']}' "
env += "" if os.environ.get("SHARE") is None else f"SHARE={os.environ['SHARE']} "
env += "" if os.environ.get("BENCH_S") is None else f"BENCH_S={os.environ['BENCH_S']} "
args = "" if all(os.path.dirname(f) == build for f in files) else " " + " ".join(files)
data = {
    "share": float(os.environ.get("SHARE", "0.25")),
    "dora_args": dora_args,
    "bench_s": float(os.environ.get("BENCH_S", "30")),
    "command": f"{env}benches/peers/prefill_vs_llamacpp.sh {rounds}{args}",
    "cached_prefix": int(cached),
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip(),
    "llamacpp": open(os.path.join(build, "bin", "VERSION")).read().strip(),
    "files": {os.path.basename(f)[:-5]: {"name": os.path.basename(f), "bytes": os.path.getsize(f)} for f in files},
    "rounds": [json.loads(l) for l in open(path)],
}
json.dump(data, open(f"benches/data/{out}.json", "w"), indent=1)
PY
python3 benches/report.py
