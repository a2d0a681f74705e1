-- Upsert triggers that keep the v2 tables equal to the kit_v1_* views (mapping.sql) while v1 keeps
-- writing. Step 3 of the kit: load after v2_schema.sql and mapping.sql, before backfill.sh.
--   mariadb -D app < deploy/mysql/triggers.sql
-- Safe to re-run (DROP ... IF EXISTS first).
--
-- Rules every trigger here follows (README.md, "Triggers"):
--   * Each v2 row has one owning v1 row (study <- pomodoro_room, participant <- pomodoro_progress,
--     content <- pomodoro_content). Writes are INSERT ... ON DUPLICATE KEY UPDATE on the v2
--     primary key: a v2 row that is missing (not backfilled yet) is created from the current v1
--     rows, and one that exists is updated. Nothing fails on a duplicate, nothing is skipped.
--   * ON DUPLICATE KEY UPDATE sets only the columns the firing v1 table feeds, so a trigger on
--     one table never writes back stale values of columns another table owns.
--   * Values from other v1 rows (the host's progress, a member's nickname) are read with
--     LOCK IN SHARE MODE: a concurrent change to them waits or is waited for, so the last
--     committed writer of every v2 column computed it from committed v1 data.
--   * Deletes are mirrored by primary key.
-- A trigger runs inside the v1 statement's transaction: the v1 write and its v2 copy commit or
-- roll back together.

-- CREATE/DROP TRIGGER need an exclusive metadata lock on the v1 table. Queued behind a long
-- transaction, that request would block every new query on the table; give up after 10 s instead
-- and re-run this file.
SET SESSION lock_wait_timeout = 10;

DELIMITER $$

-- Re-fold one study from its room's current host (mapping.sql: kit_v1_study) and, with
-- p_flags, move participant.is_host to the current host. Called when the host's progress changes
-- or when the host itself changes (first member joins, host leaves, a row changes rooms).
DROP PROCEDURE IF EXISTS kit_refold_study $$
CREATE PROCEDURE kit_refold_study(IN p_room_id BIGINT, IN p_flags BOOLEAN)
  MODIFIES SQL DATA
BEGIN
  DECLARE v_host BIGINT DEFAULT NULL;
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_host = NULL;

  INSERT INTO study (id, participant_code_id, name, total_cycle, time_per_cycle,
                     current_cycle, step, created_date, last_modified_date)
  SELECT s.id, s.participant_code_id, s.name, s.total_cycle, s.time_per_cycle,
         s.current_cycle, s.step, s.created_date, s.last_modified_date
  FROM kit_v1_study s
  WHERE s.id = p_room_id
  LOCK IN SHARE MODE
  ON DUPLICATE KEY UPDATE current_cycle = VALUES(current_cycle),
                          step          = VALUES(step);

  IF p_flags THEN
    SELECT id INTO v_host FROM pomodoro_progress
    WHERE pomodoro_room_id = p_room_id
    ORDER BY id LIMIT 1
    LOCK IN SHARE MODE;

    UPDATE participant SET is_host = (id <=> v_host)
    WHERE study_id = p_room_id AND is_host <> (id <=> v_host);
  END IF;
END $$

-- Upsert the participant copy of one pomodoro_progress row. Its own columns come from the row
-- (p_* = NEW.*); nickname and is_host come from the current v1 rows through kit_v1_participant.
-- Returns whether the row is its room's host.
DROP PROCEDURE IF EXISTS kit_upsert_participant $$
CREATE PROCEDURE kit_upsert_participant(IN p_id BIGINT, IN p_room_id BIGINT, IN p_member_id BIGINT,
                                        IN p_created DATETIME(6), IN p_modified DATETIME(6),
                                        OUT p_is_host BOOLEAN)
  MODIFIES SQL DATA
BEGIN
  DECLARE v_nickname VARCHAR(255) DEFAULT NULL;
  DECLARE v_is_host BOOLEAN DEFAULT FALSE;
  DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_nickname = NULL;

  SELECT nickname, is_host INTO v_nickname, v_is_host
  FROM kit_v1_participant
  WHERE id = p_id
  LOCK IN SHARE MODE;

  INSERT INTO participant (id, study_id, member_id, nickname, is_host,
                           created_date, last_modified_date)
  VALUES (p_id, p_room_id, p_member_id, v_nickname, v_is_host, p_created, p_modified)
  ON DUPLICATE KEY UPDATE study_id           = VALUES(study_id),
                          member_id          = VALUES(member_id),
                          nickname           = VALUES(nickname),
                          is_host            = VALUES(is_host),
                          created_date       = VALUES(created_date),
                          last_modified_date = VALUES(last_modified_date);
  SET p_is_host = v_is_host;
END $$

-- pomodoro_room -> study (room columns) and pomodoro_study_to_study ------------------------------

