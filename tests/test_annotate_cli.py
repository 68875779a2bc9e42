"""``rlhfkit annotate`` through ``main(argv)``: add-user, export, option validation, prompt files."""

from __future__ import annotations

import socket
import sys

import pytest

from rlhfkit.annotate.cli import ServeArgs, main, open_store, serve
from rlhfkit.annotate.store import AnnotationStore
from rlhfkit.config import ConfigError, parse_args
from rlhfkit.data.readers import read_preferences
from rlhfkit.errors import UserError


def test_add_user_prints_the_token_once(tmp_path, capsys):
    db = tmp_path / "a.db"
    assert main(["add-user", "alice", "--db", str(db)]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert "created annotator 'alice'" in err and "shown once" in err
    assert main(["add-user", "root", "--admin", "--db", str(db)]) == 0
    admin_token = capsys.readouterr().out.strip()
    store = AnnotationStore(db)
    assert store.user_for_token(token).name == "alice" and not store.user_for_token(token).is_admin
    assert store.user_for_token(admin_token).is_admin
    store.close()
    assert main(["add-user", "alice", "--db", str(db)]) == 2
    assert "user 'alice' already exists" in capsys.readouterr().err
    assert main(["add-user", "--db", str(db)]) == 2
    assert "add-user needs the user name first" in capsys.readouterr().err
    assert main(["add-user", "--help"]) == 0


@pytest.fixture
def db_with_rankings(tmp_path):
    store = AnnotationStore(tmp_path / "a.db")
    store.add_prompts(["Why is the sky blue?", "Name a colour."])
    store.add_user("alice")
    store.add_user("bob")
    alice, bob = store.user_by_name("alice").id, store.user_by_name("bob").id
    s1 = store.add_generation_set(1, "m", ["Rayleigh scattering.", "Because.", "Magic."])
    s2 = store.add_generation_set(2, "m", ["Blue.", "Green.", "Seven."])
    store.add_ranking(s1, alice, [0, 1, 2])
    store.add_ranking(s1, bob, [1, 0, 2])
    store.add_ranking(s2, alice, [2, 0, 1])
    store.close()
    return tmp_path / "a.db"


def test_export_tsv_and_jsonl(db_with_rankings, tmp_path, capsys):
    out = tmp_path / "out.tsv"
    assert main(["export", "--db", str(db_with_rankings), "--format", "tsv", "--output", str(out)]) == 0
    assert "wrote 3 ranking(s)" in capsys.readouterr().err
    examples = read_preferences(out, prompt_column=True)
    assert [ex.responses for ex in examples] == [
        ("Rayleigh scattering.", "Because.", "Magic."),
        ("Because.", "Rayleigh scattering.", "Magic."),
        ("Green.", "Seven.", "Blue."),
    ]
    out = tmp_path / "alice.jsonl"
    assert (
        main(
            ["export", "--db", str(db_with_rankings), "--format", "jsonl", "--output", str(out), "--annotator", "alice"]
        )
        == 0
    )
    assert [ex.prompt for ex in read_preferences(out)] == ["Why is the sky blue?", "Name a colour."]


def test_export_errors(db_with_rankings, tmp_path, capsys):
    out = str(tmp_path / "x.jsonl")
    assert main(["export", "--db", str(db_with_rankings), "--output", out, "--annotator", "zed"]) == 2
    assert "no annotator named 'zed'" in capsys.readouterr().err
    assert main(["export", "--db", str(tmp_path / "missing.db"), "--output", out]) == 2
    assert "missing.db does not exist; pass the database the server wrote" in capsys.readouterr().err
    assert main(["export", "--db", str(db_with_rankings), "--output", out, "--format", "csv"]) == 2
    assert "argument --format: invalid choice: 'csv'" in capsys.readouterr().err
    assert main(["export", "--db", str(db_with_rankings)]) == 2
    assert (
        "error: command line: option --output is required (file to write, e.g. prefs.jsonl)" in capsys.readouterr().err
    )
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "output,match",
    [
        ("{tmp}", "--output {tmp} is a folder; give a file name"),
        ("{tmp}/a.db/x.jsonl", "--output {tmp}/a.db/x.jsonl: {tmp}/a.db is a file, so no folder can be made under it"),
        pytest.param(
            "/proc/rankings.jsonl",
            "--output /proc/rankings.jsonl: /proc is not writable; choose a folder you can write to",
            marks=pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a read-only /proc"),
        ),
    ],
)
def test_export_output_that_cannot_be_written(db_with_rankings, tmp_path, output, match, capsys):
    output, match = output.format(tmp=tmp_path), match.format(tmp=tmp_path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["export", "--db", str(db_with_rankings), "--output", output]) == 2
    assert f"error: {match}" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no .tmp left behind


