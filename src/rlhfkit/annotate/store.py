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
import hashlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rlhfkit.data.types import PreferenceExample
from rlhfkit.data.writers import write_preferences
from rlhfkit.errors import UserError

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
]


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
           r.created_at, r.updated_at, r.deleted_at
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
    )


class AnnotationStore:
    """The annotation database. Thread-safe: each thread gets its own connection."""

    def __init__(self, path: str | Path, migrations: Sequence[str] = MIGRATIONS):
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

    def add_generation_set(self, prompt_id: int, model: str, responses: Sequence[str]) -> int:
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO generation_sets (prompt_id, model, responses, created_at) VALUES (?, ?, ?, ?)",
                (prompt_id, model, json.dumps(list(responses), ensure_ascii=False), _now()),
            )
            return int(cur.lastrowid)

    def get_set(self, set_id: int) -> GenerationSet | None:
        row = (
            self._conn()
            .execute(
                "SELECT s.id, s.prompt_id, p.text, s.model, s.responses FROM generation_sets s "
                "JOIN prompts p ON p.id = s.prompt_id WHERE s.id = ?",
                (set_id,),
            )
            .fetchone()
        )
        return self._set(row) if row else None

    @staticmethod
    def _set(row: Sequence) -> GenerationSet:
        return GenerationSet(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])))

    def set_for_user(
        self, user_id: int, *, prompt_id: int | None = None, overlap: int | None = None
    ) -> GenerationSet | None:
        """The first set this user has neither ranked nor skipped.

        With ``prompt_id``: a set of that prompt. Without: a set of a pool prompt that fewer
        than ``overlap`` annotators have ranked or skipped, in pool order (so annotators
        work through the same sets and their agreement can be measured).
        """
        where = [
            "NOT EXISTS (SELECT 1 FROM rankings r WHERE r.set_id = s.id AND r.user_id = :u AND r.deleted_at IS NULL)",
            "NOT EXISTS (SELECT 1 FROM skips k WHERE k.set_id = s.id AND k.user_id = :u)",
        ]
        if prompt_id is not None:
            where.append("s.prompt_id = :p")
        else:
            where.append("p.source = 'pool'")
            if overlap is not None:
                where.append(f"({_TOUCHES}) < :overlap")
        row = (
            self._conn()
            .execute(
                "SELECT s.id, s.prompt_id, p.text, s.model, s.responses FROM generation_sets s "
                f"JOIN prompts p ON p.id = s.prompt_id WHERE {' AND '.join(where)} ORDER BY s.prompt_id, s.id LIMIT 1",
                {"u": user_id, "p": prompt_id, "overlap": overlap},
            )
            .fetchone()
        )
        return self._set(row) if row else None

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

    def skip(self, set_id: int, user_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO skips (set_id, user_id, created_at) VALUES (?, ?, ?)", (set_id, user_id, _now())
            )

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
        limit: int | None = None,
        offset: int = 0,
    ) -> tuple[list[Ranking], int]:
        """Rankings matching the filters, newest first, and the total count before paging.

        ``deleted=False`` lists live rankings, ``True`` the deleted ones.
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


# How many annotators have ranked (live) or skipped set ``s``.
_TOUCHES = (
    "(SELECT count(*) FROM rankings r2 WHERE r2.set_id = s.id AND r2.deleted_at IS NULL)"
    " + (SELECT count(*) FROM skips k2 WHERE k2.set_id = s.id)"
)


EXPORT_FORMATS = {"tsv": "ranklist-tsv", "jsonl": "ranked"}
"""Export format -> the ``rlhfkit.data`` format written (both read by ``rlhfkit rm train``)."""


def export_rankings(
    store: AnnotationStore,
    path: str | Path,
    format: str,
    *,
    user_id: int | None = None,
    prompt_id: int | None = None,
    prompt_contains: str | None = None,
) -> int:
    """Write the live rankings (oldest first) for ``rlhfkit rm train``; returns the line count.

    ``tsv`` is the rank-list TSV with a prompt column (read it with ``prompt_column=True``);
    it cannot hold ties, tabs or line breaks and refuses such rows (``ValueError`` naming
    the ranking). ``jsonl`` is the ``ranked`` format and holds everything (ties need
    ``allow_ties=True`` when read).
    """

    if format not in EXPORT_FORMATS:
        raise UserError(f"export format {format!r} is not supported; use one of {', '.join(EXPORT_FORMATS)}")
    rankings, _ = store.list_rankings(user_id=user_id, prompt_id=prompt_id, prompt_contains=prompt_contains)
    if not rankings:
        raise NotFound("no rankings match, so there is nothing to export")
    try:
        return write_preferences(path, [r.example() for r in reversed(rankings)], EXPORT_FORMATS[format])
    except ValueError as e:  # the writer refuses what the format cannot hold; name our flag
        raise UserError(f"{e} (here: --format jsonl, or the Export JSONL button)") from None
