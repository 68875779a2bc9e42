"""Tokenizer fixes every stage needs: a pad token that is not the end token, and the set
of ids that end a response."""

from __future__ import annotations

import warnings
from typing import Any

from rlhfkit.errors import UserError

# Tried in order when a tokenizer has no pad token, or pads with its end token.
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "[PAD]")
FALLBACK_PAD_TOKEN = "<|pad|>"


def ensure_distinct_pad(tokenizer, model=None) -> None:
    """Give ``tokenizer`` a pad token distinct from EOS, and tell ``model``'s config about it.

    Why: when pad == EOS (SmolLM2 pads with ``<|im_end|>``), every mask built from
    ``pad_token_id`` also erases the real end tokens, and a reward read "at the last non-pad
    token" is read one token early. Adds ``<|pad|>`` (resizing ``model``'s embeddings) only
    when no existing candidate is in the vocabulary. Warns whenever it changes the pad token.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or (eos is not None and pad == eos):
        was = "missing" if pad is None else f"the EOS token {tokenizer.eos_token!r}"
        vocab = tokenizer.get_vocab()
        choice = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != eos), None)
        if choice is not None:
            tokenizer.pad_token = choice
        else:
            # A new token needs a new embedding row; the attention mask always hides it.
            tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD_TOKEN})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
        warnings.warn(
            f"the tokenizer's pad token was {was}; padding with {tokenizer.pad_token!r} "
            f"(id {tokenizer.pad_token_id}) instead so EOS tokens stay unmasked",
            stacklevel=2,
        )
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = tokenizer.pad_token_id


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids and the tokenizer's."""
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the policy has no EOS token (neither its tokenizer nor its generation config names one)")
    return ids


def use_chat_template(tokenizer: Any, choice: bool | None, model_name: str) -> bool:
    """rlhfkit's one chat-template rule, for every command that renders prompts.

    ``None`` (the default everywhere): render with the tokenizer's chat template when it has
    one, else plain text. ``True``: the template is required. ``False``: plain text.
    """
    if choice is None:
        return bool(tokenizer.chat_template)
    if choice and not tokenizer.chat_template:
        raise UserError(
            f"--chat-template: the tokenizer of {model_name} has no chat template; "
            "pass --no-chat-template (plain prompt text) or leave the option out"
        )
    return choice
