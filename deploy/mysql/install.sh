#!/usr/bin/env bash
# Steps 2 and 3 of the kit: loads mapping.sql, then triggers.sql, and retries the whole of it until
# every trigger is in place. Safe to run again at any time, under load.
#
#   deploy/mysql/install.sh -D app [-S SOCKET | -h HOST [-P PORT]] [-u USER]
#                           [--defaults-extra-file FILE] [--lock-wait 10] [--attempts 30]
#
# Each trigger is replaced in one step (CREATE OR REPLACE TRIGGER), but it needs an exclusive
# metadata lock on its table for an instant, queued behind any open transaction that used the
# table. Rather than stall every query on the table, a run gives up after --lock-wait seconds
# (ERROR 1205) and is retried as a whole: triggers already replaced stay correct, and the
# backfill repairs any row written while only some of them were installed.
set -euo pipefail

usage() { sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

here=$(dirname "$0")
. "$here/client.sh"
lock_wait=10 attempts=30
while [ $# -gt 0 ]; do
  case "$1" in
    -D|--database|-S|--socket|-h|--host|-P|--port|-u|--user|--defaults-extra-file)
      kit_connection_option "$1" "$2"; shift 2 ;;
    --lock-wait) lock_wait=$2; shift 2 ;;
    --attempts) attempts=$2; shift 2 ;;
    --help) usage ;;
    *) echo "install: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$database" ] || { echo "install: -D DATABASE is required" >&2; usage; }
case "$lock_wait" in ''|*[!0-9]*|0) echo "install: --lock-wait must be a positive number of seconds" >&2; exit 2 ;; esac
case "$attempts" in ''|*[!0-9]*|0) echo "install: --attempts must be a positive integer" >&2; exit 2 ;; esac

kit_connect install

for ((attempt = 1; ; attempt++)); do
  if out=$( { echo "SET @kit_lock_wait_timeout = $lock_wait;"; cat "$here/mapping.sql" "$here/triggers.sql"; } \
              | "${db[@]}" 2>&1); then
    break
  fi
  if grep -q 'ERROR 1205' <<<"$out" && [ "$attempt" -lt "$attempts" ]; then
    echo "install: attempt $attempt waited $lock_wait s for a table held by an open transaction; trying again" >&2
    sleep 1
    continue
  fi
  printf '%s\n' "$out" >&2
  echo "install: could not install the kit's mapping and triggers" >&2
  exit 1
done
count=$("${db[@]}" -e "SELECT COUNT(*) FROM information_schema.TRIGGERS
                       WHERE trigger_schema = DATABASE() AND trigger_name LIKE 'kit\\_%'")
echo "install: database $database: mapping and $count of 12 triggers installed (attempt $attempt)"
[ "$count" = 12 ] || exit 1
