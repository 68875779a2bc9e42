"""Where PPO's scores come from: one interface, several sources.

A reward source is called with the prompts and the decoded responses, as text, and returns
one float per response::

    source = load_reward_source("runs/rm")           # rlhfkit reward-model folder
    scores = source(["Review:"], [" A great film."])   # FloatTensor (M,), on the CPU

Sources always see text, never the policy's token ids: a reward model with a different
tokenizer (or text format) re-encodes the pair in its own way, exactly as in its training.

``load_reward_source(spec)`` picks the source from ``spec``:

- ``module:function`` or ``path/to/file.py:function``: a Python function
  ``f(prompts, responses) -> list[float]``;
- a folder written by ``rlhfkit rm train`` (or any HF sequence classifier with one label):
  :class:`RewardModelSource`;
- any other HF sequence classifier, local folder or hub id (a sentiment model, say):
  :class:`ClassifierSource`, reading one label's logit, a logit difference or a probability;
- ``KIND:SPEC`` with a registered prefix (``rm:``, ``classifier:``, ``function:``) forces
  the kind. :func:`register_reward_source` adds new kinds; the annotation issue registers
  ``human`` (a person typing scores) through it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.config import ConfigError, Options, opt
from rlhfkit.errors import UserError
from rlhfkit.evaluation.functions import load_function
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.hub import ALIASES, resolve_model, resolve_run_folder
from rlhfkit.models.reward import META_FILE, RewardModel
from rlhfkit.rl.human import HumanRewardSource

__all__ = [
    "RewardSource",
    "RewardSourceError",
    "RewardOptions",
    "RewardSourceOptions",
    "RewardModelSource",
    "ClassifierSource",
    "FunctionSource",
    "load_reward_source",
    "register_reward_source",
    "REWARD_SOURCES",
]


class RewardSource(Protocol):
    """``source(prompts, responses) -> scores (M,)``: a float32 CPU tensor, one per response."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor: ...


@dataclass
class RewardOptions:
    """Options some sources read; the others ignore them (see ``PPOConfig``'s ``reward_*``)."""

    label: str | None = None  # classifier: label name or index (default: the last label)
    transform: str = "logit"  # classifier: logit | logit-diff | prob | logprob
    text: str = "prompt+response"  # classifier: what it reads, prompt+response or response
    batch_size: int = 32
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    cpu_matmul: str = "auto"  # model sources: fp32 Linear through oneDNN on the CPU (rlhfkit.models.cpu_linear)


CLASSIFIER_TRANSFORMS = ("logit", "logit-diff", "prob", "logprob")


@dataclass(kw_only=True)
class RewardSourceOptions(Options):
    """The ``--reward*`` options of every command that scores samples (ppo, bon, ppo-eval)."""

    reward: str = opt(
        help="reward: an rlhfkit reward-model folder, a HF sequence classifier, module:function, or human"
    )
    reward_label: str | None = opt(None, "classifier rewards: label name or index to read (default: the last)")
    reward_transform: Literal["logit", "logit-diff", "prob", "logprob"] = opt(
        "logit", "classifier rewards: score from the label's logits"
    )
    reward_text: Literal["prompt+response", "response"] = opt(
        "prompt+response", "classifier rewards: the text it reads"
    )
    reward_batch_size: int = opt(32, "texts per reward-model forward pass", ge=1)

    def load_reward(self, device, cpu_matmul: str = "auto") -> RewardSource:
        return load_reward_source(
            self.reward,
            RewardOptions(
                label=self.reward_label,
                transform=self.reward_transform,
                text=self.reward_text,
                batch_size=self.reward_batch_size,
                device=device,
                cpu_matmul=cpu_matmul,
            ),
        )


class RewardSourceError(UserError):
    """A reward source returned something that is not one finite score per response."""


