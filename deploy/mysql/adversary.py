#!/usr/bin/python3
r"""Adversarial writer, independent comparison and difference planter for the database kit.

Requires Python 3 and PyMySQL, nothing else. On Debian/Ubuntu:
    apt-get install -y python3-pymysql
    /usr/bin/python3 deploy/mysql/adversary.py SUBCOMMAND --socket PATH --user root \
        --database NAME [options]        (--help after SUBCOMMAND lists them)
(/usr/bin/python3 is the interpreter apt installs PyMySQL for; a virtualenv python may not see it.)

Subcommands (README.md "The mapping" is the rule they test; SPEC §9, issue 14):
  write --writers N --seconds S --seed X [--stop-file F] [--isolation mixed|rc|rr] [--chase]
      N concurrent v1 writers, each with its own connection (mixed: half READ COMMITTED, half
      REPEATABLE READ), run a weighted mix of realistic v1 transactions for S seconds or until F
      exists: short ones, case/space/accent-only edits, deletes, explicit ROLLBACKs, long
      read-then-write ones; --chase adds writes just above the backfill cursors. Errors are
      counted per code and not retried. JSON: attempted, committed, rolled_back, failed per
      code, committed_per_second, failure_rate, by_kind.
  compare
      Reads every v1 and v2 row in one consistent snapshot as raw bytes, computes in Python what
      each v2 row below 10^12 must be, and reports per table missing (v1 row, no v2 row), extra
      (v2 row, no v1 row) and different rows, with up to 5 example ids and the differing
      columns. Uses none of the kit's views, functions or checksums. Exit 0 when nothing
      differs, 1 otherwise.
  plant --kind missing|extra|changed-byte|case-only|trailing-space|stale-host|two-cancelling
        [--seed X] [--table T]
      Plants exactly one difference in the v2 tables (two rows for two-cancelling) and prints
      the table and ids.
  bench --writers N --seconds S --phase before|after [--seed X] [--results FILE]
      `write` with a fixed mix (no long transactions, no chasing) on freshly seeded data, with no
      triggers on the v1 tables (before) or the kit's (after; checked). The caller seeds and
      installs; with the same FILE for both runs, the after run also reports the ratio.

Connection: --socket PATH, or --host HOST [--port PORT]; --user (default root); the password, if
any, from the MYSQL_PWD environment variable. Progress goes to stderr; every subcommand ends its
stdout with one JSON line. Exit status 2 means it could not run.
"""

import argparse
import collections
import json
import os
import random
import sys
import threading
import time

import pymysql

# v2 rows with ids at or above this are v2's own (v2_schema.sql AUTO_INCREMENT), not copies.
FLOOR = 10 ** 12

V1_TABLES = ("member", "participant_code", "pomodoro_room", "pomodoro_progress", "pomodoro_content")

# v2 table -> (key column, value columns in the order compare builds them)
V2_TABLES = {
    "study": ("id", ("participant_code_id", "name", "total_cycle", "time_per_cycle",
                     "current_cycle", "step", "created_date", "last_modified_date")),
    "pomodoro_study_to_study": ("pomodoro_room_id", ("study_id",)),
    "participant": ("id", ("study_id", "member_id", "nickname", "is_host",
                           "created_date", "last_modified_date")),
    "content": ("id", ("participant_id", "cycle", "plan", "retrospect",
                       "created_date", "last_modified_date")),
}
V1_SOURCE = {"study": "pomodoro_room", "pomodoro_study_to_study": "pomodoro_room",
             "participant": "pomodoro_progress", "content": "pomodoro_content"}
# The text column `plant` edits in each table that has one.
TEXT_COLUMN = {"study": "name", "participant": "nickname", "content": "plan"}

# Result values as the server sent them: a str/bytes encoder table with no decoders, so text,
# datetimes (with their 6 fractional digits), enum labels and numbers all arrive as bytes.
RAW_CONVERSIONS = {k: v for k, v in pymysql.converters.conversions.items()
                   if not isinstance(k, int)}


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def emit(summary):
    print(json.dumps(summary, sort_keys=True), flush=True)


def connect(args, raw=False, autocommit=True):
    options = dict(user=args.user, password=os.environ.get("MYSQL_PWD", ""),
                   database=args.database, charset="utf8mb4", autocommit=autocommit)
    if args.socket:
        options["unix_socket"] = args.socket
    else:
        options.update(host=args.host, port=args.port)
    if raw:
        options.update(use_unicode=False, conv=RAW_CONVERSIONS)
    return pymysql.connect(**options)


class Failure(Exception):
    """Could not run: reported on stderr, exit status 2."""


def error_code(exc):
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0


def first_cased(text):
    """Index of the first character whose case can flip without changing length, or None."""
    return next((i for i, ch in enumerate(text) if len(ch.swapcase()) == 1 and ch.swapcase() != ch),
                None)


# ------------------------------------------------------------------------------------------------
# write: concurrent v1 writers
# ------------------------------------------------------------------------------------------------

