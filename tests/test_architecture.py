"""The dependency rule of docs/architecture.md ("Rooms and the dependency rule"), checked on the source.

The rooms are read from the ```` ```rooms ```` block of docs/architecture.md, the only copy of
the table. Every module under ``src/rlhfkit`` is parsed with :mod:`ast`; each import
(``import x``, ``from x import y``, relative, inside functions, ``importlib.import_module``
with a literal name) is mapped to the room of what it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
SRC = ROOT / "src"
PACKAGE = "rlhfkit"
RANK = {"floor": 0, "feature": 1, "pipeline": 2, "top": 3}  # a room may import only rooms of lower rank (or its own)


# ----------------------------------------------------------------------------- the table
def read_rooms(doc: str) -> dict[str, str]:
    """``{entry: room}`` from the ```` ```rooms ```` block: ``room: entry entry ...`` per line.

    An entry is a path under ``src/rlhfkit/``: ``rm/`` a package, ``cli.py`` a module."""
    lines = doc.splitlines()
    start = lines.index("```rooms") + 1
    end = lines.index("```", start)
    rooms: dict[str, str] = {}
    for n, line in enumerate(lines[start:end], start + 1):
        room, _, entries = line.partition(":")
        assert room.strip() in RANK, f"{DOC.name}:{n}: unknown room {room.strip()!r}; the rooms are {', '.join(RANK)}"
        for entry in entries.split():
            assert entry not in rooms, f"{DOC.name}:{n}: {entry} has two rooms"
            rooms[entry] = room.strip()
    return rooms


def entry_module(entry: str) -> tuple[str, bool]:
    """``rm/`` -> ``("rlhfkit.rm", True)``; ``sft/cli.py`` -> ``("rlhfkit.sft.cli", False)``; ``__init__.py`` -> ``("rlhfkit", False)``."""
    if entry.endswith("/"):
        return ".".join([PACKAGE, *entry.strip("/").split("/")]), True
    parts = entry.removesuffix(".py").split("/")
    return ".".join([PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)]), False