def _check_scores(values: Any, n: int, what: str) -> Tensor:
    """Turn a source's output into a float32 (n,) tensor, or say precisely what is wrong."""
    try:
        scores = torch.as_tensor(values, dtype=torch.float32).detach().cpu().flatten()
    except (TypeError, ValueError, RuntimeError):
        raise RewardSourceError(
            f"{what} returned {type(values).__name__} {str(values)[:80]!r}; it must return a list of "
            f"{n} floats (one score per response)."
        ) from None
    if scores.numel() != n:
        raise RewardSourceError(
            f"{what} returned {scores.numel()} scores for {n} responses; return exactly one per response."
        )
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardSourceError(
            f"{what} returned non-finite scores {scores[bad[:4]].tolist()} at responses {bad[:4]}; "
            "scores must be finite numbers (PPO cannot learn from nan or inf)."
        )
    return scores


class RewardModelSource:
    """A reward model trained by ``rlhfkit rm train`` (or any one-label HF classifier).

    The model scores ``(prompt, response)`` in its own text format and tokenizer
    (:meth:`rlhfkit.models.reward.RewardModel.encode`); its score is read at the last real
    token of its own encoding, which ends with its EOS.
    """

    def __init__(self, path: str, options: RewardOptions | None = None):
        self.options = options or RewardOptions()
        self.path = path
        self.model = RewardModel.from_pretrained(path, dtype=self.options.dtype, device=self.options.device)
        self.model.eval().requires_grad_(False)
        apply_cpu_matmul(self.options.cpu_matmul, self.options.device, self.model)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        scores = self.model.score(list(prompts), list(responses), batch_size=self.options.batch_size)
        return _check_scores(scores, len(responses), f"reward model {self.path}")

    def __repr__(self) -> str:
        return f"RewardModelSource({self.path!r}, {self.model.meta.kind}, format={self.model.meta.text_format})"