LOCK_WAIT_TIMEOUT = 5          # seconds; a writer blocked longer counts a 1205 instead of stalling
# Half of the room picks go to a few busy rooms, and which rooms are busy moves on every
# HOT_PERIOD seconds, as studies start and end. Busy rooms make the races (a host leaving while
# another member writes); quiet ones afterwards keep what a race left wrong visible to compare,
# instead of the next host change in the room rewriting it.
HOT_ROOMS = 10
HOT_SHARE = 0.5
HOT_PERIOD = 2.0
ROLLBACK = "rollback"          # returned by a transaction body that must be rolled back on purpose
NAMES = ("alice", "bob", "Jose", "José", "carol", "david", "Zoë", "eve")
STATUSES = ("PLANNING", "RETROSPECT", "STUDYING")
ACCENTS = {"a": "á", "e": "é", "i": "í", "o": "ó", "u": "ú"}
ACCENTS.update({v: k for k, v in ACCENTS.items()})

# (kind, weight). Joins and new rooms outweigh leaves and room deletes so rooms keep members.
# A long read-then-write transaction sleeps 0.5-2 s: at 1 % they already take most of a writer's
# time (about 300 committed/s with 6 writers, against 2000/s without them) and a 20 s run has
# about a hundred of them. More would slow down the host changes they need to race with.
MIX = (
    ("new_room", 4), ("join", 10), ("host_progress", 12), ("any_progress", 12),
    ("new_content", 8), ("edit_content", 6), ("rename_room", 3), ("subtle_edit", 8),
    ("leave", 5), ("host_leave", 4), ("delete_content", 4), ("delete_room", 1),
    ("rollback", 4), ("long_read_then_write", 1),
)
CHASE_WEIGHT = 10
# bench leaves out the long transactions: a writer asleep in one is not writing, so they would
# hide the triggers' cost. They hold no locks while asleep, so they add no contention either.
BENCH_MIX = tuple((kind, weight) for kind, weight in MIX if kind != "long_read_then_write")
# kit_backfill_cursor.table_name -> the v1 table it walks (v2 names today; v1 names accepted too).
CURSOR_SOURCE = dict(V1_SOURCE, **{t: t for t in V1_TABLES})


def subtle_variant(value, rng):
    """The same text to a case- and accent-insensitive, PAD SPACE collation, different as bytes:
    alice -> Alice, bob -> 'bob ', Jose -> José (and back). None/'' swap for nullable columns."""
    if value is None:
        return ""
    if value == "":
        return None
    choices = ["space"]
    if first_cased(value) is not None:
        choices.append("case")
    if any(ch in ACCENTS for ch in value):
        choices.append("accent")
    choice = rng.choice(choices)
    if choice == "space":
        return value[:-1] if value.endswith(" ") else value + " "
    if choice == "case":
        i = first_cased(value)
        return value[:i] + value[i].swapcase() + value[i + 1:]
    i = max(i for i, ch in enumerate(value) if ch in ACCENTS)
    return value[:i] + ACCENTS[value[i]] + value[i + 1:]


