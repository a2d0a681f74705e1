#!/usr/bin/env bash
#! Load benchmark: rollout-proxy against NGINX, HAProxy, Caddy and Pingora doing the same job on
#! this machine.
#!
#! Operators pick a proxy partly on cost per request, so this measures CPU time per proxied
#! request (from each proxy process's own /proc/PID/stat), throughput and latency, with every
#! proxy on one worker pinned to CPU 1 and the upstreams plus the load generator (wrk) on CPU 0.
#! Routing is the same everywhere: /api/v2/ to the v2 upstream, everything else to v1, with
#! upstream keep-alive. A direct-to-upstream run is the baseline, and "floor" is what the kernel
#! alone costs for a proxied exchange: benches/peers/floor.c, an epoll relay that makes the system
#! calls a proxy cannot avoid and parses nothing. Pingora is benches/peers/pingora, a minimal
#! proxy on the published crates (its own cargo project, built here); Caddy is Debian's package
#! with GOMAXPROCS=1. Each scenario runs seven times,
#! 5 s per cell, interleaved across proxies, and the table gives medians, with ratios against
#! NGINX from the same run: on a shared (virtual) machine a slow spell of the host can slow
#! several cells in a row by a quarter; short cells repeated seven times let the median keep up
#! to three such cells per target out of the result. The cells of a round run back and forth, so
#! that NGINX's and rollout-proxy's cells of a scenario are neighbours, as are rollout-proxy's (a)
#! and (b); below the table, each round's ratios of neighbouring cells are listed with their
#! median, which a slow spell moves least.
#!
#! Scenarios: (a) keep-alive GETs at 64 connections; (b) legacy requests carrying one of 100,000
#! study ids, all pinned beforehand in rollout-proxy; (c) 1 KiB POST bodies; (d) a new connection
#! per request.
#!
#! After the rounds, each proxy's resident memory is read with 10,000 idle keep-alive connections
#! open (each has made one request; benches/peers/hold.py holds them), against its memory before
#! they opened: the growth per connection and the total.
#!
#! Usage: benches/compare.sh [--quick]   (--quick: 2 s per run, one round; checks the script)
#! SCENARIOS="a d" and TARGETS="nginx rollout" run a subset (the table's ratios need nginx and
#! rollout); ROUNDS=n and DURATION=s change the rounds and the seconds per cell; MEMORY=0 skips
#! the memory cells.
#! With BASELINE_BIN=path/to/an/older/rollout-proxy, that build runs as one more target
#! ("baseline", same config, its cells next to rollout-proxy's), for before/after comparisons of a
#! change in the same run.
#! With FLEET=1, rollout-proxy also runs in fleet mode (store.backend: redis, against a
#! redis-server on CPU 0) as target "fleet", its cells next to rollout-proxy's; its CPU per request
#! counts Redis's CPU time too. A fifth scenario, (e) a new session per request, then shows what
#! making a pin costs in each mode.
#! rollout-proxy runs on its defaults, which defer accepting a connection until its request has
#! arrived (client.defer_accept); the peers run on theirs, which do not. With PEER_DEFER=1, NGINX
#! (`listen ... deferred`) and HAProxy (`bind ... defer-accept`) defer too; Caddy and Pingora have
#! no such setting.
#! Needs root for apt-get (nginx, haproxy, caddy, wrk, gcc, cmake and python3 are installed when
#! missing). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

duration=${DURATION:-5}
rounds=${ROUNDS:-7}
if [ "${1:-}" = "--quick" ]; then duration=2; rounds=1; fi
memory=${MEMORY:-1}
nginx_defer= haproxy_defer=
if [ "${PEER_DEFER:-0}" = 1 ]; then nginx_defer=" deferred" haproxy_defer=" defer-accept"; fi

need=()
for tool in nginx haproxy caddy wrk taskset curl gcc cmake python3; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx haproxy caddy wrk \
    util-linux curl gcc libc6-dev cmake python3 >/dev/null
