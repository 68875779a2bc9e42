"""Pipeline rounds in the annotation app: pushed sets, round progress, the HTTP client and the
simulated team.

The API tests run the app in-process (FastAPI TestClient); the client and team tests run it on
a real loopback socket (:class:`AppServer`, a thread of this process), as ``rlhfkit pipeline``
does.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.annotate.app import create_app  # noqa: E402
from rlhfkit.annotate.client import AppClient, AppHTTPError  # noqa: E402
from rlhfkit.annotate.server import AppServer  # noqa: E402
from rlhfkit.annotate.store import MIGRATIONS, AnnotationStore  # noqa: E402
from rlhfkit.annotate.team import SimulatedAnnotator, SimulatedTeam, _Tickets, groups_from_scores  # noqa: E402
from rlhfkit.errors import UserError  # noqa: E402
from tests.conftest import wait_until  # noqa: E402


class EchoGenerator:
    name = "echo"

    def generate(self, prompt: str, k: int) -> list[str]:
        return [f"answer {i} to {prompt!r}" for i in range(k)]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(r, status: int, code: str, match: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"] == code, r.json()
    assert match in r.json()["message"], r.json()["message"]


def good_words(prompts: list[str], responses: list[str]) -> list[float]:
    """The test's rule: 10 points per 'good', minus 10 per 'bad' (the signature of lexicon_reward)."""
    return [10.0 * (r.split().count("good") - r.split().count("bad")) for r in responses]


def push(client, token, prompt, responses, expect=201, **fields) -> dict:
    r = client.post("/api/sets", json={"prompt": prompt, "responses": responses, **fields}, headers=auth(token))
    assert r.status_code == expect, r.text
    return r.json()


@pytest.fixture
def env(tmp_path):
    """A store with annotators alice and bob, admin root, one pool prompt; an app with K=3."""
    store = AnnotationStore(tmp_path / "annotations.db")
    store.add_prompts(["a pool prompt"])
    tokens = {
        "alice": store.add_user("alice"),
        "bob": store.add_user("bob"),
        "root": store.add_user("root", admin=True),
    }

    class Env:
        pass

    e = Env()
    e.store, e.tokens, e.db = store, tokens, tmp_path / "annotations.db"
    with TestClient(create_app(store, EchoGenerator(), k=3, prefetch=0)) as client:
        e.client = client
        yield e
    store.close()


# ------------------------------------------------------------------ the store


def test_migration_from_version_2_keeps_the_data(tmp_path):
    old = AnnotationStore(tmp_path / "a.db", migrations=MIGRATIONS[:2])
    old.add_prompts(["p"])
    token = old.add_user("alice")
    user = old.user_for_token(token)
    set_id = old.add_generation_set(1, "m", ["x", "y"], priority=2.5)
    old.add_ranking(set_id, user.id, [1, 0], "c")
    old.close()
    store = AnnotationStore(tmp_path / "a.db")
    assert store.schema_version == len(MIGRATIONS)
    s = store.get_set(set_id)
    assert (s.responses, s.round, store.set_priority(set_id)) == (("x", "y"), None, 2.5)
    (r,), total = store.list_rankings()
    assert (total, r.ranks, r.comment, r.round) == (1, (1, 0), "c", None)
    assert store.user_for_token(token) == user
    # The key index holds: two sets may not share a key.
    store.put_round_set("q", ["a", "b"], round=1, key="k")
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction() as conn:
            conn.execute("UPDATE generation_sets SET key = 'k' WHERE id = ?", (set_id,))
    store.close()


