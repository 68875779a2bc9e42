"""``rlhfkit annotate``: serve the annotation app, add users, export rankings.

    rlhfkit annotate [--policy P] [--prompts F] [--db annotations.db] [--samples-per-prompt 4] [--port 8904] ...
    rlhfkit annotate add-user NAME [--admin] --db annotations.db   # prints the token once
    rlhfkit annotate export --db annotations.db --format tsv|jsonl|pairs|hf [--aggregate every|consensus|weighted] --output F

Options, files (``--db``, ``--prompts``, ``--output``) and the port are checked before the
model loads or anything is written; a problem is a :class:`~rlhfkit.errors.UserError`.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rlhfkit.annotate.server import bind_port
from rlhfkit.annotate.store import AnnotationStore, check_hf_output, export_rankings
from rlhfkit.cli import main as rlhfkit_main
from rlhfkit.config import ConfigError, Options, opt, parse_args, require
from rlhfkit.data.prompts import read_prompts
from rlhfkit.data.readers import read_preferences
from rlhfkit.defaults import MAX_NEW_TOKENS
from rlhfkit.errors import UserError
from rlhfkit.files import check_output_file

if TYPE_CHECKING:
    from rlhfkit.annotate.selection import UncertaintySelector

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
    annotators_per_set: int = opt(
        2,
        "annotators the pool order gives each shared generation set to (2+ measures agreement)",
        ge=1,
        was=("overlap",),
    )
    overlap_share: float = opt(
        1.0,
        "share of the generation sets that go to --annotators-per-set annotators (the others to one), "
        "picked by a hash of the set id",
        ge=0,
        le=1,
    )
    prefetch: int = opt(4, "generation sets kept ready ahead of the fastest annotator", ge=0)
    cpu: bool = opt(False, "run on the CPU even if a GPU is present")
    selection: Literal["random", "uncertainty"] = opt(
        "random",
        "random: show the K responses sampled; uncertainty: sample --candidates, show the K a bootstrap ensemble "
        "of --reward-model heads disagrees on most, and serve the most uncertain sets first",
    )
    reward_model: str | None = opt(None, "--selection uncertainty: the reward model whose uncertainty chooses")
    candidates: int | None = opt(
        None, "--selection uncertainty: responses sampled per prompt to choose K from (default: 2 x K)", ge=2
    )
    selection_data: str | None = opt(
        None,
        "--selection uncertainty: a preference file the heads are fit on besides the rankings in --db "
        "(e.g. the reward model's training data)",
    )
    ensemble_size: int = opt(8, "--selection uncertainty: bootstrap heads in the ensemble", ge=2)
    min_distance: float = opt(
        0.2,
        "--selection uncertainty: candidates closer than this (1 - word Jaccard) to a chosen one are skipped as "
        "near-duplicates",
        ge=0,
        le=1,
    )
    refit_every: int = opt(20, "--selection uncertainty: refit the heads after this many new rankings", ge=1)

    def validate(self) -> None:
        super().validate()
        k = self.samples_per_prompt
        if self.selection == "uncertainty":
            require(
                self.reward_model is not None,
                "option --selection uncertainty needs --reward-model: the reward model whose uncertainty picks the "
                "responses (a folder 'rlhfkit rm train' wrote); or use --selection random",
            )
            if self.candidates is None:
                self.candidates = 2 * k
            require(
                self.candidates >= k,
                f"option --candidates {self.candidates} is fewer than --samples-per-prompt {k}: the K shown are "
                f"chosen from the candidates; raise --candidates to {2 * k}, say",
            )
            if self.selection_data is not None and not Path(self.selection_data).exists():
                raise ConfigError(
                    f"option --selection-data {self.selection_data} does not exist; pass a preference file "
                    f"(ranked JSONL, rank-list TSV, ...) or leave it out to fit on the rankings in --db alone"
                )
        else:
            ignored = [f"--{n.replace('_', '-')}" for n in ("reward_model", "candidates", "selection_data")]
            ignored = [flag for flag, v in zip(ignored, (self.reward_model, self.candidates, self.selection_data)) if v]
            if ignored:
                logger.warning("%s only apply to --selection uncertainty; ignored", ", ".join(ignored))


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
    format: Literal["tsv", "jsonl", "pairs", "hf"] = opt(
        "jsonl",
        "tsv: rank-list TSV with a prompt column; jsonl: 'ranked' JSONL; pairs: TRL/OpenRLHF JSONL "
        "(prompt, chosen, rejected), one row per ranked pair; hf: a datasets folder (save_to_disk) at --output",
    )
    aggregate: Literal["every", "consensus", "weighted"] = opt(
        "every",
        "every: one list per ranking; consensus: one list per generation set, the mean rank of "
        "its annotators (Borda count) where several ranked it; weighted: one list per ranking with "
        "a 'weight', its annotator's agreement with the others on shared sets (tsv cannot hold it)",
    )
    annotator: str | None = opt(None, "only this annotator's rankings")

    def validate(self) -> None:
        super().validate()
        if self.format == "hf":
            check_hf_output(self.output, "--output")
        else:
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


def serve(args: ServeArgs) -> int:
    """Read the prompts, take the port, open the database, load the policy; serve until Ctrl-C."""
    import uvicorn

    from rlhfkit.annotate.app import create_app
    from rlhfkit.annotate.generator import ModelGenerator

    prompts = [p.text for p in read_prompts(args.prompts)] if args.prompts is not None else []
    extra = read_preferences(args.selection_data) if args.selection_data is not None else []
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
            selector = load_selector(args, store, extra) if args.selection == "uncertainty" else None
            app = create_app(
                store,
                generator,
                args.samples_per_prompt,
                args.allow_ties,
                overlap=args.annotators_per_set,
                overlap_share=args.overlap_share,
                prefetch=args.prefetch,
                selector=selector,
                candidates=args.candidates,
            )
            port = sock.getsockname()[1]  # the real one when --port 0
            print(f"annotate at http://{args.host}:{port}/annotate (dataset at /dataset)", flush=True)
            uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level="warning")).run(sockets=[sock])
        finally:
            store.close()
    return 0


def load_selector(args: ServeArgs, store: AnnotationStore, extra: list) -> UncertaintySelector:
    """``--selection uncertainty``: load ``--reward-model`` and fit its ensemble on what is ranked so far."""
    import torch

    from rlhfkit.annotate.selection import UncertaintySelector
    from rlhfkit.models.reward import RewardModel

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    print(f"loading reward model {args.reward_model}...", flush=True)
    rm = RewardModel.from_pretrained(args.reward_model, device=device, option="--reward-model")
    selector = UncertaintySelector(
        rm,
        store=store,
        extra=extra,
        n_heads=args.ensemble_size,
        min_distance=args.min_distance,
        refit_every=args.refit_every,
    )
    pairs = selector.fit()
    source = f"the {store.list_rankings(limit=0)[1]} ranking(s) in {args.db}"
    if extra:
        source += f" and {len(extra)} list(s) of {args.selection_data}"
    print(f"uncertainty: {args.ensemble_size} heads fit on {pairs} ranked pair(s) of {source}", flush=True)
    return selector


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
        rows = export_rankings(store, args.output, args.format, user_id=user_id, aggregate=args.aggregate)
    finally:
        store.close()
    what = "pair(s)" if args.format == "pairs" else "ranking(s)" if args.aggregate != "consensus" else "list(s)"
    hint = {
        "tsv": " (read it with prompt_column=True)",
        "hf": " (a datasets folder: datasets.load_from_disk, or --train for rm train and dpo)",
    }.get(args.format, "")
    print(f"wrote {rows} {what} to {args.output}{hint}", file=sys.stderr)
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
