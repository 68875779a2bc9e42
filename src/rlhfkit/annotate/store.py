"""SQLite storage for the annotation platform.

One database file holds users, prompts, generation sets (K responses to one prompt, in
the order they are shown) and rankings. Durability rules:

- WAL journal with ``synchronous=FULL``: a commit returns only after the WAL is on disk,
  so an acknowledged submission survives ``kill -9`` and power loss, and a crash mid-write
  leaves no half-written row (SQLite rolls an unfinished transaction back on open).
- Every write is one ``BEGIN IMMEDIATE`` transaction; writers in this process also take a
  lock so they queue here instead of spinning in SQLite's busy handler.
- The schema has a version (table ``schema_version``) and ordered ``MIGRATIONS``; opening
  a database applies the missing ones in one transaction and refuses a newer database.

Rankings are stored as ``ranks`` (``ranks[i]`` is the rank of response i, 0 = best, equal
ranks are ties), the layout of :class:`~rlhfkit.data.types.PreferenceExample`. Deleting is
soft (``deleted_at``), so a delete can be undone; a user has at most one live ranking per
generation set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlhfkit.annotate.agreement import annotator_weights
from rlhfkit.annotate.consensus import consensus_ranks
from rlhfkit.data.readers import is_saved_dataset
from rlhfkit.data.types import PreferenceExample
from rlhfkit.data.writers import write_preferences
from rlhfkit.errors import UserError
from rlhfkit.files import check_output_dir

# Entry i moves the schema from version i to i + 1. Append, never edit a released one.
# Statements are split on ';', so keep semicolons out of literals and triggers.
MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        is_admin INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
        created_at TEXT NOT NULL
    );
    CREATE TABLE prompts (
        id INTEGER PRIMARY KEY,
        text TEXT NOT NULL UNIQUE,
        source TEXT NOT NULL CHECK (source IN ('pool', 'typed')),
        created_by INTEGER REFERENCES users(id),
        created_at TEXT NOT NULL
    );
    CREATE TABLE generation_sets (
        id INTEGER PRIMARY KEY,
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        model TEXT NOT NULL,
        responses TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX generation_sets_prompt ON generation_sets(prompt_id);
    CREATE TABLE rankings (
        id INTEGER PRIMARY KEY,
        set_id INTEGER NOT NULL REFERENCES generation_sets(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        ranks TEXT NOT NULL,
        comment TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        updated_at TEXT,
        deleted_at TEXT,
        deleted_by INTEGER REFERENCES users(id)
    );
    CREATE UNIQUE INDEX rankings_one_live_per_user ON rankings(set_id, user_id) WHERE deleted_at IS NULL;
    CREATE INDEX rankings_user ON rankings(user_id);
    CREATE TABLE skips (
        set_id INTEGER NOT NULL REFERENCES generation_sets(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        created_at TEXT NOT NULL,
        PRIMARY KEY (set_id, user_id)
    );
    """,
    # 2: the order sets are served in (annotate --selection uncertainty: the ensemble's disagreement)
    """
    ALTER TABLE generation_sets ADD COLUMN priority REAL NOT NULL DEFAULT 0
    """,
    # 3: sets pushed over POST /api/sets (rlhfkit pipeline rounds: N): the pipeline round a set
    # belongs to (NULL: none) and the pusher's key, which makes a repeated push a no-op
    """
    ALTER TABLE generation_sets ADD COLUMN round INTEGER;
    ALTER TABLE generation_sets ADD COLUMN key TEXT;
    CREATE UNIQUE INDEX generation_sets_key ON generation_sets(key) WHERE key IS NOT NULL;
    CREATE INDEX generation_sets_round ON generation_sets(round)
    """,
    # 4: a set served to an annotator is held for them (a lease) until they rank or skip it or the
    # lease ends, so a shared set's quota counts the annotators working on it, not only those done
    """
    CREATE TABLE leases (
        set_id INTEGER NOT NULL REFERENCES generation_sets(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        expires_at REAL NOT NULL,
        PRIMARY KEY (set_id, user_id)
    );
    CREATE INDEX leases_set ON leases(set_id)
    """,
]

LEASES_SCHEMA = 4  # the schema version that has the leases table
LEASE_SECONDS = 30 * 60.0  # how long a served set stays held for its annotator (then it goes to the next one)


