"""A user's scoring rule named ``module:function``: ``f(prompts, responses) -> list[float]``.

``rlhfkit rl --reward`` (:class:`rlhfkit.rl.reward_sources.FunctionSource`) and ``rlhfkit eval
--judge`` (:mod:`rlhfkit.judge.judges`) both load one, so the loader sits on this floor.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhfkit.config import ConfigError

__all__ = ["load_function"]


def load_function(spec: str, option: str = "--reward") -> Callable[[list[str], list[str]], Any]:
    """The function ``spec`` names: ``module:function`` (an importable dotted name) or
    ``path/to/file.py:function`` (loaded by path). ``option`` names the flag in the errors."""
    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name.isidentifier():
        raise ConfigError(f"{option} {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ConfigError(f"{option} {spec!r}: the file {path} does not exist")
        mod_id = f"rlhfkit_reward_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_id, path)
        module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
        sys.modules[mod_id] = module
        loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"{option} {spec!r}: cannot import module {module_name!r} ({e}); put it on PYTHONPATH "
                "or give a file path like path/to/rewards.py:function"
            ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{option} {spec!r}: module {module_name!r} has no function {fn_name!r}")
    return fn
