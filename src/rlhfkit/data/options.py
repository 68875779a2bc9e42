"""The data options of every trainer that learns from preference lists (``rm train``, ``dpo``):
one definition, so both read the same formats with the same flags, split the same way and
fail with the same errors.

A trainer's config derives from :class:`PreferenceDataOptions` beside the shared pieces of
:mod:`rlhfkit.training.options` and reads its data with :func:`read_train_eval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhfkit.config import ConfigError, Options, opt, require
from rlhfkit.data.readers import FORMATS, read_preferences, split_train_eval
from rlhfkit.data.types import PreferenceExample


@dataclass(kw_only=True)
class PreferenceDataOptions(Options):
    """Which preference lists to train on, which to hold out, and how to read them."""

    train: str = opt(help="training data: .tsv rank lists, .jsonl, .json, .parquet or a save_to_disk folder")
    eval: str | None = opt(None, "held-out data file (default: the split below)")
    n_train: int | None = opt(None, "train on the first N lists of --train and evaluate on the rest", ge=1)
    eval_fraction: float | None = opt(None, "hold out this seeded random share of --train for evaluation", gt=0, lt=1)
    format: Literal[FORMATS] = opt("auto", "data format (auto: from the extension and the first record)")  # type: ignore[valid-type]
    prompt_column: bool = opt(False, "rank-list TSV: the first column is the prompt")
    allow_ties: bool = opt(False, "accept equal ranks in JSONL 'ranks' fields")

    def validate(self) -> None:
        super().validate()
        require(
            self.n_train is None or self.eval_fraction is None,
            "options --n-train and --eval-fraction both split --train; give one",
        )
        require(
            not (self.eval and (self.n_train is not None or self.eval_fraction is not None)),
            "give either --eval FILE or a split of --train (--n-train / --eval-fraction), not both",
        )


def read_train_eval(cfg: PreferenceDataOptions, seed: int) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train examples, eval examples): ``--train``, then ``--eval`` or the split of ``--train``
    (``--n-train``: the first N lists; ``--eval-fraction``: a share drawn with ``seed``)."""
    kw = dict(format=cfg.format, prompt_column=cfg.prompt_column, allow_ties=cfg.allow_ties)
    train = read_preferences(cfg.train, **kw)
    evals = read_preferences(cfg.eval, **kw) if cfg.eval else []
    if cfg.n_train is not None:
        require(
            cfg.n_train < len(train),
            f"--n-train {cfg.n_train} leaves no evaluation lists: {cfg.train} has {len(train)}",
        )
        train, evals = split_train_eval(train, n_train=cfg.n_train)
    elif cfg.eval_fraction is not None:
        try:
            train, evals = split_train_eval(train, eval_fraction=cfg.eval_fraction, seed=seed)
        except ValueError as e:  # holds out every list: nothing left to train on
            raise ConfigError(f"--eval-fraction: {e} in {cfg.train}") from None
    return train, evals