fi
# Debian's caddy package starts a service of its own on port 80; the bench runs its own.
if command -v systemctl >/dev/null; then systemctl stop caddy 2>/dev/null || true; fi
cargo build --release --quiet
bin=$PWD/target/release/rollout-proxy
CARGO_TARGET_DIR=$PWD/target/peers cargo build --release --quiet --manifest-path benches/peers/pingora/Cargo.toml
pingora_bin=$PWD/target/peers/release/pingora-peer
baseline_bin=${BASELINE_BIN:-}
if [ -n "$baseline_bin" ]; then baseline_bin=$(realpath "$baseline_bin"); fi
fleet=${FLEET:-}
if [ -n "$fleet" ] && ! command -v redis-server >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

work=$(mktemp -d)
gcc -O2 -o "$work/floor" benches/peers/floor.c
# Room for the memory cells' 10,000 connections, in the proxies and the client holding them.
ulimit -n "$(ulimit -Hn)"
pids=()
trap bench_cleanup EXIT

V1=19101 V2=19102 DIRECT=19101 NGINX=19201 HAPROXY=19202 ROLLOUT=19203 ADMIN=19204
BASELINE=19205 BASELINE_ADMIN=19206 FLEET_PORT=19207 FLEET_ADMIN=19208 CADDY=19209 PINGORA=19210
FLOOR=19211 REDIS=19301
# A port still taken is a bench still running (or stopping): two runs would share listeners.
for port in $V1 $V2 $NGINX $HAPROXY $ROLLOUT $ADMIN $BASELINE $BASELINE_ADMIN $FLEET_PORT $FLEET_ADMIN \
  $CADDY $PINGORA $FLOOR $REDIS; do
  if [ -n "$(ss -Hltn "( sport = :$port )")" ]; then
    echo "port $port is in use: is another bench still running?" >&2
    exit 1
  fi
done

# --- Upstreams: one NGINX answering 200 per pool, on CPU 0. --------------------------------
start_upstreams $V1 $V2 taskset -c 0

# --- The proxies, one worker each, on CPU 1. ------------------------------------------------
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
user root;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log error;
worker_rlimit_nofile 20000;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  upstream v1 { server 127.0.0.1:$V1; keepalive 128; }
  upstream v2 { server 127.0.0.1:$V2; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX$nginx_defer;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$host;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_buffering off;
    proxy_request_buffering off;
    location /api/v2/ { proxy_pass http://v2; }
    location / { proxy_pass http://v1; }
  }
}
EOF
taskset -c 1 nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)

cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 16000
  # The open-file limit may be below what maxconn asks for; the memory cells need 10,000.
  no strict-limits
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  option forwardfor
  http-reuse always
frontend front
  bind 127.0.0.1:$HAPROXY$haproxy_defer
  acl v2 path_beg /api/v2/
  use_backend v2 if v2
  default_backend v1
backend v1
  server v1 127.0.0.1:$V1
backend v2
  server v2 127.0.0.1:$V2
EOF
taskset -c 1 haproxy -f "$work/haproxy.cfg" -db &
pids+=($!)

