-- Reference v1 schema (the study-timer service before v2), InnoDB.
-- The kit reads these tables and never changes them; test.sh loads this file into a scratch
-- database. Foreign keys have no ON DELETE CASCADE: a cascaded delete does not fire triggers, so
-- the v1 application deletes children before parents (as it does through JPA).

CREATE TABLE member (
  id                 BIGINT       NOT NULL AUTO_INCREMENT,
  nickname           VARCHAR(255) NOT NULL,
  created_date       DATETIME(6)  NOT NULL,
  last_modified_date DATETIME(6)  NOT NULL,
  PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE participant_code (
  id                 BIGINT       NOT NULL AUTO_INCREMENT,
  code               VARCHAR(255) NOT NULL,
  created_date       DATETIME(6)  NOT NULL,
  last_modified_date DATETIME(6)  NOT NULL,
  PRIMARY KEY (id),
  UNIQUE KEY uk_participant_code_code (code)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE pomodoro_room (
  id                  BIGINT       NOT NULL AUTO_INCREMENT,
  participant_code_id BIGINT       NOT NULL,
  name                VARCHAR(255) NOT NULL,
  total_cycle         INT          NOT NULL,
  time_per_cycle      INT          NOT NULL,
  created_date        DATETIME(6)  NOT NULL,
  last_modified_date  DATETIME(6)  NOT NULL,
  PRIMARY KEY (id),
  KEY fk_pomodoro_room_participant_code (participant_code_id),
  CONSTRAINT fk_pomodoro_room_participant_code
    FOREIGN KEY (participant_code_id) REFERENCES participant_code (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE pomodoro_progress (
  id                 BIGINT      NOT NULL AUTO_INCREMENT,
  pomodoro_room_id   BIGINT      NOT NULL,
  member_id          BIGINT      NOT NULL,
  is_done            BIT(1)      NOT NULL,
  current_cycle      INT         NOT NULL,
  pomodoro_status    ENUM('PLANNING', 'RETROSPECT', 'STUDYING') NOT NULL,
  created_date       DATETIME(6) NOT NULL,
  last_modified_date DATETIME(6) NOT NULL,
  PRIMARY KEY (id),
  KEY fk_pomodoro_progress_room (pomodoro_room_id),
  KEY fk_pomodoro_progress_member (member_id),
  CONSTRAINT fk_pomodoro_progress_room FOREIGN KEY (pomodoro_room_id) REFERENCES pomodoro_room (id),
  CONSTRAINT fk_pomodoro_progress_member FOREIGN KEY (member_id) REFERENCES member (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE pomodoro_content (
  id                   BIGINT      NOT NULL AUTO_INCREMENT,
  pomodoro_progress_id BIGINT      NOT NULL,
  cycle                INT         NOT NULL,
  plan                 TEXT        NULL,
  retrospect           TEXT        NULL,
  created_date         DATETIME(6) NOT NULL,
  last_modified_date   DATETIME(6) NOT NULL,
  PRIMARY KEY (id),
  KEY fk_pomodoro_content_progress (pomodoro_progress_id),
  CONSTRAINT fk_pomodoro_content_progress
    FOREIGN KEY (pomodoro_progress_id) REFERENCES pomodoro_progress (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
