#!/usr/bin/env bash
# DO NOT USE. This is the naive, event-based seed procedure that SPEC §9 calls defective,
# reproduced as it was run, so that test.sh can show verify.sh failing on it. Use README.md's
# procedure (v2_schema.sql, mapping.sql, triggers.sql, backfill.sh, verify.sh) instead.
#
#   deploy/mysql/naive.sh -D DB [-S SOCKET] [-u USER] [--gap SECONDS]
#
# What it does, and what goes wrong (all on MariaDB 10.11; MySQL 8 behaves the same):
#  1. SET @start_time = NOW(), then one big INSERT ... SELECT per v2 table: a single statement
#     that share-locks every v1 row it reads until it ends, stalling v1 writes meanwhile.
#  2. CREATE EVENT to copy "rows modified since @start_time" every second. User variables belong
#     to a session; each event run is a new session, reads @start_time as NULL and copies nothing.
#     (It logs what it saw in naive_event_log.)
#  3. Tries to install the triggers from an EVENT, which MariaDB and MySQL refuse; so the operator
#     installs them by hand later.
#  4. Waits --gap seconds, as the operator did. Rows deleted in v1 meanwhile stay in v2 for good.
#  5. Catches up by hand with the window last_modified_date > @start_time AND <= NOW(): NOW() has
#     whole seconds, so a row written in the current second after it was read is skipped, and so
#     is everything between that window and the trigger install. Changes that don't touch the
#     room's last_modified_date (a host's progress) are not in the window at all.
#  6. Installs the seed's triggers: UPDATE ... WHERE id = (SELECT study_id FROM mapping ...)
#     (does nothing when the v2 row is missing; fails the v1 write when the mapping has duplicates),
#     plain INSERTs (a duplicate fails the v1 write), the study step taken from whichever member
#     wrote last, the host flag never moved when the host leaves.
set -euo pipefail

database="" socket="" user="" gap=2
while [ $# -gt 0 ]; do
  case "$1" in
    -D|--database) database=$2; shift 2 ;;
    -S|--socket) socket=$2; shift 2 ;;
    -u|--user) user=$2; shift 2 ;;
    --gap) gap=$2; shift 2 ;;
    *) echo "naive: unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$database" ] || { echo "naive: -D DATABASE is required" >&2; exit 2; }
client=$(command -v mariadb || command -v mysql)
db=("$client")
[ -z "$socket" ] || db+=("--socket=$socket")
[ -z "$user" ] || db+=("--user=$user")
db+=(--batch --skip-column-names "--database=$database")

# 3. An EVENT cannot create a trigger: show the server's answer.
if out=$("${db[@]}" 2>&1 <<'SQL'
CREATE EVENT naive_install_triggers ON SCHEDULE AT CURRENT_TIMESTAMP + INTERVAL 1 SECOND
DO CREATE TRIGGER naive_never AFTER INSERT ON pomodoro_room FOR EACH ROW SET @x = 1;
SQL
); then
  echo "naive: the server accepted CREATE TRIGGER inside an EVENT" >&2
  exit 1
fi
echo "naive: CREATE TRIGGER inside an EVENT refused: ${out##*ERROR }"

# Everything else runs in ONE client session, so @start_time is set where the operator set it.
"${db[@]}" <<SQL
CREATE TABLE IF NOT EXISTS naive_event_log (
  ran_at DATETIME(6) NOT NULL, start_time_seen DATETIME NULL, rows_copied BIGINT NOT NULL
) ENGINE = InnoDB;

-- 1. The copy.
SET @start_time = NOW();
INSERT INTO study SELECT * FROM kit_v1_study;
INSERT INTO pomodoro_study_to_study SELECT * FROM kit_v1_pomodoro_study_to_study;
INSERT INTO participant SELECT * FROM kit_v1_participant;
INSERT INTO content SELECT * FROM kit_v1_content;

-- 2. The catch-up event.
DELIMITER \$\$
CREATE EVENT naive_copy_recent ON SCHEDULE EVERY 1 SECOND DO
BEGIN
  INSERT INTO study SELECT * FROM kit_v1_study WHERE last_modified_date > @start_time
  ON DUPLICATE KEY UPDATE name = VALUES(name), total_cycle = VALUES(total_cycle),
    time_per_cycle = VALUES(time_per_cycle), last_modified_date = VALUES(last_modified_date);
  SET @copied = ROW_COUNT();
  INSERT INTO participant SELECT * FROM kit_v1_participant WHERE last_modified_date > @start_time
  ON DUPLICATE KEY UPDATE last_modified_date = VALUES(last_modified_date);
  SET @copied = @copied + ROW_COUNT();
  INSERT INTO content SELECT * FROM kit_v1_content WHERE last_modified_date > @start_time
  ON DUPLICATE KEY UPDATE plan = VALUES(plan), retrospect = VALUES(retrospect),
    last_modified_date = VALUES(last_modified_date);
  SET @copied = @copied + ROW_COUNT();
  INSERT INTO naive_event_log VALUES (NOW(6), @start_time, @copied);
  SET @start_time = NOW();
END \$\$
DELIMITER ;

-- 4. The operator waits for the event to catch up.
DO SLEEP($gap);

