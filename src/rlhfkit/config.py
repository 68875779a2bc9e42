"""One typed dataclass per command: YAML file under command-line overrides.

A config is a keyword-only dataclass deriving from :class:`Options`; its fields are made
with :func:`opt`, whose ``help`` becomes the ``--help`` line and whose bounds (``ge``,
``gt``, ``le``, ``lt``) and ``Literal`` choices are checked once, when the object is built
(from the command line, a YAML file, a dict or Python). A field without a default is
required. Unknown keys (in YAML or on the command line) are errors; a renamed option's old
name (``was=``) still works with a warning. Cross-field checks go in ``validate()``, which
each class extends with ``super().validate()``::

    @dataclass(kw_only=True)
    class TrainArgs(Options):
        train: str = opt(help="training data file")                  # required
        lr: float = opt(1e-5, "peak learning rate", gt=0)
        loss: Literal["pairwise", "listwise"] = opt("pairwise", "the loss")

    args = parse_args(TrainArgs, ["--config", "rm.yaml", "--lr", "3e-5"])
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhfkit.errors import ConfigError, UserError
from rlhfkit.files import read_text

__all__ = [
    "ConfigError",
    "Options",
    "opt",
    "require",
    "from_dict",
    "load_yaml",
    "build_parser",
    "parse_args",
    "to_dict",
    "save_yaml",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    was: Sequence[str] = (),
    cli: bool = True,
) -> Any:
    """A config field: ``default`` (none = required) or ``factory``, ``help`` for ``--help``, bounds
    checked when the config is built, ``was``: earlier names still accepted, ``cli=False``: YAML and
    Python only (or a positional argument)."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "was": tuple(was), "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(tp: Any) -> tuple | None:
    base, _ = _unwrap_optional(tp)
    return typing.get_args(base) if typing.get_origin(base) is typing.Literal else None


def check_fields(obj: Any) -> None:
    """Raise :class:`ConfigError` for the first field outside its bounds or choices. A plain
    string given to a list-of-strings field (a config built in Python: ``force="sft"``) becomes
    a one-item list, as one value on the command line does, instead of a list of its letters."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        if isinstance(value, str) and typing.get_origin(_unwrap_optional(hints[f.name])[0]) is list:
            value = [value]
            setattr(obj, f.name, value)
        choices = _choices(hints[f.name])
        if choices is not None and value not in choices:
            raise ConfigError(
                f"option {_flag(f.name)} got {value!r}; choose one of {', '.join(map(str, choices))}", f.name
            )
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"option {_flag(f.name)} must be a finite number, got {value}", f.name)
        m = f.metadata
        for key, ok, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            bound = m.get(key)
            if bound is not None and not ok(value, bound):
                raise ConfigError(f"option {_flag(f.name)} must be {word} {bound}, got {value}", f.name)


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition``: for cross-field checks."""
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(kw_only=True)
class Options:
    """Base of every command's config: field bounds and choices, then :meth:`validate`."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses extend it and call ``super().validate()``."""


def _convert(name: str, tp: Any, value: Any, where: str) -> Any:
    """Coerce a YAML or CLI value to the field's type, with an error that names the option."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: option {_flag(name)} may not be null", name)
    if isinstance(value, str) and optional and value.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(base) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return [_convert(name, item_tp, v, where) for v in value]
        if origin is typing.Literal:
            choices = typing.get_args(base)
            if value not in choices:
                raise ConfigError(
                    f"{where}: option {_flag(name)} got {value!r}; choose one of {', '.join(map(str, choices))}", name
                )
            return value
        if dataclasses.is_dataclass(base):
            if isinstance(value, base):
                return value
            if not isinstance(value, dict):
                raise ValueError(value)
            return from_dict(base, value, where=where, prefix=f"{name}.", written=list(value))
    except UserError:
        raise
    except (TypeError, ValueError):
        tname = getattr(base, "__name__", str(base))
        raise ConfigError(f"{where}: option {_flag(name)} expects {tname}, got {value!r}", name) from None
    return value


def _renames(cls: type) -> dict[str, str]:
    """Old option names that still work -> their current names."""
    return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("was", ())}


def from_dict(
    cls: type[T], values: dict[str, Any], where: str = "config", *, prefix: str = "", written: Sequence[str] = ()
) -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys and coercing types.

    An error about one value the user wrote in a file names it by its key, as written there
    (``where: evaluation.n_prompts must be >= 1, got -2`` with ``prefix="evaluation."``), not by
    the command-line flag; ``written``: the keys that came from the file (the others, flags and
    Python values, keep the ``option --flag`` wording).
    """
    hints = typing.get_type_hints(cls)
    renames = _renames(cls)
    spelled = {
        renames.get(str(k).replace("-", "_"), str(k).replace("-", "_")): str(k) for k in written
    }  # field -> the key as the user wrote it
    try:
        return _build(cls, hints, values, where)
    except ConfigError as e:
        if e.option not in spelled:  # a flag, a cross-field check, or a nested config's error, already worded
            raise ConfigError(str(e)) from None
        message = (
            str(e).removeprefix(f"{where}: ").replace(f"option {_flag(e.option)}", f"{prefix}{spelled[e.option]}", 1)
        )
        raise ConfigError(f"{where}: {message}") from None


