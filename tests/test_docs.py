"""The README and docs/ stay true: their links resolve and the commands they show parse.

1. Every relative link in README.md, CHANGELOG.md and docs/*.md points to a file that exists,
   and an anchor (``#...``) to a heading of that file, slugged as GitHub slugs it.
2. Every ``rlhfkit ...`` command in a fenced shell block (```bash, ```sh, ```console or
   unlabelled) parses with the parser the CLI builds for that command: ``rlhfkit.cli.COMMANDS``
   dispatches as usual, but ``rlhfkit.config.parse_args`` is swapped for an argparse-only
   stand-in that stops right after parsing, so no command runs and no model loads. Unknown
   options, bad choices and options under their old (renamed) names fail; a missing required
   option does not (examples leave some out), and placeholders such as ``RUN`` are fine values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}


def _rel(path: Path, root: Path = ROOT) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


# ------------------------------------------------------------------------ markdown
@dataclasses.dataclass
class Block:
    lang: str
    first_line: int  # 1-based line number of the block's first content line
    lines: list[str]


def split_markdown(text: str) -> tuple[list[str], list[Block]]:
    """The prose lines (fenced lines blanked, so line numbers hold) and the fenced blocks."""
    prose: list[str] = []
    blocks: list[Block] = []
    fence: str | None = None
    for n, line in enumerate(text.split("\n"), 1):
        m = re.match(r"^\s{0,3}(`{3,}|~{3,})\s*([^`\s]*)", line)
        if fence is None and m:
            fence = m.group(1)
            blocks.append(Block(m.group(2).lower(), n + 1, []))
            prose.append("")
        elif fence is not None:
            if re.match(rf"^\s{{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", line):
                fence = None
            else:
                blocks[-1].lines.append(line)
            prose.append("")
        else:
            prose.append(line)
    return prose, blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped, spaces
    to hyphens (github-slugger)."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", heading)  # images
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters (any script), digits, underscore
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file: heading slugs (repeats get -1, -2, ...) and explicit ids."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose:
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
        out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


def links(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, target)`` of every link and image outside code."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    text = "\n".join(re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", line) for line in prose)  # code spans
    for pattern in (LINK, REF_LINK):
        for m in pattern.finditer(text):
            yield text.count("\n", 0, m.start()) + 1, m.group(1)


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for line, target in links(path):
        if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{_rel(path, root)}:{line}: link {target!r}"
        if not dest.exists():
            problems.append(f"{where}: no such file {_rel(dest, root)}")
        elif anchor and dest.suffix.lower() == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {_rel(dest, root)}")
    return problems


# ------------------------------------------------------------------------ commands
def _strip_comment(line: str) -> str:
    """Cut a shell comment: a ``#`` at the start of a word, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """``(line, command)`` of a shell block: continuations joined, ``$ `` prompts honoured (a
    block with prompts is a console session: only prompted lines are commands), heredoc
    bodies skipped."""
    prompted = any(line.lstrip().startswith("$ ") for line in block.lines)
    heredoc: str | None = None
    pending: tuple[int, str] | None = None
    for i, raw in enumerate(block.lines):
        n = block.first_line + i
        if heredoc is not None:
            heredoc = None if raw.strip() == heredoc else heredoc
            continue
        if pending is None:
            stripped = raw.lstrip()
            if prompted:
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:]
            pending = (n, "")
        else:
            stripped = raw.strip()
        line = _strip_comment(stripped).rstrip()
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            heredoc = m.group(1)
        if line.endswith("\\"):
            pending = (pending[0], pending[1] + line[:-1] + " ")
            continue
        yield pending[0], pending[1] + line
        pending = None
    if pending is not None:
        yield pending


def rlhfkit_argv(command: str) -> list[str] | None:
    """The arguments after ``rlhfkit`` (or ``-m rlhfkit.cli``) in one shell line, else None."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not ours to judge
        return None
    segments, current = [], []
    for tok in tokens:
        if tok in (";", "&&", "||", "|", "&", "(", ")"):
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    for seg in segments:
        while seg and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", seg[0]):  # OMP_NUM_THREADS=1 ...
            seg = seg[1:]
        if seg and seg[0] in ("time", "env"):
            seg = seg[1:]
        if not seg:
            continue
        head = os.path.basename(seg[0])
        argv = None
        if head == "rlhfkit":
            argv = seg[1:]
        elif head == "accelerate" or re.fullmatch(r"python[0-9.]*", head):
            for j in range(len(seg) - 1):
                if seg[j] == "-m" and seg[j + 1] == "rlhfkit.cli":
                    argv = seg[j + 2 :]
                    break
        if argv is not None:
            cleaned = []
            skip = False
            for tok in argv:
                if skip:
                    skip = False
                elif tok in ("<", ">", ">>", "2>", "&>"):  # a redirection and its file
                    skip = True
                elif tok not in ("...", "…"):
                    cleaned.append(tok)
            return cleaned
    return None


