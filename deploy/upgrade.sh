#!/usr/bin/env bash
# Hitless upgrade with the rollout-proxy@ template: start the idle instance, which takes the
# sockets and the state over from the running one, then wait for the old one to exit.
# Usage: deploy/upgrade.sh [NEW_BINARY]
set -euo pipefail

if [ $# -ge 1 ]; then
  install -m 0755 "$1" /usr/local/bin/rollout-proxy.new
  mv -f /usr/local/bin/rollout-proxy.new /usr/local/bin/rollout-proxy   # atomic replace
fi
rollout-proxy check --config /etc/rollout-proxy/rollout.yaml >/dev/null

if systemctl is-active --quiet rollout-proxy@a; then old=a new=b; else old=b new=a; fi
echo "taking over from rollout-proxy@$old with rollout-proxy@$new"
systemctl start "rollout-proxy@$new"
for _ in $(seq 60); do
  systemctl is-active --quiet "rollout-proxy@$old" || { echo "rollout-proxy@$old has drained and exited"; exit 0; }
  sleep 1
done
echo "rollout-proxy@$old is still draining after 60 s; check its log" >&2
exit 1