class Writer(threading.Thread):
    """One v1 writer: its own connection and isolation level, a seeded choice of transactions."""

    def __init__(self, args, index, isolation, mix, stop):
        super().__init__(name=f"writer-{index}", daemon=True)
        self.args, self.isolation, self.stop = args, isolation, stop
        self.rng = random.Random(f"{args.seed}-{index}")
        self.kinds = [kind for kind, _ in mix]
        self.weights = [weight for _, weight in mix]
        self.attempted = self.committed = self.rolled_back = 0
        self.failed = collections.Counter()          # error code -> count
        self.error_examples = {}                     # error code -> first message
        self.by_kind = collections.defaultdict(lambda: [0, 0, 0])  # attempted, committed, failed
        self.crash = None
        self.conn = None
        self.started = time.monotonic()         # the clock the busy rooms move on

    def open(self):
        self.conn = connect(self.args)
        with self.conn.cursor() as c:
            c.execute(f"SET SESSION TRANSACTION ISOLATION LEVEL {self.isolation}")
            c.execute(f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT}")

    def run(self):
        try:
            self.open()
            while not self.stop.is_set():
                kind = self.rng.choices(self.kinds, self.weights)[0]
                self.transaction(kind, getattr(self, "tx_" + kind))
            self.conn.close()
        except Exception as exc:  # reported by the main thread; a silent dead writer would lie
            self.crash = exc

    def transaction(self, kind, body):
        stats = self.by_kind[kind]
        self.attempted += 1
        stats[0] += 1
        try:
            with self.conn.cursor() as c:
                c.execute("START TRANSACTION")
                if body(c) == ROLLBACK:
                    c.execute("ROLLBACK")
                    self.rolled_back += 1
                else:
                    c.execute("COMMIT")
                    self.committed += 1
                    stats[1] += 1
        except pymysql.MySQLError as exc:
            code = error_code(exc)
            self.failed[code] += 1
            self.error_examples.setdefault(code, str(exc))
            stats[2] += 1
            # Not retried: the point is to see how many v1 transactions fail.
            try:
                self.conn.rollback()
            except pymysql.MySQLError:      # the connection is gone: a new one
                self.open()

    # -- picking rows (non-locking reads, like the application's) --------------------------------

    def pick(self, c, table, hot=False):
        c.execute(f"SELECT MIN(id), MAX(id) FROM {table}")
        lo, hi = c.fetchone()
        if lo is None:
            return None
        if hot:
            period = int((time.monotonic() - self.started) / HOT_PERIOD)
            lo += period * HOT_ROOMS % (hi - lo + 1)
            hi = min(hi, lo + HOT_ROOMS - 1)
        c.execute(f"SELECT id FROM {table} WHERE id >= %s ORDER BY id LIMIT 1",
                  (self.rng.randint(lo, hi),))
        row = c.fetchone()
        return row[0] if row else lo

    def pick_room(self, c, hot=None):
        if hot is None:
            hot = self.rng.random() < HOT_SHARE
        return self.pick(c, "pomodoro_room", hot)

    def nickname(self):
        name = self.rng.choice(NAMES)
        return name if self.rng.random() < 0.3 else f"{name} {self.rng.randrange(10 ** 6)}"

    # -- statements shared by several transactions -----------------------------------------------

    def add_member(self, c, room):
        c.execute("INSERT INTO member (nickname, created_date, last_modified_date)"
                  " VALUES (%s, NOW(6), NOW(6))", (self.nickname(),))
        c.execute("INSERT INTO pomodoro_progress (pomodoro_room_id, member_id, is_done,"
                  " current_cycle, pomodoro_status, created_date, last_modified_date)"
                  " VALUES (%s, %s, b'0', 1, 'PLANNING', NOW(6), NOW(6))", (room, c.lastrowid))

    def move_progress(self, c, where, params):
        c.execute("UPDATE pomodoro_progress SET pomodoro_status = %s,"
                  " current_cycle = current_cycle + 1, is_done = IF(%s, b'1', b'0'),"
                  " last_modified_date = NOW(6) WHERE " + where,
                  (self.rng.choice(STATUSES), self.rng.random() < 0.15) + params)

    def remove_progress(self, c, progress):
        c.execute("DELETE FROM pomodoro_content WHERE pomodoro_progress_id = %s", (progress,))
        c.execute("DELETE FROM pomodoro_progress WHERE id = %s", (progress,))

    def remove_room(self, c, room):
        c.execute("DELETE c FROM pomodoro_content c JOIN pomodoro_progress p"
                  " ON p.id = c.pomodoro_progress_id WHERE p.pomodoro_room_id = %s", (room,))
        c.execute("DELETE FROM pomodoro_progress WHERE pomodoro_room_id = %s", (room,))
        c.execute("DELETE FROM pomodoro_room WHERE id = %s", (room,))

    def rename_room(self, c, room):
        c.execute("UPDATE pomodoro_room SET name = %s, total_cycle = %s,"
                  " last_modified_date = NOW(6) WHERE id = %s",
                  (f"room {self.rng.choice(NAMES)} {self.rng.randrange(10 ** 6)}",
                   self.rng.randint(1, 8), room))

    def edit_content(self, c, content):
        c.execute("UPDATE pomodoro_content SET retrospect = %s, plan = IF(%s, '', plan),"
                  " last_modified_date = NOW(6) WHERE id = %s",
                  (None if self.rng.random() < 0.3 else f"retro | {self.rng.randrange(10 ** 9)}",
                   self.rng.random() < 0.2, content))

    def subtle_edit(self, c, table, column, row_id):
        """Reads one text value and writes back a variant equal to it under the collation."""
        c.execute(f"SELECT {column} FROM {table} WHERE id = %s", (row_id,))
        row = c.fetchone()
        if row is None:
            return
        value = subtle_variant(row[0], self.rng)
        if value is None and table != "pomodoro_content":   # only plan is nullable
            value = ""
        c.execute(f"UPDATE {table} SET {column} = %s, last_modified_date = NOW(6) WHERE id = %s",
                  (value, row_id))

    def member_of(self, c, progress):
        c.execute("SELECT member_id FROM pomodoro_progress WHERE id = %s", (progress,))
        row = c.fetchone()
        return row[0] if row else None

    # -- the transactions ------------------------------------------------------------------------

    def tx_new_room(self, c):
        c.execute("INSERT INTO participant_code (code, created_date, last_modified_date)"
                  " VALUES (CONCAT('adv-', UUID()), NOW(6), NOW(6))")
        c.execute("INSERT INTO pomodoro_room (participant_code_id, name, total_cycle,"
                  " time_per_cycle, created_date, last_modified_date)"
                  " VALUES (%s, %s, %s, %s, NOW(6), NOW(6))",
                  (c.lastrowid, f"room {self.rng.choice(NAMES)} {self.rng.randrange(10 ** 6)}",
                   self.rng.randint(1, 8), self.rng.choice((25, 30, 45, 50))))
        self.add_member(c, c.lastrowid)                 # the host

    def tx_join(self, c):
        room = self.pick_room(c)
        if room is not None:
            self.add_member(c, room)

    def tx_host_progress(self, c):
        room = self.pick_room(c)
        if room is not None:  # the host is the room's lowest progress id
            self.move_progress(c, "pomodoro_room_id = %s ORDER BY id LIMIT 1", (room,))

    def tx_any_progress(self, c):
        progress = self.pick(c, "pomodoro_progress")
        if progress is not None:
            self.move_progress(c, "id = %s", (progress,))

    def tx_new_content(self, c):
        progress = self.pick(c, "pomodoro_progress")
        if progress is None:
            return
        plan = self.rng.choice((None, "", f"plan, {self.rng.randrange(10 ** 9)} | read"))
        c.execute("INSERT INTO pomodoro_content (pomodoro_progress_id, cycle, plan, retrospect,"
                  " created_date, last_modified_date) VALUES (%s, %s, %s, %s, NOW(6), NOW(6))",
                  (progress, self.rng.randint(1, 8), plan, self.rng.choice((None, ""))))

    def tx_edit_content(self, c):
        content = self.pick(c, "pomodoro_content")
        if content is not None:
            self.edit_content(c, content)

    def tx_rename_room(self, c):
        room = self.pick_room(c)
        if room is not None:
            self.rename_room(c, room)

    def tx_subtle_edit(self, c):
        # Nicknames twice as often: today's member trigger is where such edits get lost.
        table, column = self.rng.choice((("member", "nickname"), ("member", "nickname"),
                                         ("pomodoro_room", "name"), ("pomodoro_content", "plan")))
        if table == "member":
            # A member that has a progress row, so that the nickname shows in v2.
            progress = self.pick(c, "pomodoro_progress")
            row_id = None if progress is None else self.member_of(c, progress)
        elif table == "pomodoro_room":
            row_id = self.pick_room(c)
        else:
            row_id = self.pick(c, table)
        if row_id is not None:
            self.subtle_edit(c, table, column, row_id)

    def tx_leave(self, c):
        progress = self.pick(c, "pomodoro_progress")
        if progress is not None:
            self.remove_progress(c, progress)

    def tx_host_leave(self, c):
        room = self.pick_room(c)
        if room is None:
            return
        c.execute("SELECT id FROM pomodoro_progress WHERE pomodoro_room_id = %s"
                  " ORDER BY id LIMIT 1", (room,))
        row = c.fetchone()
        if row:
            self.remove_progress(c, row[0])

    def tx_delete_content(self, c):
        content = self.pick(c, "pomodoro_content")
        if content is not None:
            c.execute("DELETE FROM pomodoro_content WHERE id = %s", (content,))

    def tx_delete_room(self, c):
        room = self.pick_room(c)
        if room is not None:
            self.remove_room(c, room)

    def tx_rollback(self, c):
        """Several changes in every v1 table, then an explicit ROLLBACK: v2 must keep none."""
        room = self.pick_room(c)
        if room is not None:
            self.add_member(c, room)
            self.rename_room(c, room)
            self.move_progress(c, "pomodoro_room_id = %s ORDER BY id LIMIT 1", (room,))
        content = self.pick(c, "pomodoro_content")
        if content is not None:
            c.execute("DELETE FROM pomodoro_content WHERE id = %s", (content,))
        progress = self.pick(c, "pomodoro_progress")
        member = None if progress is None else self.member_of(c, progress)
        if member is not None:
            self.subtle_edit(c, "member", "nickname", member)
        return ROLLBACK

    def tx_long_read_then_write(self, c):
        """Read a room's progress rows without locking, wait, then write from what was read. Under
        REPEATABLE READ the snapshot is now old: a trigger that derives a value (the host flag)
        from it instead of from the committed rows goes wrong."""
        room = self.pick_room(c, hot=True)
        if room is None:
            return
        c.execute("SELECT id FROM pomodoro_progress WHERE pomodoro_room_id = %s ORDER BY id",
                  (room,))
        seen = [row[0] for row in c.fetchall()]
        time.sleep(self.rng.uniform(0.5, 2.0))
        action = self.rng.choice(("update", "update", "delete_host", "join"))
        if not seen or action == "join":
            self.add_member(c, room)
        elif action == "update":  # preferably a non-host: its flag is what a stale snapshot breaks
            self.move_progress(c, "id = %s", (self.rng.choice(seen[1:] or seen),))
        else:
            self.remove_progress(c, seen[0])

    def tx_chase(self, c):
        """Update or delete v1 rows just above a backfill cursor: the rows the next chunk copies."""
        try:
            c.execute("SELECT table_name, last_id FROM kit_backfill_cursor")
            cursors = [(CURSOR_SOURCE[t], last) for t, last in c.fetchall() if t in CURSOR_SOURCE]
        except pymysql.err.ProgrammingError as exc:
            if error_code(exc) != 1146:     # 1146: no cursor table yet; chase the lowest ids
                raise
            cursors = []
        table, last_id = (self.rng.choice(cursors) if cursors else
                          (self.rng.choice(("pomodoro_room", "pomodoro_progress",
                                            "pomodoro_content")), 0))
        c.execute(f"SELECT id FROM {table} WHERE id > %s ORDER BY id LIMIT 10", (last_id,))
        ids = [row[0] for row in c.fetchall()]
        if not ids:
            return
        row_id, roll = self.rng.choice(ids), self.rng.random()
        if table == "pomodoro_room":
            if roll < 0.5:
                self.rename_room(c, row_id)
            elif roll < 0.8:
                self.subtle_edit(c, "pomodoro_room", "name", row_id)
            else:
                self.remove_room(c, row_id)
        elif table == "pomodoro_progress":
            if roll < 0.5:
                self.move_progress(c, "id = %s", (row_id,))
            elif roll < 0.75:
                self.remove_progress(c, row_id)
            else:
                member = self.member_of(c, row_id)
                if member is not None:
                    self.subtle_edit(c, "member", "nickname", member)
        elif roll < 0.5:
            self.edit_content(c, row_id)
        elif roll < 0.75:
            self.subtle_edit(c, "pomodoro_content", "plan", row_id)
        else:
            c.execute("DELETE FROM pomodoro_content WHERE id = %s", (row_id,))