class StoreError(UserError):
    """Base class of the store's errors; the message says what to do."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


@dataclass(frozen=True)
class User:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class Prompt:
    id: int
    text: str
    source: str


@dataclass(frozen=True)
class GenerationSet:
    id: int
    prompt_id: int
    prompt: str
    model: str
    responses: tuple[str, ...]
    round: int | None = None  # the pipeline round that pushed it; None: not part of a round

    @property
    def k(self) -> int:
        return len(self.responses)


@dataclass(frozen=True)
class Ranking:
    id: int
    set_id: int
    prompt_id: int
    prompt: str
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    comment: str
    user_id: int
    annotator: str
    created_at: str
    updated_at: str | None
    deleted_at: str | None
    round: int | None = None  # the round of the ranked set

    def example(self) -> PreferenceExample:
        return PreferenceExample(self.prompt, self.responses, self.ranks, source=f"ranking {self.id}")


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a plain hash is enough (no salt or slow KDF needed):
    # the database never holds a usable token.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


_RANKING_SELECT = """
    SELECT r.id, r.set_id, s.prompt_id, p.text, s.responses, r.ranks, r.comment, r.user_id, u.name,
           r.created_at, r.updated_at, r.deleted_at, s.round
    FROM rankings r
    JOIN generation_sets s ON s.id = r.set_id
    JOIN prompts p ON p.id = s.prompt_id
    JOIN users u ON u.id = r.user_id
