"""API tests for every endpoint of the annotation app, bad requests and permissions included.

The app runs in-process (FastAPI TestClient) with a small deterministic generator, so
each test takes milliseconds; the real tiny model is exercised in the browser test.
"""

from __future__ import annotations

import json
import re
import sqlite3
import typing

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.routing import APIRoute  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.annotate.app import create_app

SQLITE_INT_MAX = 2**63 - 1  # noqa: E402
from rlhfkit.annotate.store import AnnotationStore  # noqa: E402
from rlhfkit.data.readers import read_preferences  # noqa: E402
from tests.conftest import wait_until  # noqa: E402

PROMPTS = ["Why is the sky blue?", "Name a prime number.", "Write a haiku about rain.", "What is RLHF?"]


class EchoGenerator:
    """Deterministic stand-in for a model: K distinct answers that name the prompt and call."""

    name = "echo"

    def __init__(self):
        self.calls = 0

    def generate(self, prompt: str, k: int) -> list[str]:
        self.calls += 1
        return [f"answer {i} to {prompt!r} (call {self.calls})" for i in range(k)]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def db_rows(path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT id, set_id, user_id, ranks, comment, deleted_at FROM rankings ORDER BY id"
        ).fetchall()


@pytest.fixture
def env(tmp_path):
    """A store with a prompt pool, annotators alice and bob, admin root; an app (K=3, no prefetch)."""
    store = AnnotationStore(tmp_path / "annotations.db")
    store.add_prompts(PROMPTS)
    tokens = {
        "alice": store.add_user("alice"),
        "bob": store.add_user("bob"),
        "root": store.add_user("root", admin=True),
    }
    generator = EchoGenerator()

    def make(**kwargs):
        kwargs.setdefault("k", 3)
        kwargs.setdefault("prefetch", 0)
        return TestClient(create_app(store, generator, **kwargs))

    class Env:
        pass

    e = Env()
    e.store, e.tokens, e.generator, e.make, e.db = store, tokens, generator, make, tmp_path / "annotations.db"
    with make() as client:
        e.client = client
        yield e
    store.close()


