"""The Python API mirrors the CLI, and importing rlhfkit stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import rlhfkit
from rlhfkit.config import ConfigError


def test_import_rlhfkit_does_not_import_torch():
    code = "import sys, rlhfkit; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_and_evaluate_reward_model_from_a_dict_and_a_yaml(tiny_lm, separable_tsv, tmp_path):
    opts = {
        "model": str(tiny_lm),
        "train": str(separable_tsv),
        "n_train": 90,
        "output": str(tmp_path / "rm"),
        "epochs": 3,
        "lr": 3e-3,
        "progress": False,
        "report_to": "none",
    }
    metrics = rlhfkit.train_reward_model(opts)
    assert metrics["pairwise_accuracy"] > 0.9
    yaml_path = tmp_path / "eval.yaml"
    yaml_path.write_text(f"model: {tmp_path / 'rm'}\ndata: {separable_tsv}\nn_skip: 90\n")
    again = rlhfkit.evaluate_reward_model(yaml_path)
    assert again["pairwise_accuracy"] == pytest.approx(metrics["pairwise_accuracy"])


def test_api_rejects_unknown_options_and_types():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'epochz'"):
        rlhfkit.train_reward_model({"train": "x.tsv", "output": "o", "epochz": 1})
    with pytest.raises(TypeError, match="expected a RMTrainConfig, a dict of its options, or a YAML path"):
        rlhfkit.train_reward_model(42)
    with pytest.raises(AttributeError):
        rlhfkit.no_such_function  # noqa: B018
