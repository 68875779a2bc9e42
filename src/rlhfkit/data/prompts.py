"""Prompt files, read the same way by every command that samples (ppo, rl, bon, generate,
ppo-eval, annotate, the pipeline).

A prompt file is plain text (one prompt per non-blank line) or JSON Lines with a
``prompt`` string or a ``messages`` chat per line. A ``messages`` row (``[{"role",
"content"}, ...]`` ending in a user or system turn) is a conversation the policy answers
through its chat template; its :attr:`Prompt.text`, what reward sources and logs see, is
the row's ``prompt`` field or else its last user turn.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.data.types import DataFormatError
from rlhfkit.files import read_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``text`` is what reward sources and logs see; ``messages`` a chat, if given."""

    text: str
    messages: tuple[dict[str, str], ...] | None = None


def read_prompts(path: str | Path, option: str = "--prompts") -> list[Prompt]:
    """Every prompt of a text or JSONL file; a bad row is a :class:`DataFormatError` naming its line."""
    path = Path(path)
    lines = read_text(path, option).split("\n")
    prompts: list[Prompt] = []
    with_nul: list[int] = []
    for n, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if "\0" in line:  # a tokenizer reads NUL as a character; it is almost always a damaged or binary file
            with_nul.append(n)
            line = line.replace("\0", "")
        if not line.strip():
            continue
        prompts.append(_parse_row(line, str(path), n) if path.suffix.lower() == ".jsonl" else Prompt(line))
    if with_nul:
        logger.warning(
            "%s:%d: NUL bytes (\\0) on %d line(s) of the %s file, from this one on; removed them. NUL bytes in "
            "a text file usually mean it is damaged or not text",
            path,
            with_nul[0],
            len(with_nul),
            option,
        )
    if not prompts:
        raise DataFormatError(
            str(path), None, "holds no prompts; write one prompt per line (or JSONL rows with 'prompt')"
        )
    return prompts


def _parse_row(line: str, source: str, n: int) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            source, n, f"not valid JSON ({e.msg}); each line must be an object with 'prompt' or 'messages'"
        ) from None
    if not isinstance(row, dict) or not ({"prompt", "messages"} & row.keys()):
        raise DataFormatError(
            source,
            n,
            "expected an object with a 'prompt' string or a 'messages' list, like {\"prompt\": \"Why is the sky blue?\"}",
        )
    messages = row.get("messages")
    if messages is None:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise DataFormatError(source, n, f"'prompt' must be a non-empty string, got {row['prompt']!r}")
        return Prompt(row["prompt"])
    if not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise DataFormatError(source, n, '\'messages\' must be a non-empty list of {"role": str, "content": str}')
    if messages[-1]["role"] == "assistant":
        raise DataFormatError(source, n, "'messages' ends with an assistant turn; the policy writes that turn, drop it")
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = (
        row.get("prompt") if isinstance(row.get("prompt"), str) else (users[-1] if users else messages[-1]["content"])
    )
    return Prompt(text, tuple({"role": m["role"], "content": m["content"]} for m in messages))
