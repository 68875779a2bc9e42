"""Read preference data files into :class:`~rlhfkit.data.types.PreferenceExample` lists.

One entry point, :func:`read_preferences`, reads every supported format. Each bad line
raises one :class:`~rlhfkit.data.types.DataFormatError` naming the file, the line (or the
row, for files read through ``datasets``), what is wrong and how to fix it. Nothing is
ever dropped silently.

Formats (``FORMATS``):

- ``ranklist-tsv``: one rank list per line, responses separated by tabs, best first;
  with ``prompt_column=True`` the first column is the prompt. Plain TSV cannot express
  ties, and texts cannot contain tabs or newlines.
- ``pairs``: ``{"prompt", "chosen", "rejected", "margin"?}`` -> K=2, ranks ``(0, 1)``.
- ``hh``: ``{"chosen", "rejected"}`` holding whole dialogues (Anthropic HH-RLHF); the
  shared prompt is split off at the last shared ``"\\n\\nAssistant:"`` marker.
- ``ranked``: ``{"prompt", "responses": [best first], "ranks"?}``; ranks are ints, lower
  is better, equal ranks are ties (only with ``allow_ties=True``).
- ``choice``: ``{"prompt", "responses", "choice"}``, n-choose-1 (InstructGPT 4-choose-1).
- ``scored``: ``{"prompt", "response", "score"}`` or ``"label"`` (bool or 0/1) -> K=1.

Weights. Every JSON format may carry an optional ``"weight"``: a positive finite number, how
much the record counts in a training loss (``PreferenceExample.weight``; missing or null = 1;
``rlhfkit annotate export --aggregate weighted`` writes it). A ``save_to_disk`` folder or a
Parquet file may have a ``weight`` column the same way. Rank-list TSV has no place for it:
every line weighs 1.

Containers: ``.tsv``/``.txt`` are rank-list TSV; ``.jsonl`` is read line by line here
(so invalid JSON is reported with its line); ``.json`` (JSON array or JSON Lines) and
``.parquet`` are loaded with ``datasets.load_dataset``, and a folder that
``datasets.Dataset.save_to_disk`` wrote (``dataset_info.json`` and ``state.json``, e.g. from
``rlhfkit annotate export --format hf``) with ``datasets.load_from_disk``; each of their rows
goes through the same validator, numbered ``row N`` from 1. In every JSON format ``prompt`` may be missing
(read as ``""``), and a ``null`` value counts as a missing key (Arrow stores missing
columns as nulls).

Empty responses. A response that is empty (or only whitespace) is a legitimate answer to a
non-empty prompt, as in HH-RLHF, where some preferred answers are empty after the shared
prompt: it is read as ``""``, and the model scores it as the prompt followed by the end
token alone (``EncodedPreferences`` counts them). Without a prompt an empty response is
nothing to score and stays an error, as are two responses of one list that are both empty.
Rank-list TSV keeps refusing empty columns: there a stray tab is the likelier cause.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rlhfkit.data.types import DataFormatError, PreferenceExample, strict_ranks
from rlhfkit.errors import MissingFileError

FORMATS = ("auto", "ranklist-tsv", "pairs", "hh", "ranked", "choice", "scored")
"""Values accepted by ``read_preferences(format=...)``."""

HH_ASSISTANT_MARKER = "\n\nAssistant:"
"""Turn marker of Anthropic HH-RLHF dialogues; the prompt ends with the last shared one."""

_EXTENSION_FORMATS = {".tsv": "ranklist-tsv", ".txt": "ranklist-tsv"}
_RECORD_EXTENSIONS = (".jsonl", ".json", ".parquet")

SAVED_DATASET_FILES = ("dataset_info.json", "state.json")
"""What ``datasets.Dataset.save_to_disk`` writes beside the Arrow files: how a folder is recognised."""

# The keys each JSON format expects, for error messages.
_FORMAT_KEYS = {
    "pairs": '{"prompt", "chosen", "rejected", "margin"?, "weight"?}',
    "hh": '{"chosen", "rejected", "weight"?} (whole dialogues, no "prompt")',
    "ranked": '{"prompt", "responses": [best first], "ranks"?, "weight"?}',
    "choice": '{"prompt", "responses", "choice", "weight"?}',
    "scored": '{"prompt", "response", "score" | "label", "weight"?}',
}


class _RecordError(Exception):
    """A problem with one record; the caller adds the file and line."""


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def read_preferences(
    path: str | Path,
    format: str = "auto",
    *,
    prompt_column: bool = False,
    allow_ties: bool = False,
) -> list[PreferenceExample]:
    """Read a preference data file; every example's ``source`` is ``"path:line"``.

    Args:
        path: a ``.tsv``/``.txt``, ``.jsonl``, ``.json`` or ``.parquet`` file, or a folder
            written by ``datasets.Dataset.save_to_disk`` (rows in a JSON format).
        format: one of ``FORMATS``. ``"auto"`` picks rank-list TSV for ``.tsv``/``.txt``
            and, for JSON and Parquet, the format of the first record; every later record
            must then have the same format.
        prompt_column: TSV only: the first column is the prompt.
        allow_ties: accept equal ``ranks`` in the ``ranked`` format.

    Raises:
        FileNotFoundError: ``path`` is neither a file nor a folder.
        ValueError: ``format`` is not one of ``FORMATS``.
        DataFormatError: the file or one of its records is malformed, it holds no
            examples, or it is a folder that ``save_to_disk`` did not write.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_dir():
        _check_saved_dataset(path, format)
    elif not path.is_file():
        raise MissingFileError(f"preference data file {str(path)!r} does not exist (or is not a file)")
    extension = path.suffix.lower()
    if format == "auto" and path.is_file() and extension not in (*_EXTENSION_FORMATS, *_RECORD_EXTENSIONS):
        raise DataFormatError(
            str(path),
            None,
            f"cannot detect the format from the extension {extension or '(none)'!r}; rename the "
            f"file to .tsv, .txt, .jsonl, .json or .parquet, or pass format= one of "
            f"{', '.join(FORMATS[1:])}",
        )
    if not path.is_dir() and (format == "ranklist-tsv" or (format == "auto" and extension in _EXTENSION_FORMATS)):
        examples = _read_ranklist_tsv(path, prompt_column=prompt_column)
    else:
        if prompt_column:
            warnings.warn(
                f"prompt_column=True is ignored for {path}: it only applies to ranklist-tsv files",
                stacklevel=2,
            )
        examples = _read_records(path, format, allow_ties=allow_ties)
    if not examples:
        raise DataFormatError(str(path), None, "contains no examples; check that this is the right file")
    return examples


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder ``datasets.Dataset.save_to_disk`` wrote (``SAVED_DATASET_FILES``)."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in SAVED_DATASET_FILES)


