"""``rlhfkit annotate``: serve the annotation app, add users, export rankings.

    rlhfkit annotate [--policy P] [--prompts F] [--db annotations.db] [--samples-per-prompt 4] [--port 8904] ...
    rlhfkit annotate add-user NAME [--admin] --db annotations.db   # prints the token once
    rlhfkit annotate export --db annotations.db --format tsv|jsonl --output F

Options, files (``--db``, ``--prompts``, ``--output``) and the port are checked before the
model loads or anything is written; a problem is a :class:`~rlhfkit.errors.UserError`.
"""

from __future__ import annotations

import errno
import logging
import socket
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlhfkit.annotate.store import AnnotationStore, export_rankings
from rlhfkit.cli import main as rlhfkit_main
from rlhfkit.config import ConfigError, Options, opt, parse_args
from rlhfkit.data.prompts import read_prompts
from rlhfkit.defaults import MAX_NEW_TOKENS
from rlhfkit.errors import UserError
from rlhfkit.files import check_output_file

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True)
class ServeArgs(Options):
    """Serve the rank-list annotation app."""

    policy: str = opt(
        "smollm2-135m", "policy that writes the responses to rank: alias, checkpoint folder or hub id", was=("model",)
    )
    prompts: str | None = opt(
        None, "prompt pool to add: a text file (one prompt per line) or JSONL with a 'prompt' key"
    )
    db: str = opt("annotations.db", "SQLite database (created if missing)")
    samples_per_prompt: int = opt(4, "responses per prompt to rank (a rank list needs 2 or more)", ge=2, was=("k",))
    host: str = opt("127.0.0.1", "address to bind; anything but loopback exposes the server")
    port: int = opt(8904, "port to bind (0: any free port)", ge=0, le=65535)
    allow_ties: bool = opt(False, "let annotators tie responses")
    max_new_tokens: int = opt(MAX_NEW_TOKENS, "tokens per generated response at most", ge=1)
    temperature: float = opt(
        1.0, "sampling temperature (> 0, or the responses to a prompt would all be the same)", gt=0
    )
    top_p: float = opt(1.0, "nucleus sampling threshold, in (0, 1]", gt=0, le=1)
    overlap: int = opt(2, "annotators the pool order gives each generation set to (2+ measures agreement)", ge=1)
    prefetch: int = opt(4, "generation sets kept ready ahead of the fastest annotator", ge=0)
    cpu: bool = opt(False, "run on the CPU even if a GPU is present")


@dataclass(kw_only=True)
class AddUserArgs(Options):
    """Create an annotator (or admin) and print their token once."""

    name: str = opt(help="user name (no spaces)", cli=False)
    db: str = opt("annotations.db", "SQLite database (created if missing)")
    admin: bool = opt(False, "the user sees and may delete every annotator's rankings")


@dataclass(kw_only=True)
class ExportArgs(Options):
    """Export the saved rankings in a format `rlhfkit rm train` reads."""

    output: str = opt(help="file to write, e.g. prefs.jsonl")
    db: str = opt("annotations.db", "SQLite database the server wrote")
    format: Literal["tsv", "jsonl"] = opt("jsonl", "tsv: rank-list TSV with a prompt column; jsonl: 'ranked' JSONL")
    annotator: str | None = opt(None, "only this annotator's rankings")

    def validate(self) -> None:
        super().validate()
        check_output_file(self.output, "--output")


def open_store(db: str, *, create: bool) -> AnnotationStore:
    """The annotation database ``--db``, made if missing when ``create``.

    Raises :class:`UserError` for a folder, a missing file (``create=False``), a place where
    the file cannot be made, or a file SQLite cannot open (e.g. not a database).
    """
    path = Path(db)
    if path.is_dir():
        raise UserError(f"--db {db} is a folder; give the database file, e.g. --db {path / 'annotations.db'}")
    if create:
        check_output_file(path, "--db")
    elif not path.is_file():
        raise UserError(f"--db {db} does not exist; pass the database the server wrote")
    try:
        return AnnotationStore(path)
    except sqlite3.DatabaseError as e:
        # sqlite_errorname is Python 3.11+; on 3.10 the second wording carries SQLite's own message.
        not_a_db = getattr(e, "sqlite_errorname", None) == "SQLITE_NOTADB"
        problem = "is not an SQLite database" if not_a_db else f"cannot be opened ({e})"
        fresh = " (a new file name starts an empty one)" if create else ""
        raise UserError(f"--db {db} {problem}; pass the database 'rlhfkit annotate' wrote{fresh}") from None


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server to listen on.

    Bound before the model loads, so a busy port is reported at once rather than after
    minutes of loading, and no other process can take it in between.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is already in use (is another server running?); stop it or "
                f"choose a free port with --port, e.g. --port {port + 1 if port < 65535 else port - 1}"
            ) from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None
    return sock


