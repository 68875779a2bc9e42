"""The file beside a policy that ``rlhfkit rl`` exports: how it was trained.

Written by :func:`rlhfkit.rl.trainer.export_policy`; read by ``ppo-eval``
(:mod:`rlhfkit.rl.commands`), which takes the reference and the sampling settings from it, and
by ``rlhfkit eval`` (:mod:`rlhfkit.judge`), whose ``--baseline`` defaults to the reference. It
sits on the models floor so that both features read it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["POLICY_INFO", "read_policy_info"]

POLICY_INFO = "rlhfkit_ppo.json"  # written beside the exported policy: reference, sampling settings


def read_policy_info(policy: str) -> dict[str, Any]:
    """The info file of the exported policy folder ``policy``; ``{}`` when it has none."""
    f = Path(policy) / POLICY_INFO
    return json.loads(f.read_text()) if f.is_file() else {}
