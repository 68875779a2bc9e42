"""Entry point of ``rlhfkit sft``: parse, call the library, exit code.

Returns 0 on success, 1 when the run stopped itself (a non-finite loss or gradient), 2 on
a usage or data error (the message names the option, or the file and line).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``rlhfkit sft --model M --train F --output DIR ...``; prints where the model went and its eval loss."""
    from rlhfkit.config import ConfigError, parse_args
    from rlhfkit.data.types import DataFormatError
    from rlhfkit.sft.train import NonFiniteLossError, SFTConfig, train_sft

    prog = "rlhfkit sft"
    try:
        cfg = parse_args(SFTConfig, argv, prog=prog)
        result = train_sft(cfg)
    except (ConfigError, DataFormatError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if os.environ.get("RANK", "0") != "0":  # multi-process runs: one summary, from the main process
        return 0
    if result.get("finished"):
        line = f"model saved to {result['final']} after {result['step']} steps; train loss {result.get('train/loss', float('nan')):.4f}"
        if "eval/loss" in result:
            line += f", eval loss {result['eval/loss']:.4f} (perplexity {result['eval/perplexity']:.2f}); best/ from step {result['best_step']}"
        print(line)
    else:
        print(f"stopped at step {result['step']} with a checkpoint in {cfg.output}/checkpoint; continue with --resume")
    return 0


if __name__ == "__main__":  # `accelerate launch -m rlhfkit.sft.cli ...` for multi-process runs
    sys.exit(main())
