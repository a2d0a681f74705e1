-- Removes the kit's triggers and the procedures they call; v1 and v2 tables are left as they are.
--   mariadb -D app < deploy/mysql/drop_triggers.sql
-- Used at the end of the rollout (after the quiet window, README.md "Retire v1") and to roll back
-- before cutover (rollback.md). From the moment it returns, v1 writes no longer reach v2.
-- Like CREATE TRIGGER, DROP TRIGGER waits for an exclusive metadata lock on the table: give up
-- after 10 s rather than queue every query on the table behind a long transaction; re-run.
SET SESSION lock_wait_timeout = 10;

DROP TRIGGER IF EXISTS kit_pomodoro_room_ai;
DROP TRIGGER IF EXISTS kit_pomodoro_room_au;
DROP TRIGGER IF EXISTS kit_pomodoro_room_ad;
DROP TRIGGER IF EXISTS kit_pomodoro_progress_ai;
DROP TRIGGER IF EXISTS kit_pomodoro_progress_au;
DROP TRIGGER IF EXISTS kit_pomodoro_progress_ad;
DROP TRIGGER IF EXISTS kit_member_ai;
DROP TRIGGER IF EXISTS kit_member_au;
DROP TRIGGER IF EXISTS kit_member_ad;
DROP TRIGGER IF EXISTS kit_pomodoro_content_ai;
DROP TRIGGER IF EXISTS kit_pomodoro_content_au;
DROP TRIGGER IF EXISTS kit_pomodoro_content_ad;
-- The routines go last, once no trigger calls them: every revision the kit has used.
DROP PROCEDURE IF EXISTS kit_sync_room_1;
DROP PROCEDURE IF EXISTS kit_sync_participant_1;
DROP PROCEDURE IF EXISTS kit_sync_content_1;
DROP PROCEDURE IF EXISTS kit_backfill_rooms_1;
DROP PROCEDURE IF EXISTS kit_backfill_participants_1;
DROP PROCEDURE IF EXISTS kit_backfill_contents_1;
DROP PROCEDURE IF EXISTS kit_refold_study;
DROP PROCEDURE IF EXISTS kit_upsert_participant;
