"""Tests for rlhfkit.data.readers and rlhfkit.data.writers."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from rlhfkit.data.readers import (
    FORMATS,
    describe,
    detect_format,
    parse_record,
    read_preferences,
    split_shared_prompt,
    split_train_eval,
)
from rlhfkit.data.types import DataFormatError, PreferenceExample
from rlhfkit.data.writers import WRITE_FORMATS, write_preferences


def write_text(tmp_path: Path, name: str, text: str) -> Path:
    """Write ``text`` byte for byte (no newline translation)."""
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def write_jsonl(tmp_path: Path, name: str, *records: Any) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    return write_text(tmp_path, name, "".join(line + "\n" for line in lines))


def stripped(examples: list[PreferenceExample]) -> list[PreferenceExample]:
    """Examples with ``source`` cleared, for readable failure diffs."""
    return [dataclasses.replace(ex, source="") for ex in examples]


# --------------------------------------------------------------------------------------
# ranklist-tsv
# --------------------------------------------------------------------------------------


def test_tsv_reads_lists_best_first(tmp_path: Path) -> None:
    path = write_text(tmp_path, "lists.tsv", "很好吃，还会再买\t一般般\t太难吃了\ngreat\tfine\n")
    examples = read_preferences(path)
    assert stripped(examples) == [
        PreferenceExample("", ("很好吃，还会再买", "一般般", "太难吃了"), (0, 1, 2)),
        PreferenceExample("", ("great", "fine"), (0, 1)),
    ]
    assert [ex.source for ex in examples] == [f"{path}:1", f"{path}:2"]


def test_tsv_prompt_column(tmp_path: Path) -> None:
    path = write_text(tmp_path, "lists.txt", "Rate the phone\tlove it\tok\tbroken\n")
    (ex,) = read_preferences(path, prompt_column=True)
    assert (ex.prompt, ex.responses, ex.ranks) == ("Rate the phone", ("love it", "ok", "broken"), (0, 1, 2))


def test_tsv_bom_crlf_and_no_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "bom.tsv"
    path.write_bytes("\ufeffa\tb\r\nc\td".encode())
    assert [ex.responses for ex in read_preferences(path)] == [("a", "b"), ("c", "d")]


TSV_ERRORS = [
    ("a\tb\n\nc\td\n", r"line 2: is empty; remove it"),
    ("a\tb\n\n", r"line 2: is empty"),
    ("a\tb\n   \n", r"line 2: is empty"),
    ("a\tb\nonly one\n", r"line 2: has 1 response\(s\); a rank list needs at least 2"),
    ("a\t\tb\n", r"line 1: column 2 is empty .*stray tab"),
    ("a\tb\t\n", r"line 1: column 3 is empty"),
    ("x\ty\tx\n", r"line 1: columns 1 and 3 hold the same text"),
]


@pytest.mark.parametrize(("text", "match"), TSV_ERRORS)
def test_tsv_errors_name_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    path = write_text(tmp_path, "bad.tsv", text)
    with pytest.raises(DataFormatError, match=r"bad\.tsv, " + match):
        read_preferences(path)


def test_tsv_prompt_column_needs_two_responses(tmp_path: Path) -> None:
    path = write_text(tmp_path, "bad.tsv", "prompt\tonly answer\n")
    with pytest.raises(DataFormatError, match=r"bad\.tsv, line 1: has 1 response.*prompt_column=True"):
        read_preferences(path, prompt_column=True)


def test_tsv_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.tsv"
    path.write_bytes(b"a\tb\ncaf\xe9\tb\n")
    with pytest.raises(DataFormatError, match=r"latin1\.tsv, line 2: is not valid UTF-8"):
        read_preferences(path)


# --------------------------------------------------------------------------------------
# JSONL formats
# --------------------------------------------------------------------------------------


def test_pairs(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        "pairs.jsonl",
        {"prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away.", "margin": 2},
        {"chosen": "物流很快", "rejected": "物流太慢"},  # no prompt: read as ""
    )
    assert stripped(read_preferences(path)) == [
        PreferenceExample("Say hi", ("Hello!", "Go away."), (0, 1), margin=2.0),
        PreferenceExample("", ("物流很快", "物流太慢"), (0, 1)),
    ]


def test_hh_splits_at_last_shared_assistant_marker(tmp_path: Path) -> None:
    prompt = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:"
    path = write_jsonl(
        tmp_path,
        "hh.jsonl",
        {"chosen": prompt + " I think it is 6.", "rejected": prompt + " I think it is 7."},
    )
    (ex,) = read_preferences(path)
    assert ex.prompt == prompt
    assert ex.responses == (" I think it is 6.", " I think it is 7.")
    assert ex.ranks == (0, 1)
    assert read_preferences(path, "hh") == [ex]


def test_hh_empty_answer_is_an_empty_response(tmp_path: Path) -> None:
    # HH-RLHF has rows whose preferred answer is empty after the shared prompt: a
    # legitimate (terse) answer, read as "" and scored as the end token alone.
    prompt = "\n\nHuman: Tell me something rude.\n\nAssistant:"
    path = write_jsonl(
        tmp_path,
        "hh.jsonl",
        {"chosen": prompt, "rejected": prompt + " You are an idiot."},
        {"chosen": prompt + " No, I won't.", "rejected": prompt + "  \n"},  # whitespace only: empty too
    )
    first, second = read_preferences(path)
    assert (first.prompt, first.responses, first.ranks) == (prompt, ("", " You are an idiot."), (0, 1))
    assert (second.prompt, second.responses) == (prompt, (" No, I won't.", ""))


def test_empty_response_to_a_prompt_is_accepted_in_every_json_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, "pairs.jsonl", {"prompt": "p", "chosen": "", "rejected": "b"})
    assert read_preferences(path)[0].responses == ("", "b")
    path = write_jsonl(tmp_path, "ranked.jsonl", {"prompt": "p", "responses": ["a", " ", "c"]})
    assert read_preferences(path)[0].responses == ("a", "", "c")
    path = write_jsonl(tmp_path, "choice.jsonl", {"prompt": "p", "responses": ["", "b"], "choice": 0})
    assert read_preferences(path)[0].responses == ("", "b")
    path = write_jsonl(tmp_path, "scored.jsonl", {"prompt": "p", "response": "", "score": -1.0})
    assert read_preferences(path)[0].responses == ("",)


def test_split_shared_prompt_fallbacks() -> None:
    # A marker inside the common prefix only counts when it is complete.
    assert split_shared_prompt("Q: colour? A: red", "Q: colour? A: blue") == ("Q: colour? A: ", "red", "blue")
    assert split_shared_prompt("The answer is four", "The answer is fine") == ("The answer is ", "four", "fine")
    assert split_shared_prompt("Yes", "No") == ("", "Yes", "No")
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: bye!"
    rejected = "\n\nHuman: hi\n\nAssistant: hello"
    assert split_shared_prompt(chosen, rejected) == (
        "\n\nHuman: hi\n\nAssistant:",
        " hello\n\nHuman: bye\n\nAssistant: bye!",
        " hello",
    )


def test_ranked_with_and_without_ranks(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        "ranked.jsonl",
        {"prompt": "p", "responses": ["best", "mid", "worst"]},
        {"prompt": "p", "responses": ["c", "a", "b"], "ranks": [7, 1, 3]},  # made dense
    )
    assert [ex.ranks for ex in read_preferences(path)] == [(0, 1, 2), (2, 0, 1)]


def test_ranked_ties_need_allow_ties(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        "ties.jsonl",
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 2]},
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]},
    )
    with pytest.raises(DataFormatError, match=r"ties\.jsonl, line 2: .*share rank 1 \(a tie\).*--allow-ties"):
        read_preferences(path)
    examples = read_preferences(path, allow_ties=True)
    assert examples[1].ranks == (0, 1, 1) and examples[1].has_ties
    assert describe(examples)["n_ties"] == 1


def test_choice(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, "choice.jsonl", {"prompt": "p", "responses": ["a", "b", "c", "d"], "choice": 2})
    (ex,) = read_preferences(path)
    assert (ex.choice, ex.ranks) == (2, (1, 1, 0, 1))
    assert ex.ordered_pairs() == [(2, 0), (2, 1), (2, 3)]


def test_scored_and_binary_labels(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        "scored.jsonl",
        {"prompt": "p", "response": "fine answer", "score": 3.5},
        {"prompt": "p", "response": "accepted", "label": True},
        {"prompt": "p", "response": "rejected", "label": 0},
    )
    examples = read_preferences(path)
    assert [(ex.responses, ex.ranks, ex.label) for ex in examples] == [
        (("fine answer",), (0,), 3.5),
        (("accepted",), (0,), 1.0),
        (("rejected",), (0,), 0.0),
    ]


def test_detect_format() -> None:
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "pairs"
    assert detect_format({"chosen": "a", "rejected": "b"}) == "hh"
    assert detect_format({"responses": ["a", "b"]}) == "ranked"
    assert detect_format({"responses": ["a", "b"], "choice": 0}) == "choice"
    assert detect_format({"response": "a", "label": 1}) == "scored"
    assert detect_format({"response": "a", "score": None}) is None
    assert detect_format({"text": "a"}) is None


P = {"prompt": "p"}
JSONL_ERRORS: list[tuple[Any, str]] = [
    ('{"prompt": "p", "chosen": "a",', r"is not valid JSON"),
    ("[1, 2]", r"is array \[1, 2\]; expected a JSON object"),
    ({**P, "chosen": "a", "rejected": "a"}, r"'chosen' and 'rejected' are the same text"),
    ({"chosen": "  ", "rejected": "b"}, r"'chosen' is empty or only whitespace"),  # an empty dialogue (hh)
    ({"prompt": "", "chosen": "", "rejected": "b"}, r"'chosen' is empty or only whitespace and there is no 'prompt'"),
    ({**P, "chosen": " ", "rejected": ""}, r"'chosen' and 'rejected' are both empty"),
    ({**P, "chosen": 5, "rejected": "b"}, r"'chosen' must be a string, got number 5"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"'prompt' must be a string, got number 3"),
    ({**P, "chosen": "a", "rejected": "b", "margin": "big"}, r"'margin' must be a number"),
    ({"chosen": "same", "rejected": "same"}, r"same dialogue"),
    (
        {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: "},
        r"both dialogues end right after the shared prompt .* both answers are empty and there is nothing to prefer",
    ),
    ({**P, "responses": "a, b"}, r"'responses' must be a list of strings, got string"),
    ({**P, "responses": ["a", 2]}, r"'responses\[1\]' must be a string, got number 2"),
    ({**P, "responses": ["a"]}, r"'responses' has 1 item\(s\); a list needs at least 2"),
    ({**P, "responses": ["a", "b", "a"]}, r"responses\[0\] and responses\[2\] are the same text"),
    ({"responses": ["a", ""]}, r"'responses\[1\]' is empty or only whitespace and there is no 'prompt'"),
    ({**P, "responses": ["a", "", " "]}, r"responses\[1\] and responses\[2\] are both empty"),
    ({"response": "", "score": 1.0}, r"'response' is empty or only whitespace and there is no 'prompt'"),
    ({**P, "responses": ["a", "b"], "ranks": [0]}, r"'ranks' has 1 items but 'responses' has 2"),
    ({**P, "responses": ["a", "b"], "ranks": [0, "1"]}, r"'ranks\[1\]' must be an integer"),
    ({**P, "responses": ["a", "b"], "ranks": [0, -1]}, r"'ranks\[1\]' is -1; ranks must be >= 0"),
    ({**P, "responses": ["a", "b"], "ranks": [1, 1]}, r"all 2 responses have the same rank"),
    ({**P, "responses": ["a", "b"], "choice": 2}, r"'choice' is 2 but there are 2 responses"),
    ({**P, "responses": ["a", "b"], "choice": True}, r"'choice' must be an integer, got true"),
    ({**P, "responses": ["a", "b"], "choice": 0, "ranks": [0, 1]}, r"has both 'choice' and 'ranks'"),
    ({**P, "response": "a", "score": "high"}, r"'score' must be a number, got string 'high'"),
    ({**P, "response": "a", "score": float("nan")}, r"'score' must be a finite number, got nan"),
    ({**P, "response": "a", "label": 2}, r"'label' must be true/false or 0/1, got number 2"),
    ({**P, "response": "a", "score": 1, "label": 1}, r"has both 'score' and 'label'"),
    ({**P, "text": "a"}, r"match no known format; this file is format 'pairs'"),
]


@pytest.mark.parametrize(("record", "match"), JSONL_ERRORS)
def test_jsonl_errors_name_file_line_and_field(tmp_path: Path, record: Any, match: str) -> None:
    # The bad record is on line 2 after a good first line of the same format (so that
    # auto-detection has picked the right format), except for unparseable records.
    good: dict[str, Any] = {"prompt": "p", "chosen": "x", "rejected": "y"}
    if isinstance(record, dict):
        fmt = detect_format(record)
        good = {
            None: good,
            "pairs": good,
            "hh": {"chosen": "x", "rejected": "y"},
            "ranked": {"prompt": "p", "responses": ["x", "y"]},
            "choice": {"prompt": "p", "responses": ["x", "y"], "choice": 0},
            "scored": {"prompt": "p", "response": "x", "score": 1.0},
        }[fmt]
    path = write_jsonl(tmp_path, "bad.jsonl", good, record)
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 2: .*" + match) as info:
        read_preferences(path)
    assert info.value.line == 2


def test_format_must_not_change_within_a_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        "mixed.jsonl",
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "responses": ["a", "b"]},
    )
    with pytest.raises(
        DataFormatError, match=r"mixed\.jsonl, line 2: looks like format 'ranked' .* but the file started as 'pairs'"
    ):
        read_preferences(path)


def test_explicit_format_is_checked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, "pairs.jsonl", {"prompt": "p", "chosen": "a", "rejected": "b"})
    with pytest.raises(DataFormatError, match=r"pairs\.jsonl, line 1: .*do not fit format 'ranked'.*format='pairs'"):
        read_preferences(path, "ranked")
    # pairs without a prompt are pairs with an empty prompt, not HH dialogues
    nop = write_jsonl(tmp_path, "nop.jsonl", {"chosen": "x y", "rejected": "x z"})
    assert read_preferences(nop, "pairs")[0].responses == ("x y", "x z")
    assert read_preferences(nop)[0].responses == ("y", "z")
    unknown = write_jsonl(tmp_path, "unknown.jsonl", {"text": "a"})
    with pytest.raises(
        DataFormatError, match=r"unknown\.jsonl, line 1: .*match no known format; expected one of: pairs"
    ):
        read_preferences(unknown)


def test_blank_jsonl_line_is_an_error(tmp_path: Path) -> None:
    path = write_text(tmp_path, "gap.jsonl", '{"chosen": "a", "rejected": "b"}\n\n{"chosen": "a", "rejected": "c"}\n')
    with pytest.raises(DataFormatError, match=r"gap\.jsonl, line 2: is empty; remove it"):
        read_preferences(path)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tsv"):
        read_preferences(tmp_path / "nowhere.tsv")
    with pytest.raises(ValueError, match=r"format='csv' is not supported; use one of auto, ranklist-tsv"):
        read_preferences(write_text(tmp_path, "a.tsv", "a\tb\n"), "csv")
    with pytest.raises(DataFormatError, match=r"data\.csv: cannot detect the format from the extension '\.csv'"):
        read_preferences(write_text(tmp_path, "data.csv", "a,b\n"))
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: contains no examples"):
        read_preferences(write_text(tmp_path, "empty.jsonl", ""))
    with pytest.raises(DataFormatError, match=r"empty\.tsv: contains no examples"):
        read_preferences(write_text(tmp_path, "empty.tsv", "\ufeff"))
    assert FORMATS[0] == "auto" and "ranklist-tsv" in FORMATS


def test_prompt_column_ignored_for_jsonl_warns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, "p.jsonl", {"prompt": "p", "chosen": "a", "rejected": "b"})
    with pytest.warns(UserWarning, match="prompt_column=True is ignored"):
        read_preferences(path, prompt_column=True)


def test_parse_record_for_other_modules() -> None:
    ex = parse_record({"responses": ["a", "b"], "choice": 1}, "choice", source="db", line=7)
    assert (ex.choice, ex.source) == (1, "db:7")
    with pytest.raises(DataFormatError, match=r"db, line 7: 'choice' is 5"):
        parse_record({"responses": ["a", "b"], "choice": 5}, "choice", source="db", line=7)


# --------------------------------------------------------------------------------------
# Parquet and JSON through datasets
# --------------------------------------------------------------------------------------


def test_parquet_and_json_through_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [
        {"prompt": "p1", "chosen": "好评", "rejected": "差评", "margin": None},
        {"prompt": "p2", "chosen": "yes", "rejected": "no", "margin": 1.5},
    ]
    expected = [
        PreferenceExample("p1", ("好评", "差评"), (0, 1)),
        PreferenceExample("p2", ("yes", "no"), (0, 1), margin=1.5),
    ]
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    examples = read_preferences(parquet)
    assert stripped(examples) == expected
    assert examples[1].source == f"{parquet}:2"

    array = write_text(tmp_path, "pairs.json", json.dumps(rows, ensure_ascii=False))
    assert stripped(read_preferences(array)) == expected
    lines = write_jsonl(tmp_path, "lines.json", *rows)  # Dataset.to_json writes JSON Lines
    assert stripped(read_preferences(lines)) == expected


def test_dataset_rows_are_validated_with_row_numbers(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ranked.parquet"
    datasets.Dataset.from_list(
        [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["a", "a"]}]
    ).to_parquet(str(path))
    with pytest.raises(DataFormatError, match=r"ranked\.parquet, row 2: responses\[0\] and responses\[1\]") as info:
        read_preferences(path)
    assert info.value.line == 2
    broken = write_text(tmp_path, "broken.parquet", "not parquet")
    with pytest.raises(DataFormatError, match=r"broken\.parquet: could not be read as parquet"):
        read_preferences(broken)


# --------------------------------------------------------------------------------------
# Writers and round trips
# --------------------------------------------------------------------------------------

ROUND_TRIP_CASES = [
    (
        "ranklist-tsv",
        [
            PreferenceExample("", ("快递很快", "还行", "太慢了"), (0, 1, 2)),
            PreferenceExample("", ("good", "bad"), (0, 1)),
        ],
    ),
    ("ranklist-tsv", [PreferenceExample("Rate it", ("good", "bad"), (0, 1))]),
    (
        "ranked",
        [
            PreferenceExample("p", ("a", "b", "c"), (0, 1, 2)),
            PreferenceExample("", ("x\ty", "line\nbreak"), (0, 1)),
        ],
    ),
    ("pairs", [PreferenceExample("p", ("a", "b"), (0, 1), margin=0.5), PreferenceExample("", ("c", "d"), (0, 1))]),
    ("choice", [PreferenceExample("p", ("a", "b", "c", "d"), (1, 1, 0, 1), choice=2)]),
    ("scored", [PreferenceExample("p", ("a",), (0,), label=0.25), PreferenceExample("", ("b",), (0,), label=1.0)]),
]


@pytest.mark.parametrize(("fmt", "examples"), ROUND_TRIP_CASES)
def test_round_trip(tmp_path: Path, fmt: str, examples: list[PreferenceExample]) -> None:
    path = tmp_path / ("data.tsv" if fmt == "ranklist-tsv" else "data.jsonl")
    write_preferences(path, examples, fmt)
    prompt_column = fmt == "ranklist-tsv" and any(ex.prompt for ex in examples)
    assert stripped(read_preferences(path, prompt_column=prompt_column)) == examples
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_ranked_round_trip_with_ties_writes_ranks(tmp_path: Path) -> None:
    examples = [PreferenceExample("p", ("a", "b", "c"), (1, 0, 1)), PreferenceExample("p", ("a", "b"), (1, 0))]
    path = tmp_path / "ranked.jsonl"
    write_preferences(path, examples, "ranked")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]},
        {"prompt": "p", "responses": ["b", "a"]},  # no ties: best first, no ranks
    ]
    assert stripped(read_preferences(path, allow_ties=True)) == [
        examples[0],
        PreferenceExample("p", ("b", "a"), (0, 1)),
    ]


def test_pairs_writer_expands_lists(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    n = write_preferences(path, [PreferenceExample("p", ("a", "b", "c", "d"), (0, 1, 2, 3))], "pairs")
    examples = read_preferences(path)
    assert n == len(examples) == 6
    assert [ex.responses for ex in examples[:3]] == [("a", "b"), ("a", "c"), ("a", "d")]


def test_choice_writer_derives_choice_from_pair(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    write_preferences(path, [PreferenceExample("p", ("worse", "better"), (1, 0))], "choice")
    assert json.loads(path.read_text()) == {"prompt": "p", "responses": ["worse", "better"], "choice": 1}


WRITER_ERRORS = [
    ("ranklist-tsv", PreferenceExample("", ("a\tb", "c"), (0, 1)), r"tab or a line break.*'ranked' \(JSONL\)"),
    ("ranklist-tsv", PreferenceExample("", ("a\nb", "c"), (0, 1)), r"tab or a line break"),
    (
        "ranklist-tsv",
        PreferenceExample("p", ("", "c"), (0, 1)),
        r"an empty response, which TSV cannot hold.*'ranked' \(JSONL\)",
    ),
    ("ranklist-tsv", PreferenceExample("", ("a", "b", "c"), (0, 1, 1)), r"tied ranks.*'ranked'"),
    ("ranklist-tsv", PreferenceExample("", ("a", "b"), (0, 1), margin=1.0), r"margin=1\.0.*'pairs'"),
    ("ranked", PreferenceExample("", ("a",), (0,), label=1.0), r"scored example.*'scored'"),
    ("choice", PreferenceExample("", ("a", "b", "c"), (0, 1, 2)), r"say more than which single response"),
    ("scored", PreferenceExample("", ("a", "b"), (0, 1)), r"'scored' holds one response"),
    ("pairs", PreferenceExample("", ("a", "b"), (0, 0)), r"all responses tied"),
]


@pytest.mark.parametrize(("fmt", "example", "match"), WRITER_ERRORS)
def test_writer_refuses_lossy_output(tmp_path: Path, fmt: str, example: PreferenceExample, match: str) -> None:
    path = tmp_path / "out.txt"
    with pytest.raises(ValueError, match=r"example 0 \(src:3\) .*" + match):
        write_preferences(path, [dataclasses.replace(example, source="src:3")], fmt)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_writer_tsv_prompt_column(tmp_path: Path) -> None:
    examples = [PreferenceExample("q", ("a", "b"), (1, 0))]
    path = tmp_path / "out.tsv"
    write_preferences(path, examples, "ranklist-tsv")
    assert path.read_text() == "q\tb\ta\n"
    with pytest.raises(ValueError, match=r"has a prompt, which prompt_column=False would drop"):
        write_preferences(path, examples, "ranklist-tsv", prompt_column=False)
    assert path.read_text() == "q\tb\ta\n"  # the failed write left the old file alone
    with pytest.raises(ValueError, match=r"format='hh' cannot be written"):
        write_preferences(path, examples, "hh")
    assert "hh" not in WRITE_FORMATS


def test_writer_new_file_is_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    write_preferences(path, [PreferenceExample("", ("a", "b"), (0, 1))], "pairs")
    assert os.stat(path).st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------
# describe, split_train_eval, real data
# --------------------------------------------------------------------------------------


def test_describe() -> None:
    examples = [
        PreferenceExample("", ("a", "b", "c", "d"), (0, 1, 2, 3)),
        PreferenceExample("", ("a", "b"), (0, 1)),
        PreferenceExample("", ("a", "b", "c"), (0, 0, 1)),
        PreferenceExample("", ("a", "b", "c"), (1, 0, 1), choice=1),
        PreferenceExample("", ("a",), (0,), label=1.0),
    ]
    assert describe(examples) == {
        "n_lists": 5,
        "n_pairs": 6 + 1 + 2 + 2 + 0,
        "k_histogram": {1: 1, 2: 1, 3: 2, 4: 1},
        "n_ties": 1,
        "kinds": {"ranklist": 2, "pair": 1, "choice": 1, "scored": 1},
    }


def test_split_train_eval() -> None:
    examples = [PreferenceExample("", (f"a{i}", f"b{i}"), (0, 1)) for i in range(10)]
    train, eval_ = split_train_eval(examples, n_train=7)
    assert (train, eval_) == (examples[:7], examples[7:])
    train, eval_ = split_train_eval(examples, eval_fraction=0.3, seed=1)
    assert len(eval_) == 3 and len(train) == 7
    assert sorted(train + eval_, key=examples.index) == examples
    assert split_train_eval(examples, eval_fraction=0.3, seed=1) == (train, eval_)
    assert split_train_eval(examples, eval_fraction=0.3, seed=2) != (train, eval_)
    with pytest.raises(ValueError, match="exactly one of n_train and eval_fraction"):
        split_train_eval(examples)
    with pytest.raises(ValueError, match=r"n_train=11 must be an integer in 1\.\.10"):
        split_train_eval(examples, n_train=11)
    with pytest.raises(ValueError, match=r"eval_fraction=1\.0 must be strictly between 0 and 1"):
        split_train_eval(examples, eval_fraction=1.0)


def test_sentiment_ranklists(shared_data: Path) -> None:
    path = shared_data / "sentiment_ranklists.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    examples = read_preferences(path)
    assert len(examples) == 2482
    assert describe(examples)["k_histogram"] == {4: 2482}
    train, eval_ = split_train_eval(examples, n_train=2000)
    assert (len(train), len(eval_)) == (2000, 482)