class ModelLoaded(Exception):
    """Raised by the stand-in model: the command got as far as loading the policy."""


@pytest.fixture
def model_calls(monkeypatch):
    """Replace the policy loader: record each call's arguments, then stop the command there."""
    calls = []

    def load(policy, **kwargs):
        calls.append({"policy": policy, **kwargs})
        raise ModelLoaded

    monkeypatch.setattr("rlhfkit.annotate.generator.ModelGenerator", load)
    return calls


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--samples-per-prompt", "1"], "option --samples-per-prompt must be >= 2, got 1"),
        (["--k", "1"], "option --samples-per-prompt must be >= 2, got 1"),  # the old name still works
        (["--temperature", "0"], "option --temperature must be > 0, got 0.0"),
        (["--top-p", "1.5"], "option --top-p must be <= 1, got 1.5"),
        (["--top-p", "0"], "option --top-p must be > 0, got 0.0"),
        (["--port", "70000"], "option --port must be <= 65535, got 70000"),
        (["--max-new-tokens", "0"], "option --max-new-tokens must be >= 1, got 0"),
        (["--prompts", "/no/such/file.txt"], "--prompts /no/such/file.txt does not exist"),
        (["--overlap", "0"], "option --annotators-per-set must be >= 1, got 0"),  # the old name still works
        (["--overlap-share", "1.5"], "option --overlap-share must be <= 1, got 1.5"),
        (["--selection", "uncertainty"], "option --selection uncertainty needs --reward-model"),
        (
            ["--selection", "uncertainty", "--reward-model", "rm", "--candidates", "3"],
            "option --candidates 3 is fewer than --samples-per-prompt 4",
        ),
        (
            ["--selection", "uncertainty", "--reward-model", "rm", "--selection-data", "/no/such/prefs.jsonl"],
            "option --selection-data /no/such/prefs.jsonl does not exist",
        ),
        (["--prefetch", "-1"], "option --prefetch must be >= 0, got -1"),
        (["--colour", "red"], "unrecognized arguments: --colour red"),
        (["--device", "cuda"], "unrecognized arguments: --device cuda"),  # now --cpu
    ],
)
def test_serve_options_are_validated_before_anything_loads(argv, match, model_calls, tmp_path, capsys):
    assert main(argv + ["--db", str(tmp_path / "a.db")]) == 2
    assert match in capsys.readouterr().err
    assert model_calls == [] and not (tmp_path / "a.db").exists()


def test_serve_option_names_defaults_and_old_names(model_calls, tmp_path, caplog):
    args = parse_args(ServeArgs, [])
    assert (args.policy, args.samples_per_prompt, args.max_new_tokens, args.cpu) == ("smollm2-135m", 4, 64, False)
    with caplog.at_level("WARNING"):
        args = parse_args(ServeArgs, ["--model", "m", "--k", "3"])
    assert (args.policy, args.samples_per_prompt) == ("m", 3)
    assert (
        "option 'model' is now called 'policy'" in caplog.text
        and "option 'k' is now called 'samples_per_prompt'" in caplog.text
    )
    with pytest.raises(ConfigError, match="options 'k' and 'samples_per_prompt' are the same option"):
        parse_args(ServeArgs, ["--k", "3", "--samples-per-prompt", "3"])

    db = str(tmp_path / "a.db")
    for argv, cpu in [([], False), (["--cpu"], True)]:
        with pytest.raises(ModelLoaded):
            main(["--policy", "tiny", "--db", db, "--port", "0"] + argv)
        assert model_calls.pop() == {
            "policy": "tiny",
            "max_new_tokens": 64,
            "temperature": 1.0,
            "top_p": 1.0,
            "cpu": cpu,
        }


