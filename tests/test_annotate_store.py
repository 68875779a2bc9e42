"""The SQLite store: schema versions and migrations, durability settings, users, rankings."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from rlhfkit.annotate.store import (
    MIGRATIONS,
    AnnotationStore,
    Conflict,
    NotFound,
    StoreError,
    export_rankings,
)
from rlhfkit.data.readers import read_preferences


@pytest.fixture
def store(tmp_path):
    s = AnnotationStore(tmp_path / "a.db")
    yield s
    s.close()


def test_a_new_database_is_at_the_latest_version_in_wal_mode(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # synchronous is per connection: check the store's own.
    assert store._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.schema_version == len(MIGRATIONS)


def test_reopening_applies_nothing_and_keeps_data(tmp_path):
    s = AnnotationStore(tmp_path / "a.db")
    s.add_prompts(["p"])
    s.close()
    s = AnnotationStore(tmp_path / "a.db")
    assert s.count_prompts()["pool"] == 1
    s.close()


def test_migrations_run_in_order_from_the_stored_version(tmp_path):
    AnnotationStore(tmp_path / "a.db").close()
    later = list(MIGRATIONS) + [
        "ALTER TABLE rankings ADD COLUMN seconds REAL; CREATE INDEX rankings_set ON rankings(set_id)"
    ]
    s = AnnotationStore(tmp_path / "a.db", migrations=later)
    assert s.schema_version == len(later)
    columns = [row[1] for row in s._conn().execute("PRAGMA table_info(rankings)")]
    assert "seconds" in columns
    s.close()
    # The current code refuses a database from the future instead of corrupting it.
    with pytest.raises(
        StoreError, match=rf"schema version {len(later)} but this rlhfkit knows only up to {len(MIGRATIONS)}; upgrade"
    ):
        AnnotationStore(tmp_path / "a.db")


def test_a_failing_migration_changes_nothing(tmp_path):
    AnnotationStore(tmp_path / "a.db").close()
    broken = list(MIGRATIONS) + ["ALTER TABLE rankings ADD COLUMN x INTEGER; THIS IS NOT SQL"]
    with pytest.raises(sqlite3.OperationalError):
        AnnotationStore(tmp_path / "a.db", migrations=broken)
    s = AnnotationStore(tmp_path / "a.db")
    assert s.schema_version == len(MIGRATIONS)
    assert "x" not in [row[1] for row in s._conn().execute("PRAGMA table_info(rankings)")]
    s.close()


def test_tokens_are_stored_only_as_hashes(store):
    token = store.add_user("alice")
    admin = store.add_user("root", admin=True)
    assert store.user_for_token(token).name == "alice" and not store.user_for_token(token).is_admin
    assert store.user_for_token(admin).is_admin
    assert store.user_for_token("guess") is None
    store.close()
    files = b"".join(p.read_bytes() for p in store.path.parent.glob("a.db*"))
    assert token.encode() not in files and b"alice" in files


def test_user_names(store):
    store.add_user("alice")
    with pytest.raises(Conflict, match="user 'alice' already exists"):
        store.add_user("alice")
    for bad in ["", "two words", "x" * 65]:
        with pytest.raises(StoreError, match="without spaces"):
            store.add_user(bad)


def test_one_live_ranking_per_user_and_set_even_at_the_sql_level(store):
    store.add_prompts(["p"])
    uid = store.add_user("alice") and store.user_by_name("alice").id
    set_id = store.add_generation_set(1, "m", ["a", "b"])
    first = store.add_ranking(set_id, uid, [0, 1])
    with pytest.raises(Conflict):
        store.add_ranking(set_id, uid, [1, 0])
    with pytest.raises(sqlite3.IntegrityError):  # the partial unique index backs the check
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO rankings (set_id, user_id, ranks, created_at) VALUES (?, ?, '[1, 0]', 'now')",
                (set_id, uid),
            )
    store.delete_ranking(first, uid)
    second = store.add_ranking(set_id, uid, [1, 0])
    with pytest.raises(Conflict, match=f"ranking {second} of the same set"):
        store.restore_ranking(first)
    with pytest.raises(NotFound):
        store.restore_ranking(999)


def test_a_failed_transaction_leaves_no_row(store):
    store.add_prompts(["p"])
    with pytest.raises(RuntimeError):
        with store.transaction() as conn:
            conn.execute("INSERT INTO prompts (text, source, created_at) VALUES ('q', 'pool', 'now')")
            raise RuntimeError("crash mid-transaction")
    assert store.count_prompts()["pool"] == 1


def test_concurrent_writers_from_many_threads(store):
    store.add_prompts(["p"])
    set_id = store.add_generation_set(1, "m", ["a", "b"])
    uids = []
    for i in range(8):
        store.add_user(f"u{i}")
        uids.append(store.user_by_name(f"u{i}").id)
    errors = []

    def work(uid):
        try:
            store.add_ranking(set_id, uid, [0, 1])
            for _ in range(5):
                store.skip(set_id, uid)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(u,)) for u in uids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.list_rankings()[1] == 8


def test_export_cli_and_api_share_one_writer(store, tmp_path):
    store.add_prompts(["p\twith a tab"])
    uid = store.add_user("alice") and store.user_by_name("alice").id
    store.add_ranking(store.add_generation_set(1, "m", ["a", "b"]), uid, [1, 0])
    with pytest.raises(NotFound, match="nothing to export"):
        export_rankings(store, tmp_path / "x.jsonl", "jsonl", user_id=uid + 1)
    with pytest.raises(ValueError, match="tab or a line break"):
        export_rankings(store, tmp_path / "x.tsv", "tsv")
    with pytest.raises(ValueError, match="use one of tsv, jsonl"):
        export_rankings(store, tmp_path / "x.csv", "csv")
    assert export_rankings(store, tmp_path / "x.jsonl", "jsonl") == 1
    (example,) = read_preferences(tmp_path / "x.jsonl")
    assert (example.prompt, example.responses) == ("p\twith a tab", ("b", "a"))