def detect_format(record: dict[str, Any]) -> str | None:
    """The JSON format whose keys ``record`` has (null values count as missing), or None."""
    keys = _present_keys(record)
    # "hh" before "pairs": pairs also accept a missing prompt, but a file whose first
    # record has none holds whole dialogues.
    for name in ("choice", "ranked", "scored", "hh", "pairs"):
        if _matches(keys, name):
            return name
    return None


def parse_record(
    record: dict[str, Any],
    format: str,
    *,
    allow_ties: bool = False,
    source: str = "<record>",
    line: int | None = None,
) -> PreferenceExample:
    """Validate one JSON-style record of a known ``format`` (not ``auto``/``ranklist-tsv``).

    This is the validator every JSONL line and every ``datasets`` row goes through; other
    modules (for example an annotation store) can use it on their own records. Raises
    :class:`DataFormatError` with ``source`` and ``line`` on a bad record.
    """
    if format not in _FORMAT_KEYS:
        raise ValueError(f"format={format!r} is not a record format; use one of {', '.join(_FORMAT_KEYS)}")
    where = source if line is None else f"{source}:{line}"
    try:
        if not isinstance(record, dict):
            raise _RecordError(f"is {_show(record)}; expected a JSON object like {_FORMAT_KEYS[format]}")
        if not _matches(_present_keys(record), format):
            raise _RecordError(_mismatch_problem(record, format, started_as=None))
        return _PARSERS[format](record, allow_ties=allow_ties, source=where)
    except _RecordError as e:
        raise DataFormatError(source, line, str(e)) from None