def next_task(client, token, **params) -> dict:
    params.setdefault("wait", 5)
    r = client.get("/api/next", params=params, headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready", r.json()
    return r.json()


def submit(client, token, set_id, ranking, comment="", expect=201) -> dict:
    r = client.post(
        "/api/rankings", json={"set_id": set_id, "ranking": ranking, "comment": comment}, headers=auth(token)
    )
    assert r.status_code == expect, r.text
    return r.json()


def assert_error(r, status: int, code: str, match: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    assert match.lower() in body["message"].lower(), body["message"]


# ------------------------------------------------------------------ auth, pages, health


ENDPOINTS = [
    ("GET", "/api/me", None),
    ("GET", "/api/next", None),
    ("POST", "/api/prompts", {"text": "hi"}),
    ("POST", "/api/rankings", {"set_id": 1, "ranking": [[0], [1], [2]]}),
    ("POST", "/api/skips", {"set_id": 1}),
    ("GET", "/api/rankings", None),
    ("GET", "/api/rankings/1", None),
    ("PATCH", "/api/rankings/1", {"comment": "x"}),
    ("DELETE", "/api/rankings/1", None),
    ("POST", "/api/rankings/1/restore", None),
    ("GET", "/api/stats", None),
    ("GET", "/api/export", None),
    ("POST", "/api/sets", {"prompt": "p", "responses": ["a", "b"]}),
    ("GET", "/api/rounds/1", None),
]


@pytest.mark.parametrize("method,path,body", ENDPOINTS)
def test_every_data_endpoint_needs_a_valid_token(env, method, path, body):
    t = next_task(env.client, env.tokens["alice"])
    submit(env.client, env.tokens["alice"], t["set_id"], [[0], [1], [2]])
    before = db_rows(env.db)
    for headers, code in [
        ({}, "missing_token"),
        ({"Authorization": "Basic abc"}, "invalid_token"),
        ({"Authorization": "Bearer "}, "invalid_token"),
        (auth("not-a-token"), "invalid_token"),
    ]:
        r = env.client.request(method, path, json=body, headers=headers)
        assert_error(r, 401, code, "token")
    assert db_rows(env.db) == before


def test_health_and_pages_need_no_token_and_send_security_headers(env):
    assert env.client.get("/api/health").json() == {"status": "ok"}
    for page, marker in [("/annotate", 'id="responses"'), ("/dataset", 'id="rows"')]:
        r = env.client.get(page)
        assert r.status_code == 200 and marker in r.text
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    assert env.client.get("/", follow_redirects=False).headers["location"] == "/annotate"
    for asset in ["common.js", "annotate.js", "dataset.js", "app.css"]:
        assert env.client.get(f"/static/{asset}").status_code == 200
    # The front end never feeds server text to innerHTML.
    for asset in ["common.js", "annotate.js", "dataset.js"]:
        assert not re.search(
            r"\.(inner|outer)HTML\b|insertAdjacentHTML|document\.write", env.client.get(f"/static/{asset}").text
        )


def test_unknown_routes_and_methods_are_json_errors(env):
    assert_error(env.client.get("/api/nope", headers=auth(env.tokens["alice"])), 404, "not_found", "/api/nope")
    assert_error(env.client.put("/api/stats", headers=auth(env.tokens["alice"])), 405, "method_not_allowed", "PUT")


def test_me(env):
    r = env.client.get("/api/me", headers=auth(env.tokens["root"]))
    assert r.json() == {
        "name": "root",
        "is_admin": True,
        "k": 3,
        "allow_ties": False,
        "model": "echo",
        "prompts": {"pool": 4, "typed": 0},
    }
    assert env.client.get("/api/me", headers=auth(env.tokens["bob"])).json()["is_admin"] is False


# ------------------------------------------------------------------ getting work


def test_next_generates_then_serves_the_pool_in_order(env):
    r = env.client.get("/api/next", headers=auth(env.tokens["alice"]))  # wait=0: not generated yet
    assert r.status_code in (200, 202)
    if r.status_code == 202:
        assert r.json()["status"] == "generating" and r.json()["prompt_id"] == 1
    t = next_task(env.client, env.tokens["alice"])
    assert (t["prompt"], t["k"], t["allow_ties"]) == (PROMPTS[0], 3, False)
    assert len(set(t["responses"])) == 3
    # Asking again before ranking returns the same set (no new generation).
    assert next_task(env.client, env.tokens["alice"])["set_id"] == t["set_id"]
    assert env.generator.calls == 1


def test_overlap_gives_a_set_to_that_many_annotators(env):
    carol = env.store.add_user("carol")  # a third annotator
    a = next_task(env.client, env.tokens["alice"])
    b = next_task(env.client, env.tokens["bob"])
    assert a["set_id"] == b["set_id"]  # overlap=2: both rank the same generations
    submit(env.client, env.tokens["alice"], a["set_id"], [[0], [1], [2]])
    submit(env.client, env.tokens["bob"], b["set_id"], [[2], [1], [0]])
    c = next_task(env.client, carol)
    assert c["set_id"] != a["set_id"] and c["prompt"] == PROMPTS[1]
    # alice moves on to the next pool prompt, which is carol's set.
    assert next_task(env.client, env.tokens["alice"])["set_id"] == c["set_id"]


def test_next_reports_when_the_pool_is_done(env):
    with env.make(overlap=1) as client:
        for _ in PROMPTS:
            t = next_task(client, env.tokens["alice"])
            r = client.post("/api/skips", json={"set_id": t["set_id"]}, headers=auth(env.tokens["alice"]))
            assert r.status_code == 201
        r = client.get("/api/next", headers=auth(env.tokens["alice"]))
        assert r.status_code == 200 and r.json()["status"] == "empty"
        assert "random" in r.json()["message"]


def test_next_for_an_explicit_prompt_and_random(env):
    t = next_task(env.client, env.tokens["alice"], prompt_id=3)
    assert t["prompt"] == PROMPTS[2]
    submit(env.client, env.tokens["alice"], t["set_id"], [[1], [0], [2]])
    again = next_task(env.client, env.tokens["alice"], prompt_id=3)  # ranked it: a fresh set
    assert again["prompt_id"] == 3 and again["set_id"] != t["set_id"]
    assert next_task(env.client, env.tokens["bob"], mode="random")["prompt"] in PROMPTS


def test_next_unknown_prompt_id_and_bad_params(env):
    assert_error(
        env.client.get("/api/next", params={"prompt_id": 999}, headers=auth(env.tokens["alice"])),
        404,
        "unknown_prompt",
        "prompt 999",
    )
    assert_error(
        env.client.get("/api/next", params={"mode": "oldest"}, headers=auth(env.tokens["alice"])),
        422,
        "invalid_request",
        "mode",
    )
    assert_error(
        env.client.get("/api/next", params={"wait": -1}, headers=auth(env.tokens["alice"])),
        422,
        "invalid_request",
        "wait",
    )
    assert env.generator.calls == 0


def test_random_with_an_empty_pool(tmp_path):
    store = AnnotationStore(tmp_path / "empty.db")
    token = store.add_user("alice")
    with TestClient(create_app(store, EchoGenerator(), k=3, prefetch=0)) as client:
        assert_error(
            client.get("/api/next", params={"mode": "random"}, headers=auth(token)), 404, "no_prompts", "--prompts"
        )
        assert client.get("/api/next", headers=auth(token)).json()["status"] == "empty"


def test_typed_prompts(env):
    h = auth(env.tokens["bob"])
    r = env.client.post("/api/prompts", json={"text": "Explain KL divergence."}, headers=h)
    assert r.status_code == 201 and r.json()["source"] == "typed"
    pid = r.json()["prompt_id"]
    again = env.client.post("/api/prompts", json={"text": "Explain KL divergence."}, headers=h)
    assert again.status_code == 200 and again.json()["prompt_id"] == pid
    assert env.client.post("/api/prompts", json={"text": PROMPTS[0]}, headers=h).json()["prompt_id"] == 1
    assert next_task(env.client, env.tokens["bob"], prompt_id=pid)["prompt"] == "Explain KL divergence."
    # Typed prompts stay out of the pool order.
    assert next_task(env.client, env.tokens["alice"])["prompt"] == PROMPTS[0]
    assert_error(env.client.post("/api/prompts", json={"text": "   "}, headers=h), 422, "invalid_prompt", "empty")
    assert_error(env.client.post("/api/prompts", json={"text": ""}, headers=h), 422, "invalid_request", "text")
    assert_error(env.client.post("/api/prompts", json={"text": "x" * 4001}, headers=h), 422, "invalid_request", "4000")
    assert_error(env.client.post("/api/prompts", json={"text": "a", "x": 1}, headers=h), 422, "invalid_request", "x")
    assert env.store.count_prompts() == {"pool": 4, "typed": 1}


def test_skip(env):
    h = auth(env.tokens["alice"])
    t = next_task(env.client, env.tokens["alice"])
    r = env.client.post("/api/skips", json={"set_id": t["set_id"]}, headers=h)
    assert r.status_code == 201 and r.json() == {"set_id": t["set_id"], "skipped": True}
    assert env.client.post("/api/skips", json={"set_id": t["set_id"]}, headers=h).status_code == 201  # idempotent
    assert next_task(env.client, env.tokens["alice"])["prompt"] == PROMPTS[1]
    assert_error(env.client.post("/api/skips", json={"set_id": 999}, headers=h), 404, "unknown_set", "999")
    assert env.store.counts_by_user()[0] == {"annotator": "alice", "is_admin": False, "rankings": 0, "skips": 1}


def test_pregeneration_fills_the_buffer_in_the_background(env):
    with env.make(prefetch=2):
        wait_until(lambda: env.store.count_untouched_pool_sets() >= 2, what="2 pool sets generated in the background")
    # Leaving the app joins the generation thread, so the count is final: it stops at the buffer size.
    assert env.store.count_untouched_pool_sets() == 2 and env.generator.calls == 2
    with env.make() as client:  # no prefetch: what it serves was stored in the background
        r = client.get("/api/next", headers=auth(env.tokens["alice"]))  # wait=0, yet ready
        assert r.status_code == 200 and r.json()["prompt_id"] == 1
    assert env.generator.calls == 2


class FlakyGenerator:
    name = "flaky"

    def __init__(self, fail: int):
        self.fail = fail

    def generate(self, prompt, k):
        if self.fail:
            self.fail -= 1
            raise RuntimeError("out of memory")
        return [f"r{i}" for i in range(k)]


def test_generation_failure_is_a_503_and_a_retry_works(env):
    with TestClient(create_app(env.store, FlakyGenerator(fail=1), k=3, prefetch=0)) as client:
        assert_error(
            client.get("/api/next", params={"wait": 5}, headers=auth(env.tokens["alice"])),
            503,
            "generation_failed",
            "out of memory",
        )
        assert next_task(client, env.tokens["alice"])["responses"] == ["r0", "r1", "r2"]


class RepetitiveGenerator:
    """Returns duplicates and blanks: the pre-generator must re-sample until K distinct."""

    name = "repetitive"

    def __init__(self):
        self.calls = 0

    def generate(self, prompt, k):
        self.calls += 1
        return ["same", "same", "  "][:k] if self.calls == 1 else [f"new {self.calls}.{i}" for i in range(k)]


def test_sets_hold_k_distinct_nonblank_responses(env):
    gen = RepetitiveGenerator()
    with TestClient(create_app(env.store, gen, k=3, prefetch=0)) as client:
        t = next_task(client, env.tokens["alice"])
    assert t["responses"] == ["same", "new 2.0", "new 2.1"]


# ------------------------------------------------------------------ submitting


def test_submit_stores_one_row(env):
    t = next_task(env.client, env.tokens["alice"])
    r = submit(env.client, env.tokens["alice"], t["set_id"], [[2], [0], [1]], comment="2 is best")
    assert r["ranks"] == [1, 2, 0]
    (row,) = db_rows(env.db)
    assert row[0] == r["id"] and json.loads(row[3]) == [1, 2, 0] and row[4] == "2 is best" and row[5] is None


def test_resubmitting_the_same_set_is_a_conflict(env):
    t = next_task(env.client, env.tokens["alice"])
    submit(env.client, env.tokens["alice"], t["set_id"], [[0], [1], [2]])
    r = env.client.post(
        "/api/rankings", json={"set_id": t["set_id"], "ranking": [[1], [0], [2]]}, headers=auth(env.tokens["alice"])
    )
    assert_error(r, 409, "already_ranked", "edit or delete")
    assert len(db_rows(env.db)) == 1


BAD_SUBMISSIONS = [
    ({"set_id": 999, "ranking": [[0], [1], [2]]}, 404, "unknown_set", "set 999"),
    ({"set_id": 1, "ranking": [[0], [1]]}, 422, "invalid_ranking", "exactly once"),  # missing one
    ({"set_id": 1, "ranking": [[0], [1], [1]]}, 422, "invalid_ranking", "exactly once"),  # duplicate
    ({"set_id": 1, "ranking": [[0], [1], [3]]}, 422, "invalid_ranking", "0..2"),  # out of range
    ({"set_id": 1, "ranking": [[0], [1], [2], [3]]}, 422, "invalid_ranking", "exactly once"),  # too many
    ({"set_id": 1, "ranking": [[0], [], [1, 2]]}, 422, "invalid_ranking", "exactly once"),  # empty group
    ({"set_id": 1, "ranking": [[-1], [1], [2]]}, 422, "invalid_ranking", "exactly once"),
    ({"set_id": 1, "ranking": [[0], [1, 2]]}, 422, "ties_not_allowed", "--allow-ties"),
    ({"set_id": 1, "ranking": []}, 422, "invalid_request", "ranking"),
    ({"set_id": 1, "ranking": [[0], [1], [True]]}, 422, "invalid_request", "ranking"),
    ({"set_id": 1, "ranking": [["0"], [1], [2]]}, 422, "invalid_request", "ranking"),
    ({"set_id": "1", "ranking": [[0], [1], [2]]}, 422, "invalid_request", "set_id"),
    ({"ranking": [[0], [1], [2]]}, 422, "invalid_request", "set_id"),
    ({"set_id": 1, "ranking": [0, 1, 2]}, 422, "invalid_request", "ranking"),
    ({"set_id": 1, "ranking": [[0], [1], [2]], "comment": "x" * 5001}, 422, "invalid_request", "5000"),
    ({"set_id": 1, "ranking": [[0], [1], [2]], "user": "bob"}, 422, "invalid_request", "user"),
    ([1, 2, 3], 400, "invalid_json", "JSON object"),
]


@pytest.mark.parametrize("body,status,code,match", BAD_SUBMISSIONS)
def test_bad_submissions_are_4xx_and_change_nothing(env, body, status, code, match):
    next_task(env.client, env.tokens["alice"])  # set 1 exists
    r = env.client.post("/api/rankings", json=body, headers=auth(env.tokens["alice"]))
    assert_error(r, status, code, match)
    assert db_rows(env.db) == []


def test_malformed_and_oversized_bodies(env):
    next_task(env.client, env.tokens["alice"])
    h = auth(env.tokens["alice"]) | {"Content-Type": "application/json"}
    assert_error(
        env.client.post("/api/rankings", content=b'{"set_id": 1, "ranking": [[0]', headers=h),
        400,
        "invalid_json",
        "JSON",
    )
    assert_error(
        env.client.post("/api/rankings", content=b"set_id=1", headers=auth(env.tokens["alice"])),
        400,
        "invalid_json",
        "JSON",
    )
    latin1 = '{"set_id": 1, "ranking": [[0], [1], [2]], "comment": "caf\xe9"}'.encode("latin-1")
    for headers in (h, auth(env.tokens["alice"])):  # with and without a Content-Type
        assert_error(
            env.client.post("/api/rankings", content=latin1, headers=headers),
            400,
            "invalid_json",
            "request body is not valid UTF-8 JSON: byte 0xe9 at offset 57 is not UTF-8",
        )
    big = json.dumps({"set_id": 1, "ranking": [[0], [1], [2]], "comment": "x" * 70_000}).encode()
    assert_error(env.client.post("/api/rankings", content=big, headers=h), 413, "body_too_large", "65536 bytes")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b"x" * 1000

    assert_error(env.client.post("/api/rankings", content=chunks(), headers=h), 413, "body_too_large", "bytes")
    assert_error(env.client.post("/api/prompts", content=big, headers=h), 413, "body_too_large", "bytes")
    assert db_rows(env.db) == [] and env.store.count_prompts()["typed"] == 0
    utf16 = json.dumps({"set_id": 1, "ranking": [[0], [1], [2]]}).encode("utf-16-le")  # json.loads detects it
    assert env.client.post("/api/rankings", content=utf16, headers=h).status_code == 201


def test_ties_when_the_task_allows_them(env):
    with env.make(allow_ties=True) as client:
        t = next_task(client, env.tokens["alice"])
        assert t["allow_ties"] is True
        assert submit(client, env.tokens["alice"], t["set_id"], [[2], [0, 1]])["ranks"] == [1, 1, 0]
        t2 = next_task(client, env.tokens["alice"])
        r = client.post(
            "/api/rankings", json={"set_id": t2["set_id"], "ranking": [[0, 1, 2]]}, headers=auth(env.tokens["alice"])
        )
        assert_error(r, 422, "invalid_ranking", "no preference")
    assert len(db_rows(env.db)) == 1


# ------------------------------------------------------------------ the dataset: list, get, edit, delete


@pytest.fixture
def ranked(env):
    """alice and bob each rank sets 1 and 2 (ids: alice 1, 3; bob 2, 4)."""
    ids = {"alice": [], "bob": []}
    for ranking_a, ranking_b in [([[0], [1], [2]], [[0], [2], [1]]), ([[2], [1], [0]], [[2], [1], [0]])]:
        t = next_task(env.client, env.tokens["alice"])
        next_task(env.client, env.tokens["bob"])
        ids["alice"].append(submit(env.client, env.tokens["alice"], t["set_id"], ranking_a, comment="a")["id"])
        ids["bob"].append(submit(env.client, env.tokens["bob"], t["set_id"], ranking_b)["id"])
    env.ids = ids
    return env


def listing(env, who, **params):
    r = env.client.get("/api/rankings", params=params, headers=auth(env.tokens[who]))
    assert r.status_code == 200, r.text
    return r.json()


def test_annotators_list_only_their_own_rows_admin_lists_all(ranked):
    alice = listing(ranked, "alice")
    assert [i["id"] for i in alice["items"]] == ranked.ids["alice"][::-1]  # newest first
    assert all(i["annotator"] == "alice" and i["can_edit"] for i in alice["items"])
    item = alice["items"][-1]
    assert item["ranking"] == [[0], [1], [2]] and item["ranks"] == [0, 1, 2] and item["comment"] == "a"
    assert item["prompt"] == PROMPTS[0] and len(item["responses"]) == 3 and item["deleted"] is False
    everyone = listing(ranked, "root")
    assert everyone["total"] == 4 and all(i["can_edit"] for i in everyone["items"])
    assert [i["id"] for i in listing(ranked, "root", annotator="bob")["items"]] == ranked.ids["bob"][::-1]
    assert listing(ranked, "alice", annotator="alice")["total"] == 2


def test_list_filters_and_pagination(ranked):
    assert listing(ranked, "root", prompt="SKY")["total"] == 2  # case-insensitive substring
    assert listing(ranked, "root", prompt_id=2)["total"] == 2
    assert listing(ranked, "root", prompt="no such prompt")["total"] == 0
    page1 = listing(ranked, "root", per_page=3)
    page2 = listing(ranked, "root", per_page=3, page=2)
    assert (page1["pages"], len(page1["items"]), len(page2["items"])) == (2, 3, 1)
    assert {i["id"] for i in page1["items"] + page2["items"]} == {1, 2, 3, 4}
    assert listing(ranked, "root", per_page=3, page=5)["items"] == []


@pytest.mark.parametrize(
    "params,status,code,match",
    [
        ({"annotator": "bob"}, 403, "forbidden", "own rankings"),
        ({"prompt_id": 999}, 404, "unknown_prompt", "999"),
        ({"page": 0}, 422, "invalid_request", "page"),
        ({"per_page": 101}, 422, "invalid_request", "per_page"),
        ({"deleted": "maybe"}, 422, "invalid_request", "deleted"),
    ],
)
def test_bad_list_requests(ranked, params, status, code, match):
    assert_error(
        ranked.client.get("/api/rankings", params=params, headers=auth(ranked.tokens["alice"])), status, code, match
    )


# ------------------------------------------------------------------ integers out of range


def _holds_int(tp) -> bool:
    """``int``, or a type built from it (``int | None``, ``list[list[StrictInt]]``); not bool."""
    return tp is int or any(_holds_int(arg) for arg in typing.get_args(tp))


def int_parameters(app) -> set[tuple[str, str, str]]:
    """(method, route, parameter) of every integer an API route (or its dependencies) takes: in
    the path, the query or a field of the JSON body."""
    found = set()
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        dependants, names = [route.dependant], []
        while dependants:
            d = dependants.pop()
            dependants += d.dependencies
            names += [p.name for p in d.path_params + d.query_params if _holds_int(p.field_info.annotation)]
            for body in d.body_params:
                names += [
                    name for name, f in body.field_info.annotation.model_fields.items() if _holds_int(f.annotation)
                ]
        found |= {(method, route.path, name) for method in route.methods for name in names}
    return found


# Each: a request that is valid except that the named integer is ``v``.
INT_INPUTS = {
    ("GET", "/api/next", "prompt_id"): lambda v: {"url": "/api/next", "params": {"prompt_id": v}},
    ("POST", "/api/rankings", "set_id"): lambda v: {
        "url": "/api/rankings",
        "json": {"set_id": v, "ranking": [[0], [1], [2]]},
    },
    ("POST", "/api/rankings", "ranking"): lambda v: {
        "url": "/api/rankings",
        "json": {"set_id": 1, "ranking": [[v], [1], [2]]},
    },
    ("POST", "/api/skips", "set_id"): lambda v: {"url": "/api/skips", "json": {"set_id": v}},
    ("GET", "/api/rankings", "page"): lambda v: {"url": "/api/rankings", "params": {"page": v}},
    ("GET", "/api/rankings", "per_page"): lambda v: {"url": "/api/rankings", "params": {"per_page": v}},
    ("GET", "/api/rankings", "prompt_id"): lambda v: {"url": "/api/rankings", "params": {"prompt_id": v}},
    ("GET", "/api/rankings/{ranking_id}", "ranking_id"): lambda v: {"url": f"/api/rankings/{v}"},
    ("PATCH", "/api/rankings/{ranking_id}", "ranking_id"): lambda v: {
        "url": f"/api/rankings/{v}",
        "json": {"comment": "x"},
    },
    ("PATCH", "/api/rankings/{ranking_id}", "ranking"): lambda v: {
        "url": "/api/rankings/1",
        "json": {"ranking": [[v], [1], [2]]},
    },
    ("DELETE", "/api/rankings/{ranking_id}", "ranking_id"): lambda v: {"url": f"/api/rankings/{v}"},
    ("POST", "/api/rankings/{ranking_id}/restore", "ranking_id"): lambda v: {"url": f"/api/rankings/{v}/restore"},
    ("GET", "/api/export", "prompt_id"): lambda v: {"url": "/api/export", "params": {"prompt_id": v}},
    ("GET", "/api/rankings", "round"): lambda v: {"url": "/api/rankings", "params": {"round": v}},
    ("GET", "/api/export", "round"): lambda v: {"url": "/api/export", "params": {"round": v}},
    ("GET", "/api/rounds/{round}", "round"): lambda v: {"url": f"/api/rounds/{v}"},
    ("POST", "/api/sets", "round"): lambda v: {
        "url": "/api/sets",
        "json": {"prompt": "p", "responses": ["a", "b"], "round": v},
    },
}


def test_the_out_of_range_test_covers_every_integer_parameter(env):
    assert set(INT_INPUTS) == int_parameters(env.client.app)


@pytest.mark.parametrize("value", [99999999999999999999999, SQLITE_INT_MAX + 1, -1, -(2**70)])
@pytest.mark.parametrize("method,route,param", sorted(INT_INPUTS))
def test_integers_out_of_range_are_4xx_json_errors(ranked, method, route, param, value):
    before = db_rows(ranked.db)
    request = INT_INPUTS[method, route, param](value)
    r = ranked.client.request(method, headers=auth(ranked.tokens["root"]), **request)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert set(r.json()) == {"error", "message"} and param in r.json()["message"], r.json()
    assert db_rows(ranked.db) == before


def test_the_largest_integers_reach_the_database_safely(ranked):
    h = auth(ranked.tokens["root"])
    assert_error(
        ranked.client.get(f"/api/rankings/{SQLITE_INT_MAX}", headers=h), 404, "unknown_ranking", str(SQLITE_INT_MAX)
    )
    assert_error(ranked.client.post("/api/skips", json={"set_id": SQLITE_INT_MAX}, headers=h), 404, "unknown_set", "")
    assert_error(
        ranked.client.get("/api/next", params={"prompt_id": SQLITE_INT_MAX}, headers=h), 404, "unknown_prompt", ""
    )
    last_page = SQLITE_INT_MAX // 100
    assert listing(ranked, "root", page=last_page, per_page=100)["items"] == []  # its row offset fits in SQLite
    assert_error(
        ranked.client.get("/api/rankings", params={"page": last_page + 1}, headers=h),
        422,
        "invalid_request",
        f"query.page: Input should be less than or equal to {last_page}",
    )
    assert_error(
        ranked.client.get("/api/rankings/0", headers=h),
        422,
        "invalid_request",
        "path.ranking_id: Input should be greater than or equal to 1",
    )


def test_admin_filter_by_unknown_annotator(ranked):
    r = ranked.client.get("/api/rankings", params={"annotator": "zed"}, headers=auth(ranked.tokens["root"]))
    assert_error(r, 404, "unknown_annotator", "zed")


def test_get_one_ranking_permissions(ranked):
    a1, b1 = ranked.ids["alice"][0], ranked.ids["bob"][0]
    assert ranked.client.get(f"/api/rankings/{a1}", headers=auth(ranked.tokens["alice"])).json()["id"] == a1
    assert_error(
        ranked.client.get(f"/api/rankings/{b1}", headers=auth(ranked.tokens["alice"])),
        403,
        "forbidden",
        "another annotator",
    )
    assert ranked.client.get(f"/api/rankings/{b1}", headers=auth(ranked.tokens["root"])).json()["annotator"] == "bob"
    assert_error(
        ranked.client.get("/api/rankings/999", headers=auth(ranked.tokens["root"])), 404, "unknown_ranking", "999"
    )
    assert_error(
        ranked.client.get("/api/rankings/abc", headers=auth(ranked.tokens["root"])),
        422,
        "invalid_request",
        "ranking_id",
    )


def test_edit_own_ranking_only(ranked):
    a1, b1 = ranked.ids["alice"][0], ranked.ids["bob"][0]
    h = auth(ranked.tokens["alice"])
    before = db_rows(ranked.db)
    assert_error(
        ranked.client.patch(f"/api/rankings/{b1}", json={"comment": "mine now"}, headers=h), 403, "forbidden", "another"
    )
    assert_error(
        ranked.client.patch(f"/api/rankings/{a1}", json={"ranking": [[0], [0], [1]]}, headers=h),
        422,
        "invalid_ranking",
        "",
    )
    assert_error(
        ranked.client.patch(f"/api/rankings/{a1}", json={"ranks": [0, 1, 2]}, headers=h),
        422,
        "invalid_request",
        "ranks",
    )
    assert_error(ranked.client.patch("/api/rankings/999", json={"comment": "x"}, headers=h), 404, "unknown_ranking", "")
    assert db_rows(ranked.db) == before
    r = ranked.client.patch(f"/api/rankings/{a1}", json={"ranking": [[1], [2], [0]], "comment": "changed"}, headers=h)
    assert r.status_code == 200 and r.json()["ranks"] == [2, 0, 1] and r.json()["comment"] == "changed"
    assert r.json()["updated_at"] is not None
    assert (
        ranked.client.patch(
            f"/api/rankings/{b1}", json={"comment": "admin note"}, headers=auth(ranked.tokens["root"])
        ).status_code
        == 200
    )


def test_delete_and_undo_own_rankings_only(ranked):
    a1, b1 = ranked.ids["alice"][0], ranked.ids["bob"][0]
    ha, hb = auth(ranked.tokens["alice"]), auth(ranked.tokens["bob"])
    before = db_rows(ranked.db)
    assert_error(ranked.client.delete(f"/api/rankings/{b1}", headers=ha), 403, "forbidden", "another annotator")
    assert_error(ranked.client.post(f"/api/rankings/{b1}/restore", headers=ha), 403, "forbidden", "")
    assert_error(ranked.client.delete("/api/rankings/999", headers=ha), 404, "unknown_ranking", "")
    assert db_rows(ranked.db) == before

    assert ranked.client.delete(f"/api/rankings/{a1}", headers=ha).json() == {"id": a1, "deleted": True}
    assert a1 not in [i["id"] for i in listing(ranked, "alice")["items"]]
    assert [i["id"] for i in listing(ranked, "alice", deleted="true")["items"]] == [a1]
    assert_error(ranked.client.delete(f"/api/rankings/{a1}", headers=ha), 409, "already_deleted", "")
    assert_error(
        ranked.client.patch(f"/api/rankings/{a1}", json={"comment": "x"}, headers=ha), 409, "deleted", "restore"
    )
    assert_error(ranked.client.post(f"/api/rankings/{a1}/restore", headers=hb), 403, "forbidden", "")
    assert ranked.client.post(f"/api/rankings/{a1}/restore", headers=ha).json() == {"id": a1, "deleted": False}
    assert_error(ranked.client.post(f"/api/rankings/{a1}/restore", headers=ha), 409, "cannot_restore", "not deleted")
    assert db_rows(ranked.db) == before

    # An admin may delete anyone's row.
    assert ranked.client.delete(f"/api/rankings/{b1}", headers=auth(ranked.tokens["root"])).status_code == 200
    assert listing(ranked, "bob")["total"] == 1


def test_undo_after_re_ranking_is_a_conflict(ranked):
    a1 = ranked.ids["alice"][0]
    ha = auth(ranked.tokens["alice"])
    ranked.client.delete(f"/api/rankings/{a1}", headers=ha)
    t = next_task(ranked.client, ranked.tokens["alice"], prompt_id=1)
    assert t["set_id"] == 1  # the deleted ranking frees the set again
    submit(ranked.client, ranked.tokens["alice"], 1, [[1], [0], [2]])
    assert_error(
        ranked.client.post(f"/api/rankings/{a1}/restore", headers=ha), 409, "cannot_restore", "delete that one first"
    )


# ------------------------------------------------------------------ stats and export


def test_stats_counts_and_agreement(ranked):
    stats = ranked.client.get("/api/stats", headers=auth(ranked.tokens["root"])).json()
    counts = {a["annotator"]: a["rankings"] for a in stats["annotators"]}
    assert counts == {"alice": 2, "bob": 2, "root": 0}
    assert stats["totals"] == {"annotators": 3, "rankings": 4, "skips": 0}
    (pair,) = stats["agreement"]["pairs"]
    # Set 1: (0,1,2) vs (0,2,1): 2 of 3 pairs agree, tau = (2 - 1) / 3. Set 2: identical.
    assert (pair["annotator_a"], pair["annotator_b"], pair["shared_sets"]) == ("alice", "bob", 2)
    assert pair["pairwise_agreement"] == pytest.approx((2 / 3 + 1) / 2)
    assert pair["kendall_tau"] == pytest.approx((1 / 3 + 1) / 2)
    assert stats["agreement"]["overall"]["shared_sets"] == 2
    # A deleted ranking leaves the statistics.
    ranked.client.delete(f"/api/rankings/{ranked.ids['bob'][0]}", headers=auth(ranked.tokens["bob"]))
    stats = ranked.client.get("/api/stats", headers=auth(ranked.tokens["root"])).json()
    assert stats["agreement"]["pairs"][0]["shared_sets"] == 1 and stats["agreement"]["pairs"][0]["kendall_tau"] == 1.0


def test_stats_agreement_with_the_consensus_admin_per_annotator_others_overall(ranked):
    carol = ranked.store.add_user("carol")
    ranked.store.add_ranking(1, ranked.store.user_by_name("carol").id, [2, 1, 0])
    # Set 1: alice (0,1,2), bob (0,2,1), carol (2,1,0); set 2: alice and bob both (2,1,0).
    # Each against the Borda consensus of the others (sums of their ranks, made dense):
    #  set 1, alice vs bob+carol: sums (2,3,1) -> (1,2,0); pairs (0,1) C, (0,2) D, (1,2) D: tau -1/3
    #  set 1, bob vs alice+carol: sums (2,2,2), all tied: tau undefined, left out of the mean
    #  set 1, carol vs alice+bob: sums (0,3,3) -> (0,1,1); (0,1) D, (0,2) D, (1,2) tied: -2/sqrt(3*2)
    #  set 2, alice vs bob and bob vs alice (two annotators: the pairwise tau): 1
    admin = ranked.client.get("/api/stats", headers=auth(ranked.tokens["root"])).json()
    rows = {row["annotator"]: row for row in admin["agreement"]["consensus"]}
    assert list(rows) == ["alice", "bob", "carol"]  # root ranked nothing
    assert rows["alice"] == {
        "annotator": "alice",
        "consensus_sets": 2,
        "consensus_tau": pytest.approx((-1 / 3 + 1) / 2),
    }
    assert (rows["bob"]["consensus_sets"], rows["bob"]["consensus_tau"]) == (2, 1.0)
    assert (rows["carol"]["consensus_sets"], rows["carol"]["consensus_tau"]) == (1, pytest.approx(-2 / 6**0.5))
    overall = admin["agreement"]["overall"]
    assert overall["consensus_tau"] == pytest.approx((-1 / 3 + 1 + 1 - 2 / 6**0.5) / 4)
    for token in (ranked.tokens["alice"], carol):  # an annotator: the overall mean only, no names
        r = ranked.client.get("/api/stats", headers=auth(token))
        assert r.json()["agreement"]["consensus"] == [] and r.json()["agreement"]["overall"] == overall
        assert "consensus_sets" not in r.text and "bob" not in r.text


def test_stats_show_an_annotator_their_own_counts_and_the_totals_without_names(ranked):
    t = next_task(ranked.client, ranked.tokens["alice"])
    assert ranked.client.post(
        "/api/skips", json={"set_id": t["set_id"]}, headers=auth(ranked.tokens["alice"])
    ).is_success
    admin = ranked.client.get("/api/stats", headers=auth(ranked.tokens["root"])).json()
    for who in ("alice", "bob"):
        r = ranked.client.get("/api/stats", headers=auth(ranked.tokens[who]))
        assert r.status_code == 200
        stats = r.json()
        (own,) = stats["annotators"]
        assert own == next(a for a in admin["annotators"] if a["annotator"] == who)
        assert stats["totals"] == admin["totals"] and stats["totals"]["annotators"] == 3
        assert stats["agreement"] == {"pairs": [], "consensus": [], "overall": admin["agreement"]["overall"]}
        assert "consensus_tau" in stats["agreement"]["overall"] and "consensus_sets" not in r.text
        others = {"alice", "bob", "root"} - {who}
        assert not any(name in r.text for name in others), r.text  # no other annotator is named
    assert admin["totals"]["skips"] == 1 and len(admin["agreement"]["pairs"]) == 1


def export(env, who, **params):
    return env.client.get("/api/export", params=params, headers=auth(env.tokens[who]))


def test_export_round_trips_through_the_reader(ranked, tmp_path):
    r = export(ranked, "root", format="jsonl")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert 'filename="annotations.jsonl"' in r.headers["content-disposition"]
    (tmp_path / "all.jsonl").write_bytes(r.content)
    examples = read_preferences(tmp_path / "all.jsonl")
    assert len(examples) == 4
    rows = {row.id: row for row in ranked.store.list_rankings()[0]}
    for example, ranking_id in zip(examples, sorted(rows)):  # oldest first, each list the same order
        stored = rows[ranking_id].example()
        assert example.prompt == stored.prompt
        assert dict(zip(example.responses, example.ranks)) == dict(zip(stored.responses, stored.ranks))

    r = export(ranked, "root", format="tsv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/tab-separated-values")
    (tmp_path / "all.tsv").write_bytes(r.content)
    tsv = read_preferences(tmp_path / "all.tsv", prompt_column=True)
    assert [(ex.prompt, ex.responses, ex.ranks) for ex in tsv] == [
        (ex.prompt, ex.responses, ex.ranks) for ex in examples
    ]


def test_export_permissions_and_filters(ranked, tmp_path):
    (tmp_path / "alice.jsonl").write_bytes(export(ranked, "alice", format="jsonl").content)
    assert len(read_preferences(tmp_path / "alice.jsonl")) == 2  # only her own rows
    assert_error(export(ranked, "alice", annotator="bob"), 403, "forbidden", "own")
    (tmp_path / "bob.jsonl").write_bytes(export(ranked, "root", annotator="bob").content)
    assert len(read_preferences(tmp_path / "bob.jsonl")) == 2
    assert len(export(ranked, "root", prompt_id=1).text.splitlines()) == 2
    assert_error(export(ranked, "root", prompt="nothing like this"), 404, "nothing_to_export", "nothing to export")
    assert_error(export(ranked, "root", format="xml"), 422, "invalid_request", "format")


def test_tsv_export_refuses_ties_and_says_use_jsonl(env, tmp_path):
    with env.make(allow_ties=True) as client:
        t = next_task(client, env.tokens["alice"])
        submit(client, env.tokens["alice"], t["set_id"], [[1], [0, 2]])
        r = client.get("/api/export", params={"format": "tsv"}, headers=auth(env.tokens["alice"]))
        assert_error(r, 422, "cannot_export", "'ranked' (JSONL)")
        r = client.get("/api/export", params={"format": "jsonl"}, headers=auth(env.tokens["alice"]))
    (tmp_path / "ties.jsonl").write_bytes(r.content)
    (example,) = read_preferences(tmp_path / "ties.jsonl", allow_ties=True)
    assert example.ranks == (1, 0, 1)
