"""``rlhfkit annotate`` through ``main(argv)``: add-user, export, option validation, prompt files."""

from __future__ import annotations

import pytest

from rlhfkit.annotate.cli import main, read_prompts
from rlhfkit.annotate.store import AnnotationStore
from rlhfkit.data.readers import read_preferences
from rlhfkit.data.types import DataFormatError


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
    assert main(["add-user", "alice", "--db", str(db)]) == 1
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
        ("Rayleigh scattering.", "Because.", "Magic."), ("Because.", "Rayleigh scattering.", "Magic."), ("Green.", "Seven.", "Blue."),
    ]
    out = tmp_path / "alice.jsonl"
    assert main(["export", "--db", str(db_with_rankings), "--format", "jsonl", "--output", str(out), "--annotator", "alice"]) == 0
    assert [ex.prompt for ex in read_preferences(out)] == ["Why is the sky blue?", "Name a colour."]


def test_export_errors(db_with_rankings, tmp_path, capsys):
    out = str(tmp_path / "x.jsonl")
    assert main(["export", "--db", str(db_with_rankings), "--output", out, "--annotator", "zed"]) == 2
    assert "no annotator named 'zed'" in capsys.readouterr().err
    assert main(["export", "--db", str(tmp_path / "missing.db"), "--output", out]) == 2
    assert "missing.db does not exist" in capsys.readouterr().err
    assert main(["export", "--db", str(db_with_rankings), "--output", out, "--format", "csv"]) == 2
    assert main(["export", "--db", str(db_with_rankings)]) == 2
    assert "output" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--k", "1"], "option 'k' is 1; a rank list needs at least 2"),
    (["--temperature", "0"], "option 'temperature' is 0.0; it must be > 0"),
    (["--top-p", "1.5"], "option 'top_p' is 1.5"),
    (["--port", "70000"], "option 'port' is 70000"),
    (["--prompts", "/no/such/file.txt"], "option 'prompts': /no/such/file.txt is not a file"),
    (["--overlap", "0"], "'overlap' (0) must be >= 1"),
    (["--colour", "red"], ""),
])
def test_serve_options_are_validated_before_anything_loads(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_serve_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--allow-ties" in out and "(default: smollm2-135m)" in out and "(default: 127.0.0.1)" in out


def test_read_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\r\n\n  second, indented\nthird\n", encoding="utf-8")
    assert read_prompts(text) == ["first prompt", "  second, indented", "third"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "line one\\nline two"}\n{"prompt": "b", "id": 7}\n', encoding="utf-8")
    assert read_prompts(jsonl) == ["line one\nline two", "b"]
    jsonl.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"p.jsonl, line 2: needs a non-empty string 'prompt'"):
        read_prompts(jsonl)
    jsonl.write_text('{"prompt": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 2: is not valid JSON"):
        read_prompts(jsonl)
    text.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="holds no prompts"):
        read_prompts(text)