def test_put_round_set_is_idempotent_by_key_and_joins_the_pool(tmp_path):
    store = AnnotationStore(tmp_path / "a.db")
    first = store.put_round_set("new prompt", ["a", "b", "c"], round=2, key="run/2/0", priority=1.0)
    assert first[1] is True
    assert store.put_round_set("new prompt", ["a", "b", "c"], round=2, key="run/2/0") == (first[0], False)
    assert store.count_prompts() == {"pool": 1, "typed": 0}
    for other in [
        ("other", ["a", "b", "c"], 2),
        ("new prompt", ["a", "c", "b"], 2),
        ("new prompt", ["a", "b", "c"], 3),
    ]:
        with pytest.raises(UserError, match=r"key 'run/2/0' belongs to generation set 1, which holds another"):
            store.put_round_set(other[0], other[1], round=other[2], key="run/2/0")
    # Without a key every push is a new set, of the same prompt.
    a, _ = store.put_round_set("new prompt", ["d", "e"], round=None, key=None)
    b, _ = store.put_round_set("new prompt", ["d", "e"], round=None, key=None)
    assert a != b and store.get_set(a).prompt_id == store.get_set(first[0]).prompt_id
    store.close()


# ------------------------------------------------------------------ POST /api/sets and rounds


def test_push_is_idempotent_by_key_and_a_changed_set_is_a_409(env):
    root = env.tokens["root"]
    body = {"round": 1, "key": "run/1/0", "priority": 0.5, "model": "policy-r1"}
    created = push(env.client, root, "Why?", ["because", "no idea"], **body)
    assert created == {"set_id": created["set_id"], "created": True, "round": 1, "key": "run/1/0"}
    again = push(env.client, root, "Why?", ["because", "no idea"], expect=200, **body)
    assert again == created | {"created": False}
    r = env.client.post(
        "/api/sets", json={"prompt": "Why?", "responses": ["because", "other"], **body}, headers=auth(root)
    )
    assert_error(r, 409, "key_conflict", "key 'run/1/0' belongs to generation set")
    s = env.store.get_set(created["set_id"])
    assert (s.model, s.round, s.responses, env.store.set_priority(s.id)) == (
        "policy-r1",
        1,
        ("because", "no idea"),
        0.5,
    )


def test_only_an_admin_pushes_sets_or_reads_a_round(env):
    before = env.store.count_prompts()
    r = env.client.post("/api/sets", json={"prompt": "p", "responses": ["a", "b"]}, headers=auth(env.tokens["alice"]))
    assert_error(r, 403, "forbidden", "only an admin can push generation sets; you are 'alice'")
    assert env.store.count_prompts() == before
    r = env.client.get("/api/rounds/1", headers=auth(env.tokens["bob"]))
    assert_error(r, 403, "forbidden", "only an admin can see a round's progress")
    assert env.client.post("/api/sets", json={"prompt": "p", "responses": ["a", "b"]}).status_code == 401


@pytest.mark.parametrize(
    "body,code,match",
    [
        ({"responses": ["a", "b"]}, "invalid_request", "body.prompt: Field required"),
        ({"prompt": "p", "responses": ["a"]}, "invalid_request", "body.responses: List should have at least 2 items"),
        ({"prompt": "p", "responses": ["a"] * 17}, "invalid_request", "List should have at most 16 items"),
        ({"prompt": "p", "responses": ["a", ""]}, "invalid_request", "body.responses.1: String should have at least 1"),
        ({"prompt": "p", "responses": ["a", 3]}, "invalid_request", "body.responses.1: Input should be a valid string"),
        ({"prompt": "p", "responses": ["a", "x" * 16001]}, "invalid_request", "at most 16000 characters"),
        ({"prompt": "p", "responses": ["a", "  "]}, "invalid_set", "'responses' [1] are blank"),
        ({"prompt": "p", "responses": ["a", "a"]}, "invalid_set", "'responses' holds the same text twice"),
        ({"prompt": " ", "responses": ["a", "b"]}, "invalid_set", "'prompt' is blank"),
        (
            {"prompt": "p", "responses": ["a", "b"], "round": 0},
            "invalid_request",
            "body.round: Input should be greater",
        ),
        (
            {"prompt": "p", "responses": ["a", "b"], "round": "1"},
            "invalid_request",
            "body.round: Input should be a valid",
        ),
        ({"prompt": "p", "responses": ["a", "b"], "key": "k" * 201}, "invalid_request", "body.key: String should have"),
        (
            {"prompt": "p", "responses": ["a", "b"], "priority": "1"},
            "invalid_request",
            "body.priority: Input should be",
        ),
        ({"prompt": "p", "responses": ["a", "b"], "extra": 1}, "invalid_request", "body.extra: Extra inputs"),
    ],
)
def test_bad_pushes_are_422_and_change_nothing(env, body, code, match):
    r = env.client.post("/api/sets", json=body, headers=auth(env.tokens["root"]))
    assert_error(r, 422, code, match)
    assert env.store.count_prompts() == {"pool": 1, "typed": 0}