# Caddy: the same routes, upstream keep-alive as the others have it, one Go thread running code.
upstream_block() { # PORT
  cat <<EOF
    reverse_proxy 127.0.0.1:$1 {
      transport http {
        keepalive 60s
        keepalive_idle_conns 128
        keepalive_idle_conns_per_host 128
      }
    }
EOF
}
cat >"$work/Caddyfile" <<EOF
{
  admin off
  auto_https off
  servers {
    protocols h1
  }
}
http://127.0.0.1:$CADDY {
  handle /api/v2/* {
$(upstream_block $V2)
  }
  handle {
$(upstream_block $V1)
  }
}
EOF
GOMAXPROCS=1 XDG_DATA_HOME=$work XDG_CONFIG_HOME=$work taskset -c 1 \
  caddy run --config "$work/Caddyfile" --adapter caddyfile >"$work/caddy.log" 2>&1 &
pids+=($!)

taskset -c 1 "$pingora_bin" 127.0.0.1:$PINGORA 127.0.0.1:$V1 127.0.0.1:$V2 >"$work/pingora.log" 2>&1 &
pids+=($!)
taskset -c 1 "$work/floor" $FLOOR $V1 $V2 &
pids+=($!)

rollout_config() { # PORT ADMIN_PORT STATE_DIR [STORE]
  cat <<EOF
${4:-}
listen: "127.0.0.1:$1"
workers: 1
state_dir: $3
admin: { listen: "127.0.0.1:$2" }
pools:
  v1: { upstreams: [ { name: v1, url: "http://127.0.0.1:$V1" } ] }
  v2: { upstreams: [ { name: v2, url: "http://127.0.0.1:$V2" } ] }
routes: { v2_prefixes: ["/api/v2"], legacy_v1_percent: 100 }
# Idle connections stay open for the memory cells, as long as the peers keep theirs.
client: { max_connections: 20000, header_read_timeout: 60s }
# Room for the pins scenario (e) makes, on top of the 100,000 of scenario (b).
sessions: { max_active: 4000000 }
EOF
}
rollout_config $ROLLOUT $ADMIN "$work/state" >"$work/rollout.yaml"
RUST_LOG=warn taskset -c 1 "$bin" run --config "$work/rollout.yaml" &
pids+=($!)
ports=($V1 $V2 $NGINX $HAPROXY $CADDY $PINGORA $FLOOR $ROLLOUT)
# The proxies of the table, in the order of a forward round; the floor is not one.
proxies=(haproxy caddy pingora nginx rollout)
if [ -n "${TARGETS:-}" ]; then read -ra proxies <<<"$TARGETS"; fi
if [ -n "$fleet" ]; then
  mkdir -p "$work/redis"
  taskset -c 0 redis-server --bind 127.0.0.1 --port $REDIS --dir "$work/redis" --save "" \
    --appendonly yes --appendfsync everysec --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p $REDIS ping >/dev/null 2>&1 && break; sleep 0.1; done
  rollout_config $FLEET_PORT $FLEET_ADMIN "$work/state-fleet" \
    "store: { backend: redis, url: \"redis://127.0.0.1:$REDIS/0\", namespace: bench }" >"$work/fleet.yaml"
  RUST_LOG=warn taskset -c 1 "$bin" run --config "$work/fleet.yaml" &
  pids+=($!)
  ports+=($FLEET_PORT)
  proxies+=(fleet)
fi
if [ -n "$baseline_bin" ]; then
  rollout_config $BASELINE $BASELINE_ADMIN "$work/state-baseline" >"$work/baseline.yaml"
  RUST_LOG=warn taskset -c 1 "$baseline_bin" run --config "$work/baseline.yaml" &
  pids+=($!)
  ports+=($BASELINE)
  proxies+=(baseline)
fi

for port in "${ports[@]}"; do wait_port "$port"; done

# The process whose CPU time counts: NGINX's worker, HAProxy, rollout-proxy, the upstream worker.
worker_of() { pgrep -P "$(cat "$1")" | head -1; }
pid_of() {
  case $1 in
    direct) worker_of "$work/upstream/nginx.pid" ;;
    nginx) worker_of "$work/nginx/nginx.pid" ;;
    haproxy) pgrep -f "haproxy -f $work/haproxy.cfg" | head -1 ;;
    caddy) pgrep -f "caddy run --config $work/Caddyfile" | head -1 ;;
    pingora) pgrep -f "$pingora_bin 127.0.0.1:$PINGORA" | head -1 ;;
    floor) pgrep -f "$work/floor $FLOOR" | head -1 ;;
    rollout) pgrep -f "$bin run --config $work/rollout.yaml" | head -1 ;;
    baseline) pgrep -f "$baseline_bin run --config $work/baseline.yaml" | head -1 ;;
    # The fleet's cost is the proxy's and its Redis's together.
    fleet) echo "$(pgrep -f "$bin run --config $work/fleet.yaml" | head -1) $(pgrep -f "redis-server 127.0.0.1:$REDIS" | head -1)" ;;
  esac
}
port_of() {
  case $1 in
    direct) echo $DIRECT ;; nginx) echo $NGINX ;; haproxy) echo $HAPROXY ;; rollout) echo $ROLLOUT ;;
    caddy) echo $CADDY ;; pingora) echo $PINGORA ;; floor) echo $FLOOR ;;
    baseline) echo $BASELINE ;;
    fleet) echo $FLEET_PORT ;;
  esac
}
cpu_ticks() { # PID...: user + system ticks, summed
  local pid total=0
  for pid in "$@"; do total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat"))); done
  echo $total
}

# --- wrk scripts. ----------------------------------------------------------------------------
cat >"$work/studies.lua" <<'EOF'
-- Legacy requests for one of 100,000 studies, in a shuffled but repeatable order.
local i = 0
request = function()
  i = i + 1
  local id = (i * 7919) % 100000
  return wrk.format("GET", "/api/studies/" .. id .. "/contents")
end
EOF
cat >"$work/warm.lua" <<'EOF'
-- Visits every one of the 100,000 studies once (each thread a share), to pin them all.
local counter = 0
local threads = {}
setup = function(thread) thread:set("offset", counter); counter = counter + 1 end
local i = -1
request = function()
  i = i + 1
  local id = offset + i * 4
  if id >= 100000 then id = id % 100000 end
  return wrk.format("GET", "/api/studies/" .. id .. "/contents")
end
EOF
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
cat >"$work/post.lua" <<EOF
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

# Pin all 100,000 studies in rollout-proxy before the runs (scenario b measures lookups).
pin_all() { # PORT ADMIN_PORT NAME
  echo "pinning 100,000 studies in $3..." >&2
  taskset -c 0 wrk -t4 -c64 -d8s -s "$work/warm.lua" "http://127.0.0.1:$1" >/dev/null
  pins=$(curl -s "http://127.0.0.1:$2/metrics" | awk '/^rollout_sessions_active/ { n += $2 } END { print n + 0 }')
  echo "live pins: $pins" >&2
}
pin_all $ROLLOUT $ADMIN rollout-proxy
if [ -n "$baseline_bin" ]; then pin_all $BASELINE $BASELINE_ADMIN baseline; fi
if [ -n "$fleet" ]; then pin_all $FLEET_PORT $FLEET_ADMIN "rollout-proxy in fleet mode"; fi

# run TARGET SCENARIO: one wrk run; prints "rps p50_ms p99_ms cpu_us_per_request".
run() {
  local target=$1 scenario=$2 port pid before after out args=()
  port=$(port_of "$target")
  pid=$(pid_of "$target")
  case $scenario in
    a) args=(-c64 "http://127.0.0.1:$port/api/members/me") ;;
    b) args=(-c64 -s "$work/studies.lua" "http://127.0.0.1:$port") ;;
    c) args=(-c64 -s "$work/post.lua" "http://127.0.0.1:$port/api/studies/1/contents") ;;
    d) args=(-c16 -H "Connection: close" "http://127.0.0.1:$port/api/members/me") ;;
    e) args=(-c16 -s "$work/new.lua" "http://127.0.0.1:$port") ;;
  esac
  # shellcheck disable=SC2086 # a target may be several processes
  before=$(cpu_ticks $pid)
  out=$(taskset -c 0 wrk -t1 -d"${duration}s" --latency "${args[@]}")
  # shellcheck disable=SC2086
  after=$(cpu_ticks $pid)
  awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v d="$duration" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /^Requests\/sec:/ { rps = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /requests in/ { n = $1 }
    END { printf "%.0f %.3f %.3f %.2f\n", rps, p50, p99, (n > 0 ? ticks / hz * 1e6 / n : 0) }' <<<"$out"
}

# Cells run in a back-and-forth order (a and c forwards, b and d backwards), so that NGINX's and
# rollout-proxy's cells of a scenario are neighbours, and so are rollout-proxy's (a) and (b): the
# paired ratios below then compare cells seconds apart, which a slow spell of the host mostly
# slows alike.
scenarios=(a b c d)
if [ -n "$fleet" ]; then scenarios+=(e); fi
if [ -n "${SCENARIOS:-}" ]; then read -ra scenarios <<<"$SCENARIOS"; fi
forward=(direct floor "${proxies[@]}")
backward=()
for ((i = ${#forward[@]} - 1; i >= 0; i--)); do backward+=("${forward[i]}"); done
declare -A rps p50 p99 cpu
declare -A round_cpu round_rps round_p99
for round in $(seq "$rounds"); do
  for scenario in "${scenarios[@]}"; do
    case $scenario in
      a | c | e) targets=("${forward[@]}") ;;
      b | d) targets=("${backward[@]}") ;;
    esac
    for target in "${targets[@]}"; do
      read -r r a b c < <(run "$target" "$scenario")
      key="$scenario/$target"
      rps[$key]="${rps[$key]:-} $r"; p50[$key]="${p50[$key]:-} $a"; p99[$key]="${p99[$key]:-} $b"; cpu[$key]="${cpu[$key]:-} $c"
      round_cpu[$round/$key]=$c; round_rps[$round/$key]=$r; round_p99[$round/$key]=$b
      echo "round $round  scenario $scenario  $target: $r req/s, p50 $a ms, p99 $b ms, $c µs CPU/request" >&2
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

echo
echo "rollout-proxy $($bin --version | awk '{print $2}'), nginx $(nginx -v 2>&1 | sed 's/.*\///'), haproxy $(haproxy -v | awk 'NR==1{print $3}'), caddy $(caddy version | awk '{print $1}'), pingora $(awk '/^name = "pingora-proxy"/ { getline; print $3 }' benches/peers/pingora/Cargo.lock 2>/dev/null | tr -d '"'); $(nproc) CPUs: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
echo "$rounds round(s) of ${duration}s per cell, median shown; ratios against NGINX, rollout-proxy and the floor in the same run"
echo
printf '| scenario | target | req/s | p50 ms | p99 ms | CPU µs/req | CPU vs NGINX | CPU vs rollout-proxy | CPU vs floor | req/s vs NGINX | p99 vs NGINX |\n'
printf '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for scenario in "${scenarios[@]}"; do
  n_rps=$(median <<<"${rps[$scenario/nginx]:-}"); n_p99=$(median <<<"${p99[$scenario/nginx]:-}"); n_cpu=$(median <<<"${cpu[$scenario/nginx]:-}")
  r_cpu=$(median <<<"${cpu[$scenario/rollout]:-}"); f_cpu=$(median <<<"${cpu[$scenario/floor]:-}")
  for target in direct floor "${proxies[@]}"; do
    key="$scenario/$target"
    r=$(median <<<"${rps[$key]}"); a=$(median <<<"${p50[$key]}"); b=$(median <<<"${p99[$key]}"); c=$(median <<<"${cpu[$key]}")
    awk -v s="$scenario" -v t="$target" -v r="$r" -v a="$a" -v b="$b" -v c="$c" -v nr="$n_rps" -v nb="$n_p99" -v nc="$n_cpu" -v rc="$r_cpu" -v fc="$f_cpu" '
      function ratio(n, d) { return (t == "direct" || d + 0 <= 0) ? "-" : sprintf("%.2f", n / d) }
      BEGIN {
        printf "| %s | %s | %.0f | %.2f | %.2f | %.1f | %s | %s | %s | %.2f | %.2f |\n", s, t, r, a, b, c, ratio(c, nc), ratio(c, rc), ratio(c, fc), (nr > 0 ? r / nr : 0), (nb > 0 ? b / nb : 0)
      }'
  done
done

# Paired ratios: each round's cells divided by their neighbours in the same round.
paired() { # METRIC NUMERATOR DENOMINATOR: per-round ratios of one metric, then their median
  local -n values=$1
  local ratios=() round
  for round in $(seq "$rounds"); do
    ratios+=("$(awk -v n="${values[$round/$2]:-0}" -v d="${values[$round/$3]:-0}" 'BEGIN { printf "%.2f", (d > 0 ? n / d : 0) }')")
  done
  echo "${ratios[*]}  (median $(median <<<"${ratios[*]}"))"
}
# Per round: rollout-proxy's p99 over the lowest p99 among the peers in that round.
p99_vs_best() { # SCENARIO
  local ratios=() round target best
  for round in $(seq "$rounds"); do
    best=0
    for target in "${peers[@]}"; do
      best=$(awk -v b="$best" -v v="${round_p99[$round/$1/$target]:-0}" 'BEGIN { print (v > 0 && (b == 0 || v < b)) ? v : b }')
    done
    ratios+=("$(awk -v n="${round_p99[$round/$1/rollout]:-0}" -v d="$best" 'BEGIN { printf "%.2f", (d > 0 ? n / d : 0) }')")
  done
  echo "${ratios[*]}  (median $(median <<<"${ratios[*]}"))"
}
peers=()
for target in "${proxies[@]}"; do
  case $target in rollout | fleet | baseline) ;; *) peers+=("$target") ;; esac
done
echo
echo "Paired ratios, one per round:"
for scenario in "${scenarios[@]}"; do
  for target in "${peers[@]}"; do
    echo "- ($scenario) rollout-proxy / $target, CPU per request: $(paired round_cpu "$scenario/rollout" "$scenario/$target")"
  done
  echo "- ($scenario) rollout-proxy / the best peer that round, p99: $(p99_vs_best "$scenario")"
  echo "- ($scenario) rollout-proxy / floor, CPU per request: $(paired round_cpu "$scenario/rollout" "$scenario/floor")"
done
echo "- (a) rollout-proxy / NGINX, req/s: $(paired round_rps a/rollout a/nginx)"
if [[ " ${scenarios[*]} " == *" b "* ]]; then
  echo "- (b) / (a), rollout-proxy, CPU per request: $(paired round_cpu b/rollout a/rollout)"
fi
if [ -n "$baseline_bin" ]; then
  echo "- (a) rollout-proxy / baseline ($baseline_bin), CPU per request: $(paired round_cpu a/rollout a/baseline)"
  echo "- (a) rollout-proxy / baseline, req/s: $(paired round_rps a/rollout a/baseline)"
  echo "- (a) rollout-proxy / baseline, p99: $(paired round_p99 a/rollout a/baseline)"
  echo "- (b) rollout-proxy / baseline, CPU per request: $(paired round_cpu b/rollout b/baseline)"
  echo "- (d) rollout-proxy / baseline, CPU per request: $(paired round_cpu d/rollout d/baseline)"
fi
if [ -n "$fleet" ]; then
  echo "- (a) fleet mode / embedded, CPU per request (fleet counts Redis too): $(paired round_cpu a/fleet a/rollout)"
  echo "- (b) fleet mode / embedded, CPU per request (fleet counts Redis too): $(paired round_cpu b/fleet b/rollout)"
  echo "- (e) fleet mode / embedded, CPU per new session: $(paired round_cpu e/fleet e/rollout)"
  echo "- (e) new-session latency, embedded: p50 $(median <<<"${p50[e/rollout]}") ms, p99 $(median <<<"${p99[e/rollout]}") ms; fleet mode: p50 $(median <<<"${p50[e/fleet]}") ms, p99 $(median <<<"${p99[e/fleet]}") ms"
fi

# --- Memory: idle keep-alive connections. -----------------------------------------------------
if [ "$memory" = 1 ]; then
  held=10000
  echo
  echo "Memory with $held idle keep-alive connections open (each made one request first, then idled 2 s):"
  echo
  printf '| target | resident before | with %d connections | growth per connection |\n' $held
  printf '|---|---:|---:|---:|\n'
  for target in "${proxies[@]}"; do
    pid=$(pid_of "$target")
    # shellcheck disable=SC2086 # a target may be several processes
    before=$(rss_kib $pid)
    python3 benches/peers/hold.py "$(port_of "$target")" $held >"$work/hold.out" 2>"$work/hold.err" &
    holder=$!
    for _ in $(seq 600); do grep -q ready "$work/hold.out" && break; kill -0 $holder 2>/dev/null || break; sleep 0.1; done
    if ! grep -q ready "$work/hold.out"; then
      echo "| $target | could not hold $held connections: $(tail -1 "$work/hold.err") | | |"
      kill $holder 2>/dev/null || true; wait $holder 2>/dev/null || true
      continue
    fi
    # Idle for two seconds: rollout-proxy gives an idle connection's buffers back after one.
    sleep 2
    open=$(ss -Htn state established "( sport = :$(port_of "$target") )" | wc -l)
    # shellcheck disable=SC2086
    with=$(rss_kib $pid)
    kill $holder; wait $holder 2>/dev/null || true
    awk -v t="$target" -v b="$before" -v w="$with" -v n="$open" 'BEGIN {
      printf "| %s | %.1f MiB | %.1f MiB (%d open) | %.2f KiB |\n", t, b / 1024, w / 1024, n, (n > 0 ? (w - b) / n : 0)
    }'
    sleep 2
  done
fi
