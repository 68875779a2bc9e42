"""Entry points of ``rlhfkit ppo | bon | generate | ppo-eval``: parse, call the library, exit code.

Each returns 0 on success, 1 when a run stopped itself (a non-finite loss, a KL past
``--max-kl``), 2 on a usage or data error (the message names the option or file).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


def _run(prog: str, body: Callable[[], None]) -> int:
    from rlhfkit.config import ConfigError
    from rlhfkit.data.types import DataFormatError
    from rlhfkit.ppo.reward_sources import RewardSourceError
    from rlhfkit.ppo.trainer import PPOStopped

    try:
        body()
    except (ConfigError, DataFormatError, FileNotFoundError, RewardSourceError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except PPOStopped as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return 0


def main_ppo(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit ppo``: train; prints the final metrics and where the policy went."""
    from rlhfkit.config import parse_args
    from rlhfkit.ppo.trainer import PPOConfig, train_ppo

    def body() -> None:
        cfg = parse_args(PPOConfig, argv, prog="rlhfkit ppo")
        result = train_ppo(cfg)
        if "policy" in result:
            print(f"policy saved to {result['policy']}; score {result.get('ppo/score_mean', float('nan')):.4f}, "
                  f"KL {result.get('ppo/kl', float('nan')):.4f} at the last update")

    return _run("rlhfkit ppo", body)


def main_generate(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit generate``: sample to JSONL (stdout by default)."""
    from rlhfkit.config import parse_args
    from rlhfkit.ppo.commands import GenerateConfig, run_generate

    return _run("rlhfkit generate", lambda: run_generate(parse_args(GenerateConfig, argv, prog="rlhfkit generate")))


def main_bon(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit bon``: best-of-n to JSONL, optionally ranked lists for rejection sampling."""
    from rlhfkit.config import parse_args
    from rlhfkit.ppo.commands import BonConfig, run_bon

    return _run("rlhfkit bon", lambda: run_bon(parse_args(BonConfig, argv, prog="rlhfkit bon")))


def main_ppo_eval(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit ppo-eval``: policy vs reference vs best-of-n, table (or JSON) and PNG."""
    from rlhfkit.config import parse_args
    from rlhfkit.ppo.commands import PPOEvalConfig, print_eval_table, run_ppo_eval

    def body() -> None:
        cfg = parse_args(PPOEvalConfig, argv, prog="rlhfkit ppo-eval")
        print_eval_table(run_ppo_eval(cfg), cfg.json)

    return _run("rlhfkit ppo-eval", body)