def room_of(module: str, rooms: dict[str, str]) -> tuple[str, str] | None:
    """``(room, entry)`` of a dotted module name: an exact module entry, else the longest package entry above it."""
    best: tuple[int, str] | None = None
    for entry in rooms:
        name, is_package = entry_module(entry)
        if module == name and not is_package:
            return rooms[entry], entry
        if is_package and (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
            best = (len(name), entry)
    return (rooms[best[1]], best[1]) if best else None


# ----------------------------------------------------------------------------- the source
def source_modules(src: Path = SRC) -> dict[str, Path]:
    """``{dotted name: file}`` of every module under ``src/rlhfkit`` (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of ``rlhfkit`` in ``source`` (the module ``module``)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # ``from rlhfkit import api`` imports the module rlhfkit.api
                found.append((node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "import_module"
            )
        ):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in dict.fromkeys(found) if name == PACKAGE or name.startswith(PACKAGE + ".")]


def violations(
    module: str, where: str, source: str, rooms: dict[str, str], known: set[str], is_package: bool = False
) -> list[str]:
    """``"file:line: ..."`` for every import of ``source`` that breaks the rule (docs/architecture.md)."""
    mine = room_of(module, rooms)
    if mine is None:
        return [f"{where}: {module} has no room in {DOC.name}"]
    room, entry = mine
    out = []
    for line, target in imports(module, source, is_package, known):
        theirs = room_of(target, rooms)
        if theirs is None:
            out.append(f"{where}:{line}: imports {target}, which has no room in {DOC.name}")
        elif RANK[theirs[0]] > RANK[room]:
            out.append(
                f"{where}:{line}: imports {target}: a {room} ({entry}) must not import the {theirs[0]} ({theirs[1]})"
            )
        elif room == theirs[0] == "feature" and entry != theirs[1]:
            out.append(
                f"{where}:{line}: imports {target}: the feature {entry} must not import its sibling {theirs[1]}; "
                "move what both need one floor down"
            )
    return out


@pytest.fixture(scope="module")
def rooms() -> dict[str, str]:
    return read_rooms(DOC.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- the tests
def test_the_doc_names_the_four_rooms(rooms):
    assert "## Rooms and the dependency rule" in DOC.read_text(encoding="utf-8")
    assert set(rooms.values()) == set(RANK)


def test_every_module_and_package_has_a_room(rooms):
    modules = source_modules()
    assert not [f"{path.relative_to(ROOT)} ({name})" for name, path in modules.items() if room_of(name, rooms) is None]
    stale = [e for e in rooms if not (SRC / PACKAGE / e).exists()]
    assert not stale, f"{DOC.name} names what is not in src/{PACKAGE}: {stale}"


def test_imports_follow_the_dependency_rule(rooms):
    modules = source_modules()
    found = []
    for name, path in modules.items():
        found += violations(
            name,
            str(path.relative_to(ROOT)),
            path.read_text(encoding="utf-8"),
            rooms,
            set(modules),
            is_package=path.name == "__init__.py",
        )
    assert not found, "imports against docs/architecture.md:\n" + "\n".join(found)


def floor_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph ``{entry: entries it imports}`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_floors_import_each_other_without_a_cycle(rooms):
    modules = source_modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        room, entry = room_of(name, rooms) or ("", "")
        for _, target in imports(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", set(modules)):
            other = room_of(target, rooms)
            if room == "floor" and other is not None and other[0] == "floor" and other[1] != entry:
                edges.setdefault(entry, set()).add(other[1])
    cycle = floor_cycle(edges)
    assert cycle is None, (
        f"the floors import each other in a cycle: {' -> '.join(cycle)}; move the shared part further down"
    )
    assert floor_cycle({"models/": {"data/"}, "data/": {"evaluation/"}, "evaluation/": {"models/"}}) == [
        "data/",
        "evaluation/",
        "models/",
        "data/",
    ]


# What the rule must catch: synthetic modules, so the test above cannot pass for want of a check.
@pytest.mark.parametrize(
    "module, source, expected",
    [
        (
            "rlhfkit.rm.fake",
            "from rlhfkit.dpo.losses import dpo_loss\n",
            "the feature rm/ must not import its sibling dpo/",
        ),
        ("rlhfkit.rm.fake", "def f():\n    import rlhfkit.dpo.train\n", "fake.py:2: imports rlhfkit.dpo.train"),
        ("rlhfkit.rm.fake", "from ..dpo import losses\n", "imports rlhfkit.dpo.losses: the feature rm/"),
        (
            "rlhfkit.rm.fake",
            "from . import evaluate\nfrom .. import sft\n",
            "fake.py:2: imports rlhfkit.sft: the feature rm/",
        ),
        (
            "rlhfkit.rm.fake",
            "import importlib\nimportlib.import_module('rlhfkit.rl.trainer')\n",
            "imports rlhfkit.rl.trainer",
        ),
        (
            "rlhfkit.models.fake",
            "from rlhfkit.rl.critic import ActorCritic\n",
            "a floor (models/) must not import the feature (rl/)",
        ),
        ("rlhfkit.ops", "from rlhfkit import api\n", "a floor (ops.py) must not import the top (api.py)"),
        (
            "rlhfkit.evaluation.fake",
            "import rlhfkit.pipeline.run\n",
            "a floor (evaluation/) must not import the pipeline",
        ),
        (
            "rlhfkit.sft.fake",
            "from rlhfkit.pipeline.run import run_pipeline\n",
            "a feature (sft/) must not import the pipeline",
        ),
        ("rlhfkit.dpo.fake", "from rlhfkit.cli import main\n", "a feature (dpo/) must not import the top (cli.py)"),
        ("rlhfkit.plan.fake", "import rlhfkit\n", "a feature (plan/) must not import the top (__init__.py)"),
        (
            "rlhfkit.pipeline.fake",
            "from rlhfkit import cli\n",
            "a pipeline (pipeline/) must not import the top (cli.py)",
        ),
        ("rlhfkit.rm.fake", "import rlhfkit.newpackage.thing\n", "imports rlhfkit.newpackage.thing, which has no room"),
        ("rlhfkit.newpackage.thing", "import torch\n", "rlhfkit.newpackage.thing has no room"),
    ],
)
def test_the_rule_catches(rooms, module, source, expected):
    known = set(source_modules())
    found = violations(module, module.rpartition(".")[2] + ".py", source, rooms, known)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(
    "module, source",
    [
        (
            "rlhfkit.rm.fake",
            "from rlhfkit.models.reward import RewardModel\nfrom rlhfkit import losses as L\nfrom .evaluate import evaluate\n",
        ),
        (
            "rlhfkit.models.fake",
            "from rlhfkit.data.collate import collate\nfrom ..evaluation import scores\nimport torch\n",
        ),
        (
            "rlhfkit.pipeline.fake",
            "from rlhfkit.dpo.train import train_dpo\nfrom rlhfkit.sft.data import read_sft_data\n",
        ),
        (
            "rlhfkit.cli",
            "import importlib\nimportlib.import_module('rlhfkit.pipeline.run')\nfrom rlhfkit import __version__\n",
        ),
        ("rlhfkit.sft.cli", "from rlhfkit.cli import main\n"),
    ],
)
def test_the_rule_allows(rooms, module, source):
    assert violations(module, "fake.py", source, rooms, set(source_modules())) == []
