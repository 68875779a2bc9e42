"""``rounds: N``: InstructGPT's loop on tiny models, with a simulated team of annotators ranking in the
annotation app over HTTP; killed at each waiting point and continued, with exact counts afterwards."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_until

pytestmark = pytest.mark.slow

RULE = '''
def count_a(prompts, responses):
    """A scripted rule for tiny random models: more letters 'a' is better."""
    return [r.count("a") + 0.01 * len(r) for r in responses]
'''


def write_config(
    tmp_path: Path,
    tiny_lm: Path,
    *,
    rounds: int,
    quota: int,
    pace: float = 0.0,
    rm_steps: int = 6,
    rl_steps: int = 2,
    selection: str = "random",
    extra: str = "",
) -> Path:
    (tmp_path / "rule.py").write_text(RULE)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(json.dumps({"prompt": f"say a {i}", "response": "aaa ab " * (i % 3 + 1)}) + "\n" for i in range(8))
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"say something {i}\n" for i in range(16)))
    out = tmp_path / "loop"
    team = ", ".join(
        f"{{name: {n}, noise: {noise}, length_bias: {bias}, seconds_per_ranking: {pace}}}"
        for n, noise, bias in (("ann-a", 0.0, 0.0), ("ann-b", 0.5, 0.0), ("ann-c", 0.2, 1.0))
    )
    config = tmp_path / "loop.yaml"
    config.write_text(
        f"""
output: {out}
policy: {tiny_lm}
rounds: {rounds}
sft: {{train: {sft}, max_steps: 2, batch_size: 4, lr: 1.0e-3, max_length: 48, progress: false, report_to: none}}
preferences: {{source: simulated, labeller: "{tmp_path / "rule.py"}:count_a", prompts: {prompts}, n_prompts: 6,
  quota: {quota}, k: 3, candidates: 4, selection: {selection}, max_new_tokens: 8, chat_template: false,
  annotators_per_set: 2, overlap_share: 0.5, team: [{team}]{extra}}}
reward_model: {{max_steps: {rm_steps}, batch_size: 2, lr: 3.0e-3, eval_every: 1000, progress: false, report_to: none}}
algorithm: [ppo]
rl: {{prompts: {prompts}, max_steps: {rl_steps}, batch_size: 4, mini_batch_size: 4, max_new_tokens: 8, lr: 1.0e-3,
  progress: false, report_to: none, sample_every: 0}}