def run_writers(args, label, mix):
    """Runs the writers and returns the summary dict (the JSON line of `write` and `bench`)."""
    if args.seconds is None and args.stop_file is None:
        raise Failure("write needs --seconds or --stop-file")
    levels = {"rc": ["READ COMMITTED"], "rr": ["REPEATABLE READ"],
              "mixed": ["READ COMMITTED", "REPEATABLE READ"]}[args.isolation]
    chase = "chase" in dict(mix)
    stop = threading.Event()
    writers = [Writer(args, i, levels[i % len(levels)], mix, stop) for i in range(args.writers)]
    log(f"{label}: {args.writers} writers ({args.isolation}), seed {args.seed}"
        f"{', chasing the backfill cursor' if chase else ''}")
    started = time.monotonic()
    for w in writers:
        w.start()
    shown = started
    while not stop.is_set():
        time.sleep(0.1)
        now = time.monotonic()
        if ((args.seconds is not None and now - started >= args.seconds)
                or (args.stop_file and os.path.exists(args.stop_file))
                or not any(w.is_alive() for w in writers)):
            stop.set()
        elif now - shown >= 5:
            shown = now
            failed = sum(sum(w.failed.values()) for w in writers)
            log(f"{label}: {now - started:.0f} s: {sum(w.attempted for w in writers)} attempted, "
                f"{sum(w.committed for w in writers)} committed, {failed} failed")
    for w in writers:
        w.join()
    elapsed = time.monotonic() - started
    crashed = [w for w in writers if w.crash is not None]
    if crashed:
        raise Failure(f"{crashed[0].name} stopped: {crashed[0].crash!r}")

    failed, examples = collections.Counter(), {}
    by_kind = collections.defaultdict(lambda: [0, 0, 0])
    for w in writers:
        failed.update(w.failed)
        for code, message in w.error_examples.items():
            examples.setdefault(code, message)
        for kind, stats in w.by_kind.items():
            by_kind[kind] = [a + b for a, b in zip(by_kind[kind], stats)]
    attempted = sum(w.attempted for w in writers)
    committed = sum(w.committed for w in writers)
    summary = {
        "command": label, "writers": args.writers, "isolation": args.isolation,
        "chase": chase, "seed": args.seed, "seconds": round(elapsed, 2),
        "attempted": attempted, "committed": committed,
        "rolled_back": sum(w.rolled_back for w in writers),
        "failed": {str(code): n for code, n in sorted(failed.items())},
        "failed_total": sum(failed.values()),
        "failure_rate": round(sum(failed.values()) / attempted, 5) if attempted else 0.0,
        "committed_per_second": round(committed / elapsed, 1),
        "by_kind": {k: dict(zip(("attempted", "committed", "failed"), v))
                    for k, v in sorted(by_kind.items())},
        "error_examples": {str(code): examples[code] for code in sorted(examples)},
    }
    log(f"{label}: {attempted} attempted, {committed} committed "
        f"({summary['committed_per_second']}/s), {summary['rolled_back']} rolled back on purpose, "
        f"{summary['failed_total']} failed"
        + "".join(f"\n{label}:   error {code} x{n}: {examples[code]}"
                  for code, n in sorted(failed.items())))
    return summary