def test_serve_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--allow-ties" in out and "(default: smollm2-135m)" in out and "(default: 127.0.0.1)" in out
    assert "--policy" in out and "--samples-per-prompt" in out and "--cpu" in out and "(default: 64)" in out
    assert "--model" not in out and "--k " not in out and "--device" not in out


# ------------------------------------------------------------------ the port


def test_a_busy_port_is_reported_before_the_model_loads(model_calls, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        db = tmp_path / "a.db"
        assert main(["--port", str(port), "--db", str(db)]) == 2
        out, err = capsys.readouterr()
        assert f"error: port {port} on 127.0.0.1 is already in use (is another server running?); " in err
        assert f"choose a free port with --port, e.g. --port {port + 1}" in err
        assert "loading" not in out and "annotate at" not in out
        assert model_calls == [] and not db.exists()
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use"):
            serve(ServeArgs(port=port, db=str(db)))


def test_an_address_that_cannot_be_bound(model_calls, tmp_path, capsys):
    assert main(["--host", "192.0.2.1", "--port", "0", "--db", str(tmp_path / "a.db")]) == 2  # TEST-NET-1: not ours
    err = capsys.readouterr().err
    assert "error: cannot listen on 192.0.2.1:0 (" in err and "); check --host and --port" in err
    assert model_calls == []


# ------------------------------------------------------------------ --db


@pytest.mark.parametrize("command", [["--port", "0"], ["add-user", "alice"], ["export", "--output", "{tmp}/out.jsonl"]])
def test_db_that_is_not_a_database(command, model_calls, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database, just notes\n" * 100, encoding="utf-8")
    argv = [arg.format(tmp=tmp_path) for arg in command]
    assert main(argv + ["--db", str(notes)]) == 2
    err = capsys.readouterr().err
    assert f"error: --db {notes} is not an SQLite database; pass the database 'rlhfkit annotate' wrote" in err
    assert notes.read_text(encoding="utf-8") == "not a database, just notes\n" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no -wal/-shm, no output
    assert model_calls == []

    assert main(argv + ["--db", str(tmp_path)]) == 2
    assert (
        f"error: --db {tmp_path} is a folder; give the database file, e.g. --db {tmp_path / 'annotations.db'}"
        in capsys.readouterr().err
    )
    with pytest.raises(UserError, match="is not an SQLite database"):
        open_store(str(notes), create=True)


def test_db_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x", encoding="utf-8")
    assert main(["add-user", "alice", "--db", str(tmp_path / "f" / "a.db")]) == 2
    assert "is a file, so no folder can be made under it" in capsys.readouterr().err


def test_serve_reads_prompts_with_the_shared_reader(model_calls, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes('\ufeff{"prompt": "line one\\nline two", "id": 7}\n{"prompt": "caf\u00e9"}\n'.encode("utf-8"))
    with pytest.raises(ModelLoaded):
        main(["--prompts", str(prompts), "--db", str(tmp_path / "a.db"), "--port", "0"])
    store = AnnotationStore(tmp_path / "a.db")
    assert store.count_prompts()["pool"] == 2
    store.close()


def test_serve_reports_an_undecodable_prompt_file(model_calls, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"ok\n\xff\xfe\n")
    assert main(["--prompts", str(prompts), "--db", str(tmp_path / "a.db"), "--port", "0"]) == 2
    assert f"error: --prompts {prompts} is not UTF-8 text (byte 0xff on line 2)" in capsys.readouterr().err
    assert model_calls == [] and not (tmp_path / "a.db").exists()
