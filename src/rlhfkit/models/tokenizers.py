"""Tokenizer fixes every stage needs: a pad token that is not the end token."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Tried in order when a tokenizer has no pad token, or pads with its end token.
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "[PAD]")


def ensure_distinct_pad(tokenizer, model=None) -> None:
    """Give ``tokenizer`` a pad token distinct from EOS, and tell ``model``'s config about it.

    Why: when pad == EOS (SmolLM2 pads with ``<|im_end|>``), every mask built from
    ``pad_token_id`` also erases the real end tokens, and a reward read "at the last non-pad
    token" is read one token early. Adds ``<|pad|>`` (resizing ``model``'s embeddings) only
    when no existing candidate is in the vocabulary.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or (eos is not None and pad == eos):
        vocab = tokenizer.get_vocab()
        choice = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != eos), None)
        if choice is not None:
            tokenizer.pad_token = choice
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            logger.warning("tokenizer had no pad token distinct from EOS; added <|pad|>")
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = tokenizer.pad_token_id
