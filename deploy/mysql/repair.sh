#!/usr/bin/env bash
# Re-copies exactly the rows the verification gate flags, then checks those rows again.
#
#   deploy/mysql/repair.sh -D app [-S SOCKET | -h HOST [-P PORT]] [-u USER]
#                          [--defaults-extra-file FILE] [--after-cutover] [--dry-run]
#
# Reads the kit_diff_* views (mapping.sql) in one snapshot: every missing, stale or different row,
# by table and id. Each is synced by the routine the triggers use (kit_sync_room_1,
# kit_sync_participant_1, kit_sync_content_1 in triggers.sql): the v2 row is written whole from
# the latest committed v1 rows, read with locking reads, or deleted when its v1 row is gone; in
# short READ COMMITTED transactions of 100 rows, retried after a deadlock. Then the same ids are
# looked up in the views again. With --after-cutover, rows a v2 server wrote since cutover
# (v2_newer) are left as they are; without it they are overwritten from v1 like any difference.
# --dry-run lists what would be repaired. Exit 0 when nothing flagged is left, 1 otherwise.
set -euo pipefail

usage() { sed -n '4,5p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

. "$(dirname "$0")/client.sh"
after_cutover=0 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    -D|--database|-S|--socket|-h|--host|-P|--port|-u|--user|--defaults-extra-file)
      kit_connection_option "$1" "$2"; shift 2 ;;
    --after-cutover) after_cutover=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --help) usage ;;
    *) echo "repair: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$database" ] || { echo "repair: -D DATABASE is required" >&2; usage; }

kit_connect repair

# The rows to repair: "table id kind", from one snapshot.
skip_newer=""
[ "$after_cutover" = 0 ] || skip_newer="WHERE kind <> 'v2_newer'"
flagged() {
  "${db[@]}" -e "
SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ;
START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY;
SELECT 'study', id, kind FROM kit_diff_study $skip_newer
UNION ALL SELECT 'pomodoro_study_to_study', id, kind FROM kit_diff_pomodoro_study_to_study $skip_newer
UNION ALL SELECT 'participant', id, kind FROM kit_diff_participant $skip_newer
UNION ALL SELECT 'content', id, kind FROM kit_diff_content $skip_newer;
COMMIT;"
}

rows=$(flagged)
if [ -z "$rows" ]; then
  echo "repair: database $database: nothing to repair"
  exit 0
fi
echo "repair: database $database: $(wc -l <<<"$rows") rows flagged"
awk '{ print "repair:   " $1 " " $2 " (" $3 ")" }' <<<"$rows" | head -n 50
[ "$(wc -l <<<"$rows")" -le 50 ] || echo "repair:   ..."
[ "$dry_run" = 0 ] || exit 1

# One CALL per row; a room's study and mapping row are one sync.
calls=$(awk '
  $1 == "study" || $1 == "pomodoro_study_to_study" { if (!seen["room " $2]++) print "CALL kit_sync_room_1(" $2 ", TRUE);" }
  $1 == "participant" { print "CALL kit_sync_participant_1(" $2 ", @kit_is_host);" }
  $1 == "content" { print "CALL kit_sync_content_1(" $2 ");" }' <<<"$rows")
batch() {
  kit_retried repair "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED;
                      SET SESSION innodb_lock_wait_timeout = 5;
                      START TRANSACTION; $1 COMMIT;" "re-sync" >/dev/null
}
while IFS= read -r chunk; do
  batch "$chunk"
done < <(awk '{ body = body $0 " " } NR % 100 == 0 { print body; body = "" } END { if (body != "") print body }' <<<"$calls")

# The same rows, checked again (rows flagged for the first time since are not counted here).
left=$(flagged | awk 'NR == FNR { want[$1 " " $2] = 1; next } want[$1 " " $2]' <(printf '%s\n' "$rows") - | wc -l)
echo "repair: $(wc -l <<<"$calls") rows re-synced; $left of them still differ"
[ "$left" = 0 ]
