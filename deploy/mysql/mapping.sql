-- The v1 -> v2 mapping, written once as views. Each kit_v1_<table> view is "what the v2 table
-- must contain for the v1 rows as they are now"; the kit_diff_<table> views list, by id, where the
-- v2 table is not that. verify.sql counts the differences and repair.sh re-syncs them. The
-- triggers and the backfill (triggers.sql) compute the same values with locking reads of the v1
-- rows instead of through these views; the gate is what proves the two agree.
-- Step 2 of the kit: load after v2_schema.sql, before triggers.sql (install.sh does both). Safe
-- to re-run under load: views are replaced in one step, and the function the triggers call is
-- created once and never dropped here.

DELIMITER $$
-- One study step from the host's progress (README.md, "One step per study"). host_id is NULL when
-- the room has no progress row at all.
CREATE FUNCTION IF NOT EXISTS kit_study_step(host_id BIGINT, is_done BIT(1), pomodoro_status VARCHAR(16))
  RETURNS VARCHAR(16) CHARSET utf8mb4 DETERMINISTIC NO SQL
  RETURN CASE
    WHEN host_id IS NULL THEN 'WAITING'
    WHEN is_done = b'1' THEN 'COMPLETED'
    ELSE pomodoro_status
  END $$
DELIMITER ;

-- The host of a room is its progress row with the lowest id: the member who joined first, which
-- in v1 is the member who created the room. h is that row, or NULLs for a room nobody joined.
CREATE OR REPLACE VIEW kit_v1_study AS
SELECT r.id                                                       AS id,
       r.participant_code_id                                      AS participant_code_id,
       r.name                                                     AS name,
       r.total_cycle                                              AS total_cycle,
       r.time_per_cycle                                           AS time_per_cycle,
       COALESCE(h.current_cycle, 1)                               AS current_cycle,
       kit_study_step(h.id, h.is_done, h.pomodoro_status)         AS step,
       r.created_date                                             AS created_date,
       r.last_modified_date                                       AS last_modified_date
FROM pomodoro_room r
LEFT JOIN pomodoro_progress h
       ON h.pomodoro_room_id = r.id
      AND NOT EXISTS (SELECT 1 FROM pomodoro_progress x
                      WHERE x.pomodoro_room_id = r.id AND x.id < h.id);

CREATE OR REPLACE VIEW kit_v1_pomodoro_study_to_study AS
SELECT r.id AS pomodoro_room_id,
       r.id AS study_id
FROM pomodoro_room r;

-- host is the room's host when that is another row; is_host is true when there is none lower.
CREATE OR REPLACE VIEW kit_v1_participant AS
SELECT p.id                    AS id,
       p.pomodoro_room_id      AS study_id,
       p.member_id             AS member_id,
       m.nickname              AS nickname,
       host.id IS NULL         AS is_host,
       p.created_date          AS created_date,
       p.last_modified_date    AS last_modified_date
FROM pomodoro_progress p
LEFT JOIN member m ON m.id = p.member_id
LEFT JOIN pomodoro_progress host
       ON host.pomodoro_room_id = p.pomodoro_room_id
      AND host.id < p.id
      AND NOT EXISTS (SELECT 1 FROM pomodoro_progress x
                      WHERE x.pomodoro_room_id = p.pomodoro_room_id AND x.id < host.id);

CREATE OR REPLACE VIEW kit_v1_content AS
SELECT c.id                   AS id,
       c.pomodoro_progress_id AS participant_id,
       c.cycle                AS cycle,
       c.plan                 AS plan,
       c.retrospect           AS retrospect,
       c.created_date         AS created_date,
       c.last_modified_date   AS last_modified_date
FROM pomodoro_content c;

