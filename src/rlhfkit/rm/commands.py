"""``rlhfkit rm eval`` and ``rlhfkit score``: use a trained reward model, or a DPO run read
as one (its implicit reward ``beta * (log pi - log pi_ref)``, :mod:`rlhfkit.models.implicit_reward`)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.config import Options, opt, require
from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.data.readers import FORMATS, read_preferences
from rlhfkit.data.types import DataFormatError
from rlhfkit.files import read_text
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.implicit_reward import ImplicitReward, is_dpo_model
from rlhfkit.models.reward import RewardModel
from rlhfkit.rm.evaluate import evaluate

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RMEvalConfig(Options):
    """Evaluate a reward model on held-out preference data."""

    model: str = opt(help="reward model folder, or a DPO run (its implicit reward); a run folder picks best/")
    eval: str = opt(help="held-out preference data: .tsv rank lists, .jsonl, .json or .parquet", was=("data",))
    format: Literal[FORMATS] = opt("auto", "data format (see rm train --help)")  # type: ignore[valid-type]
    prompt_column: bool = opt(False, "rank-list TSV: the first column is the prompt")
    allow_ties: bool = opt(False, "accept equal ranks in JSONL 'ranks' fields")
    n_skip: int = opt(0, "skip the first N lists (e.g. the training part of one file)", ge=0)
    batch_size: int = opt(64, "texts per forward pass", ge=1)
    max_length: int | None = opt(None, "override the model's max length", ge=8)
    json: bool = opt(False, "print one JSON object instead of a table")
    cpu: bool = opt(False, "run on the CPU even if a GPU is present")


def _device(cpu: bool) -> str:
    return "cuda" if torch.cuda.is_available() and not cpu else "cpu"


def load_scorer(model: str, device: str, max_length: int | None = None) -> tuple[RewardModel | ImplicitReward, int]:
    """``(scorer, its max length)``: a DPO run's :class:`ImplicitReward`, else a :class:`RewardModel`."""
    if is_dpo_model(model):
        scorer = ImplicitReward.from_pretrained(model, device=device, max_length=max_length)
        apply_cpu_matmul("auto", device, scorer)
        return scorer, scorer.max_length
    rm = RewardModel.from_pretrained(model, max_length=max_length, device=device)
    apply_cpu_matmul("auto", device, rm)
    return rm, rm.meta.max_length


def run_eval(cfg: RMEvalConfig) -> dict:
    """Every held-out metric of :func:`rlhfkit.rm.evaluate.evaluate`, plus the truncation count."""
    examples = read_preferences(cfg.eval, format=cfg.format, prompt_column=cfg.prompt_column, allow_ties=cfg.allow_ties)
    require(cfg.n_skip < len(examples), f"--n-skip {cfg.n_skip} skips every list: {cfg.eval} has {len(examples)}")
    examples = examples[cfg.n_skip :]
    device = _device(cfg.cpu)
    rm, max_length = load_scorer(cfg.model, device, cfg.max_length)
    data = EncodedPreferences.build(examples, rm.encode, max_length, what=cfg.eval)
    metrics, _ = evaluate(rm, data, rm.pad, batch_size=cfg.batch_size, device=device)
    metrics["n_truncated"] = data.n_truncated
    metrics["n_empty_responses"] = data.n_empty_responses
    return metrics


@dataclass(kw_only=True)
class ScoreConfig(Options):
    """Score texts with a reward model: one score per line on stdout."""

    model: str = opt(help="reward model folder, or a DPO run (its implicit reward)")
    texts: list[str] = opt(factory=list, help="texts to score", cli=False)
    responses: str | None = opt(
        None, "file of responses to score, one per line (or JSONL with 'prompt'/'response')", was=("input",)
    )
    prompt: str = opt("", "prompt shared by all texts")
    whiten: bool = opt(False, "subtract the batch mean and divide by its std")
    batch_size: int = opt(32, "texts per forward pass", ge=1)
    json: bool = opt(False, "print JSON lines with text and score")
    cpu: bool = opt(False, "run on the CPU even if a GPU is present")

    def validate(self) -> None:
        super().validate()
        require(bool(self.texts or self.responses), "nothing to score: give texts as arguments or --responses FILE")


def read_score_inputs(cfg: ScoreConfig) -> tuple[list[str], list[str]]:
    """(prompts, responses): the positional texts, then the rows of ``--responses``."""
    prompts, responses = [cfg.prompt] * len(cfg.texts), list(cfg.texts)
    if cfg.responses:
        jsonl = cfg.responses.endswith(".jsonl")
        for n, line in enumerate(read_text(cfg.responses, "--responses").split("\n"), 1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            if not jsonl:
                prompts.append(cfg.prompt)
                responses.append(line)
                continue
            try:
                row = json.loads(line)
                prompts.append(str(row.get("prompt", cfg.prompt)))
                responses.append(str(row["response"]))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise DataFormatError(cfg.responses, n, "expected a JSON object with a 'response' field") from None
    require(bool(responses), f"nothing to score: {cfg.responses} holds no non-blank line")
    empty = [i for i, r in enumerate(responses, 1) if not r.strip()]
    if empty:
        logger.warning(
            "text %s%s is empty: its score is the reward model's score of the prompt and the end token alone, "
            "not of an answer",
            ", ".join(map(str, empty[:5])),
            f" (and {len(empty) - 5} more)" if len(empty) > 5 else "",
        )
    return prompts, responses


def run_score(cfg: ScoreConfig) -> tuple[list[str], list[float]]:
    """(responses, their scores)."""
    prompts, responses = read_score_inputs(cfg)
    rm, _ = load_scorer(cfg.model, _device(cfg.cpu))
    return responses, rm.score(prompts, responses, batch_size=cfg.batch_size, whiten=cfg.whiten).tolist()


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