-- 5. The catch-up by hand, then the triggers.
INSERT INTO study SELECT * FROM kit_v1_study
WHERE last_modified_date > @start_time AND last_modified_date <= NOW()
ON DUPLICATE KEY UPDATE name = VALUES(name), total_cycle = VALUES(total_cycle),
  time_per_cycle = VALUES(time_per_cycle), last_modified_date = VALUES(last_modified_date);
INSERT INTO participant SELECT * FROM kit_v1_participant
WHERE last_modified_date > @start_time AND last_modified_date <= NOW()
ON DUPLICATE KEY UPDATE last_modified_date = VALUES(last_modified_date);
INSERT INTO content SELECT * FROM kit_v1_content
WHERE last_modified_date > @start_time AND last_modified_date <= NOW()
ON DUPLICATE KEY UPDATE plan = VALUES(plan), retrospect = VALUES(retrospect),
  last_modified_date = VALUES(last_modified_date);

-- 6. The seed's triggers.
DELIMITER \$\$
CREATE TRIGGER naive_room_ai AFTER INSERT ON pomodoro_room FOR EACH ROW
BEGIN
  INSERT INTO study (id, participant_code_id, name, total_cycle, time_per_cycle, current_cycle,
                     step, created_date, last_modified_date)
  VALUES (NEW.id, NEW.participant_code_id, NEW.name, NEW.total_cycle, NEW.time_per_cycle, 1,
          'WAITING', NEW.created_date, NEW.last_modified_date);
  INSERT INTO pomodoro_study_to_study VALUES (NEW.id, NEW.id);
END \$\$
CREATE TRIGGER naive_room_au AFTER UPDATE ON pomodoro_room FOR EACH ROW
  UPDATE study SET name = NEW.name, total_cycle = NEW.total_cycle,
                   time_per_cycle = NEW.time_per_cycle, last_modified_date = NEW.last_modified_date
  WHERE id = (SELECT study_id FROM pomodoro_study_to_study WHERE pomodoro_room_id = NEW.id) \$\$
CREATE TRIGGER naive_room_ad AFTER DELETE ON pomodoro_room FOR EACH ROW
BEGIN
  DELETE FROM study
  WHERE id = (SELECT study_id FROM pomodoro_study_to_study WHERE pomodoro_room_id = OLD.id);
  DELETE FROM pomodoro_study_to_study WHERE pomodoro_room_id = OLD.id;
END \$\$
CREATE TRIGGER naive_progress_ai AFTER INSERT ON pomodoro_progress FOR EACH ROW
BEGIN
  INSERT INTO participant (id, study_id, member_id, nickname, is_host, created_date,
                           last_modified_date)
  VALUES (NEW.id, NEW.pomodoro_room_id, NEW.member_id,
          (SELECT nickname FROM member WHERE id = NEW.member_id),
          NOT EXISTS (SELECT 1 FROM pomodoro_progress
                      WHERE pomodoro_room_id = NEW.pomodoro_room_id AND id < NEW.id),
          NEW.created_date, NEW.last_modified_date);
  UPDATE study SET current_cycle = NEW.current_cycle, step = NEW.pomodoro_status
  WHERE id = (SELECT study_id FROM pomodoro_study_to_study
              WHERE pomodoro_room_id = NEW.pomodoro_room_id);
END \$\$
CREATE TRIGGER naive_progress_au AFTER UPDATE ON pomodoro_progress FOR EACH ROW
BEGIN
  UPDATE participant SET member_id = NEW.member_id, last_modified_date = NEW.last_modified_date
  WHERE id = NEW.id;
  UPDATE study SET current_cycle = NEW.current_cycle, step = NEW.pomodoro_status
  WHERE id = (SELECT study_id FROM pomodoro_study_to_study
              WHERE pomodoro_room_id = NEW.pomodoro_room_id);
END \$\$
CREATE TRIGGER naive_progress_ad AFTER DELETE ON pomodoro_progress FOR EACH ROW
  DELETE FROM participant WHERE id = OLD.id \$\$
CREATE TRIGGER naive_member_au AFTER UPDATE ON member FOR EACH ROW
  UPDATE participant SET nickname = NEW.nickname WHERE member_id = NEW.id \$\$
CREATE TRIGGER naive_content_ai AFTER INSERT ON pomodoro_content FOR EACH ROW
  INSERT INTO content VALUES (NEW.id, NEW.pomodoro_progress_id, NEW.cycle, NEW.plan,
                              NEW.retrospect, NEW.created_date, NEW.last_modified_date) \$\$
CREATE TRIGGER naive_content_au AFTER UPDATE ON pomodoro_content FOR EACH ROW
  UPDATE content SET cycle = NEW.cycle, plan = NEW.plan, retrospect = NEW.retrospect,
                     last_modified_date = NEW.last_modified_date
  WHERE id = NEW.id \$\$
CREATE TRIGGER naive_content_ad AFTER DELETE ON pomodoro_content FOR EACH ROW
  DELETE FROM content WHERE id = OLD.id \$\$
DELIMITER ;
SQL
echo "naive: copied, event created, waited ${gap} s, caught up to NOW(), triggers installed"