def serve(args: ServeArgs) -> int:
    """Read the prompts, take the port, open the database, load the policy; serve until Ctrl-C."""
    import uvicorn

    from rlhfkit.annotate.app import create_app
    from rlhfkit.annotate.generator import ModelGenerator

    prompts = [p.text for p in read_prompts(args.prompts)] if args.prompts is not None else []
    with bind_port(args.host, args.port) as sock:
        store = open_store(args.db, create=True)
        try:
            if prompts:
                added = store.add_prompts(prompts)
                print(
                    f"added {added} new prompt(s) from {args.prompts}; the pool holds {store.count_prompts()['pool']}",
                    flush=True,
                )
            if not store.users():
                print(
                    f"no users yet: create one with 'rlhfkit annotate add-user NAME --db {args.db}' "
                    f"(add --admin for an admin)",
                    flush=True,
                )
            if args.host not in LOOPBACK:
                logger.warning(
                    "binding to %s exposes the server beyond this machine; tokens travel as plain HTTP, "
                    "so put a TLS proxy in front",
                    args.host,
                )
            print(f"loading {args.policy}...", flush=True)
            generator = ModelGenerator(
                args.policy,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                cpu=args.cpu,
            )
            app = create_app(
                store, generator, args.samples_per_prompt, args.allow_ties, overlap=args.overlap, prefetch=args.prefetch
            )
            port = sock.getsockname()[1]  # the real one when --port 0
            print(f"annotate at http://{args.host}:{port}/annotate (dataset at /dataset)", flush=True)
            uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level="warning")).run(sockets=[sock])
        finally:
            store.close()
    return 0


def add_user(args: AddUserArgs) -> int:
    store = open_store(args.db, create=True)
    try:
        token = store.add_user(args.name, admin=args.admin)
    finally:
        store.close()
    role = "admin" if args.admin else "annotator"
    print(f"created {role} {args.name!r} in {args.db}. Token (shown once, keep it secret):", file=sys.stderr)
    print(token, flush=True)
    return 0


def export(args: ExportArgs) -> int:
    store = open_store(args.db, create=False)
    try:
        user_id = None
        if args.annotator is not None:
            user = store.user_by_name(args.annotator)
            if user is None:
                raise ConfigError(f"option --annotator: there is no annotator named {args.annotator!r} in {args.db}")
            user_id = user.id
        lines = export_rankings(store, args.output, args.format, user_id=user_id)
    finally:
        store.close()
    hint = " (read it with prompt_column=True)" if args.format == "tsv" else ""
    print(f"wrote {lines} ranking(s) to {args.output}{hint}", file=sys.stderr)
    return 0


def run(argv: Sequence[str]) -> int:
    """``rlhfkit annotate [serve|add-user|export] ...``; errors propagate to :func:`rlhfkit.cli.run_command`."""
    argv = list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "serve"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    if command == "serve":
        return serve(parse_args(ServeArgs, rest, prog="rlhfkit annotate"))
    if command == "add-user":
        if not rest or rest[0].startswith("-"):
            if "-h" in rest or "--help" in rest:
                parse_args(AddUserArgs, ["--help"], prog="rlhfkit annotate add-user NAME")
            raise ConfigError("add-user needs the user name first: rlhfkit annotate add-user NAME [--admin] --db FILE")
        return add_user(
            parse_args(AddUserArgs, rest[1:], prog="rlhfkit annotate add-user NAME", extra={"name": rest[0]})
        )
    if command == "export":
        return export(parse_args(ExportArgs, rest, prog="rlhfkit annotate export"))
    raise ConfigError(f"unknown command {command!r}; use serve (the default), add-user or export")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlhfkit.annotate.cli``: the same as ``rlhfkit annotate``, through the one error path."""

    return rlhfkit_main(["annotate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