def cmd_write(args):
    emit(run_writers(args, "write", MIX + ((("chase", CHASE_WEIGHT),) if args.chase else ())))
    return 0


# ------------------------------------------------------------------------------------------------
# bench: the same write mix, before and after the kit's triggers
# ------------------------------------------------------------------------------------------------

def cmd_bench(args):
    conn = connect(args)
    with conn.cursor() as c:
        c.execute("SELECT COUNT(*) FROM information_schema.TRIGGERS"
                  " WHERE trigger_schema = DATABASE()"
                  f" AND event_object_table IN ({', '.join(['%s'] * len(V1_TABLES))})", V1_TABLES)
        triggers = c.fetchone()[0]
    conn.close()
    if (args.phase == "before") != (triggers == 0):
        log(f"bench: phase '{args.phase}' but {triggers} triggers on the v1 tables; "
            "'before' needs none, 'after' needs the kit's")
        return 2
    # Both isolation levels, timed, no cursor chasing (no backfill runs during a bench).
    args.isolation, args.stop_file = "mixed", None
    summary = run_writers(args, "bench", BENCH_MIX)
    summary.update(phase=args.phase, v1_triggers=triggers)
    if args.results:
        earlier = []
        if os.path.exists(args.results):
            with open(args.results) as f:
                earlier = [json.loads(line) for line in f if line.strip()]
        with open(args.results, "a") as f:
            f.write(json.dumps(summary, sort_keys=True) + "\n")
        before = [r for r in earlier if r.get("phase") == "before"]
        if args.phase == "after" and before:
            b = before[-1]
            summary["before"] = {k: b[k]
                                 for k in ("committed_per_second", "failure_rate", "failed")}
            summary["throughput_ratio"] = (round(summary["committed_per_second"]
                                                 / b["committed_per_second"], 3)
                                           if b["committed_per_second"] else None)
            log(f"bench: before {b['committed_per_second']}/s, "
                f"failure rate {b['failure_rate']:.3%}; after {summary['committed_per_second']}/s, "
                f"failure rate {summary['failure_rate']:.3%}; "
                f"throughput ratio {summary['throughput_ratio']}")
    emit(summary)
    return 0


