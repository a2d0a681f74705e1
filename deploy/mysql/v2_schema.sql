-- v2 tables, the v1 -> v2 mapping table and the backfill cursor. Step 1 of the kit: load this
-- before mapping.sql and triggers.sql (see README.md). Safe to re-run: every statement is
-- IF NOT EXISTS.
--
-- Ids: a v2 row that comes from v1 keeps its v1 id (study.id = pomodoro_room.id,
-- participant.id = pomodoro_progress.id, content.id = pomodoro_content.id), so a trigger, the
-- backfill and a re-run all upsert the same primary key and can never create a second copy.
-- Rows that v2 creates itself take ids from AUTO_INCREMENT, which starts at 10^12, far above any
-- v1 id: ids below 10^12 are v1 copies (verify.sql counts a stale row only there).
--
-- No foreign keys during the rollout: a v2 constraint that fails inside a trigger would fail the
-- v1 write. Add them at cutover, after the verification gate (README.md, "Cutover").
-- Every v2 column fed by v1 accepts at least what its v1 source accepts (NULL, length, labels).

CREATE TABLE IF NOT EXISTS study (
  id                  BIGINT       NOT NULL AUTO_INCREMENT,
  participant_code_id BIGINT       NOT NULL,
  name                VARCHAR(255) NOT NULL,
  total_cycle         INT          NOT NULL,
  time_per_cycle      INT          NOT NULL,
  -- Folded from the host's pomodoro_progress (README.md, "One step per study").
  current_cycle       INT          NOT NULL DEFAULT 1,
  step                ENUM('WAITING', 'PLANNING', 'STUDYING', 'RETROSPECT', 'COMPLETED')
                                   NOT NULL DEFAULT 'WAITING',
  created_date        DATETIME(6)  NOT NULL,
  last_modified_date  DATETIME(6)  NOT NULL,
  PRIMARY KEY (id),
  KEY idx_study_participant_code (participant_code_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 AUTO_INCREMENT = 1000000000000;

CREATE TABLE IF NOT EXISTS participant (
  id                 BIGINT       NOT NULL AUTO_INCREMENT,
  study_id           BIGINT       NOT NULL,
  member_id          BIGINT       NOT NULL,
  nickname           VARCHAR(255) NULL,
  is_host            BOOLEAN      NOT NULL DEFAULT FALSE,
  created_date       DATETIME(6)  NOT NULL,
  last_modified_date DATETIME(6)  NOT NULL,
  PRIMARY KEY (id),
  KEY idx_participant_study (study_id),
  KEY idx_participant_member (member_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 AUTO_INCREMENT = 1000000000000;

CREATE TABLE IF NOT EXISTS content (
  id                 BIGINT      NOT NULL AUTO_INCREMENT,
  participant_id     BIGINT      NOT NULL,
  cycle              INT         NOT NULL,
  plan               TEXT        NULL,
  retrospect         TEXT        NULL,
  created_date       DATETIME(6) NOT NULL,
  last_modified_date DATETIME(6) NOT NULL,
  PRIMARY KEY (id),
  KEY idx_content_participant (participant_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 AUTO_INCREMENT = 1000000000000;

-- Which v2 study a v1 room became. v2 resolves legacy room ids (old links, v1 clients moved over
-- at cutover) through it. Both keys are unique, so an upsert of the same pair is a no-op and a
-- second mapping for a room cannot exist.
CREATE TABLE IF NOT EXISTS pomodoro_study_to_study (
  pomodoro_room_id BIGINT NOT NULL,
  study_id         BIGINT NOT NULL,
  PRIMARY KEY (pomodoro_room_id),
  UNIQUE KEY uk_pomodoro_study_to_study_study (study_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per v2 table the backfill fills. Advanced in the same transaction as each chunk, so a
-- killed backfill resumes after the last committed chunk.
CREATE TABLE IF NOT EXISTS kit_backfill_cursor (
  table_name  VARCHAR(64) NOT NULL,
  last_id     BIGINT      NOT NULL DEFAULT 0,   -- every source id <= last_id is done
  max_id      BIGINT      NOT NULL DEFAULT 0,   -- highest source id when this table started;
                                                -- rows above it were written under the triggers
  rows_total  BIGINT      NOT NULL DEFAULT 0,   -- source rows when this table started
  rows_done   BIGINT      NOT NULL DEFAULT 0,   -- source rows walked so far
  rows_copied BIGINT      NOT NULL DEFAULT 0,   -- v2 rows the backfill inserted (not already there)
  chunks      BIGINT      NOT NULL DEFAULT 0,
  started_at  DATETIME(6) NULL,
  updated_at  DATETIME(6) NULL,
  finished_at DATETIME(6) NULL,
  PRIMARY KEY (table_name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
