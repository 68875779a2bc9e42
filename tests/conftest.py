"""Shared fixtures: tiny models built locally (never downloaded) and synthetic data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["apple", "river", "stone", "cloud", "paper", "green", "quiet", "table", "light", "music", "north", "bread"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a shared 2-core machine two
    OpenMP threads per process stall at every barrier (seen: 9 s -> 225 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    from rlhfkit.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    from rlhfkit.models.tiny import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny-bert")


def separable_lists(n: int, k: int = 4, seed: int = 0) -> list[list[str]]:
    """Rank lists whose quality is the number of leading 'good' words (best first)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        row = []
        for q in range(k - 1, -1, -1):
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            row.append(("good " * q + body).strip())
        out.append(row)
    return out


def weights(folder: Path) -> dict:
    """The tensors of a saved model folder (``model.safetensors``), by name."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def step_losses(out: Path) -> list[float]:
    """``train/loss`` of every logged step of a run folder."""
    from rlhfkit.tracking import read_metrics

    return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


@pytest.fixture
def separable_tsv(tmp_path) -> Path:
    path = tmp_path / "lists.tsv"
    path.write_text("\n".join("\t".join(r) for r in separable_lists(120)) + "\n", encoding="utf-8")
    return path