def test_a_non_finite_priority_is_refused(env):
    r = env.client.post(
        "/api/sets",
        content=b'{"prompt": "p", "responses": ["a", "b"], "priority": Infinity}',
        headers=auth(env.tokens["root"]) | {"Content-Type": "application/json"},
    )
    assert_error(r, 422, "invalid_request", "body.priority: Input should be a finite number")


def test_newest_round_is_served_first_and_rounds_show_everywhere(env):
    root, alice = env.tokens["root"], env.tokens["alice"]
    r1 = push(env.client, root, "round one", ["a", "b"], round=1, key="r1")
    r2 = push(env.client, root, "round two", ["c", "d", "e", "f", "g"], round=2, key="r2", priority=-5)
    pool = env.store.add_generation_set(1, "echo", ["x", "y", "z"], priority=9)  # no round: after every round
    order = []
    for _ in range(3):
        task = env.client.get("/api/next", headers=auth(alice)).json()
        assert task["status"] == "ready"
        order.append((task["set_id"], task["round"], task["k"]))
        k = task["k"]
        r = env.client.post(
            "/api/rankings", json={"set_id": task["set_id"], "ranking": [[i] for i in range(k)]}, headers=auth(alice)
        )
        assert r.status_code == 201, r.text  # a pushed set is ranked at its own K, whatever the app's K is
    assert order == [(r2["set_id"], 2, 5), (r1["set_id"], 1, 2), (pool, None, 3)]
    listing = env.client.get("/api/rankings", params={"round": 2}, headers=auth(root)).json()
    assert [(x["set_id"], x["round"]) for x in listing["items"]] == [(r2["set_id"], 2)]
    every = env.client.get("/api/rankings", headers=auth(alice)).json()["items"]
    assert sorted(x["round"] or 0 for x in every) == [0, 1, 2]
    export = env.client.get("/api/export", params={"round": 1}, headers=auth(root))
    assert [json.loads(line)["prompt"] for line in export.text.splitlines()] == ["round one"]
    r = env.client.get("/api/export", params={"round": 3}, headers=auth(root))
    assert_error(r, 404, "nothing_to_export", "no rankings match")
    progress = env.client.get("/api/rounds/2", headers=auth(root)).json()
    assert progress["first_ranking_at"] and progress["first_ranking_at"] == progress["last_ranking_at"]
    assert {k: v for k, v in progress.items() if not k.endswith("_at")} == {
        "round": 2,
        "sets": 1,
        "rankings": 1,
        "sets_ranked": 1,
        "skips": 0,
        "annotators": {"alice": 1},
    }
    empty = env.client.get("/api/rounds/7", headers=auth(root)).json()
    assert (empty["sets"], empty["rankings"], empty["annotators"], empty["first_ranking_at"]) == (0, 0, {}, None)


def test_round_progress_counts_live_rankings_per_annotator(tmp_path):
    store = AnnotationStore(tmp_path / "a.db")
    users = {n: store.user_for_token(store.add_user(n)) for n in ("alice", "bob")}
    sets = [store.put_round_set(f"p{i}", ["a", "b"], round=1, key=f"k{i}")[0] for i in range(3)]
    store.put_round_set("later", ["a", "b"], round=2, key="k9")
    store.add_ranking(sets[0], users["alice"].id, [0, 1])
    store.add_ranking(sets[0], users["bob"].id, [1, 0])
    gone = store.add_ranking(sets[1], users["bob"].id, [1, 0])
    store.delete_ranking(gone, users["bob"].id)
    store.skip(sets[2], users["alice"].id)
    p = store.round_progress(1)
    assert (p["sets"], p["rankings"], p["sets_ranked"], p["skips"], p["annotators"]) == (
        3,
        2,
        1,
        1,
        {"alice": 1, "bob": 1},
    )
    assert [r.round for r in store.list_rankings(round=1)[0]] == [1, 1] and store.list_rankings(round=2)[1] == 0
    store.close()