# ------------------------------------------------------------------------------------------------
# compare: an independent v1 -> v2 comparison, as bytes
# ------------------------------------------------------------------------------------------------

def read_snapshot(args):
    """Every v1 row the mapping reads and every v2 row below FLOOR, from one consistent snapshot.
    Values are the server's bytes (NULL is None); only keys are converted to int."""
    queries = {
        "member": "SELECT id, nickname FROM member",
        "pomodoro_room": "SELECT id, participant_code_id, name, total_cycle, time_per_cycle,"
                         " created_date, last_modified_date FROM pomodoro_room",
        "pomodoro_progress": "SELECT id, pomodoro_room_id, member_id, is_done, current_cycle,"
                             " pomodoro_status, created_date, last_modified_date"
                             " FROM pomodoro_progress",
        "pomodoro_content": "SELECT id, pomodoro_progress_id, cycle, plan, retrospect,"
                            " created_date, last_modified_date FROM pomodoro_content",
    }
    for table, (key, columns) in V2_TABLES.items():
        queries[table] = (f"SELECT {key}, {', '.join(columns)} FROM {table}"
                          f" WHERE {key} < {FLOOR}")
    conn = connect(args, raw=True)
    data = {}
    with conn.cursor() as c:
        c.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        c.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        for name, sql in queries.items():
            c.execute(sql)
            data[name] = c.fetchall()
        c.execute("COMMIT")
    conn.close()
    return data


def expected_v2(data):
    """What each v2 table must hold for these v1 rows: {table: {key: value tuple}} (README.md,
    "The mapping"). Values are bytes exactly as the v2 columns would send them."""
    nickname = dict(data["member"])                         # member id bytes -> nickname bytes
    host = {}                                               # room id bytes -> host progress row
    for row in data["pomodoro_progress"]:
        current = host.get(row[1])
        if current is None or int(row[0]) < int(current[0]):
            host[row[1]] = row

    study, mapping = {}, {}
    for room_id, code_id, name, total, per_cycle, created, modified in data["pomodoro_room"]:
        h = host.get(room_id)
        if h is None:
            cycle, step = b"1", b"WAITING"
        else:
            # is_done is BIT(1): compared by number. The status is an enum label.
            cycle, step = h[4], (b"COMPLETED" if int.from_bytes(h[3], "big") else h[5])
        study[int(room_id)] = (code_id, name, total, per_cycle, cycle, step, created, modified)
        mapping[int(room_id)] = (room_id,)

    participant = {}
    for pid, room_id, member_id, *_, created, modified in data["pomodoro_progress"]:
        is_host = b"1" if host[room_id][0] == pid else b"0"
        participant[int(pid)] = (room_id, member_id, nickname.get(member_id), is_host,
                                 created, modified)

    content = {int(row[0]): row[1:] for row in data["pomodoro_content"]}
    return {"study": study, "pomodoro_study_to_study": mapping,
            "participant": participant, "content": content}


def diff_table(table, expected, actual):
    columns = V2_TABLES[table][1]
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    different = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    column_counts = collections.Counter()
    differing = {}                              # id -> indexes of the columns that differ
    for k in different:
        differing[k] = [i for i, (e, a) in enumerate(zip(expected[k], actual[k])) if e != a]
        column_counts.update(columns[i] for i in differing[k])
    # Five examples: the first row of each distinct set of differing columns, so that a rare
    # kind (a host flag among a hundred nicknames) shows, then the lowest ids.
    first_of_kind = {}
    for k in different:
        first_of_kind.setdefault(tuple(differing[k]), k)
    chosen = sorted(first_of_kind.values())[:5]
    chosen = sorted(chosen + [k for k in different if k not in chosen][:5 - len(chosen)])
    examples, details = [], []
    for k in chosen:
        examples.append({"id": k, "columns": [columns[i] for i in differing[k]]})
        details += [f"{table} id {k} {columns[i]}: from v1 {expected[k][i]!r},"
                    f" in v2 {actual[k][i]!r}" for i in differing[k]]
    result = {"v1": len(expected), "v2": len(actual),
              "missing": len(missing), "extra": len(extra), "different": len(different),
              "missing_ids": missing[:5], "extra_ids": extra[:5], "different_rows": examples,
              "different_columns": dict(sorted(column_counts.items()))}
    return result, details


