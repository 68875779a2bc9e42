"""The annotation server as a real process on loopback: concurrent clients and kill -9.

The server runs uvicorn in a subprocess with a deterministic generator (generation sets
are created in the database beforehand, so these tests measure the storage path).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow  # multi-process
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from rlhfkit.annotate.store import AnnotationStore  # noqa: E402
from rlhfkit.data.readers import read_preferences  # noqa: E402

SERVER = """
import sys
import uvicorn
from rlhfkit.annotate.app import create_app
from rlhfkit.annotate.store import AnnotationStore

class EchoGenerator:
    name = "echo"
    def generate(self, prompt, k):
        return [f"answer {i} to {prompt}" for i in range(k)]

store = AnnotationStore(sys.argv[1])
app = create_app(store, EchoGenerator(), k=int(sys.argv[3]), prefetch=0, overlap=8)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


# ``rlhfkit annotate`` itself, with a stand-in for the model (the real one is in the browser test).
SERVE_CLI = """
import sys
import rlhfkit.annotate.generator

class EchoGenerator:
    def __init__(self, policy, **kwargs):
        self.name = policy
    def generate(self, prompt, k):
        return [f"answer {i} to {prompt}" for i in range(k)]

rlhfkit.annotate.generator.ModelGenerator = EchoGenerator
from rlhfkit.annotate.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db, k: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(db), str(self.port), str(k)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(self.url + "/api/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()}")
            if time.time() > deadline:
                self.kill()
                raise RuntimeError("server did not start in 60 s")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def make_db(path, n_sets: int, k: int, users: list[str], admin: str = "root") -> dict[str, str]:
    """A database with ``n_sets`` generation sets (one per pool prompt) and users; their tokens."""
    store = AnnotationStore(path)
    store.add_prompts([f"prompt {i}" for i in range(n_sets)])
    with store.transaction() as conn:  # one transaction instead of n_sets fsyncs
        conn.executemany(
            "INSERT INTO generation_sets (prompt_id, model, responses, created_at) VALUES (?, 'echo', ?, 'now')",
            [(i + 1, json.dumps([f"answer {j} to prompt {i}" for j in range(k)])) for i in range(n_sets)],
        )
    tokens = {name: store.add_user(name) for name in users}
    tokens[admin] = store.add_user(admin, admin=True)
    store.close()
    return tokens


def random_ranking(rng: random.Random, k: int) -> list[list[int]]:
    order = list(range(k))
    rng.shuffle(order)
    return [[i] for i in order]


def test_8_clients_x_200_submissions_at_once(tmp_path):
    n_clients, n_sets, k = 8, 200, 4
    db = tmp_path / "annotations.db"
    users = [f"annotator{i}" for i in range(n_clients)]
    tokens = make_db(db, n_sets, k, users)
    server = Server(db, k)
    barrier = threading.Barrier(n_clients)
    statuses: dict[str, Counter] = {}
    submitted: dict[str, dict[int, list[list[int]]]] = {}

    def client(name: str, seed: int) -> None:
        rng = random.Random(seed)
        set_ids = list(range(1, n_sets + 1))
        rng.shuffle(set_ids)
        statuses[name], submitted[name] = Counter(), {}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=60) as http:
            barrier.wait()
            for set_id in set_ids:
                ranking = random_ranking(rng, k)
                r = http.post(
                    "/api/rankings", json={"set_id": set_id, "ranking": ranking, "comment": f"{name}/{set_id}"}
                )
                statuses[name][r.status_code] += 1
                submitted[name][set_id] = ranking

    try:
        started = time.time()
        threads = [threading.Thread(target=client, args=(name, i)) for i, name in enumerate(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - started
        assert all(statuses[name] == Counter({201: n_sets}) for name in users), statuses

        admin = {"Authorization": f"Bearer {tokens['root']}"}
        exported = {}
        for fmt in ("jsonl", "tsv"):
            r = httpx.get(f"{server.url}/api/export", params={"format": fmt}, headers=admin, timeout=60)
            assert r.status_code == 200, r.text
            exported[fmt] = tmp_path / f"export.{fmt}"
            exported[fmt].write_bytes(r.content)
        stats = httpx.get(f"{server.url}/api/stats", headers=admin, timeout=60).json()
    finally:
        server.stop()

    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT u.name, r.set_id, r.ranks, r.comment FROM rankings r JOIN users u ON u.id = r.user_id"
        ).fetchall()
    assert len(rows) == n_clients * n_sets == 1600
    for name, set_id, ranks, comment in rows:  # each row is exactly what its client sent
        ranking = submitted[name][set_id]
        assert json.loads(ranks) == [next(g for g, group in enumerate(ranking) if i in group) for i in range(k)]
        assert comment == f"{name}/{set_id}"

    # The export round-trips through the reader `rlhfkit rm train` uses.
    expected = Counter()
    for _name, set_id, ranks, _ in rows:
        ranks = json.loads(ranks)
        best_first = tuple(f"answer {j} to prompt {set_id - 1}" for j in sorted(range(k), key=lambda j: ranks[j]))
        expected[(f"prompt {set_id - 1}", best_first)] += 1
    for fmt, path in exported.items():
        examples = read_preferences(path, prompt_column=(fmt == "tsv"))
        assert len(examples) == 1600
        assert Counter((ex.prompt, ex.responses) for ex in examples) == expected
        assert all(ex.ranks == (0, 1, 2, 3) for ex in examples)
    assert stats["agreement"]["overall"]["shared_sets"] == n_sets
    assert sum(a["rankings"] for a in stats["annotators"]) == 1600
    print(f"1600 concurrent submissions in {elapsed:.1f} s ({1600 / elapsed:.0f}/s)")


def test_kill_9_loses_no_acknowledged_submission(tmp_path):
    n_sets, k, n_threads = 3000, 3, 4
    db = tmp_path / "annotations.db"
    tokens = make_db(db, n_sets, k, ["alice"])
    acknowledged: dict[int, tuple[int, list[int]]] = {}  # ranking id -> (set id, ranks)
    lock = threading.Lock()
    next_set = iter(range(1, n_sets + 1))

    def stream(url: str, stop: threading.Event) -> None:
        rng = random.Random()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['alice']}"}, timeout=10) as http:
            while not stop.is_set():
                with lock:
                    set_id = next(next_set)
                try:
                    r = http.post("/api/rankings", json={"set_id": set_id, "ranking": random_ranking(rng, k)})
                except httpx.TransportError:
                    return  # the server is gone
                if 200 <= r.status_code < 300:
                    with lock:
                        acknowledged[r.json()["id"]] = (set_id, r.json()["ranks"])

    for round_ in range(2):  # kill, restart, keep streaming, kill again
        server = Server(db, k)
        stop = threading.Event()
        threads = [threading.Thread(target=stream, args=(server.url, stop)) for _ in range(n_threads)]
        for t in threads:
            t.start()
        target = 150 * (round_ + 1)
        deadline = time.time() + 60
        while len(acknowledged) < target and time.time() < deadline:
            time.sleep(0.01)
        server.kill()  # SIGKILL while requests are in flight
        stop.set()
        for t in threads:
            t.join()
        assert len(acknowledged) >= target

    with sqlite3.connect(db) as conn:  # opening recovers the WAL; nothing may be half-written
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {
            rid: (set_id, json.loads(ranks))
            for rid, set_id, ranks in conn.execute("SELECT id, set_id, ranks FROM rankings")
        }
    assert all(sorted(ranks) == list(range(k)) for _, ranks in rows.values())
    missing = {rid: v for rid, v in acknowledged.items() if rows.get(rid) != v}
    assert not missing, f"{len(missing)} acknowledged submissions lost or changed, e.g. {list(missing.items())[:3]}"

    # ...and a restarted server serves them all.
    server = Server(db, k)
    try:
        r = httpx.get(
            f"{server.url}/api/export",
            params={"format": "jsonl"},
            headers={"Authorization": f"Bearer {tokens['root']}"},
            timeout=60,
        )
    finally:
        server.stop()
    (tmp_path / "after.jsonl").write_bytes(r.content)
    assert len(read_preferences(tmp_path / "after.jsonl")) == len(rows) >= len(acknowledged)


def test_the_cli_serves_on_the_port_it_checked_and_a_second_server_is_refused(tmp_path):
    db = tmp_path / "annotations.db"
    (tmp_path / "prompts.txt").write_text("first\nsecond\n", encoding="utf-8")
    token = make_db(db, 0, 3, ["alice"])["alice"]
    argv = [
        sys.executable,
        "-c",
        SERVE_CLI,
        "--db",
        str(db),
        "--policy",
        "echo",
        "--samples-per-prompt",
        "3",
        "--prompts",
        str(tmp_path / "prompts.txt"),
    ]
    proc = subprocess.Popen(argv + ["--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("annotate at "):
            line = proc.stdout.readline()  # '' once the process is gone
            assert line, f"the server exited: {lines} {proc.stderr.read()}"
            lines.append(line)
        assert lines[0] == "added 2 new prompt(s) from " + str(tmp_path / "prompts.txt") + "; the pool holds 2\n"
        url = lines[-1].split()[2].removesuffix("/annotate")  # http://127.0.0.1:PORT, the port bound for --port 0
        port = int(url.rsplit(":", 1)[1])
        assert port != 0
        task = httpx.get(
            f"{url}/api/next", params={"wait": 10}, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ).json()
        assert (task["prompt"], task["model"], task["responses"]) == (
            "first",
            "echo",
            [f"answer {i} to first" for i in range(3)],
        )

        second = subprocess.run(argv + ["--port", str(port)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"error: port {port} on 127.0.0.1 is already in use" in second.stderr and "--port" in second.stderr
        assert "loading" not in second.stdout and "annotate at" not in second.stdout
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, then re-raises it
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
