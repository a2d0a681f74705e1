#!/usr/bin/env bash
# Checks the deploy kit against a rollout-proxy binary:
#
#   bash deploy/check.sh target/debug/rollout-proxy
#
# promtool validates the Prometheus config and rules and runs the rule unit tests; jq validates
# the Grafana dashboard; every proxy config under deploy/ goes through `rollout-proxy check`;
# and a running demo proxy's /metrics must contain every rollout_* metric, label and label
# value that the rules and the dashboard use, so neither can drift from what the proxy exports.
# Missing tools (promtool, jq, curl) are installed from Debian's packages. One `ok:` line per
# check; the first failure stops the script with a non-zero exit.
set -euo pipefail

binary=${1:?usage: bash deploy/check.sh PATH_TO_ROLLOUT_PROXY}
[ -x "$binary" ] || { echo "error: $binary is not an executable file" >&2; exit 1; }
binary=$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")
cd "$(dirname "$0")/.."

ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v jq >/dev/null || missing+=(jq)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
demo=
cleanup() {
  if [ -n "$demo" ]; then
    kill "$demo" 2>/dev/null || true
    wait "$demo" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

prom=deploy/prometheus
dashboard=deploy/grafana/rollout-proxy.json

# --- Prometheus -----------------------------------------------------------------------------
# Debian's promtool is built without Kubernetes service discovery and rejects
# kubernetes_sd_configs. Then the rollout-proxy-k8s job is left out of the check (the rest of
# the file still is checked); an upstream promtool checks the whole file.
if out=$(promtool check config "$prom/prometheus.yml" 2>&1); then
  ok "promtool check config $prom/prometheus.yml"
elif grep -q 'field kubernetes_sd_configs not found' <<<"$out"; then
  mkdir "$work/prometheus"
  cp "$prom/rules.yml" "$work/prometheus/"
  awk '/^  - job_name: / { skip = ($3 == "rollout-proxy-k8s") } /^[^ #]/ { skip = 0 } !skip' \
    "$prom/prometheus.yml" >"$work/prometheus/prometheus.yml"
  promtool check config "$work/prometheus/prometheus.yml" >/dev/null 2>&1 \
    || { promtool check config "$work/prometheus/prometheus.yml" || true; fail "promtool check config"; }
  ok "promtool check config $prom/prometheus.yml (without the kubernetes_sd job: this promtool lacks Kubernetes discovery)"
else
  printf '%s\n' "$out" >&2
  fail "promtool check config $prom/prometheus.yml"
fi

out=$(promtool check rules "$prom/rules.yml" 2>&1) || { printf '%s\n' "$out" >&2; fail "promtool check rules"; }
ok "promtool check rules $prom/rules.yml ($(grep -o '[0-9]* rules found' <<<"$out"))"

out=$(promtool test rules "$prom/rules_test.yml" 2>&1) || { printf '%s\n' "$out" >&2; fail "promtool test rules"; }
ok "promtool test rules $prom/rules_test.yml ($(grep -c '^  - name:' "$prom/rules_test.yml") test groups)"

# Every alert needs a test that expects it to fire and one that expects silence.
for alert in $(awk '$1 == "-" && $2 == "alert:" { print $3 }' "$prom/rules.yml"); do
  firing=$(awk -v a="$alert" '$1 == "-" && $2 == "alertname:" { name = $3 }
    $1 == "exp_alerts:" && name == a { print ($2 == "[]") ? "silent" : "firing" }' "$prom/rules_test.yml" | sort -u)
  grep -qx firing <<<"$firing" || fail "$alert has no test case where it fires"
  grep -qx silent <<<"$firing" || fail "$alert has no test case where it stays silent"
done
ok "every alert has a firing and a silent test case"

# --- Grafana --------------------------------------------------------------------------------
jq -e '
  (.schemaVersion | type == "number")
  and ([.templating.list[].name] | index("datasource") != null and index("instance") != null)
  and all(.panels[]; .datasource.uid == "${datasource}" and all(.targets[]; .datasource.uid == "${datasource}" and (.expr | length) > 0))
' "$dashboard" >/dev/null || fail "$dashboard: not valid JSON, or a panel does not use the \${datasource} variable"
ok "$dashboard is valid JSON; $(jq '.panels | length' "$dashboard") panels, all on \${datasource}"

# --- Proxy configs --------------------------------------------------------------------------
while IFS= read -r -d '' file; do
  if grep -q '^pools:' "$file"; then
    # The files a config names (token, certificate) exist only where it runs.
    "$binary" check --file-only --config "$file" >/dev/null || fail "rollout-proxy check --file-only --config $file"
    ok "rollout-proxy check --file-only --config $file"
  fi
done < <(find deploy \( -name '*.yaml' -o -name '*.yml' \) -print0 | sort -z)

if command -v kubectl >/dev/null; then
  for overlay in deploy/k8s deploy/k8s-fleet; do
    kubectl kustomize "$overlay" >/dev/null || fail "kubectl kustomize $overlay"
    ok "kubectl kustomize $overlay"
  done
fi

# --- Metrics used vs. metrics exported ------------------------------------------------------
"$binary" demo --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$work/tour" 2>"$work/log" &
demo=$!
for _ in $(seq 100); do grep -q 'Ctrl-C' "$work/tour" && break; sleep 0.1; done
grep -q 'Ctrl-C' "$work/tour" || { cat "$work/log" >&2; fail "the demo did not start"; }
proxy=$(awk '$1 == "proxy" && $2 ~ /^https?:/ { print $2 }' "$work/tour")
admin=$(awk '$1 == "admin" && $2 ~ /^https?:/ { print $2 }' "$work/tour")
for path in /api/v2/studies/1 /api/studies/1/contents '/api/progress?studyId=2' /api/members/me; do
  curl -fsS -o /dev/null "$proxy$path" || fail "request $path through the demo proxy"
done
curl -fsS "$admin/metrics" >"$work/metrics" || fail "scrape $admin/metrics"

# What the proxy exports: metric family names (as in `# TYPE`, histograms without the suffixes)
# and sample names, and one "metric label value" line per label of every sample.
{
  awk '$1 == "#" && $2 == "TYPE" { print $3 }' "$work/metrics"
  grep -v '^#' "$work/metrics" | sed -E 's/[{ ].*//'
} | sort -u >"$work/exported"
grep -v '^#' "$work/metrics" | awk '{
  name = $0; sub(/[{ ].*/, "", name)
  rest = $0
  while (match(rest, /[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"/)) {
    pair = substr(rest, RSTART, RLENGTH); rest = substr(rest, RSTART + RLENGTH)
    eq = index(pair, "=")
    print name, substr(pair, 1, eq - 1), substr(pair, eq + 2, length(pair) - eq - 2)
  }
}' | sort -u >"$work/labels"

# What the rules and the dashboard use: the YAML file's lines joined (a selector may wrap), and
# every string of the dashboard with JSON escapes undone. Recording rule names
# (level:rollout_...:op) are not exported metrics and are skipped by the look-behind.
{ tr '\n' ' ' <"$prom/rules.yml"; echo; jq -r '.. | strings' "$dashboard"; } >"$work/used-text"
grep -oP '(?<![A-Za-z0-9_:])rollout_[a-z0-9_]+' "$work/used-text" | sort -u >"$work/used"
unknown=$(comm -23 "$work/used" "$work/exported")
[ -z "$unknown" ] || fail "used in rules.yml or the dashboard but not exported by the proxy: $(echo $unknown)"
ok "all $(wc -l <"$work/used") rollout_* metrics used in rules.yml and the dashboard are exported"

# Label matchers: the label must exist on the metric; for = some exported series must have the
# value, and for =~ every alternative of a list like "a|b" (any other regex: some value) must
# match one. instance and job come from Prometheus, and $variables from Grafana.
grep -oP '(?<![A-Za-z0-9_:])rollout_[a-z0-9_]+\{[^}]*\}' "$work/used-text" \
  | sed -E 's/"[[:space:]]*,[[:space:]]*/"\n/g' \
  | awk '/^rollout_/ { metric = $0; sub(/\{.*/, "", metric); sub(/^[^{]*\{/, "") }
         { sub(/\}$/, ""); gsub(/^[[:space:]]+/, "") }
         match($0, /^[a-zA-Z_][a-zA-Z0-9_]*[[:space:]]*(=~|!~|!=|=)[[:space:]]*"/) {
           label = $0; sub(/[[:space:]]*(=~|!~|!=|=).*/, "", label)
           op = $0; sub(/^[a-zA-Z0-9_]*[[:space:]]*/, "", op); sub(/[[:space:]]*".*/, "", op)
           value = $0; sub(/^[^"]*"/, "", value); sub(/"$/, "", value)
           print metric "\t" label "\t" op "\t" value
         }' | sort -u >"$work/matchers"
checked=0
while IFS=$'\t' read -r metric label op value; do
  case "$label" in instance|job) continue ;; esac
  case "$value" in *'$'*) continue ;; esac
  awk -v m="$metric" -v l="$label" -v op="$op" -v v="$value" '
    BEGIN { if (op == "=~" && v ~ /^[A-Za-z0-9_.|-]+$/) { op = "="; n = split(v, want, "|") } else want[n = 1] = v }
    $1 == m && $2 == l {
      has = 1
      for (i = 1; i <= n; i++) if ((op == "=" && $3 == want[i]) || (op == "=~" && $3 ~ ("^(" v ")$"))) hit[i] = 1
    }
    END { found = 0; for (i in hit) found++; exit !(has && (found == n || op == "!=" || op == "!~")) }' "$work/labels" \
    || fail "$metric{$label$op\"$value\"} matches no exported series"
  checked=$((checked + 1))
done <"$work/matchers"
ok "all $checked label matchers in rules.yml and the dashboard match exported series"