# ------------------------------------------------------------------ AppServer and AppClient


@pytest.fixture
def served(tmp_path):
    """An AppServer (K=2, overlap 2 on every set) on a store with admin root and three annotators."""
    store = AnnotationStore(tmp_path / "annotations.db")
    tokens = {"root": store.add_user("root", admin=True)}
    tokens |= {n: store.add_user(n) for n in ("ann", "ben", "cat")}
    with AppServer(store, k=2, overlap=2, overlap_share=1.0) as server:
        server.store, server.tokens, server.db = store, tokens, tmp_path / "annotations.db"
        yield server
    store.close()


def test_app_server_serves_pushed_sets_only(served):
    admin, ann = AppClient(served.url, served.tokens["root"]), AppClient(served.url, served.tokens["ann"])
    assert admin.health() == {"status": "ok"} and admin.me()["is_admin"] is True
    served.store.add_prompts(["a pool prompt nobody pushed a set for"])
    assert ann.next_set()["status"] == "empty"  # nothing pushed: nothing to generate either
    with pytest.raises(AppHTTPError, match="prompt 1 has no generation set waiting for you; this server generates"):
        ann._request("GET", "/api/next", params={"prompt_id": 1})
    with pytest.raises(AppHTTPError, match="typed prompts cannot be ranked here") as e:
        ann._request("POST", "/api/prompts", body={"text": "my own prompt"})
    assert (e.value.status, e.value.code) == (409, "no_generator")
    res = admin.push_set("Hi?", ["hello", "hey", "yo"], round=1, key="r1/0", priority=1.0)
    assert res == {"set_id": res["set_id"], "created": True, "round": 1, "key": "r1/0"}
    assert admin.push_set("Hi?", ["hello", "hey", "yo"], round=1, key="r1/0")["created"] is False
    task = ann.next_set()
    assert (task["status"], task["prompt"], task["k"], task["round"]) == ("ready", "Hi?", 3, 1)
    assert ann.submit(res["set_id"], [[2], [0], [1]])["ranks"] == [1, 2, 0]
    assert ann.next_set()["status"] == "empty"
    [row] = admin.rankings(round=1)
    assert (row["annotator"], row["round"], row["ranking"]) == ("ann", 1, [[2], [0], [1]])
    assert admin.round_progress(1)["rankings"] == 1 and admin.stats()["totals"]["rankings"] == 1


def test_app_server_refuses_a_port_in_use(served):
    with pytest.raises(UserError, match=f"port {served.port} on 127.0.0.1 is already in use"):
        AppServer(served.store, port=served.port)


def test_client_rankings_walks_every_page(served):
    admin = AppClient(served.url, served.tokens["root"])
    users = {n: served.store.user_by_name(n) for n in ("ann", "ben")}
    for i in range(104):  # two pages of 100 for the admin, one for ben
        set_id, _ = served.store.put_round_set(f"p{i}", ["a", "b"], round=1 + i % 2, key=f"k{i}")
        served.store.add_ranking(set_id, users["ann" if i < 100 else "ben"].id, [0, 1])
    every = admin.rankings()
    assert len(every) == 104 and len({r["id"] for r in every}) == 104
    assert [r["id"] for r in every] == sorted((r["id"] for r in every), reverse=True)
    assert len(admin.rankings(round=2)) == 52
    assert len(AppClient(served.url, served.tokens["ben"]).rankings()) == 4  # an annotator sees their own