-- Where v2 is not what v1 says, one row per id: 'missing' (a v1 row with no v2 row), 'stale' (a
-- kit row, id below 10^12, whose v1 row is gone), 'different' (any column differs as bytes:
-- texts are compared with CAST AS BINARY, so 'alice' and 'Alice' and 'alice ' all differ; NULL
-- only equals NULL; DATETIME(6) to the microsecond; enums by label) or 'v2_newer' (different, and
-- the v2 row's last_modified_date is later than v1's: a v2 server wrote it after cutover).
-- Rows at or above 10^12 are v2's own and never compared.
CREATE OR REPLACE VIEW kit_diff_study AS
SELECT v.id AS id, 'missing' AS kind
FROM kit_v1_study v LEFT JOIN study s ON s.id = v.id WHERE s.id IS NULL
UNION ALL
SELECT s.id, 'stale'
FROM study s LEFT JOIN pomodoro_room r ON r.id = s.id WHERE s.id < 1000000000000 AND r.id IS NULL
UNION ALL
SELECT v.id, IF(s.last_modified_date > v.last_modified_date, 'v2_newer', 'different')
FROM kit_v1_study v JOIN study s ON s.id = v.id
WHERE NOT (v.participant_code_id <=> s.participant_code_id
           AND CAST(v.name AS BINARY) <=> CAST(s.name AS BINARY)
           AND v.total_cycle <=> s.total_cycle
           AND v.time_per_cycle <=> s.time_per_cycle
           AND v.current_cycle <=> s.current_cycle
           AND CAST(v.step AS BINARY) <=> CAST(s.step AS BINARY)
           AND v.created_date <=> s.created_date
           AND v.last_modified_date <=> s.last_modified_date);

CREATE OR REPLACE VIEW kit_diff_pomodoro_study_to_study AS
SELECT v.pomodoro_room_id AS id, 'missing' AS kind
FROM kit_v1_pomodoro_study_to_study v
LEFT JOIN pomodoro_study_to_study m ON m.pomodoro_room_id = v.pomodoro_room_id
WHERE m.pomodoro_room_id IS NULL
UNION ALL
SELECT m.pomodoro_room_id, 'stale'
FROM pomodoro_study_to_study m LEFT JOIN pomodoro_room r ON r.id = m.pomodoro_room_id
WHERE r.id IS NULL
UNION ALL
SELECT v.pomodoro_room_id, 'different'
FROM kit_v1_pomodoro_study_to_study v
JOIN pomodoro_study_to_study m ON m.pomodoro_room_id = v.pomodoro_room_id
WHERE NOT (v.study_id <=> m.study_id);

CREATE OR REPLACE VIEW kit_diff_participant AS
SELECT v.id AS id, 'missing' AS kind
FROM kit_v1_participant v LEFT JOIN participant x ON x.id = v.id WHERE x.id IS NULL
UNION ALL
SELECT x.id, 'stale'
FROM participant x LEFT JOIN pomodoro_progress p ON p.id = x.id
WHERE x.id < 1000000000000 AND p.id IS NULL
UNION ALL
SELECT v.id, IF(x.last_modified_date > v.last_modified_date, 'v2_newer', 'different')
FROM kit_v1_participant v JOIN participant x ON x.id = v.id
WHERE NOT (v.study_id <=> x.study_id
           AND v.member_id <=> x.member_id
           AND CAST(v.nickname AS BINARY) <=> CAST(x.nickname AS BINARY)
           AND (v.is_host + 0) <=> (x.is_host + 0)
           AND v.created_date <=> x.created_date
           AND v.last_modified_date <=> x.last_modified_date);

CREATE OR REPLACE VIEW kit_diff_content AS
SELECT v.id AS id, 'missing' AS kind
FROM kit_v1_content v LEFT JOIN content x ON x.id = v.id WHERE x.id IS NULL
UNION ALL
SELECT x.id, 'stale'
FROM content x LEFT JOIN pomodoro_content c ON c.id = x.id
WHERE x.id < 1000000000000 AND c.id IS NULL
UNION ALL
SELECT v.id, IF(x.last_modified_date > v.last_modified_date, 'v2_newer', 'different')
FROM kit_v1_content v JOIN content x ON x.id = v.id
WHERE NOT (v.participant_id <=> x.participant_id
           AND v.cycle <=> x.cycle
           AND CAST(v.plan AS BINARY) <=> CAST(x.plan AS BINARY)
           AND CAST(v.retrospect AS BINARY) <=> CAST(x.retrospect AS BINARY)
           AND v.created_date <=> x.created_date
           AND v.last_modified_date <=> x.last_modified_date);