evaluation: {{n_prompts: 4, bon: [1, 2], max_new_tokens: 8}}
"""
    )
    return config


def db_rows(out: Path, sql: str, args: tuple = ()) -> list[tuple]:
    db = out / "annotate" / "annotations.db"
    if not db.is_file():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # the schema is still being made
            return []


def round_counts(out: Path) -> dict[int, int]:
    rows = db_rows(
        out,
        "SELECT s.round, count(*) FROM rankings r JOIN generation_sets s ON s.id = r.set_id "
        "WHERE r.deleted_at IS NULL GROUP BY s.round",
    )
    return {r: n for r, n in rows}


def assert_no_set_twice_to_one_annotator(out: Path) -> None:
    rows = db_rows(out, "SELECT set_id, user_id, count(*) FROM rankings GROUP BY set_id, user_id HAVING count(*) > 1")
    assert rows == []


def test_rounds_end_to_end_with_a_simulated_team_over_http(tiny_lm, tmp_path):
    from rlhfkit.cli import main

    config = write_config(tmp_path, tiny_lm, rounds=2, quota=5, selection="uncertainty")
    out = tmp_path / "loop"
    assert main(["pipeline", "--config", str(config)]) == 0
    assert round_counts(out) == {1: 5, 2: 5}  # exactly the quota, each round
    assert_no_set_twice_to_one_annotator(out)
    annotators = {n for (n,) in db_rows(out, "SELECT DISTINCT u.name FROM rankings r JOIN users u ON u.id = r.user_id")}
    assert annotators <= {"ann-a", "ann-b", "ann-c"} and len(annotators) >= 2
    for r in (1, 2):
        for stage in ("preferences", "reward_model", "ppo", "evaluation"):
            assert (out / f"round-{r}" / stage / "stage.json").is_file(), (r, stage)
        summary = json.loads((out / f"round-{r}" / "preferences" / "round.json").read_text())
        assert summary["rankings_this_round"] == 5 and summary["rankings_total"] == 5 * r
    # round 2 trained on every list so far and continued from round 1's policy, KL anchored to the SFT model
    lines = (out / "round-2" / "preferences" / "preferences.jsonl").read_text().splitlines()
    assert len(lines) == 10
    info = json.loads((out / "round-2" / "ppo" / "final" / "rlhfkit_ppo.json").read_text())
    assert Path(info["reference"]) == out / "sft" / "final"
    # uncertainty in round 2: the sets carry the ensemble's disagreement as their priority
    priorities = [p for (p,) in db_rows(out, "SELECT priority FROM generation_sets WHERE round = 2")]
    assert len(priorities) >= 5 and any(p > 0 for p in priorities)
    assert all(p == 0 for (p,) in db_rows(out, "SELECT priority FROM generation_sets WHERE round = 1"))
    md = (out / "report.md").read_text()
    for needle in ("## Rounds", "Round 1: Preference data", "Round 2: Reward model", "SIMULATED TEAM", "gold score"):
        assert needle in md, needle
    assert (out / "rounds.png").is_file()
    # everything complete: a second run reuses every stage and adds no ranking
    assert main(["pipeline", "--config", str(config)]) == 0
    assert (out / "report.md").read_text().count("reused (complete, same config)") == 9
    assert round_counts(out) == {1: 5, 2: 5}


def start(config: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p),
    }
    cmd = [sys.executable, "-m", "rlhfkit.cli", "pipeline", "--config", str(config)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, predicate, what: str) -> None:
    def ready():
        if proc.poll() is not None:
            pytest.fail(f"the pipeline ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        return predicate()

    wait_until(ready, timeout=300, what=what, interval=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def started_not_done(folder: Path) -> bool:
    return (folder / "stage.started.json").is_file() and not (folder / "stage.json").is_file()


def test_killed_at_each_waiting_point_the_loop_continues_with_exact_counts(tiny_lm, tmp_path):
    config = write_config(tmp_path, tiny_lm, rounds=2, quota=6, pace=0.6, rm_steps=60, rl_steps=6)
    out = tmp_path / "loop"
    # 1: waiting for people: killed after some of round 2's rankings are in
    kill_when(start(config), lambda: round_counts(out).get(2, 0) >= 2, "round 2's first rankings")
    before = round_counts(out)
    assert before[1] == 6 and 2 <= before[2] < 6
    # 2: in the reward-model stage of round 2
    proc = start(config)
    kill_when(proc, lambda: started_not_done(out / "round-2" / "reward_model"), "round 2's reward model")
    assert round_counts(out) == {1: 6, 2: 6}  # the resumed wait ranked exactly the missing ones, none lost
    # 3: in the RL stage of round 2
    kill_when(start(config), lambda: started_not_done(out / "round-2" / "ppo"), "round 2's RL stage")
    # and to the end
    proc = start(config)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert round_counts(out) == {1: 6, 2: 6}
    assert_no_set_twice_to_one_annotator(out)
    sets = db_rows(out, "SELECT round, count(*) FROM generation_sets GROUP BY round")
    assert dict(sets) == {1: 6, 2: 6}  # a resumed round pushed no set twice
    summary = json.loads((out / "round-2" / "preferences" / "round.json").read_text())
    assert summary["rankings_this_round"] == 6 and summary["rankings_total"] == 12
    assert len((out / "round-2" / "preferences" / "preferences.jsonl").read_text().splitlines()) == 12
    assert (out / "round-2" / "evaluation" / "stage.json").is_file()


def test_people_rank_in_an_app_already_running_by_url(tiny_lm, tmp_path):
    """source: annotate with url + token: the pipeline pushes its sets into someone else's app and waits
    for its people (here a team ranking in a thread, as people would in their browsers)."""
    import threading

    from rlhfkit.annotate.server import AppServer
    from rlhfkit.annotate.store import AnnotationStore
    from rlhfkit.annotate.team import SimulatedAnnotator, SimulatedTeam
    from rlhfkit.cli import main

    store = AnnotationStore(tmp_path / "theirs.db")
    admin = store.add_user("organiser", admin=True)
    people = [SimulatedAnnotator(name, store.add_user(name), noise=0.3, seed=1) for name in ("ann", "bob")]
    config = write_config(tmp_path, tiny_lm, rounds=1, quota=4)
    text = config.read_text().replace("source: simulated", "source: annotate")
    with AppServer(store, k=3, overlap=1) as server:
        config.write_text(text.replace("team: [", f"url: '{server.url}', token: {admin}, team: ["))
        stop = threading.Event()
        team = SimulatedTeam(server.url, people, lambda prompts, responses: [r.count("a") for r in responses])
        worker = threading.Thread(target=team.rank, args=(4,), kwargs={"stop_event": stop}, daemon=True)
        worker.start()
        try:
            assert main(["pipeline", "--config", str(config)]) == 0
        finally:
            stop.set()
            worker.join(timeout=30)
    out = tmp_path / "loop"
    assert not (out / "annotate" / "annotations.db").exists()  # their app, their database
    summary = json.loads((out / "round-1" / "preferences" / "round.json").read_text())
    assert summary["rankings_this_round"] == 4 and set(summary["annotators"]) <= {"ann", "bob"}
    assert "annotation app http://127.0.0.1" in summary["source"]
    assert len((out / "round-1" / "preferences" / "preferences.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("rounds: 2\n", "source must be 'annotate' (people in the app) or 'simulated'"),
        ("algorithm: [ppo, grpo]\n", "algorithm must be one online algorithm"),
        (
            "preferences: {source: annotate, prompts: P}\n",
            "source 'annotate' is the loop with people in it: set rounds",
        ),
        ("quota: 9\n", "quota (9) is more than a round's sets (n_prompts: 6)"),
        ("url: 'http://x'\n", "the simulated team ranks in an app the pipeline starts"),
        ("team: [{noise: 1}]\n", "every team member is a mapping with a 'name'"),
        ("warm_start_without_rounds\n", "warm_start continues the last round's reward model; it needs rounds: N"),
    ],
)
def test_bad_rounds_configs_exit_2_naming_the_key(tiny_lm, tmp_path, capsys, change, message):
    from rlhfkit.cli import main

    config = write_config(tmp_path, tiny_lm, rounds=2, quota=4)
    text = config.read_text()
    prompts = tmp_path / "prompts.txt"
    if change == "rounds: 2\n":
        (tmp_path / "prefs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
        text = text.replace("source: simulated,", f"source: file, file: {tmp_path / 'prefs.jsonl'},")
    elif change.startswith("algorithm"):
        text = text.replace("algorithm: [ppo]", "algorithm: [ppo, grpo]")
    elif change.startswith("preferences"):
        text = text.replace("rounds: 2\n", "").replace("source: simulated", "source: annotate")
    elif change.startswith("quota"):
        text = text.replace("quota: 4", "quota: 9")
    elif change.startswith("url"):
        text = text.replace("team: [", "url: 'http://x', team: [")
    elif change.startswith("team"):
        text = text.replace("team: [{name: ann-a,", "team: [{")
    else:
        text = text.replace("rounds: 2\n", "").replace("reward_model: {", "reward_model: {warm_start: true, ")
    assert str(prompts)  # the config names it
    config.write_text(text)
    assert main(["pipeline", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "loop").exists()