class ClassifierSource:
    """Any Hugging Face sequence classifier, e.g. a sentiment model.

    ``transform`` turns its logits ``z (M, C)`` for the chosen label ``y`` into a score:
    ``logit`` = ``z_y``; ``logit-diff`` = ``z_y - max_{c != y} z_c`` (for two labels, the
    log-odds of ``y``); ``prob`` = ``softmax(z)_y``; ``logprob`` = ``log softmax(z)_y``.
    ``text`` is what the classifier reads: ``prompt+response`` joined as one string (a
    continued review), or ``response`` alone.
    """

    def __init__(self, name_or_path: str, options: RewardOptions | None = None):
        self.options = o = options or RewardOptions()
        if o.transform not in CLASSIFIER_TRANSFORMS:
            raise ConfigError(
                f"option 'reward_transform' got {o.transform!r}; choose one of {', '.join(CLASSIFIER_TRANSFORMS)}"
            )
        if o.text not in ("prompt+response", "response"):
            raise ConfigError(f"option 'reward_text' got {o.text!r}; choose prompt+response or response")
        path = resolve_model(name_or_path)
        self.name = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=o.dtype).to(o.device)
        self.model.eval().requires_grad_(False)
        apply_cpu_matmul(o.cpu_matmul, o.device, self.model)
        if self.tokenizer.pad_token is None:  # decoder classifiers: pad on the right, read by mask
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index = self._label_index(o.label)
        if o.transform == "logit-diff" and self.model.config.num_labels < 2:
            raise ConfigError(f"--reward-transform logit-diff needs >= 2 labels; {name_or_path} has one. Use logit.")

    def _label_index(self, label: str | None) -> int:
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        n = self.model.config.num_labels
        if label is None:
            return n - 1  # binary sentiment models put POSITIVE last
        if label.lstrip("-").isdigit() and -n <= int(label) < n:
            return int(label) % n
        for i, name in id2label.items():
            if name.lower() == label.lower():
                return i
        raise ConfigError(
            f"option 'reward_label' got {label!r}, but classifier {self.name} has labels "
            f"{[id2label.get(i, str(i)) for i in range(n)]}; pass one of these names or an index 0..{n - 1}."
        )

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        o = self.options
        texts = list(responses) if o.text == "response" else [p + r for p, r in zip(prompts, responses)]
        max_len = min(getattr(self.tokenizer, "model_max_length", 512) or 512, 4096)
        y = self.label_index
        out = []
        for start in range(0, len(texts), o.batch_size):
            enc = self.tokenizer(
                texts[start : start + o.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_len,
            ).to(o.device)
            z = self.model(**enc).logits.float()  # (B, C)
            if o.transform == "logit":
                s = z[:, y]
            elif o.transform == "prob":
                s = z.softmax(-1)[:, y]
            elif o.transform == "logprob":
                s = z.log_softmax(-1)[:, y]
            else:  # logit-diff
                others = z.clone()
                others[:, y] = -math.inf
                s = z[:, y] - others.amax(-1)
            out.append(s.cpu())
        return _check_scores(torch.cat(out), len(texts), f"classifier {self.name}")

    def __repr__(self) -> str:
        labels = self.model.config.id2label or {}
        return f"ClassifierSource({self.name!r}, label={labels.get(self.label_index, self.label_index)!r}, {self.options.transform})"


class FunctionSource:
    """A Python function ``f(prompts, responses) -> list[float]`` named ``module:function``.

    ``module`` is an importable dotted name (``mypkg.rewards``) or a file path ending in
    ``.py`` (``rewards/length.py``), loaded by path.
    """

    def __init__(self, spec: str, options: RewardOptions | None = None):
        self.spec = spec
        self.fn: Callable[[list[str], list[str]], Any] = load_function(spec, "--reward")

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        return _check_scores(self.fn(list(prompts), list(responses)), len(responses), f"reward function {self.spec}")

    def __repr__(self) -> str:
        return f"FunctionSource({self.spec!r})"


Factory = Callable[[str, RewardOptions], RewardSource]


def _human(spec: str, options: RewardOptions) -> RewardSource:
    """``--reward human[:LOG.jsonl[@LOW..HIGH]]``: a person types the scores (see rl/human.py)."""

    return HumanRewardSource(spec, options)


REWARD_SOURCES: dict[str, Factory] = {
    "rm": RewardModelSource,
    "classifier": ClassifierSource,
    "function": FunctionSource,
    "human": _human,
}
"""Prefix -> factory. ``--reward KIND:SPEC`` (or ``--reward KIND`` alone) uses ``KIND``."""


def register_reward_source(kind: str, factory: Factory) -> None:
    """Make ``--reward KIND[:SPEC]`` build ``factory(SPEC, options)`` (e.g. ``human``)."""
    REWARD_SOURCES[kind] = factory


def _is_function_spec(spec: str) -> bool:
    if ":" not in spec or spec.count(":") != 1:
        return False
    module = spec.split(":", 1)[0]
    return module.endswith(".py") or bool(re.fullmatch(r"[A-Za-z_][\w.]*", module))


def _classifier_kind(path: str) -> str:
    """``rm`` for an rlhfkit reward model or a one-label classifier, else ``classifier``."""
    folder = Path(resolve_run_folder(path))
    if (folder / META_FILE).is_file():
        return "rm"
    try:
        config = AutoConfig.from_pretrained(str(folder) if folder.exists() else path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--reward {path!r} is neither a reward-model folder, a loadable Hugging Face model, nor "
            f"'module:function' ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    archs = config.architectures or []
    if not any("ForSequenceClassification" in a for a in archs):
        raise ConfigError(
            f"--reward {path!r} is a {', '.join(archs) or config.model_type} checkpoint, not a reward model or "
            "sequence classifier (its score head would be random). Train one with 'rlhfkit rm train', or pass a "
            "classifier, or a Python function as 'module:function'."
        )
    return "rm" if config.num_labels == 1 else "classifier"


def load_reward_source(spec: str, options: RewardOptions | None = None) -> RewardSource:
    """Build the reward source that ``spec`` names (see the module docstring)."""

    options = options or RewardOptions()
    kind, _, rest = spec.partition(":")
    if kind in REWARD_SOURCES and (rest or kind not in ("rm", "classifier", "function")):
        return REWARD_SOURCES[kind](rest, options)
    if _is_function_spec(spec) and not Path(spec).exists():
        return FunctionSource(spec, options)
    if spec in ALIASES:
        raise ConfigError(
            f"--reward {spec!r} is a base model, not a reward model; train one with 'rlhfkit rm train --model {spec}'"
        )
    try:
        resolve_model(spec)
    except FileNotFoundError as e:
        raise ConfigError(f"--reward: {e}") from None
    kind = _classifier_kind(spec)
    return REWARD_SOURCES[kind](spec, options)
