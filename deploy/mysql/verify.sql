-- Step 5 of the kit, the verification gate: are the v2 tables exactly what the mapping
-- (mapping.sql, the kit_v1_* views) says they must be for the v1 rows as they are now?
--   mariadb -D app < deploy/mysql/verify.sql          (or deploy/mysql/verify.sh -D app)
-- Per table:
--   missing   v1 rows with no v2 row (anti-join v1 -> v2 on the primary key)
--   stale     v2 rows below the v2-native id floor (10^12) whose v1 row is gone (anti-join v2 -> v1)
--   different rows on both sides whose mapped columns differ: BIT_XOR(CRC32(row text)) per chunk
--             of @kit_chunk ids on each side; only chunks whose two sums differ are compared row by
--             row, as bytes (a case-insensitive, trailing-space-blind collation would let
--             'Plan ' equal 'plan').
-- The last line is "verdict: PASS missing=0 different=0 stale=0" or "verdict: FAIL ...".
--
-- Everything is read in one consistent snapshot and nothing is locked: v1 writes go on while it
-- runs, and because a trigger commits its v2 copy with the v1 write, the snapshot holds both or
-- neither. The row text is built by one expression over a UNION ALL of both sides, so v1 and v2
-- values go through the same conversions: NULL is encoded apart from '' (CONCAT_WS would skip it),
-- every value is length-prefixed (a separator inside a text cannot shift a value into the next),
-- an ENUM is compared by its label and a BIT/BOOLEAN by its number, DATETIME(6) with microseconds.

SET @kit_chunk = COALESCE(@kit_chunk, 1000);
SET @kit_floor = 1000000000000;
SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ;
START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY;

-- study <- pomodoro_room ---------------------------------------------------------------------------
SELECT COUNT(*) INTO @study_v1 FROM pomodoro_room;
SELECT COUNT(*) INTO @study_v2 FROM study WHERE id < @kit_floor;
SELECT COUNT(*) INTO @study_missing
FROM pomodoro_room r LEFT JOIN study s ON s.id = r.id WHERE s.id IS NULL;
SELECT COUNT(*) INTO @study_stale
FROM study s LEFT JOIN pomodoro_room r ON r.id = s.id WHERE s.id < @kit_floor AND r.id IS NULL;
WITH u AS (
  SELECT 1 AS side, id, participant_code_id, name, total_cycle, time_per_cycle, current_cycle,
         step, created_date, last_modified_date
  FROM kit_v1_study
  UNION ALL
  SELECT 2, id, participant_code_id, name, total_cycle, time_per_cycle, current_cycle,
         step, created_date, last_modified_date
  FROM study WHERE id < @kit_floor
), t AS (
  SELECT side, id, FLOOR(id / @kit_chunk) AS chunk,
         CONCAT_WS('|', id,
           IFNULL(CONCAT(LENGTH(participant_code_id), ':', participant_code_id), 'N'),
           IFNULL(CONCAT(LENGTH(name), ':', name), 'N'),
           IFNULL(CONCAT(LENGTH(total_cycle), ':', total_cycle), 'N'),
           IFNULL(CONCAT(LENGTH(time_per_cycle), ':', time_per_cycle), 'N'),
           IFNULL(CONCAT(LENGTH(current_cycle), ':', current_cycle), 'N'),
           IFNULL(CONCAT(LENGTH(CAST(step AS CHAR)), ':', CAST(step AS CHAR)), 'N'),
           IFNULL(CONCAT(LENGTH(created_date), ':', created_date), 'N'),
           IFNULL(CONCAT(LENGTH(last_modified_date), ':', last_modified_date), 'N')) AS row_text
  FROM u
), sums AS (
  SELECT chunk, BIT_XOR(IF(side = 1, CRC32(row_text), 0)) AS v1_sum,
                BIT_XOR(IF(side = 2, CRC32(row_text), 0)) AS v2_sum
  FROM t GROUP BY chunk
), bad AS (
  SELECT chunk FROM sums WHERE v1_sum <> v2_sum
)
SELECT (SELECT COUNT(*) FROM sums), (SELECT COUNT(*) FROM bad),
       (SELECT COUNT(*) FROM (SELECT id FROM t WHERE chunk IN (SELECT chunk FROM bad)
                              GROUP BY id
                              HAVING COUNT(*) = 2
                                 AND MIN(CAST(row_text AS BINARY)) <> MAX(CAST(row_text AS BINARY))) d)
INTO @study_chunks, @study_bad_chunks, @study_different;

