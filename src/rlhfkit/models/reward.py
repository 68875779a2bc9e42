"""The reward model: a transformer backbone and a linear head to one scalar.

It *is* a Hugging Face ``*ForSequenceClassification`` model with ``num_labels=1``, so a
saved reward model loads with ``AutoModelForSequenceClassification.from_pretrained`` (TRL,
vLLM, ...) and gives the same scores, for the default pooling:

- decoders (Llama, SmolLM2, ...): the head reads the hidden state of the last real token
  (found from the attention mask, so right and left padding both work; the tokenizer gets
  a pad token distinct from EOS, so HF's pad-id based lookup agrees);
- encoders (BERT, MiniLM, ERNIE): ``pooling="auto"`` is the architecture's own head (BERT:
  the pooler over [CLS]); ``"cls"`` and ``"mean"`` read the [CLS] state or the masked mean
  of all states directly into the classifier. Those two are not what
  ``AutoModelForSequenceClassification`` computes, so use ``auto`` when interop matters.

How the reward model sees a (prompt, response): decoders read ``prompt + response + EOS``
(``text_format="plain"``) or the chat template with a user and an assistant turn
(``"chat"``); encoders read the pair as two segments ([CLS] prompt [SEP] response [SEP]).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.checkpoint import export_pretrained
from rlhfkit.errors import ConfigError
from rlhfkit.models.hub import resolve_model
from rlhfkit.models.tokenizers import ensure_distinct_pad

logger = logging.getLogger(__name__)

META_FILE = "reward_model.json"


@dataclass
class RewardModelMeta:
    """What is needed, beside the HF checkpoint, to score text exactly as in training."""

    kind: str  # "decoder" | "encoder"
    pooling: str = "auto"  # decoder: "last"; encoder: "auto" | "cls" | "mean"
    text_format: str = "plain"  # decoder only: "plain" | "chat"
    max_length: int = 512


def is_decoder_config(config) -> bool:
    archs = " ".join(getattr(config, "architectures", None) or [])
    return (
        bool(getattr(config, "is_decoder", False))
        or "CausalLM" in archs
        or config.model_type
        in {
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3",
            "phi",
            "phi3",
            "gpt2",
            "gpt_neox",
            "smollm3",
            "olmo",
            "olmo2",
            "granite",
            "starcoder2",
            "gptj",
            "opt",
            "bloom",
            "falcon",
        }
    )


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row. attention_mask (N, T) -> (N,).

    Works for right padding (1 1 1 0 0), left padding (0 0 1 1 1) and none.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


class RewardModel(nn.Module):
    """A scalar reward model around a HF sequence classifier. See the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, meta: RewardModelMeta):
        super().__init__()
        self.model = model  # a *ForSequenceClassification (possibly peft-wrapped)
        self.tokenizer = tokenizer
        self.meta = meta
        if meta.kind == "decoder":
            tokenizer.padding_side = "right"

    @property
    def _no_split_modules(self) -> list[str]:
        """The blocks FSDP shards one by one (``transformers``' name for them, of the inner model)."""
        return list(getattr(self.hf_model, "_no_split_modules", None) or [])

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        pooling: str | None = None,
        text_format: str | None = None,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        option: str | None = "--model",
    ) -> RewardModel:
        """Load a trained reward model folder, or start a new one from any backbone.

        ``name_or_path`` may be a folder written by ``rlhfkit rm train`` (its ``best/`` or
        ``final/`` export is picked when given the run folder), any HF checkpoint, or an
        alias (``smollm2-135m``, ``minilm-l6``). ``option``: the flag that named it, for the
        error about a folder that is not a loadable model.
        """

        path = resolve_model(name_or_path, option)
        saved = _read_meta(path)
        config = AutoConfig.from_pretrained(path)
        kind = saved.kind if saved else ("decoder" if is_decoder_config(config) else "encoder")
        meta = RewardModelMeta(
            kind=kind,
            pooling=pooling or (saved.pooling if saved else ("last" if kind == "decoder" else "auto")),
            text_format=text_format or (saved.text_format if saved else "plain"),
            max_length=max_length or (saved.max_length if saved else 512),
        )
        _validate_meta(meta, str(name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype or torch.float32)
        if kind == "decoder":
            ensure_distinct_pad(tokenizer, model)
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, meta)

    # ------------------------------------------------------------- the forward
    @property
    def hf_model(self) -> nn.Module:
        """The plain HF model (under any peft wrapper)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        return_token_scores: bool = False,
    ):
        """Scores (N,) for sequences (N, T); with ``return_token_scores`` also (N, T).

        Token scores are the head applied to every position (decoders only): the per-token
        values that the ``token-pairwise`` loss and a PPO critic read.
        """
        hf = self.hf_model
        if self.meta.kind == "decoder":
            backbone = getattr(hf, hf.base_model_prefix)
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
            token_scores = hf.score(hidden).squeeze(-1)  # (N, T)
            idx = last_token_index(attention_mask)  # (N,)
            scores = token_scores.gather(1, idx[:, None]).squeeze(1)  # (N,)
            return (scores, token_scores) if return_token_scores else scores
        if return_token_scores:
            raise ValueError("per-token scores need a decoder backbone; this reward model is an encoder")
        if self.meta.pooling == "auto":
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.logits.squeeze(-1)
        base = hf.base_model
        hidden = base(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        if self.meta.pooling == "cls":
            pooled = hidden[:, 0]  # (N, H)
        else:  # mean over real tokens
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (N, H)
        dropout = getattr(hf, "dropout", nn.Identity())
        return hf.classifier(dropout(pooled)).squeeze(-1)

    # ------------------------------------------------------------ tokenising
    def encode(self, prompt: str, response: str) -> tuple[dict[str, list[int]], int, bool]:
        """Token ids of one (prompt, response) as this model reads it.

        Returns (features, prompt_token_count, truncated). Decoders end with EOS; when the
        text is longer than ``max_length`` the prompt is cut from the left first, then the
        response from the right (EOS kept). Encoders truncate longest-first.
        """
        tok, max_len = self.tokenizer, self.meta.max_length
        if self.meta.kind == "encoder":
            if prompt and not response and getattr(tok, "is_fast", False):
                return self._encode_empty_response(prompt)
            if prompt:
                full = tok(prompt, response, truncation=False)
            else:
                full = tok(response, truncation=False)
            truncated = len(full["input_ids"]) > max_len
            if truncated:
                full = (
                    tok(prompt, response, truncation="longest_first", max_length=max_len)
                    if prompt
                    else tok(response, truncation=True, max_length=max_len)
                )
            feats = {k: list(v) for k, v in full.items() if k in ("input_ids", "token_type_ids")}
            n_prompt = feats["token_type_ids"].count(0) if prompt and "token_type_ids" in feats else 1
            return feats, n_prompt, truncated
        if self.meta.text_format == "chat" and tok.chat_template:
            msgs = ([{"role": "user", "content": prompt}] if prompt else []) + [
                {"role": "assistant", "content": response}
            ]
            prefix = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) if prompt else ""
            whole = tok.apply_chat_template(msgs, tokenize=False)
            p_ids = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
            r_ids = tok(whole[len(prefix) :].rstrip("\n"), add_special_tokens=False)["input_ids"]
        else:
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            r_ids = tok(response, add_special_tokens=False)["input_ids"]
        eos = tok.eos_token_id
        if eos is not None and (not r_ids or r_ids[-1] != eos):
            r_ids = r_ids + [eos]
        truncated = len(p_ids) + len(r_ids) > max_len
        if truncated:
            keep_prompt = max(0, max_len - len(r_ids))
            p_ids = p_ids[len(p_ids) - keep_prompt :] if keep_prompt else []
            if len(r_ids) > max_len:
                r_ids = r_ids[: max_len - 1] + ([eos] if eos is not None else r_ids[max_len - 1 : max_len])
        return {"input_ids": p_ids + r_ids}, len(p_ids), truncated

    def _encode_empty_response(self, prompt: str) -> tuple[dict[str, list[int]], int, bool]:
        """Encoder input for an empty answer to ``prompt``: ``[CLS] prompt [SEP] [SEP]``.

        Tokenizers read an empty second segment as none (``[CLS] prompt [SEP]``, the prompt
        alone); the pair's special tokens are kept here, so the answer is its end token. Made
        by encoding a placeholder answer and dropping its tokens (sequence id 1), which works
        for any pair template (BERT, RoBERTa...). A long prompt is cut from the right.
        """
        tok, max_len = self.tokenizer, self.meta.max_length
        enc = tok(prompt, "x", truncation=False)
        n_placeholder = enc.sequence_ids().count(1)
        truncated = len(enc["input_ids"]) - n_placeholder > max_len
        if truncated:
            enc = tok(prompt, "x", truncation="only_first", max_length=max_len + n_placeholder)
        keep = [i for i, s in enumerate(enc.sequence_ids()) if s != 1]
        ids = {k: list(v) for k, v in enc.items() if k in ("input_ids", "token_type_ids")}
        feats = {k: [v[i] for i in keep] for k, v in ids.items()}
        n_prompt = feats["token_type_ids"].count(0) if "token_type_ids" in feats else len(feats["input_ids"]) - 1
        return feats, n_prompt, truncated

    def pad(self, features: Sequence[dict[str, list[int]]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Dynamic padding to the longest sequence; attention_mask 1 = real token."""
        n, t = len(features), max(len(f["input_ids"]) for f in features)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = {
            "input_ids": torch.full((n, t), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, t), dtype=torch.long),
        }
        has_tt = "token_type_ids" in features[0]
        if has_tt:
            out["token_type_ids"] = torch.zeros((n, t), dtype=torch.long)
        for i, f in enumerate(features):
            L = len(f["input_ids"])
            sl = slice(0, L) if padding_side == "right" else slice(t - L, t)
            out["input_ids"][i, sl] = torch.tensor(f["input_ids"])
            out["attention_mask"][i, sl] = 1
            if has_tt:
                out["token_type_ids"][i, sl] = torch.tensor(f["token_type_ids"])
        return out

    # --------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str] | str | None,
        responses: Sequence[str],
        *,
        batch_size: int = 32,
        whiten: bool = False,
        eps: float = 1e-8,
    ) -> torch.Tensor:
        """Scores (N,) for N (prompt, response) pairs; prompts may be one string or None.

        ``whiten`` subtracts the batch mean and divides by (std + eps), the usual
        normalisation of a reward before it enters PPO.
        """
        if isinstance(responses, str):
            raise TypeError("responses must be a list of strings, not one string")
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts or ""] * len(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        encoded = [self.encode(p, r)[0] for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))  # length-sorted batches
        scores = torch.empty(len(encoded))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in self.pad([encoded[i] for i in idx]).items()}
            scores[idx] = self(**batch).float().cpu()
        self.train(was_training)
        if whiten:
            scores = (scores - scores.mean()) / (scores.std(unbiased=False) + eps)
        return scores

    # ---------------------------------------------------------------- saving
    def save_pretrained(
        self, path: str | os.PathLike, extra_files: dict[str, str] | None = None, state_dict: dict | None = None
    ) -> None:
        """Write a plain HF checkpoint (LoRA merged, safetensors) and the scoring metadata, atomically.

        ``state_dict``: this module's full weights gathered from a sharded (FSDP) run."""
        config = self.hf_model.config
        config.num_labels = 1
        if self.tokenizer.pad_token_id is not None:
            config.pad_token_id = self.tokenizer.pad_token_id
        inner = {k.removeprefix("model."): v for k, v in state_dict.items()} if state_dict is not None else None
        export_pretrained(
            self.model,
            self.tokenizer,
            path,
            {META_FILE: json.dumps(asdict(self.meta), indent=2), **(extra_files or {})},
            state_dict=inner,
        )


def _read_meta(path: str) -> RewardModelMeta | None:
    f = Path(path) / META_FILE
    if not f.is_file():
        return None
    return RewardModelMeta(**json.loads(f.read_text()))


def _validate_meta(meta: RewardModelMeta, name: str = "the model") -> None:
    if meta.kind == "decoder" and meta.pooling not in ("last", "auto"):
        raise ConfigError(
            f"--pooling {meta.pooling} is for encoders, and {name} is a decoder: a decoder reward model "
            "reads the hidden state of the last real token. Leave --pooling at auto (or pass last)"
        )
    if meta.kind == "decoder" and meta.pooling == "auto":
        meta.pooling = "last"
    if meta.kind == "encoder" and meta.pooling not in ("auto", "cls", "mean"):
        raise ConfigError(
            f"--pooling {meta.pooling} is for decoders, and {name} is an encoder: choose auto (the "
            "architecture's own head), cls or mean"
        )
    if meta.text_format not in ("plain", "chat"):
        raise ValueError(f"text_format={meta.text_format!r} is not one of plain, chat")
    if meta.max_length < 8:
        raise ValueError(f"max_length={meta.max_length} is too small; use at least 8 tokens")