def describe(examples: Sequence[PreferenceExample]) -> dict[str, Any]:
    """Summary counts of a data set, for logs and ``rlhfkit data describe``.

    Returns a dict with ``n_lists`` (examples), ``n_pairs`` (ordered (better, worse)
    pairs over all lists: C(K,2) per strict list), ``k_histogram`` ({K: number of
    lists}), ``n_ties`` (rank lists with explicit tied ranks; n-choose-1 lists are not
    counted although their unchosen responses share a rank) and ``kinds``
    ({"ranklist" | "pair" | "choice" | "scored": count}).
    """
    kinds: Counter[str] = Counter()
    for ex in examples:
        if ex.label is not None:
            kinds["scored"] += 1
        elif ex.choice is not None:
            kinds["choice"] += 1
        elif ex.k == 2:
            kinds["pair"] += 1
        else:
            kinds["ranklist"] += 1
    return {
        "n_lists": len(examples),
        "n_pairs": sum(len(ex.ordered_pairs()) for ex in examples),
        "k_histogram": dict(sorted(Counter(ex.k for ex in examples).items())),
        "n_ties": sum(1 for ex in examples if ex.has_ties and ex.choice is None),
        "kinds": dict(kinds),
    }


def split_train_eval(
    examples: Sequence[PreferenceExample],
    n_train: int | None = None,
    eval_fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Split into (train, eval); give exactly one of ``n_train`` and ``eval_fraction``.

    ``n_train`` takes the first ``n_train`` examples for training and the rest for eval
    (deterministic, as in "train on the first 2,000 lists"). ``eval_fraction`` draws
    ``round(len * eval_fraction)`` (at least 1) eval examples with ``random.Random(seed)``;
    both parts keep the file order.
    """
    if (n_train is None) == (eval_fraction is None):
        raise ValueError(
            f"give exactly one of n_train and eval_fraction (got n_train={n_train!r}, eval_fraction={eval_fraction!r})"
        )
    n = len(examples)
    if n_train is not None:
        if isinstance(n_train, bool) or not isinstance(n_train, int) or not 0 < n_train <= n:
            raise ValueError(f"n_train={n_train!r} must be an integer in 1..{n} (the number of examples)")
        return list(examples[:n_train]), list(examples[n_train:])
    assert eval_fraction is not None
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction!r} must be strictly between 0 and 1")
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise ValueError(
            f"eval_fraction={eval_fraction} of {n} examples leaves nothing to train on; "
            f"use a smaller fraction or more data"
        )
    eval_idx = set(random.Random(seed).sample(range(n), n_eval))
    train = [ex for i, ex in enumerate(examples) if i not in eval_idx]
    eval_ = [ex for i, ex in enumerate(examples) if i in eval_idx]
    return train, eval_


# --------------------------------------------------------------------------------------
# Rank-list TSV
# --------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """The file's lines, UTF-8 with an optional BOM, ``\\n`` or ``\\r\\n`` endings.

    The newline that ends the last line is a terminator, not an extra empty line. Only
    ``\\n`` splits lines (``str.splitlines`` would also split on ``\\x1c``, ``\\u2028``...,
    which may legitimately sit inside a text).
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(
            str(path), line, f"is not valid UTF-8 (byte {e.start} of the file); re-save the file as UTF-8"
        ) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_ranklist_tsv(path: Path, *, prompt_column: bool) -> list[PreferenceExample]:
    examples = []
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            raise DataFormatError(str(path), line_no, "is empty; remove it (blank lines are not allowed)")
        cells = line.split("\t")
        prompt, responses = (cells[0], cells[1:]) if prompt_column else ("", cells)
        first = 2 if prompt_column else 1  # 1-based column of responses[0]
        if len(responses) < 2:
            hint = " (the first column is the prompt because prompt_column=True)" if prompt_column else ""
            raise DataFormatError(
                str(path),
                line_no,
                f"has {len(responses)} response(s){hint}; a rank list needs at least 2 "
                f"tab-separated responses, best first",
            )
        for i, text in enumerate(responses):
            if not text.strip():
                raise DataFormatError(
                    str(path),
                    line_no,
                    f"column {first + i} is empty (two tabs in a row, or a tab at the start or end "
                    f"of the line); remove the stray tab",
                )
        duplicate = _first_duplicate(responses)
        if duplicate is not None:
            i, j = duplicate
            raise DataFormatError(
                str(path),
                line_no,
                f"columns {first + i} and {first + j} hold the same text; a list cannot rank a "
                f"response against itself, remove the duplicate",
            )
        examples.append(
            PreferenceExample(
                prompt=prompt,
                responses=tuple(responses),
                ranks=strict_ranks(len(responses)),
                source=f"{path}:{line_no}",
            )
        )
    return examples


# --------------------------------------------------------------------------------------
# JSON records: containers
# --------------------------------------------------------------------------------------


def _check_saved_dataset(path: Path, format: str) -> None:
    """Refuse a folder that is not one dataset written by ``save_to_disk``, or a TSV ``format``."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if is_saved_dataset(p))
        example = path / (splits[0] if splits else "train")
        raise DataFormatError(
            str(path),
            None,
            f"is a DatasetDict folder (splits: {', '.join(splits) or 'none'}); pass one split's folder, e.g. {example}",
        )
    if not is_saved_dataset(path):
        raise DataFormatError(
            str(path),
            None,
            f"is a folder but not a dataset written by datasets' save_to_disk (it has no "
            f"{' and '.join(SAVED_DATASET_FILES)}); pass a data file (.tsv, .jsonl, .json, .parquet) "
            f"or the folder 'rlhfkit annotate export --format hf' wrote",
        )
    if format == "ranklist-tsv":
        raise DataFormatError(
            str(path),
            None,
            f"is a datasets folder, whose rows are JSON-style records, not rank-list TSV; pass format "
            f"auto or one of {', '.join(_FORMAT_KEYS)}",
        )


def _read_records(path: Path, format: str, *, allow_ties: bool) -> list[PreferenceExample]:
    """Validate every record of a JSONL/JSON/Parquet file or a ``save_to_disk`` folder; ``format`` may be ``auto``."""
    extension = path.suffix.lower()
    if path.is_dir():
        unit, records = "row", _iter_saved_rows(path)
    elif extension in (".json", ".parquet"):
        unit, records = "row", _iter_dataset_rows(path, "parquet" if extension == ".parquet" else "json")
    else:
        unit, records = "line", _iter_jsonl(path)
    file_format = None if format == "auto" else format
    examples = []
    for n, record in records:
        try:
            if not isinstance(record, dict):
                expected = _FORMAT_KEYS.get(file_format or "", "{...}")
                raise _RecordError(f"is {_show(record)}; expected a JSON object like {expected}")
            if file_format is None:
                file_format = detect_format(record)
                if file_format is None:
                    raise _RecordError(_mismatch_problem(record, None, started_as=None))
            elif not _matches(_present_keys(record), file_format):
                started_as = file_format if format == "auto" else None
                raise _RecordError(_mismatch_problem(record, file_format, started_as=started_as))
            examples.append(_PARSERS[file_format](record, allow_ties=allow_ties, source=f"{path}:{n}"))
        except _RecordError as e:
            raise _located_error(path, unit, n, str(e)) from None
    return examples


def _located_error(path: Path, unit: str, n: int, problem: str) -> DataFormatError:
    """``DataFormatError`` for line ``n``, or for row ``n`` of a ``datasets``-loaded file."""
    error = DataFormatError(str(path), n, problem)
    if unit != "line":
        # DataFormatError always says "line"; a Parquet row has no line, so say "row"
        # while keeping .source, .line and .problem machine-readable.
        error.args = (f"{path}, {unit} {n}: {problem}",)
    return error


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value) for each line of a JSON Lines file."""
    for line_no, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            raise DataFormatError(str(path), line_no, "is empty; remove it (blank lines are not allowed)")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                str(path),
                line_no,
                f"is not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object",
            ) from None
        yield line_no, value