-- pomodoro_study_to_study <- pomodoro_room -------------------------------------------------------
SELECT COUNT(*) INTO @map_v1 FROM pomodoro_room;
SELECT COUNT(*) INTO @map_v2 FROM pomodoro_study_to_study;
SELECT COUNT(*) INTO @map_missing
FROM pomodoro_room r LEFT JOIN pomodoro_study_to_study m ON m.pomodoro_room_id = r.id
WHERE m.pomodoro_room_id IS NULL;
SELECT COUNT(*) INTO @map_stale
FROM pomodoro_study_to_study m LEFT JOIN pomodoro_room r ON r.id = m.pomodoro_room_id
WHERE r.id IS NULL;
WITH u AS (
  SELECT 1 AS side, pomodoro_room_id AS id, study_id FROM kit_v1_pomodoro_study_to_study
  UNION ALL
  SELECT 2, pomodoro_room_id, study_id FROM pomodoro_study_to_study
), t AS (
  SELECT side, id, FLOOR(id / @kit_chunk) AS chunk,
         CONCAT_WS('|', id, IFNULL(CONCAT(LENGTH(study_id), ':', study_id), 'N')) AS row_text
  FROM u
), sums AS (
  SELECT chunk, BIT_XOR(IF(side = 1, CRC32(row_text), 0)) AS v1_sum,
                BIT_XOR(IF(side = 2, CRC32(row_text), 0)) AS v2_sum
  FROM t GROUP BY chunk
), bad AS (
  SELECT chunk FROM sums WHERE v1_sum <> v2_sum
)
SELECT (SELECT COUNT(*) FROM sums), (SELECT COUNT(*) FROM bad),
       (SELECT COUNT(*) FROM (SELECT id FROM t WHERE chunk IN (SELECT chunk FROM bad)
                              GROUP BY id
                              HAVING COUNT(*) = 2
                                 AND MIN(CAST(row_text AS BINARY)) <> MAX(CAST(row_text AS BINARY))) d)
INTO @map_chunks, @map_bad_chunks, @map_different;

-- participant <- pomodoro_progress (+ member.nickname, host flag) ----------------------------------
SELECT COUNT(*) INTO @participant_v1 FROM pomodoro_progress;
SELECT COUNT(*) INTO @participant_v2 FROM participant WHERE id < @kit_floor;
SELECT COUNT(*) INTO @participant_missing
FROM pomodoro_progress p LEFT JOIN participant x ON x.id = p.id WHERE x.id IS NULL;
SELECT COUNT(*) INTO @participant_stale
FROM participant x LEFT JOIN pomodoro_progress p ON p.id = x.id
WHERE x.id < @kit_floor AND p.id IS NULL;
WITH u AS (
  SELECT 1 AS side, id, study_id, member_id, nickname, is_host + 0 AS is_host,
         created_date, last_modified_date
  FROM kit_v1_participant
  UNION ALL
  SELECT 2, id, study_id, member_id, nickname, is_host + 0, created_date, last_modified_date
  FROM participant WHERE id < @kit_floor
), t AS (
  SELECT side, id, FLOOR(id / @kit_chunk) AS chunk,
         CONCAT_WS('|', id,
           IFNULL(CONCAT(LENGTH(study_id), ':', study_id), 'N'),
           IFNULL(CONCAT(LENGTH(member_id), ':', member_id), 'N'),
           IFNULL(CONCAT(LENGTH(nickname), ':', nickname), 'N'),
           IFNULL(CONCAT(LENGTH(is_host), ':', is_host), 'N'),
           IFNULL(CONCAT(LENGTH(created_date), ':', created_date), 'N'),
           IFNULL(CONCAT(LENGTH(last_modified_date), ':', last_modified_date), 'N')) AS row_text
  FROM u
), sums AS (
  SELECT chunk, BIT_XOR(IF(side = 1, CRC32(row_text), 0)) AS v1_sum,
                BIT_XOR(IF(side = 2, CRC32(row_text), 0)) AS v2_sum
  FROM t GROUP BY chunk
), bad AS (
  SELECT chunk FROM sums WHERE v1_sum <> v2_sum
)
SELECT (SELECT COUNT(*) FROM sums), (SELECT COUNT(*) FROM bad),
       (SELECT COUNT(*) FROM (SELECT id FROM t WHERE chunk IN (SELECT chunk FROM bad)
                              GROUP BY id
                              HAVING COUNT(*) = 2
                                 AND MIN(CAST(row_text AS BINARY)) <> MAX(CAST(row_text AS BINARY))) d)
INTO @participant_chunks, @participant_bad_chunks, @participant_different;

