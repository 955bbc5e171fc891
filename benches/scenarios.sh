#!/usr/bin/env bash
# The load scenarios, on the real model, through `dora-serve bench` (HTTP, streamed,
# fixed-length outputs), each against a freshly spawned server, in interleaved rounds: every
# round runs every scenario once, each round in another (rotated) order, so that all
# scenarios see the same drift of this shared machine. The report gives medians and ranges
# over the rounds, and each ratio is taken within a round (median and range of those).
#
# Scenarios: base at 1 and 8 streams; 8 adapters uniform in each apply mode; one hot adapter
# in each mode; 100 adapters on disk with Zipf 1.0 popularity and a cache that fits 8, against
# the same with a cache that fits all of them. When the llama.cpp peer is built
# (benches/peers/llamacpp_build.sh), the base workload also runs against llama.cpp's
# llama-server and against dora-serve on the very same file (llama.cpp's F32 GGUF), driven by
# the same client: HTTP against HTTP.
#
#   scripts/fetch-model.sh && cargo build --release && benches/scenarios.sh [ROUNDS] [SECONDS]
#
# Each spawned server is measured only once it listens and its start-up check of the stored
# adapters is over (`dora-serve bench --spawn-model` waits for both).
#
# Writes benches/data/scenarios.json (every round's summary of every scenario) and regenerates
# benches/RESULTS.md from it (benches/report.py). Each run's JSON and SVG: target/scenarios/.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
bin=target/release/dora-serve
rounds=${1:-3}
secs=${2:-20}
warm=${WARMUP:-4}
tokens=${TOKENS:-64}
lcpp=${LLAMACPP:-/tmp/llamacpp}
out=target/scenarios
store=target/bench-store
[ -s "$model" ] || { echo "run scripts/fetch-model.sh first" >&2; exit 1; }
[ -x "$bin" ] || { echo "run cargo build --release first" >&2; exit 1; }
rm -rf "$out"; mkdir -p "$out" benches/data
if [ ! -d "$store/ad-99" ]; then
  rm -rf "$store"; mkdir -p "$store"
  echo "writing 100 random DoRA r16 adapters (all seven projections) to $store"
  "$bin" adapter random --model "$model" --out "$store/ad" --count 100 --rank 16 --seed 1 >/dev/null
fi
# The scenarios over 8 adapters or fewer run on a store of 8, so that the server's start-up
# check of every stored adapter (which the bench waits for) stays short.
store8=target/bench-store8
if [ ! -d "$store8/ad-7" ]; then
  rm -rf "$store8"; mkdir -p "$store8"
  for i in 0 1 2 3 4 5 6 7; do cp -r "$store/ad-$i" "$store8/"; done
fi
one=$("$bin" adapter inspect "$store/ad-0" --model "$model" --json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])')