def _iter_dataset_rows(path: Path, builder: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) of a local Parquet or JSON file, via ``datasets``."""
    import datasets  # heavy (pyarrow, pandas): imported only when a file needs it

    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets/pyarrow raise many types for unreadable files
        root: BaseException = e  # DatasetGenerationError wraps the informative pyarrow/json error
        while root.__cause__ is not None:
            root = root.__cause__
        detail = str(root) if len(str(root)) <= 200 else str(root)[:197] + "..."
        expected = "a Parquet file" if builder == "parquet" else "a JSON array of objects, or JSON Lines"
        raise DataFormatError(
            str(path),
            None,
            f"could not be read as {builder} by datasets.load_dataset ({type(root).__name__}: "
            f"{detail}); check that it is {expected}",
        ) from e
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
    yield from enumerate(dataset, start=1)


def _iter_saved_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) of a folder written by ``save_to_disk``, via ``datasets``."""
    import datasets  # heavy (pyarrow, pandas): imported only when a folder needs it

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged or foreign folder: datasets/pyarrow raise many types
        detail = str(e) if len(str(e)) <= 200 else str(e)[:197] + "..."
        raise DataFormatError(
            str(path),
            None,
            f"could not be read by datasets.load_from_disk ({type(e).__name__}: {detail}); check that "
            f"the folder is complete, or write it again with save_to_disk",
        ) from e
    if not isinstance(dataset, datasets.Dataset):  # a DatasetDict saved without dataset_dict.json
        raise DataFormatError(str(path), None, f"holds a {type(dataset).__name__}, not one Dataset; pass one split")
    yield from enumerate(dataset, start=1)


