#!/usr/bin/env bash
#! Memory of 1,000,000 pins in fleet mode, next to the same pins in embedded mode.
#!
#! Operators size replicas and their Redis by it. One embedded-mode proxy and a fleet of two
#! replicas (A and B, sharing one redis-server with its append-only file on) get 1,000,000 new
#! sessions each over HTTP: the embedded proxy directly, the fleet through A, so that A makes
#! every pin and B learns them from the change stream. Reported: each proxy's resident memory
#! before and after, Redis's `used_memory` and resident memory before and after, and the size of
#! its append-only file.
#!
#! Usage: benches/fleet-memory.sh   (PINS=n for another count; about 5 minutes at 1,000,000)
#! Needs root for apt-get (nginx, wrk, redis-server are installed when missing). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

pins=${PINS:-1000000}
need=()
for tool in nginx wrk redis-server redis-cli curl; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx wrk redis-server curl >/dev/null
fi
cargo build --release --quiet
bin=$PWD/target/release/rollout-proxy

work=$(mktemp -d)
pids=()
trap bench_cleanup EXIT

V1=19111 V2=19112 EMBEDDED=19213 EMBEDDED_ADMIN=19214 A=19215 A_ADMIN=19216 B=19217 B_ADMIN=19218
REDIS=19311

start_upstreams $V1 $V2

mkdir -p "$work/redis"
redis-server --bind 127.0.0.1 --port $REDIS --dir "$work/redis" --save "" \
  --appendonly yes --appendfsync everysec --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p $REDIS ping >/dev/null 2>&1 && break; sleep 0.1; done

config() { # PORT ADMIN_PORT STATE_DIR [STORE]
  cat <<EOF
${4:-}
listen: "127.0.0.1:$1"
workers: 1
state_dir: $3
admin: { listen: "127.0.0.1:$2" }
pools:
  v1: { upstreams: [ { name: v1, url: "http://127.0.0.1:$V1" } ] }
  v2: { upstreams: [ { name: v2, url: "http://127.0.0.1:$V2" } ] }
routes: { v2_prefixes: ["/api/v2"], legacy_v1_percent: 50 }
sessions: { max_active: 2000000 }
EOF
}
store="store: { backend: redis, url: \"redis://127.0.0.1:$REDIS/0\", namespace: memory }"
config $EMBEDDED $EMBEDDED_ADMIN "$work/state-embedded" >"$work/embedded.yaml"
config $A $A_ADMIN "$work/state-a" "$store" >"$work/a.yaml"
config $B $B_ADMIN "$work/state-b" "$store" >"$work/b.yaml"
for name in embedded a b; do
  RUST_LOG=warn "$bin" run --config "$work/$name.yaml" &
  pids+=($!)
done
for port in $EMBEDDED $A $B; do wait_port $port; done
sleep 1

pid_of() { pgrep -f "$bin run --config $work/$1.yaml" | head -1; }
rss_mib() { awk -v k="$(rss_kib "$1")" 'BEGIN { printf "%.1f", k / 1024 }'; }
redis_mib() { redis-cli -p $REDIS info memory | awk -F: -v f="$1" '$1 == f { printf "%.1f", $2 / 1048576 }'; }
live() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^rollout_sessions_active/ { n += $2 } END { print n + 0 }'; }

cat >"$work/new.lua" <<'EOF'
-- A study never seen before on every request: each one makes a pin.
math.randomseed(os.time())
local run = math.random(1, 1000000000)
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/api/studies/new-" .. run .. "-" .. i)
end
EOF
fill() { # PORT ADMIN_PORT NAME: new sessions until the proxy holds $pins pins
  local made
  for _ in $(seq 60); do
    made=$(live "$2")
    if [ "$made" -ge "$pins" ]; then echo "$3: $made pins" >&2; return 0; fi
    wrk -t1 -c16 -d5s -s "$work/new.lua" "http://127.0.0.1:$1" >/dev/null
  done
  echo "$3 did not reach $pins pins (has $(live "$2"))" >&2
  exit 1
}

embedded_before=$(rss_mib "$(pid_of embedded)")
a_before=$(rss_mib "$(pid_of a)")
b_before=$(rss_mib "$(pid_of b)")
redis_used_before=$(redis_mib used_memory)
redis_rss_before=$(redis_mib used_memory_rss)

fill $EMBEDDED $EMBEDDED_ADMIN "embedded mode"
fill $A $A_ADMIN "fleet replica A"
for _ in $(seq 120); do [ "$(live $B_ADMIN)" -ge "$pins" ] && break; sleep 1; done
echo "fleet replica B: $(live $B_ADMIN) pins, learned from the stream" >&2
sleep 3 # the last refresh batches and commits

row() { awk -v n="$1" -v b="$2" -v a="$3" 'BEGIN { printf "| %s | %.1f | %.1f | +%.1f |\n", n, b, a, a - b }'; }
echo
echo "rollout-proxy $($bin --version | awk '{print $2}'), $(redis-server --version | awk '{print $1, $2, $3}'); $pins pins"
echo
echo "| process | MiB before | MiB with the pins | growth |"
echo "|---|---:|---:|---:|"
row "embedded mode: resident" "$embedded_before" "$(rss_mib "$(pid_of embedded)")"
row "fleet replica A (made the pins): resident" "$a_before" "$(rss_mib "$(pid_of a)")"
row "fleet replica B (learned them): resident" "$b_before" "$(rss_mib "$(pid_of b)")"
row "Redis: used_memory" "$redis_used_before" "$(redis_mib used_memory)"
row "Redis: resident" "$redis_rss_before" "$(redis_mib used_memory_rss)"
echo
echo "Redis append-only file: $(du -sm "$work/redis" | awk '{print $1}') MiB; stream entries: $(redis-cli -p $REDIS xlen '{memory}:changes')"