def shown_commands(path: Path) -> Iterator[tuple[int, list[str]]]:
    _, blocks = split_markdown(path.read_text(encoding="utf-8"))
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for line, command in shell_lines(block):
            argv = rlhfkit_argv(command)
            if argv is not None:
                yield line, argv


class _Parsed(Exception):
    """Raised by the stand-in parse_args once argparse has accepted the options."""

    def __init__(self, old_names: list[str]):
        super().__init__()
        self.old_names = old_names


@contextlib.contextmanager
def parse_only() -> Iterator[None]:
    """Swap ``parse_args`` everywhere in rlhfkit for argparse alone (no config object, no run)."""
    import rlhfkit.config as config

    original = config.parse_args

    def parse_only_args(cls, argv, prog=None, extra=None, positional=None):
        parser = config.build_parser(cls, prog=prog)
        if positional:
            parser.add_argument(positional, nargs="*", default=None)
        ns = parser.parse_args(list(argv) if argv is not None else [])
        used = [k.removeprefix("was:") for k, v in vars(ns).items() if k.startswith("was:") and v is not None]
        new = {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("was", ())}
        raise _Parsed([f"--{old.replace('_', '-')} (now --{new[old].replace('_', '-')})" for old in used])

    def swap(old, new):
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("rlhfkit") and getattr(mod, "parse_args", None) is old:
                mod.parse_args = new  # lazily imported modules bind the stand-in from config, put back too

    swap(original, parse_only_args)
    try:
        yield
    finally:
        swap(parse_only_args, original)


def argv_problem(argv: list[str]) -> str | None:
    """Why ``rlhfkit ARGV`` would not parse (inside :func:`parse_only`), or None."""
    from rlhfkit.cli import COMMANDS
    from rlhfkit.errors import UserError

    if not argv:
        return None
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help", "-V", "--version"):
        return None
    if name not in COMMANDS:
        return f"unknown command {name!r}"
    if name == "models":  # no parser; 'models prepare' would convert models, so check by hand
        from rlhfkit.models.hub import ALIASES

        if not rest or rest[0] in ("-h", "--help"):
            return None
        if rest[0] == "prepare":
            unknown = [r for r in rest[1:] if r not in ALIASES]
            return f"models prepare: unknown model(s) {unknown}" if unknown else None
        return f"models: unknown argument {rest[0]!r}"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            COMMANDS[name](rest)
    except _Parsed as parsed:
        return f"old option name(s) {', '.join(parsed.old_names)}" if parsed.old_names else None
    except SystemExit as e:  # --help
        return None if e.code in (0, None) else f"exit {e.code}"
    except UserError as e:
        return str(e)
    return None if any(a in ("-h", "--help") for a in rest) else "the command ran without parsing its options"


def command_problems(path: Path) -> list[str]:
    problems = []
    with parse_only():
        for line, argv in shown_commands(path):
            problem = argv_problem(argv)
            if problem:
                problems.append(f"{_rel(path)}:{line}: rlhfkit {shlex.join(argv)}\n    -> {problem}")
    return problems


# --------------------------------------------------------------------------- tests
@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths in the commands (e.g. --config FILE) are the repo's


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_relative_links_resolve(path):
    problems = link_problems(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=_rel)
def test_shown_commands_parse(path):
    problems = command_problems(path)
    assert not problems, "commands that the CLI would refuse:\n" + "\n".join(problems)


