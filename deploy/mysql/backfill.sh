#!/usr/bin/env bash
# Step 4 of the kit: bring every v2 row that was not written by a trigger in line with v1: rows that
# existed before the triggers, and rows written while only some of the triggers were installed.
#
#   deploy/mysql/backfill.sh -D app [-S /run/mysqld/mysqld.sock | -h HOST [-P PORT]] [-u USER]
#                            [--defaults-extra-file FILE] [--chunk 1000] [--sleep 0] [--restart]
#
# Per v2 table, walks the v1 primary key in keyset chunks (WHERE id > cursor ORDER BY id LIMIT
# chunk: sparse ids cost nothing). Each chunk is one short READ COMMITTED transaction that syncs
# every id of the chunk's range, on either side, with the routines the triggers use
# (kit_backfill_*_1 in triggers.sql): a v2 row is written whole from the latest committed v1 rows,
# read with locking reads, or deleted when its v1 row is gone; then the cursor row advances. So
# the backfill upserts: it also repairs rows written before the full trigger set existed. A v1
# write to the chunk's rows waits for the chunk, or the chunk for it, and either way the last
# writer of the v2 row computed it from what v1 says at its commit.
# Kill it at any point: the chunk in flight rolls back and the next run resumes after the last
# committed one. Re-running after it finished does nothing; --restart walks everything again. It
# refuses to start unless the kit's triggers are installed. Every lock it takes is one chunk's;
# a deadlock or lock wait timeout rolls the chunk back and it is retried.
# Password: use --defaults-extra-file (a [client] section) or MYSQL_PWD, never the command line.
set -euo pipefail

usage() { sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

. "$(dirname "$0")/client.sh"
chunk=1000 pause=0 restart=0
while [ $# -gt 0 ]; do
  case "$1" in
    -D|--database|-S|--socket|-h|--host|-P|--port|-u|--user|--defaults-extra-file)
      kit_connection_option "$1" "$2"; shift 2 ;;
    --chunk) chunk=$2; shift 2 ;;
    --sleep) pause=$2; shift 2 ;;
    --restart) restart=1; shift ;;
    --help) usage ;;
    *) echo "backfill: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$database" ] || { echo "backfill: -D DATABASE is required" >&2; usage; }
case "$chunk" in ''|*[!0-9]*|0) echo "backfill: --chunk must be a positive integer" >&2; exit 2 ;; esac

kit_connect backfill
sql() { "${db[@]}" -e "$1"; }