# --------------------------------------------------------------------------------------
# JSON records: format detection and per-format validation
# --------------------------------------------------------------------------------------


def _present_keys(record: dict[str, Any]) -> set[str]:
    """Keys with a non-null value: Arrow fills columns a row lacks with nulls."""
    return {key for key, value in record.items() if value is not None}


def _matches(keys: set[str], format: str) -> bool:
    """Whether a record with these keys belongs to ``format``; extra keys are ignored."""
    if format in ("pairs", "hh"):
        pair = {"chosen", "rejected"} <= keys and not keys & {"responses", "response"}
        return pair and (format == "pairs" or "prompt" not in keys)
    if format == "ranked":
        return "responses" in keys and "choice" not in keys
    if format == "choice":
        return {"responses", "choice"} <= keys
    if format == "scored":
        return "response" in keys and bool(keys & {"score", "label"})
    raise AssertionError(format)


def _mismatch_problem(record: dict[str, Any], expected: str | None, *, started_as: str | None) -> str:
    """Why ``record`` is not of format ``expected`` (None: no format expected yet)."""
    keys = sorted(record)
    nulls = sorted(key for key, value in record.items() if value is None)
    null_note = f" (null values count as missing: {', '.join(nulls)})" if nulls else ""
    detected = detect_format(record)
    if detected is None:
        if expected is None:
            listing = "; ".join(f"{name} {keys_}" for name, keys_ in _FORMAT_KEYS.items())
            return f"has keys {keys}{null_note}, which match no known format; expected one of: {listing}"
        return (
            f"has keys {keys}{null_note}, which match no known format; this file is format "
            f"{expected!r}: {_FORMAT_KEYS[expected]}"
        )
    if started_as is not None:
        return (
            f"looks like format {detected!r} (keys {keys}) but the file started as {started_as!r}; "
            f"keep one format per file"
        )
    return (
        f"has keys {keys}, which do not fit format {expected!r} {_FORMAT_KEYS[expected or '']}; "
        f"it looks like {detected!r}, pass format={detected!r}"
    )


def _parse_pairs(record: dict[str, Any], *, allow_ties: bool, source: str) -> PreferenceExample:
    prompt = _prompt(record)
    chosen = _response(record["chosen"], "chosen", prompt)
    rejected = _response(record["rejected"], "rejected", prompt)
    if chosen == rejected:
        same = "both empty" if not chosen else "the same text"
        raise _RecordError(f"'chosen' and 'rejected' are {same}; a pair needs two different responses")
    return PreferenceExample(
        prompt, (chosen, rejected), (0, 1), margin=_margin(record), source=source, weight=_weight(record)
    )


