-- The v1 -> v2 mapping, written once. Each kit_v1_<table> view is "what the v2 table must contain
-- for the v1 rows as they are now": backfill.sh copies from these views and verify.sql compares
-- the v2 tables against them, so the two cannot disagree about the mapping. triggers.sql computes
-- the same values from NEW/OLD; verify.sql is what proves the triggers agree with these views.
-- Step 2 of the kit: load after v2_schema.sql, before triggers.sql. Safe to re-run.
--
-- The views contain no aggregate, GROUP BY, LIMIT or select-list subquery, so MariaDB and MySQL
-- merge them into the query that reads them: a backfill chunk's "WHERE id > ? AND id <= ?" is a
-- primary key range on the v1 table, and its LOCK IN SHARE MODE locks the v1 rows read.

DROP FUNCTION IF EXISTS kit_study_step;
-- One study step from the host's progress (README.md, "One step per study"). host_id is NULL when
-- the room has no progress row at all.
CREATE FUNCTION kit_study_step(host_id BIGINT, is_done BIT(1), pomodoro_status VARCHAR(16))
  RETURNS VARCHAR(16) CHARSET utf8mb4 DETERMINISTIC NO SQL
  RETURN CASE
    WHEN host_id IS NULL THEN 'WAITING'
    WHEN is_done = b'1' THEN 'COMPLETED'
    ELSE pomodoro_status
  END;

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