def test_client_errors_name_the_url_and_say_what_to_do(served):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        with pytest.raises(UserError, match=rf"the annotation app at {closed} is not reachable .*start it"):
            AppClient(closed, "t").me()
    with pytest.raises(AppHTTPError, match=rf"GET {served.url}/api/me failed: HTTP 401 invalid_token: this token"):
        AppClient(served.url, "wrong").me()
    annotator = AppClient(served.url, served.tokens["ann"])
    with pytest.raises(AppHTTPError, match="HTTP 403 forbidden: only an admin can push generation sets") as e:
        annotator.push_set("p", ["a", "b"], round=1, key=None)
    assert (e.value.status, e.value.code) == (403, "forbidden")
    with pytest.raises(AppHTTPError, match=r"HTTP 404 unknown_set: generation set 99 does not exist"):
        annotator.submit(99, [[0], [1]])


# ------------------------------------------------------------------ the simulated team


def test_groups_from_scores():
    assert groups_from_scores([3.0, 1.0, 3.0], allow_ties=True) == [[0, 2], [1]]
    assert groups_from_scores([3.0, 1.0, 3.0], allow_ties=False) == [[0], [2], [1]]
    assert groups_from_scores([1.0, 1.0], allow_ties=True) == [[0], [1]]  # all tied: no preference, so by index


def test_noise_free_annotators_follow_the_rule_and_their_length_bias(served):
    admin = AppClient(served.url, served.tokens["root"])
    # Rule scores: 10, 20, 0. 'long' is 10 words longer than 'short'... a bias of 150 points per
    # 100 words adds 15 to a 10-word answer: 10 + 15 = 25 beats 20.
    responses = ["good " + "word " * 9, "good good", "bad nothing"]
    admin.push_set("Say something nice.", responses, round=1, key="s")
    plain = SimulatedAnnotator("ann", served.tokens["ann"])
    biased = SimulatedAnnotator("ben", served.tokens["ben"], length_bias=150.0)
    assert plain.scores(good_words, 1, "x", responses) == [10.0, 20.0, -10.0]
    assert biased.scores(good_words, 1, "x", responses) == [25.0, 23.0, -7.0]
    assert SimulatedTeam(served.url, [plain, biased], good_words).rank(2) == 2
    rows = {r["annotator"]: r["ranking"] for r in admin.rankings()}
    assert rows == {"ann": [[1], [0], [2]], "ben": [[0], [1], [2]]}


def test_noise_is_the_same_whichever_thread_ranks_first():
    a = SimulatedAnnotator("ann", "t", noise=2.0, seed=3)
    texts = ["one", "two", "three", "four"]
    assert a.scores(good_words, 7, "p", texts) == a.scores(good_words, 7, "p", texts)
    assert a.scores(good_words, 7, "p", texts) != a.scores(good_words, 8, "p", texts)
    assert a.scores(good_words, 7, "p", texts) != SimulatedAnnotator("bob", "t", noise=2.0, seed=3).scores(
        good_words, 7, "p", texts
    )
    with pytest.raises(ValueError, match="noise=-1.0 must be a finite number >= 0"):
        SimulatedAnnotator("ann", "t", noise=-1.0)


def test_a_team_of_three_reaches_an_exact_quota_then_continues_to_the_next(served):
    admin = AppClient(served.url, served.tokens["root"])
    for i in range(12):
        words = " ".join(["good"] * (i % 3) + ["bad"] * (i % 2))
        admin.push_set(f"prompt {i}", [f"{words} first", f"second {i}", "third"], round=1, key=f"r1/{i}")
    team = SimulatedTeam(
        served.url,
        [
            SimulatedAnnotator("ann", served.tokens["ann"], noise=0.0, seed=1),
            SimulatedAnnotator("ben", served.tokens["ben"], noise=5.0, seed=1),
            SimulatedAnnotator("cat", served.tokens["cat"], noise=1.0, length_bias=20.0, seconds_per_ranking=0.01),
        ],
        good_words,
        poll_s=0.05,
    )
    assert team.rank(7, round=1) == 7
    assert admin.round_progress(1)["rankings"] == 7
    assert team.rank(10, round=1) == 10  # a resumed pipeline asks for what is missing
    progress = admin.round_progress(1)
    assert progress["rankings"] == 17 and sum(progress["annotators"].values()) == 17
    with sqlite3.connect(served.db) as conn:
        per_user_set = conn.execute(
            "SELECT set_id, user_id, count(*) FROM rankings WHERE deleted_at IS NULL GROUP BY set_id, user_id"
        ).fetchall()
        per_set = conn.execute("SELECT count(*) FROM rankings GROUP BY set_id").fetchall()
    assert all(n == 1 for _, _, n in per_user_set)  # nobody ranked a set twice
    # The overlap is checked when a set is served (there is no lease), so annotators asking at once
    # may all get a set that needed one more ranking: a set ends with 2 or more, never more than the team.
    assert max(n for (n,) in per_set) <= 3