# Order matters: v2 tables, then triggers, then this. Check all of it before copying anything.
expected_triggers="kit_member_ad kit_member_ai kit_member_au kit_pomodoro_content_ad
kit_pomodoro_content_ai kit_pomodoro_content_au kit_pomodoro_progress_ad kit_pomodoro_progress_ai
kit_pomodoro_progress_au kit_pomodoro_room_ad kit_pomodoro_room_ai kit_pomodoro_room_au"
installed=$(sql "SELECT trigger_name FROM information_schema.TRIGGERS
                 WHERE trigger_schema = DATABASE() AND trigger_name LIKE 'kit\\_%'")
missing=""
for t in $expected_triggers; do
  grep -qx "$t" <<<"$installed" || missing="$missing $t"
done
if [ -n "$missing" ]; then
  echo "backfill: refusing to run: the kit's triggers are not installed in '$database' (missing:$missing)." >&2
  echo "backfill: the order is v2_schema.sql, install.sh, then backfill.sh (deploy/mysql/README.md)." >&2
  exit 3
fi
objects=$(sql "SELECT COUNT(*) FROM information_schema.TABLES WHERE table_schema = DATABASE()
               AND table_name IN ('study', 'participant', 'content', 'pomodoro_study_to_study',
                                  'kit_backfill_cursor')")
routines=$(sql "SELECT COUNT(*) FROM information_schema.ROUTINES WHERE routine_schema = DATABASE()
                AND routine_name IN ('kit_backfill_rooms_1', 'kit_backfill_participants_1',
                                     'kit_backfill_contents_1')")
if [ "$objects" != 5 ] || [ "$routines" != 3 ]; then
  echo "backfill: refusing to run: v2_schema.sql and install.sh have not both run in '$database'" >&2
  exit 3
fi

if [ "$restart" = 1 ]; then
  sql "DELETE FROM kit_backfill_cursor"
  echo "backfill: cursors reset; walking every table again (rows already in v2 are left as they are)"
fi

echo "backfill: database $database, $chunk source rows per chunk"

# Target v2 table, v1 source table, and the routine that syncs one chunk of it.
plan=(
  "study pomodoro_room kit_backfill_rooms_1"
  "participant pomodoro_progress kit_backfill_participants_1"
  "content pomodoro_content kit_backfill_contents_1"
)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# A statement batch, retried after a deadlock or lock wait timeout against a v1 write.
retried() { kit_retried backfill "$2" "$1"; }

run_chunk() {
  local name=$1 source=$2 routine=$3
  retried "$name: chunk" "
SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED;
SET SESSION innodb_lock_wait_timeout = 5;
START TRANSACTION;
SELECT last_id, max_id INTO @kit_lo, @kit_max FROM kit_backfill_cursor
WHERE table_name = '$name' FOR UPDATE;
SELECT MAX(id), COUNT(*) INTO @kit_hi, @kit_seen
FROM (SELECT id FROM $source WHERE id > @kit_lo AND id <= @kit_max ORDER BY id LIMIT $chunk) chunk;
SET @kit_hi = IF(@kit_seen < $chunk, @kit_max, @kit_hi);
CALL $routine(@kit_lo, @kit_hi);
UPDATE kit_backfill_cursor
SET last_id = @kit_hi, rows_done = rows_done + @kit_seen, chunks = chunks + 1, updated_at = NOW(6),
    finished_at = IF(@kit_hi >= max_id, NOW(6), NULL)
WHERE table_name = '$name';
COMMIT;
SELECT last_id, max_id, rows_done, rows_total, finished_at IS NOT NULL
FROM kit_backfill_cursor WHERE table_name = '$name';"
}

report() {  # name last max done total finished [suffix]
  local pct
  if [ "$6" = 1 ]; then pct=100; elif [ "$5" -gt 0 ]; then pct=$(( $4 * 100 / $5 )); else pct=0; fi
  [ "$pct" -le 100 ] || pct=100
  [ "$6" = 1 ] || [ "$pct" -lt 100 ] || pct=99
  printf 'backfill: %s: %d/%d rows (%d%%), up to id %d of %d%s\n' "$1" "$4" "$5" "$pct" "$2" "$3" "${7:-}"
}

interrupted() { echo "backfill: interrupted; re-run the same command to resume after the last committed chunk" >&2; exit 130; }
trap interrupted INT TERM

for entry in "${plan[@]}"; do
  read -r name source routine <<<"$entry"
  # The first run for a table records where to stop: rows above max_id were inserted after the
  # triggers were all installed, so the triggers have them. The bounds come from a plain read,
  # which locks nothing; the cursor starts at 0 so that v2 rows below the first v1 id are
  # looked at too.
  retried "$name: start" "
SELECT COALESCE(MAX(id), 0), COUNT(*) INTO @kit_max, @kit_total FROM $source;
INSERT INTO kit_backfill_cursor (table_name, last_id, max_id, rows_total, started_at, updated_at)
VALUES ('$name', 0, @kit_max, @kit_total, NOW(6), NOW(6))
ON DUPLICATE KEY UPDATE table_name = table_name;" >/dev/null
  read -r last max done total finished <<<"$(retried "$name: cursor" "SELECT last_id, max_id, rows_done, rows_total, finished_at IS NOT NULL
                                                 FROM kit_backfill_cursor WHERE table_name = '$name'")"
  if [ "$finished" = 1 ]; then
    report "$name" "$last" "$max" "$done" "$total" 1 ", finished earlier"
    continue
  fi
  if [ "$done" -gt 0 ]; then
    echo "backfill: $name from $source: resuming after id $last (of $max), $done of $total rows done"
  else
    echo "backfill: $name from $source: $total rows, ids up to $max"
  fi
  started=$(now) shown=$(date +%s)
  while [ "$finished" != 1 ]; do
    read -r last max done total finished <<<"$(run_chunk "$name" "$source" "$routine")"
    if [ "$finished" = 1 ] || [ "$(date +%s)" -gt "$shown" ]; then
      shown=$(date +%s)
      if [ "$finished" = 1 ]; then
        report "$name" "$last" "$max" "$done" "$total" 1 ", done in $(elapsed "$started") s"
      else
        report "$name" "$last" "$max" "$done" "$total" 0
      fi
    fi
    [ "$pause" = 0 ] || sleep "$pause"
  done
done
echo "backfill: every table done; next: deploy/mysql/verify.sh -D $database"