common=(--duration "$secs" --warmup "$warm" --max-tokens "$tokens" --prompt-words 16 --quiet)
run() { # round, name, then bench arguments
  local r=$1 name=$2; shift 2
  echo "== round $r: $name"
  "$bin" bench "${common[@]}" --json "$out/r$r/$name.json" --plot "$out/r$r/$name.svg" "$@"
}
dora() { # round, name, store, then bench arguments: a dora-serve spawned on the model
  local r=$1 name=$2 dir=$3; shift 3
  run "$r" "$name" --spawn-model "$model" --server-arg=--adapters-dir="$dir" "$@"
}
peer_file="$lcpp/SmolLM2-135M-Instruct.F32.gguf"
have_peer=false
[ -x "$lcpp/bin/llama-server" ] && [ -s "$peer_file" ] && have_peer=true
llama_server() { # round, name, streams
  local r=$1 name=$2 n=$3 port=$((18000 + RANDOM % 1000))
  "$lcpp/bin/llama-server" -m "$peer_file" --host 127.0.0.1 --port "$port" -t "$(nproc)" \
    -np "$n" -c $((n * 2048)) -cb --metrics >"$out/r$r/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.2
  done
  run "$r" "$name" --url "http://127.0.0.1:$port" --concurrency "$n" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

scenarios=(base-1 base-8 uniform8-unmerged uniform8-merged uniform8-auto hot1-unmerged hot1-merged
  hot1-auto zipf100-cache8 zipf100-allhot)
$have_peer && scenarios+=(peer-llamacpp-1 peer-dora-1 peer-llamacpp-8 peer-dora-8)
scenario() { # round, name
  local r=$1 name=$2 mode
  case $name in
    base-1) dora "$r" "$name" "$store8" --concurrency 1 ;;
    base-8) dora "$r" "$name" "$store8" --concurrency 8 ;;
    uniform8-*) mode=${name#uniform8-}
      dora "$r" "$name" "$store8" --concurrency 8 --adapters 8 --preload --server-arg=--adapter-mode="$mode" ;;
    hot1-*) mode=${name#hot1-}
      dora "$r" "$name" "$store8" --concurrency 8 --adapters 1 --preload --server-arg=--adapter-mode="$mode" ;;
    zipf100-cache8) dora "$r" "$name" "$store" --concurrency 8 --adapters 100 --zipf 1.0 \
      --server-arg=--adapter-cache-bytes=$((8 * one)) --server-arg=--adapter-mode=auto ;;
    zipf100-allhot) dora "$r" "$name" "$store" --concurrency 8 --adapters 100 --zipf 1.0 --preload \
      --server-arg=--adapter-cache-bytes=$((101 * one)) --server-arg=--adapter-mode=auto ;;
    peer-llamacpp-*) llama_server "$r" "$name" "${name##*-}" ;;
    peer-dora-*) run "$r" "$name" --spawn-model "$peer_file" --concurrency "${name##*-}" ;;
  esac
}
n=${#scenarios[@]}
for ((r = 1; r <= rounds; r++)); do
  mkdir -p "$out/r$r"
  # Rotate the order each round (and keep each peer pair adjacent: they come in pairs).
  shift_by=$(( ((r - 1) * 2) % n ))
  for ((i = 0; i < n; i++)); do
    scenario "$r" "${scenarios[$(( (i + shift_by) % n ))]}"
  done
done

python3 - "$out" "$rounds" "$secs" "$warm" "$tokens" "$one" "$model" "$have_peer" "$lcpp" <<'PY'
import json, os, platform, subprocess, sys
out, rounds, secs, warm, tokens, one, model, have_peer, lcpp = sys.argv[1:]
data = {
    "command": f"benches/scenarios.sh {rounds} {secs}",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "date": subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip(),
    "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()),
    "cores": os.cpu_count(), "seconds": int(secs), "warmup": int(warm), "tokens": int(tokens),
    "adapter_bytes": int(one), "model": model,
    "peer": None, "rounds": [],
}
if have_peer == "true":
    version = open(os.path.join(lcpp, "bin", "VERSION")).read().strip()
    data["peer"] = {"llamacpp": version, "file": "SmolLM2-135M-Instruct.F32.gguf (llama-quantize --allow-requantize of the Q4_1 file)",
                    "server": "llama-server -t <cores> -np <streams> -c <streams×2048> -cb"}
for r in range(1, int(rounds) + 1):
    d = os.path.join(out, f"r{r}")
    runs = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".json"):
            continue
        j = json.load(open(os.path.join(d, f)))
        s = j["server"]
        runs[f[:-5]] = {
            "output_tokens_per_s": j["output_tokens_per_s"], "requests_per_s": j["requests_per_s"],
            "ttft_p50": j["ttft_s"]["p50"], "ttft_p99": j["ttft_s"]["p99"],
            "tpot_p50": j["tpot_s"]["p50"], "tpot_p99": j["tpot_s"]["p99"],
            "cache_hit_rate": s["cache_hit_rate"], "loads": s["adapter_loads"],
            "steps_merged": s["steps_merged"], "steps_unmerged": s["steps_unmerged"],
            "steps_base": s.get("steps_base", 0), "errors": sum(j["errors"].values()),
        }
    data["rounds"].append(runs)
json.dump(data, open("benches/data/scenarios.json", "w"), indent=1)
PY
python3 benches/report.py
