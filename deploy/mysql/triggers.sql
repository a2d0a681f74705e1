-- Triggers that keep the v2 tables equal to what the v1 rows say (the mapping of mapping.sql)
-- while v1 keeps writing. Step 3 of the kit, after v2_schema.sql and mapping.sql, before
-- backfill.sh; load it with install.sh, which retries it as a whole:
--   deploy/mysql/install.sh -D app
--
-- Rules every trigger and routine here follows (README.md, "Triggers"):
--   * Each v2 row has one owning v1 row (study <- pomodoro_room, participant <- pomodoro_progress,
--     content <- pomodoro_content). A v2 row is written whole with INSERT ... ON DUPLICATE KEY
--     UPDATE from the current v1 rows, or deleted when its v1 row is gone: one that is missing
--     (not backfilled yet) is created, one that is wrong is corrected, nothing fails on a
--     duplicate.
--   * Every value that comes from another v1 row (the room's host, the host's progress, a
--     member's nickname) is read with a locking read of that row by its key: a locking read sees
--     the latest committed version (never the writer's snapshot, whatever its isolation level),
--     and holds the row until commit, so the last writer of every v2 value computed it from what
--     v1 says at its commit. No derived value is read through a view or a subquery: MySQL does
--     not lock the rows of a nested subquery in a locking read.
--   * Text is compared as bytes (CAST AS BINARY): under the default case- and accent-insensitive
--     collation 'alice' = 'Alice' = 'alice ', and such a change must reach v2 all the same.
-- A trigger runs inside the v1 statement's transaction: the v1 write and its v2 copy commit or
-- roll back together.
--
-- Re-running this file under load fails no v1 write and loses none:
--   * every trigger is CREATE OR REPLACE TRIGGER, which swaps the definition in one step under the
--     table's metadata lock (MariaDB 10.6+ atomic DDL): there is no moment without it;
--   * the routines the triggers call are created IF NOT EXISTS and never dropped here; a changed
--     routine gets a new revision number (the _1 suffix), so a statement already running keeps
--     the routine it started with. drop_triggers.sql removes them at the end of the rollout.
-- CREATE OR REPLACE TRIGGER waits for an exclusive metadata lock on its table, queued behind any
-- open transaction that used the table; it gives up after @kit_lock_wait_timeout seconds (10 by
-- default) rather than stall every query on the table. install.sh then runs the whole file again.

SET SESSION lock_wait_timeout = COALESCE(@kit_lock_wait_timeout, 10);

DELIMITER $$

-- The study and the mapping row of one room, written whole from the room row and its host's
-- progress (the room's progress row with the lowest id, mapping.sql), or deleted with the room.
-- With p_flags, participant.is_host of the room's rows moves to the current host.
CREATE PROCEDURE IF NOT EXISTS kit_sync_room_1(IN p_room BIGINT, IN p_flags BOOLEAN)
  MODIFIES SQL DATA
BEGIN
  DECLARE v_found BOOLEAN DEFAULT FALSE;
  DECLARE v_code, v_host BIGINT DEFAULT NULL;
  DECLARE v_name VARCHAR(255) DEFAULT NULL;
  DECLARE v_total, v_time, v_cycle INT DEFAULT NULL;
  DECLARE v_done BIT(1) DEFAULT NULL;
  DECLARE v_status VARCHAR(16) DEFAULT NULL;
  DECLARE v_created, v_modified DATETIME(6) DEFAULT NULL;
  DECLARE CONTINUE HANDLER FOR NOT FOUND BEGIN END;

  SELECT participant_code_id, name, total_cycle, time_per_cycle, created_date, last_modified_date,
         TRUE
    INTO v_code, v_name, v_total, v_time, v_created, v_modified, v_found
    FROM pomodoro_room WHERE id = p_room LOCK IN SHARE MODE;
  SELECT id, is_done, current_cycle, pomodoro_status
    INTO v_host, v_done, v_cycle, v_status
    FROM pomodoro_progress WHERE pomodoro_room_id = p_room ORDER BY id LIMIT 1 LOCK IN SHARE MODE;
  IF v_found THEN
    INSERT INTO study (id, participant_code_id, name, total_cycle, time_per_cycle,
                       current_cycle, step, created_date, last_modified_date)
    VALUES (p_room, v_code, v_name, v_total, v_time, COALESCE(v_cycle, 1),
            kit_study_step(v_host, v_done, v_status), v_created, v_modified)
    ON DUPLICATE KEY UPDATE participant_code_id = VALUES(participant_code_id),
                            name                = VALUES(name),
                            total_cycle         = VALUES(total_cycle),
                            time_per_cycle      = VALUES(time_per_cycle),
                            current_cycle       = VALUES(current_cycle),
                            step                = VALUES(step),
                            created_date        = VALUES(created_date),
                            last_modified_date  = VALUES(last_modified_date);
    INSERT INTO pomodoro_study_to_study (pomodoro_room_id, study_id)
    VALUES (p_room, p_room)
    ON DUPLICATE KEY UPDATE study_id = VALUES(study_id);
  ELSE
    DELETE FROM study WHERE id = p_room;
    DELETE FROM pomodoro_study_to_study WHERE pomodoro_room_id = p_room;
  END IF;
  IF p_flags THEN
    UPDATE participant SET is_host = (id <=> v_host)
    WHERE study_id = p_room AND is_host <> (id <=> v_host);
  END IF;
END $$

-- The participant row of one pomodoro_progress row, written whole (its own columns, the member's
-- nickname, whether it is its room's host), or deleted with the progress row. p_is_host says
-- whether the row is now its room's host.
CREATE PROCEDURE IF NOT EXISTS kit_sync_participant_1(IN p_id BIGINT, OUT p_is_host BOOLEAN)
  MODIFIES SQL DATA
BEGIN
  DECLARE v_found BOOLEAN DEFAULT FALSE;
  DECLARE v_room, v_member, v_host BIGINT DEFAULT NULL;
  DECLARE v_nickname VARCHAR(255) DEFAULT NULL;
  DECLARE v_created, v_modified DATETIME(6) DEFAULT NULL;
  DECLARE CONTINUE HANDLER FOR NOT FOUND BEGIN END;

  SET p_is_host = FALSE;
  SELECT pomodoro_room_id, member_id, created_date, last_modified_date, TRUE
    INTO v_room, v_member, v_created, v_modified, v_found
    FROM pomodoro_progress WHERE id = p_id LOCK IN SHARE MODE;
  IF v_found THEN
    SELECT nickname INTO v_nickname FROM member WHERE id = v_member LOCK IN SHARE MODE;
    SELECT id INTO v_host FROM pomodoro_progress
    WHERE pomodoro_room_id = v_room ORDER BY id LIMIT 1 LOCK IN SHARE MODE;
    SET p_is_host = (p_id <=> v_host);
    INSERT INTO participant (id, study_id, member_id, nickname, is_host,
                             created_date, last_modified_date)
    VALUES (p_id, v_room, v_member, v_nickname, p_is_host, v_created, v_modified)
    ON DUPLICATE KEY UPDATE study_id           = VALUES(study_id),
                            member_id          = VALUES(member_id),
                            nickname           = VALUES(nickname),
                            is_host            = VALUES(is_host),
                            created_date       = VALUES(created_date),
                            last_modified_date = VALUES(last_modified_date);
  ELSE
    DELETE FROM participant WHERE id = p_id;
  END IF;
END $$

-- The content row of one pomodoro_content row, written whole or deleted with it (backfill.sh and
-- repair.sh; the content triggers write NEW directly).
-- (The row is share-locked by the COUNT before the INSERT ... SELECT, which then never waits while
-- it holds the v2 table's AUTO-INC lock; see kit_backfill_contents_1.)
CREATE PROCEDURE IF NOT EXISTS kit_sync_content_1(IN p_id BIGINT)
  MODIFIES SQL DATA
BEGIN
  DECLARE v_found INT DEFAULT 0;
  SELECT COUNT(*) INTO v_found FROM pomodoro_content WHERE id = p_id LOCK IN SHARE MODE;
  IF v_found > 0 THEN
    INSERT INTO content (id, participant_id, cycle, plan, retrospect,
                         created_date, last_modified_date)
    SELECT id, pomodoro_progress_id, cycle, plan, retrospect, created_date, last_modified_date
    FROM pomodoro_content WHERE id = p_id
    LOCK IN SHARE MODE
    ON DUPLICATE KEY UPDATE participant_id     = VALUES(participant_id),
                            cycle              = VALUES(cycle),
                            plan               = VALUES(plan),
                            retrospect         = VALUES(retrospect),
                            created_date       = VALUES(created_date),
                            last_modified_date = VALUES(last_modified_date);
  ELSE
    DELETE FROM content WHERE id = p_id;
  END IF;
END $$

-- One backfill chunk per table (backfill.sh): every id in (p_lo, p_hi] on the v1 side or the v2
-- side is synced, so rows written before the full trigger set existed are repaired and v2 rows
-- whose v1 row was deleted meanwhile go. The ids are found with a plain read; each row is then
-- synced by the same routine the triggers call, with its locking reads.
CREATE PROCEDURE IF NOT EXISTS kit_backfill_rooms_1(IN p_lo BIGINT, IN p_hi BIGINT)
  MODIFIES SQL DATA
BEGIN
  DECLARE v_id BIGINT;
  DECLARE v_end BOOLEAN DEFAULT FALSE;
  DECLARE ids CURSOR FOR
    SELECT id FROM pomodoro_room WHERE id > p_lo AND id <= p_hi
    UNION SELECT id FROM study WHERE id > p_lo AND id <= p_hi
    UNION SELECT pomodoro_room_id FROM pomodoro_study_to_study
          WHERE pomodoro_room_id > p_lo AND pomodoro_room_id <= p_hi;
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_end = TRUE;
  OPEN ids;
  rooms: LOOP
    FETCH ids INTO v_id;
    IF v_end THEN LEAVE rooms; END IF;
    CALL kit_sync_room_1(v_id, TRUE);
  END LOOP;
  CLOSE ids;
END $$

CREATE PROCEDURE IF NOT EXISTS kit_backfill_participants_1(IN p_lo BIGINT, IN p_hi BIGINT)
  MODIFIES SQL DATA
BEGIN
  DECLARE v_id BIGINT;
  DECLARE v_is_host BOOLEAN;
  DECLARE v_end BOOLEAN DEFAULT FALSE;
  DECLARE ids CURSOR FOR
    SELECT id FROM pomodoro_progress WHERE id > p_lo AND id <= p_hi
    UNION SELECT id FROM participant WHERE id > p_lo AND id <= p_hi;
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_end = TRUE;
  OPEN ids;
  participants: LOOP
    FETCH ids INTO v_id;
    IF v_end THEN LEAVE participants; END IF;
    CALL kit_sync_participant_1(v_id, v_is_host);
  END LOOP;
  CLOSE ids;
END $$

-- Contents depend on their own row only: one INSERT ... SELECT for the chunk, then the v2 rows of
-- the range that have no v1 row. The chunk's v1 rows are share-locked first, by a plain locking
-- read: an INSERT ... SELECT holds the v2 table's AUTO-INC lock for as long as it runs
-- (innodb_autoinc_lock_mode 1, the default), and must not wait for a v1 row lock while it does,
-- or every v1 insert, whose trigger inserts into the same v2 table, would wait behind it.
CREATE PROCEDURE IF NOT EXISTS kit_backfill_contents_1(IN p_lo BIGINT, IN p_hi BIGINT)
  MODIFIES SQL DATA
BEGIN
  DECLARE v_id BIGINT;
  DECLARE v_rows INT;
  DECLARE v_end BOOLEAN DEFAULT FALSE;
  DECLARE gone CURSOR FOR
    SELECT x.id FROM content x LEFT JOIN pomodoro_content c ON c.id = x.id
    WHERE x.id > p_lo AND x.id <= p_hi AND c.id IS NULL;
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_end = TRUE;
  SELECT COUNT(*) INTO v_rows FROM pomodoro_content WHERE id > p_lo AND id <= p_hi LOCK IN SHARE MODE;
  INSERT INTO content (id, participant_id, cycle, plan, retrospect, created_date, last_modified_date)
  SELECT id, pomodoro_progress_id, cycle, plan, retrospect, created_date, last_modified_date
  FROM pomodoro_content WHERE id > p_lo AND id <= p_hi
  LOCK IN SHARE MODE
  ON DUPLICATE KEY UPDATE participant_id     = VALUES(participant_id),
                          cycle              = VALUES(cycle),
                          plan               = VALUES(plan),
                          retrospect         = VALUES(retrospect),
                          created_date       = VALUES(created_date),
                          last_modified_date = VALUES(last_modified_date);
  OPEN gone;
  stale: LOOP
    FETCH gone INTO v_id;
    IF v_end THEN LEAVE stale; END IF;
    CALL kit_sync_content_1(v_id);
  END LOOP;
  CLOSE gone;
END $$

-- pomodoro_room -> study, pomodoro_study_to_study ------------------------------------------------
-- Rooms are written rarely (created once, renamed now and then): the whole study row is synced.

CREATE OR REPLACE TRIGGER kit_pomodoro_room_ai AFTER INSERT ON pomodoro_room FOR EACH ROW
  CALL kit_sync_room_1(NEW.id, FALSE) $$

CREATE OR REPLACE TRIGGER kit_pomodoro_room_au AFTER UPDATE ON pomodoro_room FOR EACH ROW
BEGIN
  DECLARE v_study BIGINT DEFAULT NULL;
  DECLARE CONTINUE HANDLER FOR NOT FOUND BEGIN END;
  IF NEW.id = OLD.id THEN
    -- A rename: the study's room columns only. Its step and cycle are the host's business, and
    -- reading the host's progress here would lock it against the host's own writes.
    SELECT id INTO v_study FROM study WHERE id = NEW.id FOR UPDATE;
  END IF;
  IF v_study IS NOT NULL THEN
    UPDATE study SET participant_code_id = NEW.participant_code_id, name = NEW.name,
                     total_cycle = NEW.total_cycle, time_per_cycle = NEW.time_per_cycle,
                     created_date = NEW.created_date, last_modified_date = NEW.last_modified_date
    WHERE id = NEW.id;
  ELSE
    IF NEW.id <> OLD.id THEN
      CALL kit_sync_room_1(OLD.id, FALSE);
    END IF;
    CALL kit_sync_room_1(NEW.id, FALSE);
  END IF;
END $$

CREATE OR REPLACE TRIGGER kit_pomodoro_room_ad AFTER DELETE ON pomodoro_room FOR EACH ROW
  CALL kit_sync_room_1(OLD.id, FALSE) $$

-- pomodoro_progress -> participant, and the study when its host is involved ---------------------

CREATE OR REPLACE TRIGGER kit_pomodoro_progress_ai AFTER INSERT ON pomodoro_progress FOR EACH ROW
BEGIN
  DECLARE v_is_host BOOLEAN DEFAULT FALSE;
  CALL kit_sync_participant_1(NEW.id, v_is_host);
  -- The first member of a room becomes its host (and one inserted below the host, with an
  -- explicit id, takes over): the study takes this row's step and the host flag moves.
  IF v_is_host THEN
    CALL kit_sync_room_1(NEW.pomodoro_room_id, TRUE);
  END IF;
END $$

CREATE OR REPLACE TRIGGER kit_pomodoro_progress_au AFTER UPDATE ON pomodoro_progress FOR EACH ROW
BEGIN
  DECLARE v_is_host, v_was BOOLEAN DEFAULT FALSE;
  DECLARE v_flag BOOLEAN DEFAULT NULL;
  DECLARE v_study BIGINT DEFAULT NULL;
  DECLARE CONTINUE HANDLER FOR NOT FOUND BEGIN END;
  IF NEW.id = OLD.id AND NEW.pomodoro_room_id = OLD.pomodoro_room_id AND NEW.member_id = OLD.member_id THEN
    -- The common case, a member's progress moving: only the row's own dates change in v2, and
    -- the study's step and cycle only if this row is the host, from NEW itself. Whether it is,
    -- is the copy's host flag, read with a lock: every change of host rewrites the flags of the
    -- room's rows under their locks, so one in flight either waits for this row or has already
    -- set it. No other v1 row is locked: members' writes and the host's do not wait for each
    -- other, nor for a rename of the room.
    SELECT is_host INTO v_flag FROM participant WHERE id = NEW.id FOR UPDATE;
    IF v_flag THEN
      SELECT id INTO v_study FROM study WHERE id = NEW.pomodoro_room_id FOR UPDATE;
    END IF;
  END IF;
  IF v_flag IS NOT NULL AND (NOT v_flag OR v_study IS NOT NULL) THEN
    UPDATE participant SET created_date = NEW.created_date, last_modified_date = NEW.last_modified_date
    WHERE id = NEW.id;
    IF v_flag THEN
      UPDATE study SET current_cycle = NEW.current_cycle,
                       step = kit_study_step(NEW.id, NEW.is_done, NEW.pomodoro_status)
      WHERE id = NEW.pomodoro_room_id;
    END IF;
  ELSE
    IF NEW.id <> OLD.id THEN
      CALL kit_sync_participant_1(OLD.id, v_was);
    END IF;
    CALL kit_sync_participant_1(NEW.id, v_is_host);
    IF NEW.id <> OLD.id OR NEW.pomodoro_room_id <> OLD.pomodoro_room_id THEN
      -- Who hosts the old room and the new one may both have changed.
      CALL kit_sync_room_1(OLD.pomodoro_room_id, TRUE);
      CALL kit_sync_room_1(NEW.pomodoro_room_id, TRUE);
    ELSEIF v_is_host THEN
      -- The host's own progress moved: the study follows it. Other members' progress does not
      -- change the study (README.md, "One step per study").
      CALL kit_sync_room_1(NEW.pomodoro_room_id, FALSE);
    END IF;
  END IF;
END $$

CREATE OR REPLACE TRIGGER kit_pomodoro_progress_ad AFTER DELETE ON pomodoro_progress FOR EACH ROW
BEGIN
  DECLARE v_is_host BOOLEAN DEFAULT FALSE;
  DECLARE v_next BIGINT DEFAULT NULL;
  DECLARE CONTINUE HANDLER FOR NOT FOUND BEGIN END;
  CALL kit_sync_participant_1(OLD.id, v_is_host);
  -- The host left when no remaining row of the room is below it: the next member by id becomes
  -- the host and the study takes that member's step (or WAITING when the room is now empty).
  SELECT id INTO v_next FROM pomodoro_progress
  WHERE pomodoro_room_id = OLD.pomodoro_room_id ORDER BY id LIMIT 1 LOCK IN SHARE MODE;
  IF v_next IS NULL OR v_next > OLD.id THEN
    CALL kit_sync_room_1(OLD.pomodoro_room_id, TRUE);
  END IF;
END $$

-- member -> participant.nickname -----------------------------------------------------------------
-- Only the nickname is carried, to the participant rows that name the member. The foreign key
-- from pomodoro_progress means a member row is inserted before and deleted after every progress
-- row that names it, so the insert and delete triggers have nothing to do unless a session wrote
-- with foreign_key_checks = 0; they do nothing otherwise, because even an UPDATE that matches no
-- row takes a gap lock on participant's member index, and two members joining rooms at once
-- would then deadlock on it.

CREATE OR REPLACE TRIGGER kit_member_ai AFTER INSERT ON member FOR EACH ROW
BEGIN
  IF @@foreign_key_checks = 0 THEN
    UPDATE participant SET nickname = NEW.nickname WHERE member_id = NEW.id;
  END IF;
END $$

CREATE OR REPLACE TRIGGER kit_member_au AFTER UPDATE ON member FOR EACH ROW
BEGIN
  -- Bytes, not collation: 'alice' -> 'Alice', 'bob' -> 'bob ' and 'Jose' -> 'José' are changes.
  IF NOT (CAST(NEW.nickname AS BINARY) <=> CAST(OLD.nickname AS BINARY)) OR NEW.id <> OLD.id THEN
    UPDATE participant SET nickname = NEW.nickname WHERE member_id = NEW.id;
  END IF;
  IF NEW.id <> OLD.id THEN
    UPDATE participant SET nickname = NULL WHERE member_id = OLD.id;
  END IF;
END $$

CREATE OR REPLACE TRIGGER kit_member_ad AFTER DELETE ON member FOR EACH ROW
BEGIN
  IF @@foreign_key_checks = 0 THEN
    UPDATE participant SET nickname = NULL WHERE member_id = OLD.id;
  END IF;
END $$

-- pomodoro_content -> content ---------------------------------------------------------------------
-- A content row depends on its own v1 row only: NEW is written as it is.

CREATE OR REPLACE TRIGGER kit_pomodoro_content_ai AFTER INSERT ON pomodoro_content FOR EACH ROW
  INSERT INTO content (id, participant_id, cycle, plan, retrospect,
                       created_date, last_modified_date)
  VALUES (NEW.id, NEW.pomodoro_progress_id, NEW.cycle, NEW.plan, NEW.retrospect,
          NEW.created_date, NEW.last_modified_date)
  ON DUPLICATE KEY UPDATE participant_id     = VALUES(participant_id),
                          cycle              = VALUES(cycle),
                          plan               = VALUES(plan),
                          retrospect         = VALUES(retrospect),
                          created_date       = VALUES(created_date),
                          last_modified_date = VALUES(last_modified_date) $$

CREATE OR REPLACE TRIGGER kit_pomodoro_content_au AFTER UPDATE ON pomodoro_content FOR EACH ROW
BEGIN
  IF NEW.id <> OLD.id THEN
    DELETE FROM content WHERE id = OLD.id;
  END IF;
  INSERT INTO content (id, participant_id, cycle, plan, retrospect,
                       created_date, last_modified_date)
  VALUES (NEW.id, NEW.pomodoro_progress_id, NEW.cycle, NEW.plan, NEW.retrospect,
          NEW.created_date, NEW.last_modified_date)
  ON DUPLICATE KEY UPDATE participant_id     = VALUES(participant_id),
                          cycle              = VALUES(cycle),
                          plan               = VALUES(plan),
                          retrospect         = VALUES(retrospect),
                          created_date       = VALUES(created_date),
                          last_modified_date = VALUES(last_modified_date);
END $$

CREATE OR REPLACE TRIGGER kit_pomodoro_content_ad AFTER DELETE ON pomodoro_content FOR EACH ROW
  DELETE FROM content WHERE id = OLD.id $$

DELIMITER ;