def _parse_hh(record: dict[str, Any], *, allow_ties: bool, source: str) -> PreferenceExample:
    chosen = _text(record["chosen"], "chosen")
    rejected = _text(record["rejected"], "rejected")
    if chosen == rejected:
        raise _RecordError(
            "'chosen' and 'rejected' are the same dialogue; there is no response to prefer, fix or remove the line"
        )
    prompt, chosen_response, rejected_response = split_shared_prompt(chosen, rejected)
    # An answer that is empty after the shared prompt is a legitimate (if terse) answer:
    # it is kept as "" and scored as the prompt plus the end token.
    chosen_response, rejected_response = _or_empty(chosen_response), _or_empty(rejected_response)
    if not chosen_response and not rejected_response:
        raise _RecordError(
            f"both dialogues end right after the shared prompt {_clip(prompt)}, so both answers are "
            f"empty and there is nothing to prefer; fix or remove the line"
        )
    return PreferenceExample(
        prompt,
        (chosen_response, rejected_response),
        (0, 1),
        margin=_margin(record),
        source=source,
        weight=_weight(record),
    )


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two whole dialogues into (prompt, chosen response, rejected response).

    The prompt is the longest common prefix that ends with the last ``"\\n\\nAssistant:"``
    marker both dialogues share (the marker is part of the prompt, so responses start
    like ``" I think..."``). Without a shared marker it is the longest common prefix that
    ends just after a whitespace character, so no word is cut in two; it can be ``""``.
    """
    common = os.path.commonprefix([chosen, rejected])
    marker = common.rfind(HH_ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(HH_ASSISTANT_MARKER)
    else:
        cut = next((i + 1 for i in range(len(common) - 1, -1, -1) if common[i].isspace()), 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _parse_ranked(record: dict[str, Any], *, allow_ties: bool, source: str) -> PreferenceExample:
    prompt = _prompt(record)
    responses = _responses(record, prompt)
    given = record.get("ranks")
    if given is None:
        return PreferenceExample(prompt, responses, strict_ranks(len(responses)), source=source, weight=_weight(record))
    if not isinstance(given, (list, tuple)):
        raise _RecordError(f"'ranks' must be a list of integers (lower = better), got {_show(given)}")
    if len(given) != len(responses):
        raise _RecordError(
            f"'ranks' has {len(given)} items but 'responses' has {len(responses)}; give one rank per response"
        )
    raw = [_integer(value, f"ranks[{i}]") for i, value in enumerate(given)]
    for i, rank in enumerate(raw):
        if rank < 0:
            raise _RecordError(f"'ranks[{i}]' is {rank}; ranks must be >= 0 (0 = best)")
    # Dense ranks: (3, 1, 1, 7) -> (1, 0, 0, 2), so strict orders are always 0..K-1.
    dense = {value: i for i, value in enumerate(sorted(set(raw)))}
    ranks = tuple(dense[rank] for rank in raw)
    if len(dense) == 1:
        raise _RecordError(
            f"all {len(ranks)} responses have the same rank, so the list states no preference; "
            f"rank them or drop the line"
        )
    if len(dense) < len(ranks) and not allow_ties:
        tie = _first_duplicate(raw)
        assert tie is not None  # fewer distinct ranks than responses
        i, j = tie
        raise _RecordError(
            f"responses[{i}] and responses[{j}] share rank {raw[i]} (a tie); ties are only accepted "
            f"with --allow-ties (allow_ties=True), otherwise give distinct ranks"
        )
    return PreferenceExample(prompt, responses, ranks, source=source, weight=_weight(record))


def _parse_choice(record: dict[str, Any], *, allow_ties: bool, source: str) -> PreferenceExample:
    prompt = _prompt(record)
    responses = _responses(record, prompt)
    if record.get("ranks") is not None:
        raise _RecordError("has both 'choice' and 'ranks'; keep 'choice' (n-choose-1) or 'ranks' (ranked), not both")
    choice = _integer(record["choice"], "choice")
    if not 0 <= choice < len(responses):
        raise _RecordError(
            f"'choice' is {choice} but there are {len(responses)} responses; it must be an index "
            f"0..{len(responses) - 1} (0-based)"
        )
    ranks = tuple(0 if i == choice else 1 for i in range(len(responses)))
    return PreferenceExample(prompt, responses, ranks, choice=choice, source=source, weight=_weight(record))


def _parse_scored(record: dict[str, Any], *, allow_ties: bool, source: str) -> PreferenceExample:
    prompt = _prompt(record)
    response = _response(record["response"], "response", prompt)
    score, label = record.get("score"), record.get("label")
    if score is not None and label is not None:
        raise _RecordError(
            "has both 'score' and 'label'; keep one ('score' for graded values, 'label' for accept/reject)"
        )
    if score is not None:
        value = _finite_number(score, "score")
    elif isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1)):
        value = float(label)
    else:
        raise _RecordError(f"'label' must be true/false or 0/1, got {_show(label)}; use 'score' for graded values")
    return PreferenceExample(prompt, (response,), (0,), label=value, source=source, weight=_weight(record))


_PARSERS = {
    "pairs": _parse_pairs,
    "hh": _parse_hh,
    "ranked": _parse_ranked,
    "choice": _parse_choice,
    "scored": _parse_scored,
}


# --------------------------------------------------------------------------------------
# Field validators (raise _RecordError naming the field)
# --------------------------------------------------------------------------------------


def _prompt(record: dict[str, Any]) -> str:
    prompt = record.get("prompt")
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise _RecordError(f"'prompt' must be a string, got {_show(prompt)}")
    return prompt


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _RecordError(f"'{field}' must be a string, got {_show(value)}")
    if not value.strip():
        raise _RecordError(f"'{field}' is empty or only whitespace; every response needs text")
    return value


def _response(value: Any, field: str, prompt: str) -> str:
    """A response: a string, ``""`` when empty or only whitespace, which needs a prompt."""
    if not isinstance(value, str):
        raise _RecordError(f"'{field}' must be a string, got {_show(value)}")
    if not value.strip() and not prompt:
        raise _RecordError(
            f"'{field}' is empty or only whitespace and there is no 'prompt', so there is nothing to "
            f"score; give the response text (an empty answer is only accepted as the answer to a prompt)"
        )
    return _or_empty(value)


def _or_empty(text: str) -> str:
    """``""`` for an empty or whitespace-only response (scored as the end token alone)."""
    return text if text.strip() else ""


def _responses(record: dict[str, Any], prompt: str) -> tuple[str, ...]:
    value = record["responses"]
    if not isinstance(value, (list, tuple)):
        raise _RecordError(f"'responses' must be a list of strings, got {_show(value)}")
    responses = tuple(_response(text, f"responses[{i}]", prompt) for i, text in enumerate(value))
    if len(responses) < 2:
        raise _RecordError(
            f"'responses' has {len(responses)} item(s); a list needs at least 2 (for one response "
            f"with a score use the scored format: 'response' and 'score')"
        )
    duplicate = _first_duplicate(responses)
    if duplicate is not None:
        i, j = duplicate
        same = "both empty" if not responses[i] else "the same text"
        raise _RecordError(
            f"responses[{i}] and responses[{j}] are {same}; a list cannot rank a response "
            f"against itself, remove the duplicate"
        )
    return responses


def _integer(value: Any, field: str) -> int:
    # bool is an int subclass, but `true` as an index is a mistake; 2.0 is fine.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _RecordError(f"'{field}' must be an integer, got {_show(value)}")


def _finite_number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RecordError(f"'{field}' must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise _RecordError(f"'{field}' must be a finite number, got {value}")
    return float(value)


def _margin(record: dict[str, Any]) -> float | None:
    margin = record.get("margin")
    return None if margin is None else _finite_number(margin, "margin")


def _weight(record: dict[str, Any]) -> float:
    """The optional ``"weight"``: a positive finite number, 1 when missing or null."""
    weight = record.get("weight")
    if weight is None:
        return 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        shown = _show(weight) if not isinstance(weight, float) or math.isfinite(weight) else str(weight)
        raise _RecordError(
            f"'weight' must be a positive finite number (how much the list counts in training; 1 = once), "
            f"got {shown}; fix the value or drop the key to weigh the list 1"
        )
    return float(weight)


def _first_duplicate(items: Sequence[Any]) -> tuple[int, int] | None:
    """Indices (i, j), i < j, of the first repeated item, or None."""
    seen: dict[Any, int] = {}
    for j, item in enumerate(items):
        if item in seen:
            return seen[item], j
        seen[item] = j
    return None


_JSON_TYPE_NAMES = {int: "number", float: "number", str: "string", list: "array", tuple: "array", dict: "object"}


def _show(value: Any) -> str:
    """``value`` for an error message: its JSON type and a clipped repr."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return f"{_JSON_TYPE_NAMES.get(type(value), type(value).__name__)} {_clip(value)}"


def _clip(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
