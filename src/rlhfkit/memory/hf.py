"""A local Hugging Face folder's :class:`~rlhfkit.memory.shapes.ModelShape`, counted exactly: the
model is built from its ``config.json`` on the ``meta`` device (no weights read, no memory
used) and its parameters, one block's and the LoRA adapters' that peft would add are counted.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rlhfkit.errors import UserError
from rlhfkit.memory.shapes import ModelShape
from rlhfkit.models.hub import resolve_run_folder
from rlhfkit.models.reward import is_decoder_config


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the largest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise UserError(f"{type(model).__name__}: found no list of transformer blocks to plan with")
    return list(max(lists, key=len))


def _count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)  # shared (tied) once


def shape_from_folder(path: Path, option: str = "--model") -> ModelShape:
    """Read ``path/config.json`` (a run folder: its exported model) and count on the meta device."""
    folder = Path(resolve_run_folder(str(path)))
    if not (folder / "config.json").is_file():
        raise UserError(
            f"{option}: {path} has no config.json; give a Hugging Face model folder, a known name or a size like 7B"
        )
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError) as e:
        raise UserError(f"{option}: {folder}/config.json could not be read by transformers: {e}") from None
    decoder = is_decoder_config(config)
    # the random state is left as it was: a run that reads a shape (rl --micro-batch-size auto) samples the same
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = (AutoModelForCausalLM if decoder else AutoModel).from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, heads = int(text.hidden_size), int(text.num_attention_heads)
    blocks = _blocks(model)
    embed = model.get_input_embeddings()
    out = model.get_output_embeddings() if decoder else None
    embed_params = _count(model.embeddings) if hasattr(model, "embeddings") else embed.weight.numel()
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    shape = ModelShape(
        name=folder.name,
        hidden=h,
        layers=len(blocks),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or h // heads),
        intermediate=int(text.intermediate_size),
        vocab=int(text.vocab_size),
        tied=out is not None and out.weight is embed.weight,
        params=_count(model),
        block_params=_count(blocks[0]),
        embed_params=embed_params,
        lora_params=0,
        kind="decoder" if decoder else "encoder",
        gated_mlp=bool(names & {"gate_proj", "gate_up_proj", "w1"}),
        source=f"{folder}/config.json, counted on the meta device",
    )
    with torch.random.fork_rng(devices=[]):
        return replace(shape, lora_params=lora_params_at_rank_1(model))


def lora_params_at_rank_1(model: torch.nn.Module) -> int:
    """The adapters peft adds at rank 1 on its default modules for this architecture (they scale
    with r); 0 when peft has no default modules for it (planning ``--lora`` then says so)."""
    try:
        with warnings.catch_warnings():  # deprecation notices from peft's wrapping, irrelevant here
            warnings.simplefilter("ignore")
            lora = get_peft_model(model, LoraConfig(r=1, lora_alpha=1))
    except ValueError:
        return 0
    return sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