def cmd_compare(args):
    started = time.monotonic()
    data = read_snapshot(args)
    read_seconds = time.monotonic() - started
    expected = expected_v2(data)
    tables, totals = {}, collections.Counter()
    for table in V2_TABLES:
        actual = {int(row[0]): row[1:] for row in data[table]}
        result, details = diff_table(table, expected[table], actual)
        tables[table] = result
        for what in ("missing", "extra", "different"):
            totals[what] += result[what]
        log(f"compare: {table:<24} v1={result['v1']} v2={result['v2']} missing={result['missing']}"
            f" extra={result['extra']} different={result['different']}"
            + (f" {result['different_columns']}" if result["different"] else "")
            + (f" missing ids {result['missing_ids']}" if result["missing"] else "")
            + (f" extra ids {result['extra_ids']}" if result["extra"] else ""))
        for line in details:
            log(f"compare:   {line}")
    ok = not any(totals.values())
    seconds = time.monotonic() - started
    log(f"compare: {'EQUAL' if ok else 'DIFFERENT'} missing={totals['missing']} "
        f"extra={totals['extra']} different={totals['different']} "
        f"(snapshot read in {read_seconds:.1f} s, {seconds:.1f} s in all)")
    emit({"command": "compare", "ok": ok, "missing": totals["missing"], "extra": totals["extra"],
          "different": totals["different"], "tables": tables,
          "read_seconds": round(read_seconds, 2), "seconds": round(seconds, 2)})
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# plant: one known difference in the v2 tables
# ------------------------------------------------------------------------------------------------

# kind -> the v2 tables it can be planted in
PLANT_TABLES = {
    "missing": tuple(V2_TABLES), "extra": tuple(V2_TABLES),
    "changed-byte": tuple(TEXT_COLUMN), "case-only": tuple(TEXT_COLUMN),
    "trailing-space": tuple(TEXT_COLUMN), "stale-host": ("participant",),
    "two-cancelling": tuple(TEXT_COLUMN),
}


def copied_rows(c, table, columns):
    """The v2 copies (key below FLOOR) of `table`, with `columns`, sorted by key; raw bytes."""
    key = V2_TABLES[table][0]
    c.execute(f"SELECT {', '.join((key,) + tuple(columns))} FROM {table}"
              f" WHERE {key} < {FLOOR} ORDER BY {key}")
    return [(int(row[0]),) + row[1:] for row in c.fetchall()]


def plant_missing(c, table, rng):
    key = V2_TABLES[table][0]
    row_id = rng.choice(copied_rows(c, table, ()))[0]
    c.execute(f"DELETE FROM {table} WHERE {key} = %s", (row_id,))
    return [row_id], None


def plant_extra(c, table, rng):
    """A copy of an existing v2 row under an id that no v1 row has (nor will soon: just below
    FLOOR, far above the v1 AUTO_INCREMENT)."""
    key, columns = V2_TABLES[table]
    while True:
        row_id = FLOOR - 1 - rng.randrange(10 ** 6)
        c.execute(f"SELECT (SELECT COUNT(*) FROM {V1_SOURCE[table]} WHERE id = %s)"
                  f" + (SELECT COUNT(*) FROM {table} WHERE {key} = %s)", (row_id, row_id))
        if c.fetchone()[0] == b"0":        # raw connection: the count arrives as bytes
            break
    if table == "pomodoro_study_to_study":
        c.execute("INSERT INTO pomodoro_study_to_study (pomodoro_room_id, study_id)"
                  " VALUES (%s, %s)", (row_id, row_id))
    else:
        template = rng.choice(copied_rows(c, table, ()))[0]
        c.execute(f"INSERT INTO {table} ({key}, {', '.join(columns)})"
                  f" SELECT %s, {', '.join(columns)} FROM {table} WHERE {key} = %s",
                  (row_id, template))
    return [row_id], None


def plant_text(c, table, rng, edit):
    """Applies edit(text) -> new text (or None when it does not apply) to one text value."""
    column = TEXT_COLUMN[table]
    candidates = []
    for row_id, value in copied_rows(c, table, (column,)):
        if value is not None:
            new = edit(value.decode(), rng)
            if new is not None:
                candidates.append((row_id, value.decode(), new))
    if not candidates:
        raise Failure(f"no {table}.{column} value to edit")
    row_id, old, new = rng.choice(candidates)
    c.execute(f"UPDATE {table} SET {column} = %s WHERE id = %s", (new, row_id))
    log(f"plant: {table} id {row_id} {column}: {old!r} -> {new!r}")
    return [row_id], column


def changed_byte(text, rng):
    if not text:
        return None
    i = rng.randrange(len(text))
    return text[:i] + ("#" if text[i] != "#" else "%") + text[i + 1:]


def case_only(text, _rng):
    i = first_cased(text)
    return None if i is None else text[:i] + text[i].swapcase() + text[i + 1:]


def trailing_space(text, _rng):
    return text + " "


def plant_stale_host(c, table, rng):
    row_id = rng.choice(copied_rows(c, table, ()))[0]
    c.execute("UPDATE participant SET is_host = NOT is_host WHERE id = %s", (row_id,))
    return [row_id], "is_host"