def test_a_team_waits_for_sets_and_stops_on_the_event(served):
    admin = AppClient(served.url, served.tokens["root"])
    team = SimulatedTeam(served.url, [SimulatedAnnotator("ann", served.tokens["ann"])], good_words, poll_s=0.02)
    stop, result = threading.Event(), []
    worker = threading.Thread(target=lambda: result.append(team.rank(3, stop_event=stop, round=2)))
    worker.start()
    admin.push_set("old round", ["a", "b"], round=1, key="old")  # another round's set does not count
    admin.push_set("now", ["good", "bad"], round=2, key="new")
    wait_until(
        lambda: admin.round_progress(2)["rankings"] == 1, timeout=30, what="the team ranking round 2", interval=0.02
    )
    stop.set()
    worker.join(10)
    assert result == [1] and admin.round_progress(1)["rankings"] == 0
    patient = SimulatedTeam(
        served.url, [SimulatedAnnotator("ben", served.tokens["ben"])], good_words, poll_s=0.02, patience_s=0.1
    )
    assert patient.rank(5, round=2) == 1  # one set waits for ben; then none, and he gives up


# ------------------------------------------------------------------ the pages (headless Chromium)


@pytest.mark.slow  # a browser process
def test_the_pages_show_a_sets_round(served):
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip(f"{chromium} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing (pip install playwright)")
    admin = AppClient(served.url, served.tokens["root"])
    admin.push_set("A pushed prompt <b>bold?</b>", ["first answer", "second answer"], round=3, key="r3/0")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"{served.url}/annotate#token={served.tokens['ann']}")
            page.locator("#task").wait_for(state="visible", timeout=30_000)
            assert page.locator("#round-tag").inner_text() == "Round 3"
            page.locator("#submit").click()
            page.locator("#empty").wait_for(state="visible", timeout=30_000)  # nothing else waits
            page.goto(f"{served.url}/dataset#token={served.tokens['root']}")
            page.locator(".row .tag").wait_for(state="visible", timeout=30_000)
            assert page.locator(".row .tag").inner_text() == "Round 3"
        finally:
            browser.close()
    assert admin.round_progress(3)["rankings"] == 1


def test_a_failing_annotator_stops_the_team_and_the_error_reaches_the_caller(served):
    AppClient(served.url, served.tokens["root"]).push_set("p", ["a", "b"], round=1, key="p")

    def broken_rule(prompts: list[str], responses: list[str]) -> list[float]:
        return [0.0]

    team = SimulatedTeam(
        served.url,
        [SimulatedAnnotator(n, served.tokens[n]) for n in ("ann", "ben")],
        broken_rule,
        poll_s=0.02,
    )
    with pytest.raises(ValueError, match="the rule gave 1 scores for 2 responses"):
        team.rank(2)
    with pytest.raises(AppHTTPError, match="HTTP 401 invalid_token"):
        SimulatedTeam(served.url, [SimulatedAnnotator("x", "not-a-token")], good_words).rank(1)


def test_a_ticket_of_a_failed_post_goes_back():
    tickets, stop = _Tickets(2), threading.Event()
    assert tickets.claim(stop) and tickets.claim(stop)
    tickets.settle(False)  # that POST failed: someone else may take its place
    assert tickets.claim(stop)
    tickets.settle(True)
    tickets.settle(True)
    assert tickets.submitted == 2 and tickets.done() and not tickets.claim(stop)
