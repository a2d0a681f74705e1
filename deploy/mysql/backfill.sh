#!/usr/bin/env bash
# Step 4 of the kit: copy the v1 rows that existed before the triggers into the v2 tables.
#
#   deploy/mysql/backfill.sh -D app [-S /run/mysqld/mysqld.sock | -h HOST [-P PORT]] [-u USER]
#                            [--defaults-extra-file FILE] [--chunk 1000] [--sleep 0] [--restart]
#
# Per v2 table, walks the v1 primary key in chunks. Each chunk is one short transaction:
#   INSERT INTO v2 SELECT ... FROM kit_v1_<table> WHERE id > cursor AND id <= cursor + chunk
#   LOCK IN SHARE MODE ON DUPLICATE KEY UPDATE id = id
# plus the cursor row's advance. The shared locks make a concurrent v1 write to those rows wait for
# the chunk (or the chunk for it), and ON DUPLICATE KEY UPDATE id = id leaves every row a trigger
# already wrote as it is: the trigger's copy is never older than the backfill's.
# Kill it at any point: the chunk in flight rolls back and the next run resumes after the last
# committed one. Re-running after it finished does nothing; --restart walks everything again, which
# inserts only what is missing. It refuses to start unless the kit's triggers are installed,
# because a row written between a copy and the trigger install would be lost.
# Password: use --defaults-extra-file (a [client] section) or MYSQL_PWD, never the command line.
set -euo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

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
  echo "backfill: the order is v2_schema.sql, mapping.sql, triggers.sql, then backfill.sh (deploy/mysql/README.md)." >&2
  exit 3
