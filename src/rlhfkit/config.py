"""One typed dataclass per command: YAML file under command-line overrides.

Each field's ``metadata["help"]`` becomes its ``--help`` line. Unknown keys (in YAML or on
the command line) are errors. Validation lives in each dataclass's ``__post_init__`` and so
runs once, at the boundary.

    @dataclass
    class TrainArgs:
        lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})

    args = parse_args(TrainArgs, ["--config", "rm.yaml", "--lr", "3e-5"])
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


# The run-control option every trainer has (rlhfkit.models.cpu_linear does the work).
CPU_MATMUL_HELP = ("CPU only: fp32 Linear matmuls through oneDNN (auto: on the CPU; ~2x faster where MKL takes a slow "
                   "path, e.g. AMD) or PyTorch's default BLAS (torch)")


class ConfigError(ValueError):
    """A bad configuration value; the message names the option and how to fix it."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(name: str, tp: Any, value: Any, where: str) -> Any:
    """Coerce a YAML or CLI value to the field's type, with an error that names the option."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: option '{name}' may not be null")
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
                    f"{where}: option '{name}' got {value!r}; choose one of {', '.join(map(str, choices))}"
                )
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        tname = getattr(base, "__name__", str(base))
        raise ConfigError(f"{where}: option '{name}' expects {tname}, got {value!r}") from None
    return value


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys and coercing types."""
    hints = _resolved_types(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        close = {u: [k for k in known if u.replace("-", "_") == k] for u in unknown}
        hint = "; ".join(f"'{u}' (did you mean '{c[0]}'?)" if c else f"'{u}'" for u, c in close.items())
        raise ConfigError(f"{where}: unknown option(s) {hint}. Valid options: {', '.join(sorted(known))}")
    kwargs = {k: _convert(k, hints[k], v, where) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{where}: {e}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose options mirror ``cls``'s fields (all default to 'unset')."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--config", metavar="YAML", help="YAML file of options; command-line flags override it")
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if default is not None and default != "" and not required:
            help_text = f"{help_text} (default: {default})"
        if required:
            help_text = f"{help_text} (required)"
        names = [_flag(f.name)] + list(f.metadata.get("aliases", ()))
        if tp is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) in (list, tuple):
            parser.add_argument(*names, dest=f.name, nargs="*", default=None, help=help_text)
        else:
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
            parser.add_argument(*names, dest=f.name, default=None, choices=choices, help=help_text, metavar=f.name.upper() if not choices else None)
    return parser


def parse_args(
    cls: type[T], argv: Sequence[str] | None, prog: str | None = None, extra: dict[str, Any] | None = None,
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
    if extra:
        values.update(extra)
    for k, v in vars(ns).items():
        if k != "config" and v is not None:
            values[k] = v
    return from_dict(cls, values, where=ns.config or "command line")


def _field_help(cls: type, name: str) -> str:
    return next((f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name), "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (for saving beside checkpoints)."""
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