DROP TRIGGER IF EXISTS kit_pomodoro_room_ai $$
CREATE TRIGGER kit_pomodoro_room_ai AFTER INSERT ON pomodoro_room FOR EACH ROW
BEGIN
  -- current_cycle and step are folded from the host's progress; a new room has none yet, but
  -- reading them through the view keeps one definition.
  INSERT INTO study (id, participant_code_id, name, total_cycle, time_per_cycle,
                     current_cycle, step, created_date, last_modified_date)
  SELECT NEW.id, NEW.participant_code_id, NEW.name, NEW.total_cycle, NEW.time_per_cycle,
         s.current_cycle, s.step, NEW.created_date, NEW.last_modified_date
  FROM kit_v1_study s
  WHERE s.id = NEW.id
  LOCK IN SHARE MODE
  ON DUPLICATE KEY UPDATE participant_code_id = VALUES(participant_code_id),
                          name                = VALUES(name),
                          total_cycle         = VALUES(total_cycle),
                          time_per_cycle      = VALUES(time_per_cycle),
                          created_date        = VALUES(created_date),
                          last_modified_date  = VALUES(last_modified_date);
  INSERT INTO pomodoro_study_to_study (pomodoro_room_id, study_id)
  VALUES (NEW.id, NEW.id)
  ON DUPLICATE KEY UPDATE study_id = VALUES(study_id);
END $$

DROP TRIGGER IF EXISTS kit_pomodoro_room_au $$
CREATE TRIGGER kit_pomodoro_room_au AFTER UPDATE ON pomodoro_room FOR EACH ROW
BEGIN
  IF NEW.id <> OLD.id THEN
    DELETE FROM study WHERE id = OLD.id;
    DELETE FROM pomodoro_study_to_study WHERE pomodoro_room_id = OLD.id;
  END IF;
  INSERT INTO study (id, participant_code_id, name, total_cycle, time_per_cycle,
                     current_cycle, step, created_date, last_modified_date)
  SELECT NEW.id, NEW.participant_code_id, NEW.name, NEW.total_cycle, NEW.time_per_cycle,
         s.current_cycle, s.step, NEW.created_date, NEW.last_modified_date
  FROM kit_v1_study s
  WHERE s.id = NEW.id
  LOCK IN SHARE MODE
  ON DUPLICATE KEY UPDATE participant_code_id = VALUES(participant_code_id),
                          name                = VALUES(name),
                          total_cycle         = VALUES(total_cycle),
                          time_per_cycle      = VALUES(time_per_cycle),
                          created_date        = VALUES(created_date),
                          last_modified_date  = VALUES(last_modified_date);
  INSERT INTO pomodoro_study_to_study (pomodoro_room_id, study_id)
  VALUES (NEW.id, NEW.id)
  ON DUPLICATE KEY UPDATE study_id = VALUES(study_id);
END $$

DROP TRIGGER IF EXISTS kit_pomodoro_room_ad $$
CREATE TRIGGER kit_pomodoro_room_ad AFTER DELETE ON pomodoro_room FOR EACH ROW
BEGIN
  DELETE FROM study WHERE id = OLD.id;
  DELETE FROM pomodoro_study_to_study WHERE pomodoro_room_id = OLD.id;
END $$

-- pomodoro_progress -> participant, and study.current_cycle/step when the host is involved -------

DROP TRIGGER IF EXISTS kit_pomodoro_progress_ai $$
CREATE TRIGGER kit_pomodoro_progress_ai AFTER INSERT ON pomodoro_progress FOR EACH ROW
BEGIN
  DECLARE v_is_host BOOLEAN DEFAULT FALSE;
  CALL kit_upsert_participant(NEW.id, NEW.pomodoro_room_id, NEW.member_id,
                              NEW.created_date, NEW.last_modified_date, v_is_host);
  -- The first member of a room becomes its host: the study takes this row's step, and a row
  -- inserted below an existing host (explicit id) takes the host flag from it.
  IF v_is_host THEN
    CALL kit_refold_study(NEW.pomodoro_room_id, TRUE);
  END IF;
END $$

DROP TRIGGER IF EXISTS kit_pomodoro_progress_au $$
CREATE TRIGGER kit_pomodoro_progress_au AFTER UPDATE ON pomodoro_progress FOR EACH ROW
BEGIN
  DECLARE v_is_host BOOLEAN DEFAULT FALSE;
  IF NEW.id <> OLD.id THEN
    DELETE FROM participant WHERE id = OLD.id;
  END IF;
  CALL kit_upsert_participant(NEW.id, NEW.pomodoro_room_id, NEW.member_id,
                              NEW.created_date, NEW.last_modified_date, v_is_host);
  IF NEW.id <> OLD.id OR NEW.pomodoro_room_id <> OLD.pomodoro_room_id THEN
    -- Who hosts the old room and the new one may both have changed.
    CALL kit_refold_study(OLD.pomodoro_room_id, TRUE);
    CALL kit_refold_study(NEW.pomodoro_room_id, TRUE);
  ELSEIF v_is_host THEN
    -- The host's own progress moved: the study follows it. Other members' progress does not
    -- change the study (README.md, "One step per study").
    CALL kit_refold_study(NEW.pomodoro_room_id, FALSE);
  END IF;
END $$