def _build(cls: type[T], hints: dict[str, Any], values: dict[str, Any], where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    for old, new in _renames(cls).items():
        if old in values:
            if new in values:
                raise ConfigError(
                    f"{where}: options '{old}' and '{new}' are the same option ('{old}' is its old name); give one"
                )
            logger.warning("%s: option '%s' is now called '%s'; the old name still works for now", where, old, new)
            values[new] = values.pop(old)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(repr(u) for u in unknown)}. "
            f"Valid options: {', '.join(sorted(fields))}"
        )
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{where}: option {_flag(missing[0])} is required ({fields[missing[0]].metadata.get('help', '')})"
        )
    kwargs = {k: _convert(k, hints[k], v, where) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        message = str(e) if str(e).startswith(where) else f"{where}: {e}"
        raise ConfigError(message, e.option) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (``-`` in keys read as ``_``)."""
    path = Path(path)
    text = read_text(path, "--config")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` instead of printing usage and exiting (so the
    one error path reports it), but still exits 0 for ``--help``."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose options mirror ``cls``'s fields (all default to 'unset')."""
    parser = _Parser(prog=prog, description=description or (cls.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--config", metavar="YAML", help="YAML file of options; command-line flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
        )
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            help_text = f"{help_text} (required)"
        elif default is not None and default != "" and default != []:
            help_text = f"{help_text} (default: {default})"
        names = [_flag(f.name)]
        if tp is bool:
            parser.add_argument(
                *names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif typing.get_origin(tp) in (list, tuple):
            parser.add_argument(*names, dest=f.name, nargs="*", default=None, help=help_text)
        else:
            choices = _choices(tp)
            parser.add_argument(
                *names,
                dest=f.name,
                default=None,
                choices=choices,
                help=help_text,
                metavar=f.name.upper() if not choices else None,
            )
        for old in f.metadata.get("was", ()):  # old flag names: accepted, not advertised
            kind = (
                dict(action=argparse.BooleanOptionalAction)
                if tp is bool
                else (dict(nargs="*") if typing.get_origin(tp) in (list, tuple) else {})
            )
            parser.add_argument(_flag(old), dest=f"was:{old}", default=None, help=argparse.SUPPRESS, **kind)
    return parser


def parse_args(
    cls: type[T],
    argv: Sequence[str] | None,
    prog: str | None = None,
    extra: dict[str, Any] | None = None,
    positional: str | None = None,
) -> T:
    """Parse ``argv`` into ``cls``: defaults < YAML (``--config``) < ``extra`` < flags.

    ``positional`` names a list field filled from bare arguments (``rlhfkit score TEXT...``).
    """
    parser = build_parser(cls, prog=prog)
    if positional:
        parser.add_argument(positional, nargs="*", default=None, help=_field_help(cls, positional))
    ns = parser.parse_args(list(argv) if argv is not None else None)
    if positional and not getattr(ns, positional):
        setattr(ns, positional, None)
    values: dict[str, Any] = {}
    if ns.config:
        values.update(load_yaml(ns.config))
    from_file = set(values)
    if extra:
        values.update(extra)
    renames = _renames(cls)
    for k, v in vars(ns).items():
        if k != "config" and v is not None:
            k = k.removeprefix("was:")
            for key in [key for key in from_file if renames.get(key, key) == renames.get(k, k)]:  # a flag overrides
                del values[key]  # the file's value, under the option's old name or its new one
                from_file.discard(key)
            values[k] = v
    return from_dict(cls, values, where=ns.config or "command line", written=sorted(from_file - set(extra or {})))


def _field_help(cls: type, name: str) -> str:
    return next((f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name), "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (for saving beside checkpoints)."""
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
