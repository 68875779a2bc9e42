"""The SQLite store: schema versions and migrations, durability settings, users, rankings."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from rlhfkit.annotate.store import (
    _DRAW_SQL,
    MIGRATIONS,
    AnnotationStore,
    Conflict,
    NotFound,
    StoreError,
    export_rankings,
    overlap_cut,
    overlap_draw,
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


# ------------------------------------------------------------------ serving order and overlap


def test_sets_are_served_highest_priority_first_then_in_pool_order(store):
    store.add_prompts(["p1", "p2", "p3", "p4"])
    uid = store.add_user("alice") and store.user_by_name("alice").id
    plain = [store.add_generation_set(p, "m", ["a", "b"]) for p in (1, 2)]  # priority 0: pool order
    low = store.add_generation_set(3, "m", ["a", "b"], priority=0.1)
    high = store.add_generation_set(4, "m", ["a", "b"], priority=0.6)
    assert store.set_priority(high) == 0.6 and store.set_priority(plain[0]) == 0.0
    served = []
    while (s := store.set_for_user(uid, overlap=1)) is not None:
        served.append(s.id)
        store.add_ranking(s.id, uid, [0, 1])
    assert served == [high, low, *plain]


def test_a_version_1_database_gets_priority_0_for_its_sets(tmp_path):
    old = AnnotationStore(tmp_path / "a.db", migrations=MIGRATIONS[:1])
    old.add_prompts(["p1", "p2"])
    for p in (2, 1):
        old._conn().execute(
            "INSERT INTO generation_sets (prompt_id, model, responses, created_at) VALUES (?, 'm', '[\"a\",\"b\"]', 'now')",
            (p,),
        )
    old.close()
    s = AnnotationStore(tmp_path / "a.db")
    assert s.schema_version == len(MIGRATIONS) and [s.set_priority(i) for i in (1, 2)] == [0.0, 0.0]
    uid = s.add_user("alice") and s.user_by_name("alice").id
    assert s.set_for_user(uid, overlap=2).prompt_id == 1  # equal priorities: pool order as before
    s.close()


def test_the_overlap_draw_is_the_same_in_sql_and_python(store):
    ids = [1, 2, 3, 1000, 123456789]
    got = [store._conn().execute(f"SELECT {_DRAW_SQL} FROM (SELECT ? AS id) s", (i,)).fetchone()[0] for i in ids]
    assert got == [overlap_draw(i) for i in ids]
    assert overlap_cut(0.0) == 0 and overlap_cut(1.0) == 2**32
    with pytest.raises(ValueError, match=r"overlap share must be in \[0, 1\], got 1.5"):
        overlap_cut(1.5)


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_a_share_of_sets_goes_to_several_annotators_and_nobody_gets_a_set_twice(store, share):
    n_sets, per_set = 40, 3
    store.add_prompts([f"p{i}" for i in range(n_sets)])
    sets = [store.add_generation_set(p, "m", ["a", "b"]) for p in range(1, n_sets + 1)]
    users = [store.add_user(f"u{i}") and store.user_by_name(f"u{i}").id for i in range(5)]
    served: dict[int, list[int]] = {u: [] for u in users}
    progress = True
    while progress:  # annotators take turns until nobody is served anything
        progress = False
        for u in users:
            s = store.set_for_user(u, overlap=per_set, overlap_share=share)
            if s is not None:
                served[u].append(s.id)
                if len(served[u]) % 4:
                    store.add_ranking(s.id, u, [0, 1])
                else:  # a skip counts as a touch too
                    store.skip(s.id, u)
                progress = True
    for u in users:
        assert len(served[u]) == len(set(served[u]))  # never the same set twice
    times = {s: sum(s in served[u] for u in users) for s in sets}
    shared = {s for s in sets if overlap_draw(s) < overlap_cut(share)}
    assert all(times[s] == (per_set if s in shared else 1) for s in sets)
    assert abs(len(shared) - share * n_sets) <= 1  # the golden-ratio hash spreads consecutive ids evenly


def test_the_app_serves_by_the_overlap_share(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from rlhfkit.annotate.app import create_app

    class Fixed:
        name = "fixed"

        def generate(self, prompt, k):
            return [f"{prompt} {i}" for i in range(k)]

    store = AnnotationStore(tmp_path / "a.db")
    store.add_prompts([f"p{i}" for i in range(6)])
    sets = [store.add_generation_set(p, "m", ["a", "b"]) for p in range(1, 7)]
    tokens = [store.add_user(name) for name in ("alice", "bob")]
    with pytest.raises(ValueError, match=r"overlap_share=2 in \[0, 1\]"):
        create_app(store, Fixed(), k=2, overlap_share=2)
    with TestClient(create_app(store, Fixed(), k=2, prefetch=0, overlap=2, overlap_share=0.0)) as client:
        got = {}
        for token in tokens:
            headers = {"Authorization": f"Bearer {token}"}
            got[token] = []
            for _ in range(len(sets)):
                r = client.get("/api/next", headers=headers).json()
                if r["status"] != "ready":
                    break
                got[token].append(r["set_id"])
                client.post("/api/rankings", json={"set_id": r["set_id"], "ranking": [[0], [1]]}, headers=headers)
    assert got[tokens[0]] == sets and got[tokens[1]] == []  # share 0: every set to one annotator
    store.close()


# ------------------------------------------------------------------ leases: the overlap is a hard cap
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _users(store, n):
    return [store.add_user(f"u{i}") and store.user_by_name(f"u{i}").id for i in range(n)]


def test_a_served_set_is_held_so_its_quota_counts_who_works_on_it(tmp_path):
    clock = Clock()
    store = AnnotationStore(tmp_path / "a.db", lease_seconds=60.0, clock=clock)
    store.add_prompts(["p1", "p2"])
    s1, s2 = (store.add_generation_set(p, "m", ["a", "b"]) for p in (1, 2))
    a, b, c = _users(store, 3)
    assert store.set_for_user(a, overlap=2).id == s1
    assert store.set_for_user(a, overlap=2).id == s1  # asking again: the same set, still one place taken
    assert store.set_for_user(b, overlap=2).id == s1
    assert store.set_for_user(c, overlap=2).id == s2  # s1's two places are held by a and b, nobody has ranked
    store.add_ranking(s1, a, [0, 1])
    assert store.set_for_user(c, overlap=2).id == s2  # a's ranking and b's lease: still two
    clock.t += 61  # b walked away: the lease ends and the place is free again
    assert store.set_for_user(c, overlap=2).id == s1
    assert store.set_for_user(b, overlap=2).id == s2  # c holds s1 now; b is served the next set
    store.add_ranking(s1, c, [1, 0])
    assert store.set_for_user(b, overlap=2).id == s2
    # without a quota nothing is held (a prompt's own set, or an app without overlap)
    assert store.set_for_user(a, prompt_id=2).id == s2
    assert store._conn().execute("SELECT count(*) FROM leases WHERE user_id = ?", (a,)).fetchone()[0] == 0
    store.close()


def test_being_served_a_newer_rounds_set_lets_the_old_one_go(tmp_path):
    store = AnnotationStore(tmp_path / "a.db")
    old, _ = store.put_round_set("old", ["a", "b"], round=1, key="o")
    a, b = _users(store, 2)
    assert store.set_for_user(a, overlap=1).id == old
    new, _ = store.put_round_set("new", ["a", "b"], round=2, key="n")
    assert store.set_for_user(a, overlap=1).id == new  # newest round first, as without leases
    assert store.set_for_user(b, overlap=1).id == old  # a let the old set go when served the new one
    store.skip(old, b)
    assert store._conn().execute("SELECT set_id, user_id FROM leases").fetchall() == [(new, a)]
    store.close()


def test_concurrent_annotators_never_exceed_the_overlap(tmp_path):
    """The race the lease closes: many threads ask for the next set at once and rank it after a
    pause; every set ends with exactly its quota of rankings, never more."""
    import time

    store = AnnotationStore(tmp_path / "a.db")
    n_sets, overlap = 6, 2
    store.add_prompts([f"p{i}" for i in range(n_sets)])
    sets = [store.add_generation_set(p, "m", ["a", "b"]) for p in range(1, n_sets + 1)]
    users = _users(store, 6)
    barrier = threading.Barrier(len(users))

    def work(u):
        barrier.wait()
        while (s := store.set_for_user(u, overlap=overlap)) is not None:
            time.sleep(0.01)  # ranking takes a moment: others ask meanwhile
            store.add_ranking(s.id, u, [0, 1])

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    counts = dict(
        store._conn().execute("SELECT set_id, count(*) FROM rankings WHERE deleted_at IS NULL GROUP BY set_id")
    )
    assert counts == {s: overlap for s in sets}
    store.close()
