"""rlhfkit: reinforcement learning from human feedback, readable and fast.

This module stays thin: importing ``rlhfkit`` does not import torch or transformers. The
Python API (``rlhfkit.train_reward_model(config)``, ...) is loaded on first use.
"""

__version__ = "0.1.0"

_API = (
    "train_reward_model",
    "evaluate_reward_model",
    "train_sft",
    "train_ppo",
    "train_rl",
    "train_dpo",
    "best_of_n",
    "evaluate_ppo",
    "evaluate_policy",
    "run_pipeline",
)
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from rlhfkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlhfkit' has no attribute {name!r}")