-- content <- pomodoro_content -------------------------------------------------------------------
SELECT COUNT(*) INTO @content_v1 FROM pomodoro_content;
SELECT COUNT(*) INTO @content_v2 FROM content WHERE id < @kit_floor;
SELECT COUNT(*) INTO @content_missing
FROM pomodoro_content c LEFT JOIN content x ON x.id = c.id WHERE x.id IS NULL;
SELECT COUNT(*) INTO @content_stale
FROM content x LEFT JOIN pomodoro_content c ON c.id = x.id
WHERE x.id < @kit_floor AND c.id IS NULL;
WITH u AS (
  SELECT 1 AS side, id, participant_id, cycle, plan, retrospect, created_date, last_modified_date
  FROM kit_v1_content
  UNION ALL
  SELECT 2, id, participant_id, cycle, plan, retrospect, created_date, last_modified_date
  FROM content WHERE id < @kit_floor
), t AS (
  SELECT side, id, FLOOR(id / @kit_chunk) AS chunk,
         CONCAT_WS('|', id,
           IFNULL(CONCAT(LENGTH(participant_id), ':', participant_id), 'N'),
           IFNULL(CONCAT(LENGTH(cycle), ':', cycle), 'N'),
           IFNULL(CONCAT(LENGTH(plan), ':', plan), 'N'),
           IFNULL(CONCAT(LENGTH(retrospect), ':', retrospect), 'N'),
           IFNULL(CONCAT(LENGTH(created_date), ':', created_date), 'N'),
           IFNULL(CONCAT(LENGTH(last_modified_date), ':', last_modified_date), 'N')) AS row_text
  FROM u
), sums AS (
  SELECT chunk, BIT_XOR(IF(side = 1, CRC32(row_text), 0)) AS v1_sum,
                BIT_XOR(IF(side = 2, CRC32(row_text), 0)) AS v2_sum
  FROM t GROUP BY chunk
), bad AS (
  SELECT chunk FROM sums WHERE v1_sum <> v2_sum
)
SELECT (SELECT COUNT(*) FROM sums), (SELECT COUNT(*) FROM bad),
       (SELECT COUNT(*) FROM (SELECT id FROM t WHERE chunk IN (SELECT chunk FROM bad)
                              GROUP BY id
                              HAVING COUNT(*) = 2
                                 AND MIN(CAST(row_text AS BINARY)) <> MAX(CAST(row_text AS BINARY))) d)
INTO @content_chunks, @content_bad_chunks, @content_different;

COMMIT;

SELECT CONCAT(RPAD(t, 24, ' '), ' v1=', v1, ' v2=', v2, ' missing=', missing, ' different=',
              different, ' stale=', stale, '  (', bad_chunks, ' of ', chunks,
              ' chunks differ)') AS `table`
FROM (
  SELECT 1 AS o, 'study' AS t, @study_v1 AS v1, @study_v2 AS v2, @study_missing AS missing,
         @study_different AS different, @study_stale AS stale, @study_chunks AS chunks,
         @study_bad_chunks AS bad_chunks
  UNION ALL SELECT 2, 'pomodoro_study_to_study', @map_v1, @map_v2, @map_missing, @map_different,
         @map_stale, @map_chunks, @map_bad_chunks
  UNION ALL SELECT 3, 'participant', @participant_v1, @participant_v2, @participant_missing,
         @participant_different, @participant_stale, @participant_chunks, @participant_bad_chunks
  UNION ALL SELECT 4, 'content', @content_v1, @content_v2, @content_missing, @content_different,
         @content_stale, @content_chunks, @content_bad_chunks
) per_table
ORDER BY o;

SET @kit_missing = @study_missing + @map_missing + @participant_missing + @content_missing;
SET @kit_different = @study_different + @map_different + @participant_different + @content_different;
SET @kit_stale = @study_stale + @map_stale + @participant_stale + @content_stale;
-- A chunk whose sums differ always holds a missing, stale or different row; if none was found, the
-- comparison itself is off, and that is no PASS either.
SET @kit_bad_chunks = @study_bad_chunks + @map_bad_chunks + @participant_bad_chunks + @content_bad_chunks;
SELECT CONCAT('verdict: ',
              IF(@kit_missing + @kit_different + @kit_stale + @kit_bad_chunks = 0, 'PASS', 'FAIL'),
              ' missing=', @kit_missing, ' different=', @kit_different, ' stale=', @kit_stale,
              IF(@kit_bad_chunks > 0 AND @kit_missing + @kit_different + @kit_stale = 0,
                 CONCAT(' (', @kit_bad_chunks, ' chunks differ without a differing row)'), ''))
       AS verdict;
