"""Write :class:`~rlhfkit.data.types.PreferenceExample` lists in the formats the readers read.

Writing is lossless or refused: an example whose information a format cannot hold (a
tie in plain TSV, a margin outside ``pairs``, a full order squeezed into ``choice``)
raises ``ValueError`` naming the example and the format to use instead. Every file is
written atomically (temporary file in the same directory, then ``os.replace``), so a
reader never sees half a file. ``read_preferences(write_preferences(...))`` gives back
equal examples (``source`` aside) whenever the format is the one they were read from.
A ``weight`` other than 1 is written as ``"weight"`` by every JSONL format (and never when it
is 1, so unweighted files stay as they were); rank-list TSV cannot hold one and refuses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhfkit.data.types import PreferenceExample

WRITE_FORMATS = ("ranklist-tsv", "ranked", "pairs", "choice", "scored")
"""Values accepted by ``write_preferences(format=...)``."""


def write_preferences(
    path: str | Path,
    examples: Iterable[PreferenceExample],
    format: str,
    *,
    prompt_column: bool | None = None,
) -> int:
    """Write ``examples`` to ``path`` in ``format``; returns the number of lines written.

    Args:
        path: output file; parent directories are created.
        examples: the examples to write (at least one).
        format: one of ``WRITE_FORMATS``:
            ``ranklist-tsv``: one line per list, responses best first, tab-separated;
            ``ranked``: JSONL ``{"prompt", "responses", "ranks"?}``, responses best first
            and ``ranks`` written only for lists with ties;
            ``pairs``: JSONL ``{"prompt", "chosen", "rejected", "margin"?}``, one line per
            ordered pair (C(K,2) lines for a strict list of K);
            ``choice``: JSONL ``{"prompt", "responses", "choice"}`` (lists with a single
            best response and all others tied, e.g. pairs);
            ``scored``: JSONL ``{"prompt", "response", "score"}`` (K=1 with a label).
        prompt_column: TSV only. ``None`` writes a prompt column when any prompt is
            non-empty; ``False`` refuses examples with a prompt rather than drop it.

    Raises:
        ValueError: unknown format, no examples, or an example the format cannot hold.
    """
    if format not in WRITE_FORMATS:
        raise ValueError(f"format={format!r} cannot be written; use one of {', '.join(WRITE_FORMATS)}")
    examples = list(examples)
    if not examples:
        raise ValueError(f"no examples to write to {path}; the readers reject empty files")
    if prompt_column is not None and format != "ranklist-tsv":
        warnings.warn(f"prompt_column={prompt_column} is ignored for format {format!r}", stacklevel=2)
    if format == "ranklist-tsv":
        lines = _tsv_lines(examples, prompt_column)
    else:
        render = _RECORD_RENDERERS[format]
        lines = [
            json.dumps(_with_weight(record, example), ensure_ascii=False)
            for i, example in enumerate(examples)
            for record in render(i, example)
        ]
    _write_atomic(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)


def _tsv_lines(examples: list[PreferenceExample], prompt_column: bool | None) -> list[str]:
    if prompt_column is None:
        prompt_column = any(ex.prompt for ex in examples)
    lines = []
    for i, ex in enumerate(examples):
        _check_list(i, ex, "ranklist-tsv")
        if ex.has_ties:
            raise ValueError(
                f"{_where(i, ex)} has tied ranks {ex.ranks}, which plain TSV cannot express; "
                f"write format 'ranked' (JSONL) instead"
            )
        if ex.weight != 1.0:
            raise ValueError(
                f"{_where(i, ex)} has weight {ex.weight}, which plain TSV cannot store; "
                f"write format 'ranked' (JSONL) instead"
            )
        if ex.prompt and not prompt_column:
            raise ValueError(
                f"{_where(i, ex)} has a prompt, which prompt_column=False would drop; pass "
                f"prompt_column=True (or None), or write a JSONL format"
            )
        if "" in ex.responses:
            raise ValueError(
                f"{_where(i, ex)} has an empty response, which TSV cannot hold (the reader takes an "
                f"empty column for a stray tab); write format 'ranked' (JSONL) instead"
            )
        cells = [ex.prompt] if prompt_column else []
        cells += [ex.responses[j] for j in _best_first(ex)]
        for cell in cells:
            if any(ch in cell for ch in "\t\n\r"):
                raise ValueError(
                    f"{_where(i, ex)} has a text containing a tab or a line break "
                    f"({cell[:40]!r}...), which TSV cannot hold; write format 'ranked' (JSONL) instead"
                )
        lines.append("\t".join(cells))
    return lines


def _ranked_records(i: int, ex: PreferenceExample) -> list[dict[str, Any]]:
    _check_list(i, ex, "ranked")
    if not ex.has_ties:
        return [{"prompt": ex.prompt, "responses": [ex.responses[j] for j in _best_first(ex)]}]
    # Ties keep the stored order with explicit ranks; the reader needs allow_ties=True.
    return [{"prompt": ex.prompt, "responses": list(ex.responses), "ranks": list(ex.ranks)}]


def _pairs_records(i: int, ex: PreferenceExample) -> list[dict[str, Any]]:
    if ex.label is not None or ex.k < 2:
        raise ValueError(f"{_where(i, ex)} is a scored example (K={ex.k}); write format 'scored' instead")
    pairs = ex.ordered_pairs()
    if not pairs:
        raise ValueError(f"{_where(i, ex)} has all responses tied, so it has no (chosen, rejected) pair")
    records = []
    for better, worse in pairs:
        record: dict[str, Any] = {
            "prompt": ex.prompt,
            "chosen": ex.responses[better],
            "rejected": ex.responses[worse],
        }
        if ex.margin is not None:
            record["margin"] = ex.margin
        records.append(record)
    return records


def _choice_records(i: int, ex: PreferenceExample) -> list[dict[str, Any]]:
    _check_list(i, ex, "choice")
    choice = ex.choice
    if choice is None:
        best = min(ex.ranks)
        winners = [j for j, rank in enumerate(ex.ranks) if rank == best]
        if len(winners) != 1 or len({r for r in ex.ranks if r != best}) != 1:
            raise ValueError(
                f"{_where(i, ex)} has ranks {ex.ranks}, which say more than which single response "
                f"is best; 'choice' would lose that order, write format 'ranked' instead"
            )
        choice = winners[0]
    return [{"prompt": ex.prompt, "responses": list(ex.responses), "choice": choice}]


def _scored_records(i: int, ex: PreferenceExample) -> list[dict[str, Any]]:
    if ex.label is None or ex.k != 1:
        raise ValueError(
            f"{_where(i, ex)} has K={ex.k} responses and label={ex.label}; 'scored' holds one "
            f"response with a score, write format 'ranked' or 'pairs' instead"
        )
    if ex.margin is not None:
        raise ValueError(f"{_where(i, ex)} has margin={ex.margin}, which only format 'pairs' stores")
    return [{"prompt": ex.prompt, "response": ex.responses[0], "score": ex.label}]


_RECORD_RENDERERS = {
    "ranked": _ranked_records,
    "pairs": _pairs_records,
    "choice": _choice_records,
    "scored": _scored_records,
}


def _with_weight(record: dict[str, Any], ex: PreferenceExample) -> dict[str, Any]:
    """``record`` with ``"weight"`` last when the example's weight is not 1 (else unchanged)."""
    return record if ex.weight == 1.0 else {**record, "weight": ex.weight}


def _check_list(i: int, ex: PreferenceExample, format: str) -> None:
    """Refuse what a list format cannot store: scored examples and margins."""
    if ex.label is not None or ex.k < 2:
        raise ValueError(f"{_where(i, ex)} is a scored example (K={ex.k}); write format 'scored' instead")
    if ex.margin is not None:
        raise ValueError(
            f"{_where(i, ex)} has margin={ex.margin}, which format {format!r} cannot store; write format 'pairs'"
        )


def _best_first(ex: PreferenceExample) -> list[int]:
    """Response indices sorted by rank (stable, so equal ranks keep their order)."""
    return sorted(range(ex.k), key=lambda j: ex.ranks[j])


def _where(i: int, ex: PreferenceExample) -> str:
    return f"example {i}" + (f" ({ex.source})" if ex.source else "")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to a temporary file beside ``path``, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates 0600 files; keep an existing file's mode, else use the usual 0644.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
