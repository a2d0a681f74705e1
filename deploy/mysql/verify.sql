-- Step 5 of the kit, the verification gate: are the v2 tables exactly what the mapping
-- (mapping.sql) says they must be for the v1 rows as they are now?
--   deploy/mysql/verify.sh -D app          (or: mariadb -D app < deploy/mysql/verify.sql)
-- Per table, from the kit_diff_* views of mapping.sql:
--   missing    v1 rows with no v2 row (anti-join v1 -> v2 on the primary key)
--   stale      v2 rows below the v2-native id floor (10^12) whose v1 row is gone (anti-join v2 -> v1)
--   different  rows on both sides that differ in any mapped column, compared row by row as bytes
--              (CAST AS BINARY: a case-, space- or accent-only change is a difference; NULL only
--              equals NULL; DATETIME(6) to the microsecond). No checksum: nothing can cancel out.
--   v2_newer   different, with a later last_modified_date in v2: a v2 server wrote the row. Before
--              cutover it is a failure like any difference; with @kit_after_cutover = 1 (verify.sh
--              --after-cutover) it is reported and does not fail the gate.
-- The last line is "verdict: PASS missing=0 different=0 stale=0" or "verdict: FAIL ...".
--
-- Everything is read in one consistent snapshot and nothing is locked: v1 writes go on while it
-- runs, and because a trigger commits its v2 copy with the v1 write, the snapshot holds both or
-- neither.

SET @kit_after_cutover = COALESCE(@kit_after_cutover, 0);
SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ;
START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY;

SELECT (SELECT COUNT(*) FROM pomodoro_room), (SELECT COUNT(*) FROM study WHERE id < 1000000000000),
       COUNT(IF(kind = 'missing', 1, NULL)), COUNT(IF(kind = 'stale', 1, NULL)),
       COUNT(IF(kind = 'different', 1, NULL)), COUNT(IF(kind = 'v2_newer', 1, NULL))
INTO @study_v1, @study_v2, @study_missing, @study_stale, @study_different, @study_newer
FROM kit_diff_study;
SELECT (SELECT COUNT(*) FROM pomodoro_room), (SELECT COUNT(*) FROM pomodoro_study_to_study),
       COUNT(IF(kind = 'missing', 1, NULL)), COUNT(IF(kind = 'stale', 1, NULL)),
       COUNT(IF(kind = 'different', 1, NULL)), 0
INTO @map_v1, @map_v2, @map_missing, @map_stale, @map_different, @map_newer
FROM kit_diff_pomodoro_study_to_study;
SELECT (SELECT COUNT(*) FROM pomodoro_progress),
       (SELECT COUNT(*) FROM participant WHERE id < 1000000000000),
       COUNT(IF(kind = 'missing', 1, NULL)), COUNT(IF(kind = 'stale', 1, NULL)),
       COUNT(IF(kind = 'different', 1, NULL)), COUNT(IF(kind = 'v2_newer', 1, NULL))
INTO @participant_v1, @participant_v2, @participant_missing, @participant_stale,
     @participant_different, @participant_newer
FROM kit_diff_participant;
SELECT (SELECT COUNT(*) FROM pomodoro_content), (SELECT COUNT(*) FROM content WHERE id < 1000000000000),
       COUNT(IF(kind = 'missing', 1, NULL)), COUNT(IF(kind = 'stale', 1, NULL)),
       COUNT(IF(kind = 'different', 1, NULL)), COUNT(IF(kind = 'v2_newer', 1, NULL))
INTO @content_v1, @content_v2, @content_missing, @content_stale, @content_different, @content_newer
FROM kit_diff_content;

COMMIT;

SELECT CONCAT(RPAD(t, 24, ' '), ' v1=', v1, ' v2=', v2, ' missing=', missing, ' different=',
              different, ' stale=', stale, IF(newer > 0, CONCAT(' v2_newer=', newer), '')) AS `table`
FROM (
  SELECT 1 AS o, 'study' AS t, @study_v1 AS v1, @study_v2 AS v2, @study_missing AS missing,
         @study_different AS different, @study_stale AS stale, @study_newer AS newer
  UNION ALL SELECT 2, 'pomodoro_study_to_study', @map_v1, @map_v2, @map_missing, @map_different,
         @map_stale, @map_newer
  UNION ALL SELECT 3, 'participant', @participant_v1, @participant_v2, @participant_missing,
         @participant_different, @participant_stale, @participant_newer
  UNION ALL SELECT 4, 'content', @content_v1, @content_v2, @content_missing, @content_different,
         @content_stale, @content_newer
) per_table
ORDER BY o;

SET @kit_missing = @study_missing + @map_missing + @participant_missing + @content_missing;
SET @kit_stale = @study_stale + @map_stale + @participant_stale + @content_stale;
SET @kit_v2_newer = @study_newer + @participant_newer + @content_newer;
SET @kit_different = @study_different + @map_different + @participant_different + @content_different
                     + IF(@kit_after_cutover, 0, @kit_v2_newer);
SELECT CONCAT('verdict: ', IF(@kit_missing + @kit_different + @kit_stale = 0, 'PASS', 'FAIL'),
              ' missing=', @kit_missing, ' different=', @kit_different, ' stale=', @kit_stale,
              IF(@kit_after_cutover AND @kit_v2_newer > 0,
                 CONCAT(' (', @kit_v2_newer, ' rows written by v2 since cutover, not compared)'), ''))
       AS verdict;