DROP TRIGGER IF EXISTS kit_pomodoro_progress_ad $$
CREATE TRIGGER kit_pomodoro_progress_ad AFTER DELETE ON pomodoro_progress FOR EACH ROW
BEGIN
  DELETE FROM participant WHERE id = OLD.id;
  -- The host left when no remaining row of the room is below it: the next member by id becomes
  -- the host and the study takes that member's step (or WAITING when the room is now empty).
  IF NOT EXISTS (SELECT 1 FROM pomodoro_progress
                 WHERE pomodoro_room_id = OLD.pomodoro_room_id AND id < OLD.id
                 LOCK IN SHARE MODE) THEN
    CALL kit_refold_study(OLD.pomodoro_room_id, TRUE);
  END IF;
END $$

-- member -> participant.nickname ------------------------------------------------------------------
-- The foreign key from pomodoro_progress means a member row is normally inserted before and
-- deleted after every progress row that names it; the insert and delete triggers only matter for
-- writes made with foreign_key_checks = 0, and then keep the copies equal to the view.

DROP TRIGGER IF EXISTS kit_member_ai $$
CREATE TRIGGER kit_member_ai AFTER INSERT ON member FOR EACH ROW
BEGIN
  INSERT INTO participant (id, study_id, member_id, nickname, is_host,
                           created_date, last_modified_date)
  SELECT v.id, v.study_id, v.member_id, v.nickname, v.is_host,
         v.created_date, v.last_modified_date
  FROM kit_v1_participant v
  WHERE v.member_id = NEW.id
  LOCK IN SHARE MODE
  ON DUPLICATE KEY UPDATE nickname = VALUES(nickname);
END $$

DROP TRIGGER IF EXISTS kit_member_au $$
CREATE TRIGGER kit_member_au AFTER UPDATE ON member FOR EACH ROW
BEGIN
  IF NOT (NEW.nickname <=> OLD.nickname) OR NEW.id <> OLD.id THEN
    INSERT INTO participant (id, study_id, member_id, nickname, is_host,
                             created_date, last_modified_date)
    SELECT v.id, v.study_id, v.member_id, v.nickname, v.is_host,
           v.created_date, v.last_modified_date
    FROM kit_v1_participant v
    WHERE v.member_id IN (NEW.id, OLD.id)
    LOCK IN SHARE MODE
    ON DUPLICATE KEY UPDATE nickname = VALUES(nickname);
  END IF;
END $$

DROP TRIGGER IF EXISTS kit_member_ad $$
CREATE TRIGGER kit_member_ad AFTER DELETE ON member FOR EACH ROW
BEGIN
  INSERT INTO participant (id, study_id, member_id, nickname, is_host,
                           created_date, last_modified_date)
  SELECT v.id, v.study_id, v.member_id, v.nickname, v.is_host,
         v.created_date, v.last_modified_date
  FROM kit_v1_participant v
  WHERE v.member_id = OLD.id
  LOCK IN SHARE MODE
  ON DUPLICATE KEY UPDATE nickname = VALUES(nickname);
END $$

-- pomodoro_content -> content -------------------------------------------------------------------

DROP TRIGGER IF EXISTS kit_pomodoro_content_ai $$
CREATE TRIGGER kit_pomodoro_content_ai AFTER INSERT ON pomodoro_content FOR EACH ROW
BEGIN
  INSERT INTO content (id, participant_id, cycle, plan, retrospect,
                       created_date, last_modified_date)
  VALUES (NEW.id, NEW.pomodoro_progress_id, NEW.cycle, NEW.plan, NEW.retrospect,
          NEW.created_date, NEW.last_modified_date)
  ON DUPLICATE KEY UPDATE participant_id     = NEW.pomodoro_progress_id,
                          cycle              = NEW.cycle,
                          plan               = NEW.plan,
                          retrospect         = NEW.retrospect,
                          created_date       = NEW.created_date,
                          last_modified_date = NEW.last_modified_date;
END $$

DROP TRIGGER IF EXISTS kit_pomodoro_content_au $$
CREATE TRIGGER kit_pomodoro_content_au AFTER UPDATE ON pomodoro_content FOR EACH ROW
BEGIN
  IF NEW.id <> OLD.id THEN
    DELETE FROM content WHERE id = OLD.id;
  END IF;
  INSERT INTO content (id, participant_id, cycle, plan, retrospect,
                       created_date, last_modified_date)
  VALUES (NEW.id, NEW.pomodoro_progress_id, NEW.cycle, NEW.plan, NEW.retrospect,
          NEW.created_date, NEW.last_modified_date)
  ON DUPLICATE KEY UPDATE participant_id     = NEW.pomodoro_progress_id,
                          cycle              = NEW.cycle,
                          plan               = NEW.plan,
                          retrospect         = NEW.retrospect,
                          created_date       = NEW.created_date,
                          last_modified_date = NEW.last_modified_date;
END $$

DROP TRIGGER IF EXISTS kit_pomodoro_content_ad $$
CREATE TRIGGER kit_pomodoro_content_ad AFTER DELETE ON pomodoro_content FOR EACH ROW
BEGIN
  DELETE FROM content WHERE id = OLD.id;
END $$

DELIMITER ;
