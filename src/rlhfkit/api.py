"""The Python API: the CLI's commands as functions, for notebooks and scripts.

Each function takes its command's config dataclass, a dict of the same options, or a path
to a YAML file, and returns what the command computed::

    import rlhfkit
    metrics = rlhfkit.train_reward_model({"model": "minilm-l6", "train": "lists.tsv", "output": "runs/rm"})
    report = rlhfkit.run_pipeline("examples/pipeline_demo.yaml")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhfkit.config import from_dict, load_yaml


def _config(cls: type, config: Any):
    if isinstance(config, cls):
        return config
    if isinstance(config, (str, Path)):
        values = load_yaml(config)
        return from_dict(cls, values, where=str(config), written=list(values))
    if isinstance(config, dict):
        return from_dict(cls, dict(config), where=f"{cls.__name__} dict")
    raise TypeError(f"expected a {cls.__name__}, a dict of its options, or a YAML path; got {type(config).__name__}")


def train_reward_model(config: Any) -> dict[str, Any]:
    """``rlhfkit rm train``; returns the final held-out metrics."""
    from rlhfkit.rm.train import RMTrainConfig
    from rlhfkit.rm.train import train_reward_model as run

    return run(_config(RMTrainConfig, config))


def evaluate_reward_model(config: Any) -> dict[str, Any]:
    """``rlhfkit rm eval``; returns the metrics dict."""
    from rlhfkit.rm.commands import RMEvalConfig, run_eval

    return run_eval(_config(RMEvalConfig, config))


def train_sft(config: Any) -> dict[str, Any]:
    """``rlhfkit sft``."""
    from rlhfkit.sft.train import SFTConfig
    from rlhfkit.sft.train import train_sft as run

    return run(_config(SFTConfig, config))


def train_ppo(config: Any) -> dict[str, Any]:
    """``rlhfkit ppo``."""
    from rlhfkit.rl.trainer import PPOConfig
    from rlhfkit.rl.trainer import train_rl as run

    return run(_config(PPOConfig, config))


def train_rl(config: Any) -> dict[str, Any]:
    """``rlhfkit rl --algo ppo|rloo|grpo|reinforce++``."""
    from rlhfkit.rl.trainer import RLConfig
    from rlhfkit.rl.trainer import train_rl as run

    return run(_config(RLConfig, config))


def train_dpo(config: Any) -> dict[str, Any]:
    """``rlhfkit dpo``; returns the last train and eval metrics and the model folders."""
    from rlhfkit.dpo.train import DPOConfig
    from rlhfkit.dpo.train import train_dpo as run

    return run(_config(DPOConfig, config))


def best_of_n(config: Any) -> list[dict[str, Any]]:
    """``rlhfkit bon``; returns the best response per prompt."""
    from rlhfkit.rl.commands import BonConfig, run_bon

    return run_bon(_config(BonConfig, config))


def evaluate_ppo(config: Any) -> dict[str, Any]:
    """``rlhfkit ppo-eval``; returns score and KL for the policy, the reference and best-of-n."""
    from rlhfkit.rl.commands import PPOEvalConfig, run_ppo_eval

    return run_ppo_eval(_config(PPOEvalConfig, config))


def evaluate_policy(config: Any) -> dict[str, Any]:
    """``rlhfkit eval``; returns the summary (``win_rate``, ``win_rate_ci``, ``lc_win_rate``, ...)."""
    from rlhfkit.judge.commands import EvalConfig, run_eval

    return run_eval(_config(EvalConfig, config))


def run_pipeline(config: Any) -> dict[str, Any]:
    """``rlhfkit pipeline``; returns report paths, per-stage summaries and the summary paragraph."""
    from rlhfkit.pipeline.run import PipelineConfig
    from rlhfkit.pipeline.run import run_pipeline as run

    return run(_config(PipelineConfig, config))
