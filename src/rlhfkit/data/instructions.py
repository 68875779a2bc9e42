"""Instruction data (SFT's training file): read JSON Lines into :class:`~rlhfkit.data.examples.SFTExample`.

Formats (one object per line). Each bad line raises one :class:`~rlhfkit.data.types.DataFormatError`
naming the file, the line and what to fix; nothing is dropped silently.

- ``{"prompt": str, "response": str}``; a missing ``prompt`` reads as ``""``.
- ``{"messages": [{"role": str, "content": str}, ...]}``: a chat ending with an assistant turn.

Read by ``rlhfkit sft``, the pipeline, and ``rlhfkit plan --algo sft --train`` (which measures
the file's token lengths), so it lives on this floor rather than in the sft package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhfkit.data.examples import SFTExample
from rlhfkit.data.readers import _iter_jsonl, _show  # one JSONL reader: the same line errors for every data file
from rlhfkit.data.types import DataFormatError
from rlhfkit.errors import MissingFileError


def read_sft_data(path: str | Path) -> list[SFTExample]:
    """Read a JSONL file of ``{"prompt", "response"}`` and/or ``{"messages"}`` rows.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        DataFormatError: a line is malformed (file, line number, what to fix), or the file
            holds no examples.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"instruction data file {str(path)!r} does not exist (or is not a file)")
    examples = [_parse_row(row, str(path), n) for n, row in _iter_jsonl(path)]
    if not examples:
        raise DataFormatError(str(path), None, "contains no examples; check that this is the right file")
    return examples


_EXPECTED = 'a JSON object {"prompt": str, "response": str} or {"messages": [{"role": str, "content": str}, ...]}'


def _parse_row(row: Any, source: str, line: int) -> SFTExample:
    def bad(problem: str) -> DataFormatError:
        return DataFormatError(source, line, problem)

    if not isinstance(row, dict):
        raise bad(f"is {_show(row)}; expected {_EXPECTED}")
    where = f"{source}:{line}"
    if row.get("messages") is not None:
        if row.get("response") is not None:
            raise bad("has both 'messages' and 'response'; give either a chat ('messages') or a prompt/response pair")
        return _parse_messages(row["messages"], bad, where)
    if "response" not in row or row["response"] is None:
        raise bad(f"has no 'response' (keys: {', '.join(sorted(map(str, row))) or 'none'}); expected {_EXPECTED}")
    response, prompt = row["response"], row.get("prompt")
    if not isinstance(response, str):
        raise bad(f"'response' must be a string, got {_show(response)}")
    if not response.strip():
        raise bad("'response' is empty or only whitespace; every example needs a reply to learn from")
    if prompt is not None and not isinstance(prompt, str):
        raise bad(f"'prompt' must be a string, got {_show(prompt)}")
    return SFTExample(prompt=prompt or "", response=response, source=where)


def _parse_messages(messages: Any, bad, where: str) -> SFTExample:
    if not isinstance(messages, list) or not messages:
        raise bad(f'\'messages\' must be a non-empty list of {{"role": str, "content": str}}, got {_show(messages)}')
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise bad(f'messages[{i}] must be an object {{"role": str, "content": str}}, got {_show(m)}')
        if m["role"] == "assistant" and not m["content"].strip():
            raise bad(f"messages[{i}] is an empty assistant turn; every assistant turn needs text to learn from")
    if messages[-1]["role"] != "assistant":
        raise bad(
            f"'messages' ends with a {messages[-1]['role']!r} turn; the last turn must be the assistant reply to learn "
            "(drop trailing turns, or move the row to the prompt file of PPO)"
        )
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    clean = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return SFTExample(prompt=users[-1] if users else "", response=messages[-1]["content"], messages=clean, source=where)