def plant_two_cancelling(c, table, rng):
    """The same lower -> upper case flip (one byte XOR 0x20) at the same offset of two rows whose
    every column has the same length: their row texts differ from the originals by the same bit
    pattern, so XOR-of-CRC32 sums over any chunk holding both come out unchanged. The two ids are
    taken from one aligned block of 25 when possible, so any chunk size that is a multiple of 25
    puts them in the same chunk."""
    key, columns = V2_TABLES[table]
    column = TEXT_COLUMN[table]
    at = columns.index(column) + 1
    # (digits of the key, length of every column, offset of the first ASCII a-z) -> (key, text)
    groups = collections.defaultdict(list)
    for row in copied_rows(c, table, columns):
        text = row[at] or b""
        i = next((i for i, b in enumerate(text) if 0x61 <= b <= 0x7A), None)
        if i is not None:
            shape = (len(str(row[0])), i) + tuple(-1 if v is None else len(v) for v in row[1:])
            groups[shape].append((row[0], text, i))
    pairs = [(a, b) for rows in groups.values() for a, b in zip(rows, rows[1:])]
    if not pairs:
        raise Failure(f"no two {table} rows of equal shape")
    same_block = [p for p in pairs if p[0][0] // 25 == p[1][0] // 25]
    pair = rng.choice(same_block) if same_block else min(pairs, key=lambda p: p[1][0] - p[0][0])
    for row_id, text, i in pair:
        new = text[:i] + bytes([text[i] ^ 0x20]) + text[i + 1:]
        c.execute(f"UPDATE {table} SET {column} = %s WHERE {key} = %s", (new.decode(), row_id))
        log(f"plant: {table} id {row_id} {column}: {text.decode()!r} -> {new.decode()!r}")
    return [row_id for row_id, _, _ in pair], column


PLANTERS = {
    "missing": plant_missing,
    "extra": plant_extra,
    "changed-byte": lambda c, t, rng: plant_text(c, t, rng, changed_byte),
    "case-only": lambda c, t, rng: plant_text(c, t, rng, case_only),
    "trailing-space": lambda c, t, rng: plant_text(c, t, rng, trailing_space),
    "stale-host": plant_stale_host,
    "two-cancelling": plant_two_cancelling,
}


def cmd_plant(args):
    rng = random.Random(args.seed)
    tables = PLANT_TABLES[args.kind]
    if args.table and args.table not in tables:
        log(f"plant: {args.kind} can be planted in {', '.join(tables)}, not {args.table}")
        return 2
    table = args.table or rng.choice(tables)
    conn = connect(args, raw=True, autocommit=False)
    with conn.cursor() as c:
        ids, column = PLANTERS[args.kind](c, table, rng)
    conn.commit()
    conn.close()
    log(f"plant: {args.kind} in {table}, id{'s' if len(ids) > 1 else ''} "
        f"{', '.join(map(str, ids))}")
    emit({"command": "plant", "kind": args.kind, "table": table, "ids": ids, "column": column})
    return 0


# ------------------------------------------------------------------------------------------------

def main():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", help="Unix socket of the server")
    common.add_argument("--host", default="127.0.0.1", help="without --socket")
    common.add_argument("--port", type=int, default=3306, help="without --socket")
    common.add_argument("--user", default="root")
    common.add_argument("--database", required=True)

    def writer_options(p):
        p.add_argument("--writers", type=int, default=6)
        p.add_argument("--seconds", type=float)
        p.add_argument("--seed", default="1", help="same seed, same choices per writer")

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("write", parents=[common], help="concurrent v1 writers")
    writer_options(p)
    p.add_argument("--stop-file", help="stop once this file exists")
    p.add_argument("--isolation", choices=("mixed", "rc", "rr"), default="mixed",
                   help="mixed: even writers READ COMMITTED, odd ones REPEATABLE READ")
    p.add_argument("--chase", action="store_true",
                   help="also update and delete v1 rows just above the backfill cursors")
    p.set_defaults(run=cmd_write)
    p = sub.add_parser("compare", parents=[common], help="independent v1/v2 comparison")
    p.set_defaults(run=cmd_compare)
    p = sub.add_parser("plant", parents=[common], help="plant one difference in v2")
    p.add_argument("--kind", required=True, choices=tuple(PLANTERS))
    p.add_argument("--table", choices=tuple(V2_TABLES), help="default: chosen by --seed")
    p.add_argument("--seed", default="1")
    p.set_defaults(run=cmd_plant)
    p = sub.add_parser("bench", parents=[common], help="`write` labelled before/after the triggers")
    writer_options(p)
    p.add_argument("--phase", required=True, choices=("before", "after"))
    p.add_argument("--results", help="JSON lines file: each run appends; 'after' reports the ratio")
    p.set_defaults(run=cmd_bench)
    args = parser.parse_args()
    if args.command == "bench" and args.seconds is None:
        parser.error("bench needs --seconds")
    try:
        return args.run(args)
    except (pymysql.MySQLError, Failure) as exc:
        log(f"adversary: {args.command}: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
