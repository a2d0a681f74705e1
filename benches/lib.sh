# Shared by the bench scripts (sourced, not run): the processes a bench starts and stops, the
# upstreams every proxy forwards to, and reading a process's resident memory.
#
# A script sets `work` (its scratch directory) and `pids=()` before it calls these, and traps
# EXIT to `bench_cleanup`.

# Stops what the bench started, last started first (a fleet's proxy before its Redis), then
# removes the scratch directory.
bench_cleanup() {
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# start_upstreams V1_PORT V2_PORT [COMMAND PREFIX...]: one NGINX worker answering 200 ("v1" or
# "v2") on each port, keep-alive without a request limit, started through the prefix (e.g.
# `taskset -c 0`). Its pid file is $work/upstream/nginx.pid.
start_upstreams() {
  local v1=$1 v2=$2
  shift 2
  mkdir -p "$work/upstream"
  cat >"$work/upstream/nginx.conf" <<EOC
worker_processes 1;
user root;
daemon off;
pid $work/upstream/nginx.pid;
error_log $work/upstream/error.log error;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/upstream/body;
  server { listen 127.0.0.1:$v1 reuseport; location / { return 200 "v1\n"; } }
  server { listen 127.0.0.1:$v2 reuseport; location / { return 200 "v2\n"; } }
}
EOC
  "$@" nginx -c "$work/upstream/nginx.conf" -p "$work/upstream" &
  pids+=($!)
}

# wait_port PORT: until something answers HTTP on 127.0.0.1:PORT (10 s at most, then exits).
wait_port() {
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2
  exit 1
}

# rss_kib PID...: resident memory in KiB, summed over the processes.
rss_kib() {
  local pid total=0
  for pid in "$@"; do total=$((total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"))); done
  echo $total
}
