"""``python -m rlhfkit.sft.cli ...`` (as ``accelerate launch -m rlhfkit.sft.cli`` in earlier
versions): the same as ``rlhfkit sft ...``, through the one error path of :mod:`rlhfkit.cli`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rlhfkit.cli import main as rlhfkit_main


def main(argv: Sequence[str] | None = None) -> int:
    return rlhfkit_main(["sft", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
