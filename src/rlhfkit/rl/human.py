"""``rlhfkit ppo --reward human``: a person types a score for each generation.

Each batch's generations are shown one by one in the terminal; the person types a number
(``u`` undoes the previous score of the batch, ``?`` shows help). Every score is appended
to a JSONL log and flushed to disk before the next question, so no judgement is lost;
a resumed session (``rlhfkit ppo --resume``) reads the log back and does not ask again for
a (prompt, response) it already has a score for.

``--reward human`` logs to ``human_scores.jsonl`` in the current folder;
``--reward human:PATH`` logs to PATH. ``--reward human:PATH@LOW..HIGH`` also restricts the
accepted range (e.g. ``human:scores.jsonl@-1..1``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import torch

HELP = "type a number and Enter; 'u' undoes the previous score in this batch; '?' shows this help"


def _key(prompt: str, response: str) -> str:
    return hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()[:24]


class HumanRewardSource:
    """Scores typed by a person, logged to JSONL, replayed on resume."""

    def __init__(self, spec: str = "", options=None, *, stdin: IO[str] | None = None, stdout: IO[str] | None = None):
        path, _, bounds = spec.partition("@")
        self.log_path = Path(path or "human_scores.jsonl")
        self.low, self.high = None, None
        if bounds:
            try:
                lo, hi = bounds.split("..")
                self.low, self.high = float(lo), float(hi)
            except ValueError:
                raise ValueError(f"--reward human:{spec}: the range must look like LOW..HIGH, e.g. -1..1") from None
            if not self.low < self.high:
                raise ValueError(f"--reward human:{spec}: LOW must be below HIGH")
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.known: dict[str, float] = {}
        self.batch = 0
        if self.log_path.is_file():
            for n, line in enumerate(self.log_path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{self.log_path}, line {n}: not valid JSON; fix or move the log away") from None
                if "undo" in row:
                    self.known.pop(row["undo"], None)
                else:
                    self.known[row["key"]] = float(row["score"])
                self.batch = max(self.batch, int(row.get("batch", 0)))
            self._say(f"human rewards: {len(self.known)} earlier scores read back from {self.log_path}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def _say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def _append(self, row: dict) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a judgement is on disk before the next question

    def _parse(self, text: str) -> float | str:
        text = text.strip()
        if text in ("u", "?"):
            return text
        try:
            value = float(text)
        except ValueError:
            return f"'{text}' is not a number; {HELP}"
        if value != value or value in (float("inf"), float("-inf")):
            return "the score must be a finite number"
        if self.low is not None and not self.low <= value <= self.high:
            return f"the score must be between {self.low:g} and {self.high:g}"
        return value

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        self.batch += 1
        scores: list[float | None] = [self.known.get(_key(p, r)) for p, r in zip(prompts, responses)]
        todo = [i for i, s in enumerate(scores) if s is None]
        if len(todo) < len(scores):
            self._say(
                f"batch {self.batch}: {len(scores) - len(todo)} of {len(scores)} generations already scored in the log"
            )
        if todo:
            self._say(f"\nbatch {self.batch}: score {len(todo)} generations ({HELP})")
        done: list[int] = []
        pos = 0
        while pos < len(todo):
            i = todo[pos]
            range_note = f" [{self.low:g}..{self.high:g}]" if self.low is not None else ""
            self.stdout.write(
                f"\n[{pos + 1}/{len(todo)}] prompt: {prompts[i]}\nresponse: {responses[i]}\nscore{range_note}> "
            )
            self.stdout.flush()
            line = self.stdin.readline()
            if line == "":
                raise EOFError(
                    f"standard input closed before every generation had a score; the {len(done)} scores typed in this "
                    f"batch are saved in {self.log_path}. Resume with --resume to continue."
                )
            value = self._parse(line)
            if value == "?":
                self._say(HELP)
                continue
            if value == "u":
                if not done:
                    self._say("nothing to undo in this batch")
                    continue
                last = done.pop()
                key = _key(prompts[last], responses[last])
                self.known.pop(key, None)
                scores[last] = None
                self._append({"undo": key, "batch": self.batch, "time": time.time()})
                pos -= 1
                self._say("undone; score that generation again")
                continue
            if isinstance(value, str):
                self._say(value)
                continue
            key = _key(prompts[i], responses[i])
            self._append(
                {
                    "key": key,
                    "prompt": prompts[i],
                    "response": responses[i],
                    "score": value,
                    "batch": self.batch,
                    "time": time.time(),
                }
            )
            self.known[key] = value
            scores[i] = value
            done.append(i)
            pos += 1
        return torch.tensor(scores, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"HumanRewardSource(log={str(self.log_path)!r})"