def test_the_docs_show_commands_and_links():
    """Not vacuous: the extraction finds the README's tour and its links."""
    readme = ROOT / "README.md"
    commands = [argv[0] for _, argv in shown_commands(readme)]
    assert {
        "rm",
        "score",
        "sft",
        "ppo",
        "rl",
        "dpo",
        "ppo-eval",
        "bon",
        "generate",
        "pipeline",
        "annotate",
        "plan",
    } <= set(commands)
    assert sum(1 for _ in links(readme)) >= 10


def test_a_made_up_option_is_caught():
    with parse_only():
        problem = argv_problem(["rm", "train", "--no-such-flag"])
        assert problem and "--no-such-flag" in problem
        assert "--no-such-flag" in argv_problem(["rl", "--algo", "grpo", "--no-such-flag", "1"])
        assert "invalid choice" in argv_problem(["rl", "--algo", "no-such-algo"])
        assert "unknown command" in argv_problem(["no-such-command"])
        assert argv_problem(["rm", "train", "--train", "DATA.tsv", "--epochs", "1"]) is None  # --output missing: fine
    import rlhfkit.cli
    from rlhfkit.config import parse_args

    assert rlhfkit.cli.parse_args is parse_args and parse_args.__module__ == "rlhfkit.config"  # put back


def test_command_extraction(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```bash\n"
        "OMP_NUM_THREADS=1 rlhfkit rm train --model m \\\n"
        "    --train T.tsv --output RUN   # a comment --not-an-option\n"
        "accelerate launch --config_file x.yaml --num_processes 2 -m rlhfkit.cli rl --algo grpo ... --cpu\n"
        "make demo\n"
        "python - <<'PY'\n"
        "rlhfkit inside a heredoc\n"
        "PY\n"
        "```\n"
        "```console\n"
        "$ rlhfkit plan --model 7B\n"
        "rlhfkit plan: output, not a command\n"
        "```\n"
        "```python\n"
        "rlhfkit.train_sft({})\n"
        "```\n"
        "```sh\n"
        'rlhfkit score --prompt "a # b" "it\'s fine"\n'
        "```\n"
    )
    assert list(shown_commands(doc)) == [
        (2, ["rm", "train", "--model", "m", "--train", "T.tsv", "--output", "RUN"]),
        (4, ["rl", "--algo", "grpo", "--cpu"]),
        (11, ["plan", "--model", "7B"]),
        (18, ["score", "--prompt", "a # b", "it's fine"]),
    ]


def test_link_check(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Title\n\n## Where the CPU time goes, and `--cpu-matmul`\n\n## Again\n\n## Again\n\n"
        "[ok](b.md#rlhfkit-vs-trl-ppo-benchmarksppo_vs_trlpy) [ok](#again-1) [ok](#where-the-cpu-time-goes-and---cpu-matmul)\n"
        "[bad anchor](#nowhere) `[in code](missing.md)` [ok](https://example.com/x.md)\n"
        "[split across\nlines](missing.md)\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    (tmp_path / "b.md").write_text("## rlhfkit vs TRL: PPO (`benchmarks/ppo_vs_trl.py`)\n")
    targets = [t for _, t in links(tmp_path / "a.md")]
    assert "missing.md" in targets and targets.count("missing.md") == 1  # not the code span, not the block
    problems = link_problems(tmp_path / "a.md", root=tmp_path)
    assert len(problems) == 2, problems
    assert "#nowhere" in problems[0] and "a.md:10" in problems[0]
    assert "missing.md" in problems[1] and "a.md:11" in problems[1]


def test_readme_starts_with_the_two_commands_and_no_timings():
    """House style 13: the README's first screen has make demo and make test, and no number that
    moves with the machine."""
    first_screen = (ROOT / "README.md").read_text(encoding="utf-8").split("\n")[:40]
    text = "\n".join(first_screen)
    assert "make demo" in text and "make test" in text
    timings = re.findall(r"\b\d+(?:\.\d+)?\s?(?:min|ms|s)\b(?![-\w/])", text)
    assert not timings, f"timings in the README's first screen (move them to docs/benchmarks.md): {timings}"
