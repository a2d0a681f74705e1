#!/usr/bin/env bash
# Step 5 of the kit, the verification gate: runs verify.sql and exits 0 only on
# "verdict: PASS missing=0 different=0 stale=0" (1 on FAIL, 2 when it could not run).
#
#   deploy/mysql/verify.sh -D app [-S SOCKET | -h HOST [-P PORT]] [-u USER]
#                          [--defaults-extra-file FILE] [--after-cutover]
#
# Read-only and lock-free (one consistent snapshot): run it while v1 is live, as often as needed.
# After cutover, --after-cutover leaves out rows a v2 server has written since (README.md).
set -euo pipefail

usage() { sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

. "$(dirname "$0")/client.sh"
after_cutover=0
while [ $# -gt 0 ]; do
  case "$1" in
    -D|--database|-S|--socket|-h|--host|-P|--port|-u|--user|--defaults-extra-file)
      kit_connection_option "$1" "$2"; shift 2 ;;
    --after-cutover) after_cutover=1; shift ;;
    --help) usage ;;
    *) echo "verify: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$database" ] || { echo "verify: -D DATABASE is required" >&2; usage; }

kit_connect verify

triggers=$("${db[@]}" -e "SELECT COUNT(*) FROM information_schema.TRIGGERS
                          WHERE trigger_schema = DATABASE() AND trigger_name LIKE 'kit\\_%'")
echo "verify: database $database, row by row, $triggers of 12 kit triggers installed"

started=$(date +%s.%N)
if ! out=$( { echo "SET @kit_after_cutover = $after_cutover;"; cat "$(dirname "$0")/verify.sql"; } | "${db[@]}" 2>&1); then
  printf '%s\n' "$out" >&2
  echo "verify: could not run verify.sql" >&2
  exit 2
fi
printf '%s\n' "$out" | grep -v '^verdict: ' | sed 's/^/verify: /'
verdict=$(printf '%s\n' "$out" | grep '^verdict: ' || true)
awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "verify: one snapshot, %.1f s\n", b - a }'
if [ -z "$verdict" ]; then
  echo "verify: verify.sql printed no verdict" >&2
  exit 2
fi
echo "$verdict"
case "$verdict" in "verdict: PASS "*) exit 0 ;; *) exit 1 ;; esac
