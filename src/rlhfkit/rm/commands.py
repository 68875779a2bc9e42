"""``rlhfkit rm eval`` and ``rlhfkit score``: use a trained reward model."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from rlhfkit.config import ConfigError


@dataclass
class RMEvalConfig:
    """Evaluate a reward model on held-out preference data."""

    model: str = field(default="", metadata={"help": "reward model folder (a run folder picks best/)"})
    data: str = field(default="", metadata={"help": "preference data: .tsv rank lists, .jsonl, .json or .parquet"})
    format: str = field(default="auto", metadata={"help": "data format (see rm train --help)"})
    prompt_column: bool = field(default=False, metadata={"help": "rank-list TSV: the first column is the prompt"})
    allow_ties: bool = field(default=False, metadata={"help": "accept equal ranks in JSONL 'ranks' fields"})
    n_skip: int = field(default=0, metadata={"help": "skip the first N lists (e.g. the training part of one file)"})
    batch_size: int = field(default=64, metadata={"help": "texts per forward pass"})
    max_length: int | None = field(default=None, metadata={"help": "override the model's max length"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of a table"})

    def __post_init__(self):
        if not self.model:
            raise ConfigError("option 'model' is required (--model DIR)")
        if not self.data:
            raise ConfigError("option 'data' is required (--data FILE)")
        if self.n_skip < 0:
            raise ConfigError(f"option 'n_skip' must be >= 0, got {self.n_skip}")


def run_eval(cfg: RMEvalConfig) -> dict:
    import torch

    from rlhfkit.data.collate import EncodedPreferences
    from rlhfkit.data.readers import read_preferences
    from rlhfkit.models.cpu_linear import apply_cpu_matmul
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rm.evaluate import evaluate

    examples = read_preferences(cfg.data, format=cfg.format, prompt_column=cfg.prompt_column, allow_ties=cfg.allow_ties)
    if cfg.n_skip >= len(examples):
        raise ConfigError(f"--n-skip {cfg.n_skip} skips every list: {cfg.data} has {len(examples)}")
    examples = examples[cfg.n_skip :]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rm = RewardModel.from_pretrained(cfg.model, max_length=cfg.max_length, device=device)
    apply_cpu_matmul("auto", device, rm)
    data = EncodedPreferences.build(examples, rm.encode, rm.meta.max_length, what=cfg.data)
    metrics, _ = evaluate(rm, data, rm.pad, batch_size=cfg.batch_size, device=device)
    metrics["n_truncated"] = data.n_truncated
    return metrics


@dataclass
class ScoreConfig:
    """Score texts with a reward model: one score per line on stdout."""

    model: str = field(default="", metadata={"help": "reward model folder"})
    texts: list[str] = field(default_factory=list, metadata={"help": "texts to score", "cli": False})
    input: str | None = field(default=None, metadata={"help": "file of texts, one per line (or JSONL with 'prompt'/'response')"})
    prompt: str = field(default="", metadata={"help": "prompt shared by all texts"})
    whiten: bool = field(default=False, metadata={"help": "subtract the batch mean and divide by its std"})
    batch_size: int = field(default=32, metadata={"help": "texts per forward pass"})
    json: bool = field(default=False, metadata={"help": "print JSON lines with text and score"})

    def __post_init__(self):
        if not self.model:
            raise ConfigError("option 'model' is required (--model DIR)")
        if not self.texts and not self.input:
            raise ConfigError("nothing to score: give texts as arguments or --input FILE")


def read_score_inputs(cfg: ScoreConfig) -> tuple[list[str], list[str]]:
    prompts, responses = [cfg.prompt] * len(cfg.texts), list(cfg.texts)
    if cfg.input:
        from pathlib import Path

        path = Path(cfg.input)
        if not path.is_file():
            raise ConfigError(f"--input {path} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if cfg.input.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                    prompts.append(str(row.get("prompt", cfg.prompt)))
                    responses.append(str(row["response"]))
                except (json.JSONDecodeError, KeyError, AttributeError):
                    raise ConfigError(f"{path}, line {n}: expected a JSON object with a 'response' field") from None
            else:
                prompts.append(cfg.prompt)
                responses.append(line)
    return prompts, responses


def run_score(cfg: ScoreConfig) -> list[float]:
    import torch

    from rlhfkit.models.cpu_linear import apply_cpu_matmul
    from rlhfkit.models.reward import RewardModel

    prompts, responses = read_score_inputs(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rm = RewardModel.from_pretrained(cfg.model, device=device)
    apply_cpu_matmul("auto", device, rm)
    return rm.score(prompts, responses, batch_size=cfg.batch_size, whiten=cfg.whiten).tolist()


def print_eval(metrics: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, ensure_ascii=False))
        return
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"{k:28s} {v:.4f}")
        else:
            print(f"{k:28s} {v}")


def print_scores(texts: list[str], scores: list[float], as_json: bool) -> None:
    for t, s in zip(texts, scores):
        if as_json:
            print(json.dumps({"text": t, "score": s}, ensure_ascii=False))
        else:
            print(f"{s:.6f}")
    sys.stdout.flush()
