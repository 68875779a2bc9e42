"""The ``rlhfkit`` command: parse, call the library, exit code. Nothing else lives here."""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

USAGE = """usage: rlhfkit COMMAND [options]   (rlhfkit COMMAND --help for each)

reward models
  rm train      train a reward model on rank lists, pairs, choices or scores
  rm eval       held-out accuracy, list-exact accuracy, Kendall tau, diagnostics
  score         score texts with a reward model

supervised fine-tuning and PPO
  sft           supervised fine-tuning on instruction data (loss on response tokens only)
  ppo           PPO against a reward model, with a KL penalty to the reference
  bon           best-of-n sampling (also writes rejection-sampling data)
  generate      plain sampling
  ppo-eval      score and KL of policy, reference and best-of-n on held-out prompts

the whole pipeline
  pipeline      SFT -> preferences -> reward model -> PPO -> evaluation -> report.html

annotation
  annotate      web app where annotators rank K generations; add-user, export

models
  models        list the embedded default models; 'models prepare NAME' converts one now
"""


def _rm(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rlhfkit rm {train,eval} [options]")
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    from rlhfkit.config import parse_args

    if sub == "train":
        from rlhfkit.rm.train import RMTrainConfig, train_reward_model

        cfg = parse_args(RMTrainConfig, rest, prog="rlhfkit rm train")
        train_reward_model(cfg)
        return 0
    if sub == "eval":
        from rlhfkit.rm.commands import RMEvalConfig, print_eval, run_eval

        cfg = parse_args(RMEvalConfig, rest, prog="rlhfkit rm eval")
        print_eval(run_eval(cfg), cfg.json)
        return 0
    print(f"rlhfkit rm: unknown subcommand {sub!r}; use 'train' or 'eval'", file=sys.stderr)
    return 2


def _score(argv: Sequence[str]) -> int:
    from rlhfkit.config import parse_args
    from rlhfkit.rm.commands import ScoreConfig, print_scores, read_score_inputs, run_score

    cfg = parse_args(ScoreConfig, argv, prog="rlhfkit score", positional="texts")
    scores = run_score(cfg)
    print_scores(read_score_inputs(cfg)[1], scores, cfg.json)
    return 0


def _models(argv: Sequence[str]) -> int:
    from rlhfkit.models.hub import ALIASES, resolve_model

    if argv and argv[0] == "prepare":
        for name in argv[1:] or list(ALIASES):
            print(f"{name}: {resolve_model(name)}")
        return 0
    for name, what in ALIASES.items():
        print(f"{name:14s} {what}")
    return 0


def _annotate(argv: Sequence[str]) -> int:
    from rlhfkit.annotate.cli import main as annotate_main

    return annotate_main(list(argv))


def _lazy(module: str, attr: str) -> Callable[[Sequence[str]], int]:
    def run(argv: Sequence[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), attr)(list(argv))

    return run


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "rm": _rm,
    "score": _score,
    "models": _models,
    "annotate": _annotate,
    "sft": _lazy("rlhfkit.sft.cli", "main"),
    "ppo": _lazy("rlhfkit.ppo.cli", "main_ppo"),
    "bon": _lazy("rlhfkit.ppo.cli", "main_bon"),
    "generate": _lazy("rlhfkit.ppo.cli", "main_generate"),
    "ppo-eval": _lazy("rlhfkit.ppo.cli", "main_ppo_eval"),
    "pipeline": _lazy("rlhfkit.pipeline.cli", "main"),
}


def _quiet_transformers() -> None:
    """Keep transformers' per-file progress bars and load reports off the user's screen."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from rlhfkit import __version__

        print(f"rlhfkit {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"rlhfkit: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_transformers()
    from rlhfkit.config import ConfigError
    from rlhfkit.data.types import DataFormatError

    try:
        return command(argv[1:])
    except (ConfigError, DataFormatError, FileNotFoundError) as e:
        print(f"rlhfkit {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "NonFiniteLossError":
            raise
        print(f"rlhfkit {argv[0]}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
