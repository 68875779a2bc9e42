"""``rlhfkit annotate``: serve the annotation app, add users, export rankings.

    rlhfkit annotate [--model M] [--prompts F] [--db annotations.db] [--k 4] [--port 8904] ...
    rlhfkit annotate add-user NAME [--admin] --db annotations.db   # prints the token once
    rlhfkit annotate export --db annotations.db --format tsv|jsonl --output F
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from rlhfkit.config import ConfigError, parse_args
from rlhfkit.data.types import DataFormatError

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeArgs:
    """Serve the rank-list annotation app."""

    model: str = field(default="smollm2-135m", metadata={"help": "policy that writes the K responses: alias, checkpoint folder or hub id"})
    prompts: str | None = field(default=None, metadata={"help": "prompt pool to add: a text file (one prompt per line) or JSONL with a 'prompt' key"})
    db: str = field(default="annotations.db", metadata={"help": "SQLite database (created if missing)"})
    k: int = field(default=4, metadata={"help": "responses per prompt to rank"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; anything but loopback exposes the server"})
    port: int = field(default=8904, metadata={"help": "port to bind"})
    allow_ties: bool = field(default=False, metadata={"help": "let annotators tie responses"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per generated response at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0: the K responses must differ)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    overlap: int = field(default=2, metadata={"help": "annotators the pool order gives each generation set to (2+ measures agreement)"})
    prefetch: int = field(default=4, metadata={"help": "generation sets kept ready ahead of the fastest annotator"})
    device: str | None = field(default=None, metadata={"help": "torch device for the model (default: cuda if available, else cpu)"})

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ConfigError(f"option 'k' is {self.k}; a rank list needs at least 2 responses, use --k 2 or more")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"option 'port' is {self.port}; use a port in 1..65535")
        if self.max_new_tokens < 1:
            raise ConfigError(f"option 'max_new_tokens' is {self.max_new_tokens}; use 1 or more")
        if self.temperature <= 0:
            raise ConfigError(
                f"option 'temperature' is {self.temperature}; it must be > 0, or the K responses to a prompt "
                f"would all be the same"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"option 'top_p' is {self.top_p}; use a value in (0, 1]")
        if self.overlap < 1 or self.prefetch < 0:
            raise ConfigError(f"options 'overlap' ({self.overlap}) must be >= 1 and 'prefetch' ({self.prefetch}) >= 0")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ConfigError(f"option 'prompts': {self.prompts} is not a file")


@dataclass
class AddUserArgs:
    """Create an annotator (or admin) and print their token once."""

    name: str = field(metadata={"help": "user name (no spaces)", "cli": False})
    db: str = field(default="annotations.db", metadata={"help": "SQLite database (created if missing)"})
    admin: bool = field(default=False, metadata={"help": "the user sees and may delete every annotator's rankings"})


@dataclass
class ExportArgs:
    """Export the saved rankings in a format `rlhfkit rm train` reads."""

    output: str = field(metadata={"help": "file to write"})
    db: str = field(default="annotations.db", metadata={"help": "SQLite database"})
    format: Literal["tsv", "jsonl"] = field(default="jsonl", metadata={"help": "tsv: rank-list TSV with a prompt column; jsonl: 'ranked' JSONL"})
    annotator: str | None = field(default=None, metadata={"help": "only this annotator's rankings"})

    def __post_init__(self) -> None:
        if not Path(self.db).is_file():
            raise ConfigError(f"option 'db': {self.db} does not exist; pass the database the server wrote")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per non-blank line) or JSONL (``{"prompt": ...}`` per line)."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    prompts = []
    for line_no, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(str(path), line_no, f"is not valid JSON ({e.msg}); write one {{\"prompt\": ...}} object per line") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataFormatError(str(path), line_no, "needs a non-empty string 'prompt', like {\"prompt\": \"Why is the sky blue?\"}")
        prompts.append(prompt)
    if not prompts:
        raise DataFormatError(str(path), None, "holds no prompts; write one prompt per line")
    return prompts


def serve(args: ServeArgs) -> int:
    import uvicorn

    from rlhfkit.annotate.app import create_app
    from rlhfkit.annotate.generator import ModelGenerator
    from rlhfkit.annotate.store import AnnotationStore

    store = AnnotationStore(args.db)
    if args.prompts is not None:
        added = store.add_prompts(read_prompts(args.prompts))
        print(f"added {added} new prompt(s) from {args.prompts}; the pool holds {store.count_prompts()['pool']}", flush=True)
    if not store.users():
        print(f"no users yet: create one with 'rlhfkit annotate add-user NAME --db {args.db}' (add --admin for an admin)", flush=True)
    if args.host not in LOOPBACK:
        logger.warning("binding to %s exposes the server beyond this machine; tokens travel as plain HTTP, "
                       "so put a TLS proxy in front", args.host)
    print(f"loading {args.model}...", flush=True)
    generator = ModelGenerator(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, device=args.device)
    app = create_app(store, generator, args.k, args.allow_ties, overlap=args.overlap, prefetch=args.prefetch)
    print(f"annotate at http://{args.host}:{args.port}/annotate (dataset at /dataset)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        store.close()
    return 0


def add_user(args: AddUserArgs) -> int:
    from rlhfkit.annotate.store import AnnotationStore

    store = AnnotationStore(args.db)
    token = store.add_user(args.name, admin=args.admin)
    store.close()
    role = "admin" if args.admin else "annotator"
    print(f"created {role} {args.name!r} in {args.db}. Token (shown once, keep it secret):", file=sys.stderr)
    print(token, flush=True)
    return 0


def export(args: ExportArgs) -> int:
    from rlhfkit.annotate.store import AnnotationStore, export_rankings

    store = AnnotationStore(args.db)
    try:
        user_id = None
        if args.annotator is not None:
            user = store.user_by_name(args.annotator)
            if user is None:
                raise ConfigError(f"option 'annotator': there is no annotator named {args.annotator!r} in {args.db}")
            user_id = user.id
        lines = export_rankings(store, args.output, args.format, user_id=user_id)
    finally:
        store.close()
    hint = " (read it with prompt_column=True)" if args.format == "tsv" else ""
    print(f"wrote {lines} ranking(s) to {args.output}{hint}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rlhfkit annotate``; returns the exit code."""
    from rlhfkit.annotate.store import StoreError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "serve"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    try:
        if command == "serve":
            return serve(parse_args(ServeArgs, rest, prog="rlhfkit annotate"))
        if command == "add-user":
            if not rest or rest[0].startswith("-"):
                if "-h" in rest or "--help" in rest:
                    parse_args(AddUserArgs, ["--help"], prog="rlhfkit annotate add-user NAME")
                raise ConfigError("add-user needs the user name first: rlhfkit annotate add-user NAME [--admin] --db FILE")
            return add_user(parse_args(AddUserArgs, rest[1:], prog="rlhfkit annotate add-user NAME", extra={"name": rest[0]}))
        if command == "export":
            return export(parse_args(ExportArgs, rest, prog="rlhfkit annotate export"))
        raise ConfigError(f"unknown command {command!r}; use serve (the default), add-user or export")
    except SystemExit as e:  # argparse: --help or a malformed flag
        return e.code if isinstance(e.code, int) else 2
    except (ConfigError, DataFormatError, StoreError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
