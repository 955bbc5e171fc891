#!/usr/bin/env bash
# The load scenarios of issue #6, in one run, on the real model, through `dora-serve bench`
# (HTTP, streamed, fixed-length outputs), each against a freshly spawned server:
#   base at 1 and 8 streams; 8 adapters uniform in each apply mode; one hot adapter in each
#   mode; 100 adapters on disk with Zipf 1.0 popularity and a cache that fits 8, against the
#   same with a cache that fits all of them.
# Writes benches/RESULTS.md (table, machine, ratios) and keeps each run's JSON and SVG under
# target/scenarios/. Peer figures are added when benches/peers/ has written them.
#
#   scripts/fetch-model.sh && cargo build --release && benches/scenarios.sh [SECONDS]
#   benches/scenarios.sh --report     # only rewrite RESULTS.md (after a peer script ran)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
bin=target/release/dora-serve
report_only=false
if [ "${1:-}" = "--report" ]; then report_only=true; shift; fi
secs=${1:-30}
warm=${WARMUP:-5}
tokens=${TOKENS:-64}
out=target/scenarios
store=target/bench-store
[ -s "$model" ] || { echo "run scripts/fetch-model.sh first" >&2; exit 1; }
[ -x "$bin" ] || { echo "run cargo build --release first" >&2; exit 1; }
mkdir -p "$out"
if ! $report_only; then
if [ ! -d "$store/ad-99" ]; then
  rm -rf "$store"; mkdir -p "$store"
  echo "writing 100 random DoRA r16 adapters (all seven projections) to $store"
  "$bin" adapter random --model "$model" --out "$store/ad" --count 100 --rank 16 --seed 1 >/dev/null
fi
one=$("$bin" adapter inspect "$store/ad-0" --model "$model" --json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])')

run() { # name, then bench arguments
  local name=$1; shift
  echo "== $name"
  "$bin" bench --spawn-model "$model" --server-arg=--adapters-dir="$store" \
    --duration "$secs" --warmup "$warm" --max-tokens "$tokens" --prompt-words 16 --quiet \
    --json "$out/$name.json" --plot "$out/$name.svg" "$@"
}
# Steady state: every scenario but the cold-cache one loads its adapters before the clock.
run base-1 --concurrency 1
run base-8 --concurrency 8
for mode in unmerged merged auto; do
  run "uniform8-$mode" --concurrency 8 --adapters 8 --preload --server-arg=--adapter-mode=$mode
  run "hot1-$mode" --concurrency 8 --adapters 1 --preload --server-arg=--adapter-mode=$mode
done
run zipf100-cache8 --concurrency 8 --adapters 100 --zipf 1.0 \
  --server-arg=--adapter-cache-bytes=$((8 * one)) --server-arg=--adapter-mode=auto
run zipf100-allhot --concurrency 8 --adapters 100 --zipf 1.0 --preload \
  --server-arg=--adapter-cache-bytes=$((101 * one)) --server-arg=--adapter-mode=auto
fi

[ -n "${one:-}" ] || one=$("$bin" adapter inspect "$store/ad-0" --model "$model" --json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes"])')
python3 - "$out" "$secs" "$warm" "$tokens" "$one" <<'PY'
import json, os, platform, subprocess, sys
out, secs, warm, tokens, one = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
R = {f[:-5]: json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.endswith(".json")}
tp = lambda k: R[k]["output_tokens_per_s"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
rows = ["base-1", "base-8"] + [f"{w}-{m}" for w in ("uniform8", "hot1") for m in ("unmerged", "merged", "auto")] + ["zipf100-cache8", "zipf100-allhot"]
lines = [
    "# Load-test results",
    "",
    f"`benches/scenarios.sh {secs}` at commit {commit}: SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to f32),",
    f"{os.cpu_count()} cores ({cpu}), each scenario a fresh `dora-serve serve` driven by `dora-serve bench`",
    f"over HTTP for {secs} s after {warm} s of warm-up; prompts of 16 words, {tokens} output tokens each",
    "(ignore_eos), greedy, streamed. Adapters: random DoRA r16 on all seven projections",
    f"({one / 2**20:.1f} MiB each loaded). Throughput is output tokens/s over the counted window (prefill included).",
    "",
    "| scenario | output tok/s | req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | cache hit rate | loads | steps merged/unmerged | errors |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
for k in rows:
    if k not in R:
        continue
    r, s = R[k], R[k]["server"]
    hr = "-" if s["cache_hit_rate"] is None else f"{s['cache_hit_rate']:.3f}"
    lines.append(f"| {k} | {tp(k):.1f} | {r['requests_per_s']:.2f} | {r['ttft_s']['p50']*1e3:.0f} | {r['ttft_s']['p99']*1e3:.0f} | "
                 f"{r['tpot_s']['p50']*1e3:.1f} | {r['tpot_s']['p99']*1e3:.1f} | {hr} | {s['adapter_loads']:.0f} | "
                 f"{s['steps_merged']:.0f}/{s['steps_unmerged']:.0f} | {sum(r['errors'].values())} |")
def ratio(name, num, den, target, higher=True):
    ok = num / den >= target
    lines.append(f"| {name} | {num:.1f} ÷ {den:.1f} = **{num/den:.2f}** | ≥ {target} | {'met' if ok else 'MISSED'} |")
lines += ["", "| ratio | value | target | |", "|---|---|---|---|"]
ratio("unmerged, 8 adapters ÷ base (8 streams)", tp("uniform8-unmerged"), tp("base-8"), 0.90)
ratio("merged, one adapter ÷ base", tp("hot1-merged"), tp("base-8"), 0.98)
for w in ("uniform8", "hot1"):
    best = max(tp(f"{w}-merged"), tp(f"{w}-unmerged"))
    ratio(f"auto ÷ best of merged/unmerged, {w}", tp(f"{w}-auto"), best, 0.95)
ratio("Zipf-100 (cache fits 8) ÷ all hot", tp("zipf100-cache8"), tp("zipf100-allhot"), 0.8)
ratio("base, 8 streams ÷ 1 stream", tp("base-8"), tp("base-1"), 5.0)
peft = "benches/peers/peft.json"
if os.path.exists(peft):
    p = json.load(open(peft))
    best = max(tp("uniform8-unmerged"), tp("uniform8-auto"))
    ratio(f"dora-serve ÷ PEFT, 8 adapters ({p['how']})", best, p["output_tokens_per_s"], 10.0)
lcpp = "benches/peers/llamacpp.json"
if os.path.exists(lcpp):
    l = json.load(open(lcpp))
    ratio("dora-serve base ÷ llama.cpp F32, 1 sequence", tp("base-1"), l["tg"]["1"], 1.0)
    ratio("dora-serve base ÷ llama.cpp F32, 8 sequences", tp("base-8"), l["tg"]["8"], 1.0)
    ratio("dora-serve 8 DoRA adapters ÷ llama.cpp base, 8 sequences", max(tp("uniform8-unmerged"), tp("uniform8-auto")), l["tg"]["8"], 0.9)
lines += ["", "Per-run JSON (every request's timings) and SVG plots: `target/scenarios/`. Compare two runs with",
          "`dora-serve bench --compare A.json B.json`."]
open("benches/RESULTS.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