"""


def _ranking(row: Sequence) -> Ranking:
    return Ranking(
        id=row[0],
        set_id=row[1],
        prompt_id=row[2],
        prompt=row[3],
        responses=tuple(json.loads(row[4])),
        ranks=tuple(json.loads(row[5])),
        comment=row[6],
        user_id=row[7],
        annotator=row[8],
        created_at=row[9],
        updated_at=row[10],
        deleted_at=row[11],
        round=row[12],
    )


# The columns :meth:`AnnotationStore._set` reads, from ``generation_sets s JOIN prompts p``.
_SET_COLUMNS = "s.id, s.prompt_id, p.text, s.model, s.responses, s.round"


class AnnotationStore:
    """The annotation database. Thread-safe: each thread gets its own connection."""

    def __init__(
        self,
        path: str | Path,
        migrations: Sequence[str] = MIGRATIONS,
        *,
        lease_seconds: float = LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self.lease_seconds, self.clock = lease_seconds, clock
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        try:
            self.schema_version = self._migrate(migrations)
        except BaseException:  # not a database, or a newer schema: leave no connection open
            self.close()
            raise

    # ---------------------------------------------------------------- connections

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE ourselves.
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any exception."""
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _migrate(self, migrations: Sequence[str]) -> int:
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > len(migrations):
                raise StoreError(
                    f"{self.path} has schema version {version} but this rlhfkit knows only up to "
                    f"{len(migrations)}; upgrade rlhfkit to open it"
                )
            for script in migrations[version:]:
                # executescript would COMMIT our transaction; run the statements one by one.
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (len(migrations),))
        return len(migrations)

    # ---------------------------------------------------------------- users

    def add_user(self, name: str, admin: bool = False) -> str:
        """Create a user and return their token (it is stored only as a hash)."""
        name = name.strip()
        if not name or len(name) > 64 or any(ch.isspace() for ch in name):
            raise StoreError(f"user name {name!r} must be 1-64 characters without spaces")
        token = secrets.token_urlsafe(32)
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"user {name!r} already exists in {self.path}; pick another name")
            conn.execute(
                "INSERT INTO users (name, token_hash, is_admin, created_at) VALUES (?, ?, ?, ?)",
                (name, hash_token(token), int(admin), _now()),
            )
        return token

    def user_for_token(self, token: str) -> User | None:
        row = (
            self._conn()
            .execute("SELECT id, name, is_admin FROM users WHERE token_hash = ?", (hash_token(token),))
            .fetchone()
        )
        return User(row[0], row[1], bool(row[2])) if row else None

    def user_by_name(self, name: str) -> User | None:
        row = self._conn().execute("SELECT id, name, is_admin FROM users WHERE name = ?", (name,)).fetchone()
        return User(row[0], row[1], bool(row[2])) if row else None

    def users(self) -> list[User]:
        rows = self._conn().execute("SELECT id, name, is_admin FROM users ORDER BY id").fetchall()
        return [User(r[0], r[1], bool(r[2])) for r in rows]

    # ---------------------------------------------------------------- prompts and generations

    def add_prompts(self, texts: Sequence[str]) -> int:
        """Add pool prompts (duplicates and prompts already stored are skipped); returns how many were new."""
        now = _now()
        with self.transaction() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO prompts (text, source, created_at) VALUES (?, 'pool', ?)",
                [(t, now) for t in texts],
            )
            return conn.total_changes - before

    def add_typed_prompt(self, text: str, user_id: int) -> tuple[Prompt, bool]:
        """The prompt with this text, created as 'typed' by ``user_id`` if new; (prompt, created)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT id, text, source FROM prompts WHERE text = ?", (text,)).fetchone()
            if row:
                return Prompt(*row), False
            cur = conn.execute(
                "INSERT INTO prompts (text, source, created_by, created_at) VALUES (?, 'typed', ?, ?)",
                (text, user_id, _now()),
            )
            return Prompt(cur.lastrowid, text, "typed"), True

    def get_prompt(self, prompt_id: int) -> Prompt | None:
        row = self._conn().execute("SELECT id, text, source FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        return Prompt(*row) if row else None

    def random_pool_prompt(self) -> Prompt | None:
        row = (
            self._conn()
            .execute("SELECT id, text, source FROM prompts WHERE source = 'pool' ORDER BY random() LIMIT 1")
            .fetchone()
        )
        return Prompt(*row) if row else None

    def count_prompts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT source, count(*) FROM prompts GROUP BY source").fetchall()
        return {"pool": 0, "typed": 0} | dict(rows)

    def add_generation_set(self, prompt_id: int, model: str, responses: Sequence[str], priority: float = 0.0) -> int:
        """Store one set; pool sets are served highest ``priority`` first (equal: in pool order)."""
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO generation_sets (prompt_id, model, responses, priority, created_at) VALUES (?, ?, ?, ?, ?)",
                (prompt_id, model, json.dumps(list(responses), ensure_ascii=False), float(priority), _now()),
            )
            return int(cur.lastrowid)

    def put_round_set(
        self,
        prompt_text: str,
        responses: Sequence[str],
        *,
        round: int | None,
        key: str | None,
        priority: float = 0.0,
        model: str = "pipeline",
    ) -> tuple[int, bool]:
        """Store a set pushed from outside (``POST /api/sets``); returns (set id, created).

        In one transaction: the prompt joins the pool if its text is new, and the set is
        stored with its ``round`` and ``key``. A ``key`` already stored makes this a no-op that
        returns the existing set (``created`` False), so a pusher that died mid-round can push
        the whole round again; ``Conflict`` if that set holds another prompt, other responses
        or another round.
        """
        stored = json.dumps(list(responses), ensure_ascii=False)
        with self.transaction() as conn:
            if key is not None:
                row = conn.execute(
                    "SELECT s.id, p.text, s.responses, s.round FROM generation_sets s "
                    "JOIN prompts p ON p.id = s.prompt_id WHERE s.key = ?",
                    (key,),
                ).fetchone()
                if row is not None:
                    if (row[1], json.loads(row[2]), row[3]) != (prompt_text, list(responses), round):
                        raise Conflict(
                            f"key {key!r} belongs to generation set {row[0]}, which holds another prompt, other "
                            f"responses or another round; push new content under a new key"
                        )
                    return int(row[0]), False
            now = _now()
            conn.execute(
                "INSERT OR IGNORE INTO prompts (text, source, created_at) VALUES (?, 'pool', ?)", (prompt_text, now)
            )
            prompt_id = conn.execute("SELECT id FROM prompts WHERE text = ?", (prompt_text,)).fetchone()[0]
            cur = conn.execute(
                "INSERT INTO generation_sets (prompt_id, model, responses, priority, round, key, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (prompt_id, model, stored, float(priority), round, key, now),
            )
            return int(cur.lastrowid), True

    def round_progress(self, round: int) -> dict:
        """Where pipeline round ``round`` stands: its sets, their live rankings and who ranked them.

        ``{"round", "sets", "rankings", "sets_ranked" (sets with at least one live ranking),
        "skips", "annotators": {name: live rankings}, "first_ranking_at", "last_ranking_at"}``
        (the times are None before the first ranking).
        """
        conn = self._conn()
        sets = conn.execute("SELECT count(*) FROM generation_sets WHERE round = ?", (round,)).fetchone()[0]
        live = (
            "FROM rankings r JOIN generation_sets s ON s.id = r.set_id JOIN users u ON u.id = r.user_id "
            "WHERE s.round = ? AND r.deleted_at IS NULL"
        )
        rankings, sets_ranked, first, last = conn.execute(
            f"SELECT count(*), count(DISTINCT r.set_id), min(r.created_at), max(r.created_at) {live}", (round,)
        ).fetchone()
        per_annotator = conn.execute(f"SELECT u.name, count(*) {live} GROUP BY u.name ORDER BY u.name", (round,))
        skips = conn.execute(
            "SELECT count(*) FROM skips k JOIN generation_sets s ON s.id = k.set_id WHERE s.round = ?", (round,)
        ).fetchone()[0]
        return {
            "round": round,
            "sets": sets,
            "rankings": rankings,
            "sets_ranked": sets_ranked,
            "skips": skips,
            "annotators": dict(per_annotator),
            "first_ranking_at": first,
            "last_ranking_at": last,
        }

    def set_priority(self, set_id: int) -> float:
        row = self._conn().execute("SELECT priority FROM generation_sets WHERE id = ?", (set_id,)).fetchone()
        if row is None:
            raise NotFound(f"generation set {set_id} does not exist")
        return float(row[0])

    def get_set(self, set_id: int) -> GenerationSet | None:
        row = (
            self._conn()
            .execute(
                f"SELECT {_SET_COLUMNS} FROM generation_sets s JOIN prompts p ON p.id = s.prompt_id WHERE s.id = ?",
                (set_id,),
            )
            .fetchone()
        )
        return self._set(row) if row else None

    @staticmethod
    def _set(row: Sequence) -> GenerationSet:
        return GenerationSet(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])), round=row[5])

    def set_for_user(
        self, user_id: int, *, prompt_id: int | None = None, overlap: int | None = None, overlap_share: float = 1.0
    ) -> GenerationSet | None:
        """The first set this user has neither ranked nor skipped.

        With ``prompt_id``: a set of that prompt. Without: a set of a pool prompt (or a pushed
        set, :meth:`put_round_set`) that fewer than its quota of annotators have ranked or
        skipped: the newest pipeline round first (sets of no round last), then highest
        ``priority``, then in pool order (so annotators work through the same sets and their
        agreement can be measured). The quota is ``overlap`` for the share ``overlap_share`` of
        sets picked by :func:`overlap_draw` of the set id, and 1 for the others;
        ``overlap=None``: no quota.

        With a quota the set served is held for this user (a lease of ``lease_seconds``), and a
        set's quota counts the other users' live leases beside its rankings and skips: three
        annotators asking at once for a set shared by two get it twice, and the third another
        set. Asking again before ranking gives the user the same set unless one ahead of it in
        the order arrived meanwhile; ranking or skipping ends the lease, and so does being served
        another set (one set at a time).
        """
        if prompt_id is None and overlap is not None:
            return self._lease_set(user_id, overlap, overlap_share)
        where = [
            "NOT EXISTS (SELECT 1 FROM rankings r WHERE r.set_id = s.id AND r.user_id = :u AND r.deleted_at IS NULL)",
            "NOT EXISTS (SELECT 1 FROM skips k WHERE k.set_id = s.id AND k.user_id = :u)",
        ]
        if prompt_id is not None:
            where.append("s.prompt_id = :p")
        else:
            where.append("(p.source = 'pool' OR s.round IS NOT NULL OR s.key IS NOT NULL)")
            if overlap is not None:
                where.append(f"({_TOUCHES}) < (CASE WHEN {_DRAW_SQL} < :cut THEN :overlap ELSE 1 END)")
        row = (
            self._conn()
            .execute(
                f"SELECT {_SET_COLUMNS} FROM generation_sets s "
                f"JOIN prompts p ON p.id = s.prompt_id WHERE {' AND '.join(where)} "
                "ORDER BY s.round IS NULL, s.round DESC, s.priority DESC, s.prompt_id, s.id LIMIT 1",
                {"u": user_id, "p": prompt_id, "overlap": overlap, "cut": overlap_cut(overlap_share)},
            )
            .fetchone()
        )
        return self._set(row) if row else None

    def _end_lease(self, conn: sqlite3.Connection, set_id: int, user_id: int) -> None:
        if self.schema_version >= LEASES_SCHEMA:  # a store opened with fewer migrations (tests of old data) has none
            conn.execute("DELETE FROM leases WHERE set_id = ? AND user_id = ?", (set_id, user_id))

    def _lease_set(self, user_id: int, overlap: int, overlap_share: float) -> GenerationSet | None:
        """:meth:`set_for_user` with a quota: choose and lease in one write transaction, so two
        requests cannot both take a set's last place."""
        now = self.clock()
        others = "(SELECT count(*) FROM leases l2 WHERE l2.set_id = s.id AND l2.user_id != :u AND l2.expires_at > :now)"
        undone = (
            "NOT EXISTS (SELECT 1 FROM rankings r WHERE r.set_id = s.id AND r.user_id = :u AND r.deleted_at IS NULL) "
            "AND NOT EXISTS (SELECT 1 FROM skips k WHERE k.set_id = s.id AND k.user_id = :u) "
            "AND (p.source = 'pool' OR s.round IS NOT NULL OR s.key IS NOT NULL)"
        )
        order = "ORDER BY s.round IS NULL, s.round DESC, s.priority DESC, s.prompt_id, s.id LIMIT 1"
        args = {"u": user_id, "now": now, "overlap": overlap, "cut": overlap_cut(overlap_share)}
        base = f"SELECT {_SET_COLUMNS} FROM generation_sets s JOIN prompts p ON p.id = s.prompt_id WHERE {undone}"
        quota = f"(CASE WHEN {_DRAW_SQL} < :cut THEN :overlap ELSE 1 END)"
        with self.transaction() as conn:
            row = conn.execute(f"{base} AND ({_TOUCHES}) + {others} < {quota} {order}", args).fetchone()
            if row is None:
                return None
            # one set at a time: a user served another set (a newer round's, say) lets the old one go
            conn.execute("DELETE FROM leases WHERE user_id = ? AND set_id != ?", (user_id, row[0]))
            conn.execute(
                "INSERT INTO leases (set_id, user_id, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (set_id, user_id) DO UPDATE SET expires_at = excluded.expires_at",
                (row[0], user_id, now + self.lease_seconds),
            )
            conn.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))  # keep the table small
        return self._set(row)

    def pool_prompts_without_sets(self, limit: int) -> list[Prompt]:
        rows = (
            self._conn()
            .execute(
                "SELECT id, text, source FROM prompts p WHERE source = 'pool' AND NOT EXISTS "
                "(SELECT 1 FROM generation_sets s WHERE s.prompt_id = p.id) ORDER BY id LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [Prompt(*r) for r in rows]

    def count_untouched_pool_sets(self) -> int:
        """Pool sets nobody has ranked or skipped yet: the pre-generated buffer."""
        return (
            self._conn()
            .execute(
                f"SELECT count(*) FROM generation_sets s JOIN prompts p ON p.id = s.prompt_id "
                f"WHERE p.source = 'pool' AND ({_TOUCHES}) = 0"
            )
            .fetchone()[0]
        )

    def untouched_pool_sets(self) -> list[GenerationSet]:
        """Pool sets nobody has ranked or skipped yet, in set order: the buffer whose order can still change."""
        rows = (
            self._conn()
            .execute(
                f"SELECT {_SET_COLUMNS} FROM generation_sets s "
                f"JOIN prompts p ON p.id = s.prompt_id WHERE p.source = 'pool' AND ({_TOUCHES}) = 0 ORDER BY s.id"
            )
            .fetchall()
        )
        return [self._set(r) for r in rows]

    def set_priorities(self, priorities: dict[int, float]) -> None:
        """Set the serving priority of sets ``{set id: priority}``, in one transaction."""
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE generation_sets SET priority = ? WHERE id = ?", [(float(p), i) for i, p in priorities.items()]
            )

    def skip(self, set_id: int, user_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO skips (set_id, user_id, created_at) VALUES (?, ?, ?)", (set_id, user_id, _now())
            )
            self._end_lease(conn, set_id, user_id)

    # ---------------------------------------------------------------- rankings

    def add_ranking(self, set_id: int, user_id: int, ranks: Sequence[int], comment: str = "") -> int:
        """Insert one ranking in one transaction; ``Conflict`` if the user already ranked the set."""
        with self.transaction() as conn:
            existing = conn.execute(
                "SELECT id FROM rankings WHERE set_id = ? AND user_id = ? AND deleted_at IS NULL", (set_id, user_id)
            ).fetchone()
            if existing:
                raise Conflict(
                    f"you already ranked generation set {set_id} (ranking {existing[0]}); "
                    f"edit or delete that ranking instead"
                )
            cur = conn.execute(
                "INSERT INTO rankings (set_id, user_id, ranks, comment, created_at) VALUES (?, ?, ?, ?, ?)",
                (set_id, user_id, json.dumps(list(ranks)), comment, _now()),
            )
            self._end_lease(conn, set_id, user_id)
            return int(cur.lastrowid)

    def get_ranking(self, ranking_id: int) -> Ranking | None:
        row = self._conn().execute(_RANKING_SELECT + " WHERE r.id = ?", (ranking_id,)).fetchone()
        return _ranking(row) if row else None

    def update_ranking(
        self, ranking_id: int, *, ranks: Sequence[int] | None = None, comment: str | None = None
    ) -> None:
        with self.transaction() as conn:
            row = conn.execute("SELECT deleted_at FROM rankings WHERE id = ?", (ranking_id,)).fetchone()
            if row is None:
                raise NotFound(f"ranking {ranking_id} does not exist")
            if row[0] is not None:
                raise Conflict(f"ranking {ranking_id} is deleted; restore it before editing")
            if ranks is not None:
                conn.execute("UPDATE rankings SET ranks = ? WHERE id = ?", (json.dumps(list(ranks)), ranking_id))
            if comment is not None:
                conn.execute("UPDATE rankings SET comment = ? WHERE id = ?", (comment, ranking_id))
            conn.execute("UPDATE rankings SET updated_at = ? WHERE id = ?", (_now(), ranking_id))

    def delete_ranking(self, ranking_id: int, by_user_id: int) -> None:
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE rankings SET deleted_at = ?, deleted_by = ? WHERE id = ? AND deleted_at IS NULL",
                (_now(), by_user_id, ranking_id),
            )
            if cur.rowcount == 0:
                raise Conflict(f"ranking {ranking_id} is already deleted")

    def restore_ranking(self, ranking_id: int) -> None:
        with self.transaction() as conn:
            row = conn.execute(
                "SELECT set_id, user_id, deleted_at FROM rankings WHERE id = ?", (ranking_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"ranking {ranking_id} does not exist")
            if row[2] is None:
                raise Conflict(f"ranking {ranking_id} is not deleted")
            live = conn.execute(
                "SELECT id FROM rankings WHERE set_id = ? AND user_id = ? AND deleted_at IS NULL", (row[0], row[1])
            ).fetchone()
            if live:
                raise Conflict(
                    f"ranking {ranking_id} cannot be restored: ranking {live[0]} of the same set by the same "
                    f"annotator is live; delete that one first"
                )
            conn.execute("UPDATE rankings SET deleted_at = NULL, deleted_by = NULL WHERE id = ?", (ranking_id,))

    def list_rankings(
        self,
        *,
        user_id: int | None = None,
        prompt_id: int | None = None,
        prompt_contains: str | None = None,
        deleted: bool = False,
        round: int | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> tuple[list[Ranking], int]:
        """Rankings matching the filters, newest first, and the total count before paging.

        ``deleted=False`` lists live rankings, ``True`` the deleted ones; ``round``: only the
        rankings of that pipeline round's sets.
        """
        where = ["r.deleted_at IS NOT NULL" if deleted else "r.deleted_at IS NULL"]
        params: list = []
        if user_id is not None:
            where.append("r.user_id = ?")
            params.append(user_id)
        if prompt_id is not None:
            where.append("s.prompt_id = ?")
            params.append(prompt_id)
        if prompt_contains:
            where.append("instr(lower(p.text), lower(?)) > 0")
            params.append(prompt_contains)
        if round is not None:
            where.append("s.round = ?")
            params.append(round)
        clause = " WHERE " + " AND ".join(where)
        conn = self._conn()
        total = conn.execute(
            "SELECT count(*) FROM rankings r JOIN generation_sets s ON s.id = r.set_id "
            "JOIN prompts p ON p.id = s.prompt_id" + clause,
            params,
        ).fetchone()[0]
        page = " LIMIT ? OFFSET ?" if limit is not None else ""
        rows = conn.execute(
            _RANKING_SELECT + clause + " ORDER BY r.id DESC" + page,
            params + ([limit, offset] if limit is not None else []),
        ).fetchall()
        return [_ranking(r) for r in rows], total

    def counts_by_user(self) -> list[dict]:
        """Per annotator: live rankings and skips."""
        rows = (
            self._conn()
            .execute(
                "SELECT u.name, u.is_admin, "
                "(SELECT count(*) FROM rankings r WHERE r.user_id = u.id AND r.deleted_at IS NULL), "
                "(SELECT count(*) FROM skips k WHERE k.user_id = u.id) FROM users u ORDER BY u.name"
            )
            .fetchall()
        )
        return [{"annotator": r[0], "is_admin": bool(r[1]), "rankings": r[2], "skips": r[3]} for r in rows]

    def shared_rankings(self) -> list[tuple[int, str, tuple[int, ...]]]:
        """(set id, annotator, ranks) of every live ranking of a set ranked by two or more annotators."""
        rows = (
            self._conn()
            .execute(
                "SELECT r.set_id, u.name, r.ranks FROM rankings r JOIN users u ON u.id = r.user_id "
                "WHERE r.deleted_at IS NULL AND r.set_id IN (SELECT set_id FROM rankings WHERE deleted_at IS NULL "
                "GROUP BY set_id HAVING count(*) > 1) ORDER BY r.set_id, u.name"
            )
            .fetchall()
        )
        return [(r[0], r[1], tuple(json.loads(r[2]))) for r in rows]

    def integrity_check(self) -> str:
        return self._conn().execute("PRAGMA integrity_check").fetchone()[0]


# Which sets go to several annotators: a multiplicative hash of the set id (Knuth, TAOCP vol. 3,
# sec. 6.4: id * floor(2^32 / golden ratio) mod 2^32), the same in SQL and in Python, so the share
# is deterministic, survives restarts and needs no column. Consecutive ids spread evenly over
# [0, 2^32) (the golden-ratio sequence), so the share of any run of sets is close to exact.
_DRAW_MULTIPLIER, _DRAW_RANGE = 2654435769, 2**32
_DRAW_SQL = f"((s.id * {_DRAW_MULTIPLIER}) % {_DRAW_RANGE})"


def overlap_draw(set_id: int) -> int:
    """The set's draw in [0, 2^32): it goes to several annotators when below :func:`overlap_cut`."""
    return (set_id * _DRAW_MULTIPLIER) % _DRAW_RANGE


def overlap_cut(share: float) -> int:
    """The draw below which a set is shared, for a ``share`` in [0, 1] of the sets."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"overlap share must be in [0, 1], got {share}")
    return round(share * _DRAW_RANGE)


# How many annotators have ranked (live) or skipped set ``s``.
_TOUCHES = (
    "(SELECT count(*) FROM rankings r2 WHERE r2.set_id = s.id AND r2.deleted_at IS NULL)"
    " + (SELECT count(*) FROM skips k2 WHERE k2.set_id = s.id)"
)


EXPORT_FORMATS = {"tsv": "ranklist-tsv", "jsonl": "ranked", "pairs": "pairs", "hf": None}
"""Export format -> the ``rlhfkit.data`` format written (every one read by ``rlhfkit rm train``).

``hf`` is a ``datasets`` folder written with ``save_to_disk`` (:data:`HF_COLUMNS`), not a file."""

AGGREGATES = ("every", "consensus", "weighted")
"""``every``: one list per live ranking; ``consensus``: one list per generation set;
``weighted``: one list per live ranking, weighted by its annotator's agreement with the others."""

HF_COLUMNS = ("prompt", "responses", "ranks", "set_id", "annotator", "annotators")
"""Columns of ``--format hf``, plus ``round`` when the rankings carry one. ``responses`` is in
the order the app showed them and ``ranks[i]`` is the rank of ``responses[i]`` (0 = best, equal
= tie), so ties round-trip; ``annotator`` is the annotator's name, or ``consensus`` for a
consensus list, whose ``annotators`` are the names it combines; and ``weight`` when a list's
weight is not 1 (``--aggregate weighted``)."""


@dataclass(frozen=True)
class ExportedList:
    """One list to export: a ranking, or the consensus of a set's rankings."""

    example: PreferenceExample
    set_id: int
    annotator: str
    annotators: tuple[str, ...]
    round: int | None


def exported_lists(rankings: Sequence[Ranking], aggregate: str) -> list[ExportedList]:
    """The lists to write from ``rankings`` (oldest first).

    ``every``: one per ranking. ``consensus``: one per generation set, in the order of the
    set's first ranking; a set ranked by several annotators gets their consensus
    (:func:`~rlhfkit.annotate.consensus.consensus_ranks`, mean rank), a set ranked once its
    ranking. A consensus with every response tied (the annotators cancel out) states no
    preference and is left out. ``weighted``: one per ranking, as ``every``, each with
    ``example.weight`` its annotator's weight from
    :func:`~rlhfkit.annotate.agreement.annotator_weights` (agreement with the others on the
    shared sets, in [0.1, 1]; 1 for an annotator who shares no set).
    """
    if aggregate not in AGGREGATES:
        raise UserError(f"aggregate {aggregate!r} is not supported; use one of {', '.join(AGGREGATES)}")
    if aggregate in ("every", "weighted"):
        weights = (
            annotator_weights((r.set_id, r.annotator, r.ranks) for r in rankings) if aggregate == "weighted" else {}
        )
        return [
            ExportedList(
                dataclasses.replace(r.example(), weight=weights.get(r.annotator, 1.0)),
                r.set_id,
                r.annotator,
                (r.annotator,),
                getattr(r, "round", None),
            )
            for r in rankings
        ]
    by_set: dict[int, list[Ranking]] = {}
    for r in rankings:
        by_set.setdefault(r.set_id, []).append(r)
    lists = []
    for set_id, group in by_set.items():
        first, round_ = group[0], getattr(group[0], "round", None)
        if len(group) == 1:
            lists.append(ExportedList(first.example(), set_id, first.annotator, (first.annotator,), round_))
            continue
        ranks = consensus_ranks([r.ranks for r in group])
        if len(set(ranks)) == 1:
            continue
        names = tuple(r.annotator for r in group)
        source = f"consensus of rankings {', '.join(str(r.id) for r in group)}"
        example = PreferenceExample(first.prompt, first.responses, ranks, source=source)
        lists.append(ExportedList(example, set_id, "consensus", names, round_))
    return lists


def export_rankings(
    store: AnnotationStore,
    path: str | Path,
    format: str,
    *,
    user_id: int | None = None,
    prompt_id: int | None = None,
    prompt_contains: str | None = None,
    aggregate: str = "every",
    round: int | None = None,
) -> int:
    """Write the live rankings (oldest first) for ``rlhfkit rm train``; returns the rows written.

    ``tsv`` is the rank-list TSV with a prompt column (read it with ``prompt_column=True``);
    it cannot hold ties, tabs or line breaks and refuses such rows (``ValueError`` naming
    the ranking). ``jsonl`` is the ``ranked`` format and holds everything (ties need
    ``allow_ties=True`` when read). ``pairs`` is the TRL / OpenRLHF preference JSONL
    ``{"prompt", "chosen", "rejected"}``, one row per ordered pair of a list (ties give no
    pair). ``hf`` saves a ``datasets.Dataset`` (:data:`HF_COLUMNS`) into the folder ``path``
    with ``save_to_disk``. ``aggregate`` is one of :data:`AGGREGATES` (see :func:`exported_lists`).
    ``round``: only the rankings of that pipeline round's sets.
    """

    if format not in EXPORT_FORMATS:
        raise UserError(f"export format {format!r} is not supported; use one of {', '.join(EXPORT_FORMATS)}")
    rankings, _ = store.list_rankings(
        user_id=user_id, prompt_id=prompt_id, prompt_contains=prompt_contains, round=round
    )
    if not rankings:
        raise NotFound("no rankings match, so there is nothing to export")
    lists = exported_lists(list(reversed(rankings)), aggregate)
    if format == "pairs":  # a list with every response tied has no pair; the writer refuses it
        lists = [x for x in lists if x.example.ordered_pairs()]
    if not lists:
        raise NotFound(f"the {len(rankings)} matching ranking(s) state no preference (every response tied)")
    if format == "hf":
        return save_hf_dataset(path, lists)
    try:
        return write_preferences(path, [x.example for x in lists], EXPORT_FORMATS[format])
    except ValueError as e:  # the writer refuses what the format cannot hold; name our flag
        raise UserError(f"{e} (here: --format jsonl, or the Export JSONL button)") from None


def check_hf_output(path: str | Path, option: str = "--output") -> Path:
    """Refuse an ``hf`` output that is a file or a folder holding something else; creates nothing."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not is_saved_dataset(path):
        raise UserError(
            f"{option} {path} is a folder that holds other files; --format hf replaces only a folder "
            f"save_to_disk wrote, so give a new or empty folder"
        )
    return check_output_dir(path, option)


def save_hf_dataset(path: str | Path, lists: Sequence[ExportedList]) -> int:
    """Save ``lists`` as a ``datasets.Dataset`` (:data:`HF_COLUMNS`) into the folder ``path``.

    Written into a temporary folder beside ``path`` and renamed over it, so a reader never
    sees half a dataset; an earlier ``save_to_disk`` folder at ``path`` is replaced. Returns
    the number of rows.
    """
    import datasets  # heavy (pyarrow, pandas): only this format needs it

    path = check_hf_output(path)
    columns: dict[str, list] = {
        "prompt": [x.example.prompt for x in lists],
        "responses": [list(x.example.responses) for x in lists],
        "ranks": [list(x.example.ranks) for x in lists],
        "set_id": [x.set_id for x in lists],
        "annotator": [x.annotator for x in lists],
        "annotators": [list(x.annotators) for x in lists],
    }
    features = {
        "prompt": datasets.Value("string"),
        "responses": datasets.Sequence(datasets.Value("string")),
        "ranks": datasets.Sequence(datasets.Value("int32")),
        "set_id": datasets.Value("int64"),
        "annotator": datasets.Value("string"),
        "annotators": datasets.Sequence(datasets.Value("string")),
    }
    if any(x.round is not None for x in lists):
        columns["round"] = [x.round for x in lists]
        features["round"] = datasets.Value("int64")
    if any(x.example.weight != 1.0 for x in lists):  # --aggregate weighted; the readers take it as the weight
        columns["weight"] = [x.example.weight for x in lists]
        features["weight"] = datasets.Value("float64")
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = tmp.with_suffix(".old")
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(tmp))
        if path.exists():  # an empty folder or an earlier export (check_hf_output allowed no other)
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:  # put the earlier export back rather than lose it
            if old.exists():
                old.rename(path)
            raise
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return len(lists)