fi
objects=$(sql "SELECT COUNT(*) FROM information_schema.TABLES WHERE table_schema = DATABASE()
               AND table_name IN ('study', 'participant', 'content', 'pomodoro_study_to_study',
                                  'kit_backfill_cursor', 'kit_v1_study', 'kit_v1_participant',
                                  'kit_v1_content', 'kit_v1_pomodoro_study_to_study')")
if [ "$objects" != 9 ]; then
  echo "backfill: refusing to run: v2_schema.sql and mapping.sql are not both loaded in '$database'" >&2
  exit 3
fi

if [ "$restart" = 1 ]; then
  sql "DELETE FROM kit_backfill_cursor"
  echo "backfill: cursors reset; walking every table again (rows already in v2 are left as they are)"
fi

echo "backfill: database $database, $chunk source ids per chunk"

# Target table, v1 source table, then "v2 table:view" pairs filled in the same chunk.
plan=(
  "study pomodoro_room study:kit_v1_study pomodoro_study_to_study:kit_v1_pomodoro_study_to_study"
  "participant pomodoro_progress participant:kit_v1_participant"
  "content pomodoro_content content:kit_v1_content"
)
columns() {
  case "$1" in
    study) echo "id, participant_code_id, name, total_cycle, time_per_cycle, current_cycle, step, created_date, last_modified_date" ;;
    pomodoro_study_to_study) echo "pomodoro_room_id, study_id" ;;
    participant) echo "id, study_id, member_id, nickname, is_host, created_date, last_modified_date" ;;
    content) echo "id, participant_id, cycle, plan, retrospect, created_date, last_modified_date" ;;
  esac
}
key() { [ "$1" = pomodoro_study_to_study ] && echo pomodoro_room_id || echo id; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

run_chunk() {
  local name=$1 source=$2; shift 2
  local body="" pair target view k
  for pair in "$@"; do
    target=${pair%%:*} view=${pair#*:} k=$(key "$target")
    body+="
INSERT INTO $target ($(columns "$target"))
SELECT $(columns "$target") FROM $view
WHERE $k > @kit_lo AND $k <= @kit_hi
LOCK IN SHARE MODE
ON DUPLICATE KEY UPDATE $target.$k = $target.$k;
SET @kit_copied = IF(@kit_copied IS NULL, ROW_COUNT(), @kit_copied);"
  done
  sql "
SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ;
SET SESSION innodb_lock_wait_timeout = 5;
START TRANSACTION;
SELECT last_id, max_id INTO @kit_lo, @kit_max FROM kit_backfill_cursor
WHERE table_name = '$name' FOR UPDATE;
SET @kit_hi = LEAST(@kit_lo + $chunk, @kit_max), @kit_copied = NULL;
$body
SELECT COUNT(*) INTO @kit_seen FROM $source WHERE id > @kit_lo AND id <= @kit_hi LOCK IN SHARE MODE;
UPDATE kit_backfill_cursor
SET last_id = @kit_hi, rows_done = rows_done + @kit_seen, rows_copied = rows_copied + @kit_copied,
    chunks = chunks + 1, updated_at = NOW(6),
    finished_at = IF(@kit_hi >= max_id, NOW(6), NULL)
WHERE table_name = '$name';
COMMIT;
SELECT last_id, max_id, rows_done, rows_total, rows_copied, finished_at IS NOT NULL
FROM kit_backfill_cursor WHERE table_name = '$name';"
}

report() {  # name last max done total copied finished [suffix]
  local pct
  if [ "$7" = 1 ]; then pct=100; elif [ "$5" -gt 0 ]; then pct=$(( $4 * 100 / $5 )); else pct=0; fi
  [ "$pct" -le 100 ] || pct=100
  [ "$7" = 1 ] || [ "$pct" -lt 100 ] || pct=99
  printf 'backfill: %s: %d/%d rows (%d%%), up to id %d of %d, %d copied%s\n' "$1" "$4" "$5" "$pct" "$2" "$3" "$6" "${8:-}"
}

interrupted() { echo "backfill: interrupted; re-run the same command to resume after the last committed chunk" >&2; exit 130; }
trap interrupted INT TERM

for entry in "${plan[@]}"; do
  read -r name source pairs <<<"$entry"
  # The first run for a table records where to start and where to stop: rows above max_id were
  # inserted after the triggers were installed, so the triggers have copied them.
  sql "INSERT INTO kit_backfill_cursor (table_name, last_id, max_id, rows_total, started_at, updated_at, finished_at)
       SELECT '$name', COALESCE(MIN(id), 1) - 1, COALESCE(MAX(id), 0), COUNT(*), NOW(6), NOW(6),
              IF(COUNT(*) = 0, NOW(6), NULL)
       FROM $source
       ON DUPLICATE KEY UPDATE table_name = table_name"
  read -r last max done total copied finished <<<"$(sql "SELECT last_id, max_id, rows_done, rows_total, rows_copied, finished_at IS NOT NULL
                                                         FROM kit_backfill_cursor WHERE table_name = '$name'")"
  if [ "$finished" = 1 ]; then
    report "$name" "$last" "$max" "$done" "$total" "$copied" 1 ", finished earlier"
    continue
  fi
  if [ "$done" -gt 0 ]; then
    echo "backfill: $name from $source: resuming after id $last (of $max), $done of $total rows done"
  else
    echo "backfill: $name from $source: $total rows, ids up to $max"
  fi
  started=$(now) shown=$(date +%s)
  while [ "$finished" != 1 ]; do
    tries=0
    while :; do
      if out=$(run_chunk "$name" "$source" $pairs 2>&1); then break; fi
      tries=$((tries + 1))
      # Deadlock or lock wait timeout against a v1 write: the chunk rolled back; try it again.
      if grep -qE 'ERROR (1213|1205)' <<<"$out" && [ "$tries" -lt 30 ]; then
        sleep 0.$((RANDOM % 5 + 1))
        continue
      fi
      echo "backfill: $name: chunk after id $last failed: $out" >&2
      exit 1
    done
    read -r last max done total copied finished <<<"$out"
    if [ "$finished" = 1 ] || [ "$(date +%s)" -gt "$shown" ]; then
      shown=$(date +%s)
      if [ "$finished" = 1 ]; then
        report "$name" "$last" "$max" "$done" "$total" "$copied" 1 ", done in $(elapsed "$started") s"
      else
        report "$name" "$last" "$max" "$done" "$total" "$copied" 0
      fi
    fi
    [ "$pause" = 0 ] || sleep "$pause"
  done
done
echo "backfill: every table done; next: deploy/mysql/verify.sh -D $database"
