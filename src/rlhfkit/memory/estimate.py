"""How much memory one process of an rlhfkit run holds, term by term, as pure functions of
a model's shape (:class:`~rlhfkit.memory.shapes.ModelShape`) and the run's settings (:class:`Setup`).

Every figure is bytes on one device (a GPU, or one CPU process's RAM). Notation: ``h``
hidden size, ``L`` layers, ``a`` query heads, ``kv`` key/value heads, ``d`` head size, ``I``
MLP width, ``V`` vocabulary, ``P`` parameters; a micro-batch is ``rows x T`` tokens.

What the trainers hold (read from ``rlhfkit/{sft,rm,rl}`` and ``training/``):

- fp32 master weights always; on CUDA ``mixed_precision auto`` is bf16 autocast, so matmuls
  read bf16 copies of the weights (kept for the backward pass) and write bf16 activations;
  under FSDP2 accelerate's ``MixedPrecisionPolicy`` gathers weights in bf16 instead;
- AdamW (fused): two fp32 moments per trained parameter; gradients fp32, freed after every
  optimizer step (``zero_grad(set_to_none=True)``), so rollouts and evaluation hold none;
- DDP (2+ processes): gradient buckets, a second fp32 copy of the gradients, for the whole run;
- FSDP2 (accelerate, one unit per transformer block; the tied embedding with the final norm
  and LM head as one more unit, kept gathered from the forward to the backward pass):
  ``1/N`` of weights, gradients and AdamW state, plus the units being computed (two blocks:
  the current one and the prefetched next) and their unsharded gradients; the RL rollout
  gathers the actor's full weights for generation (``training.distributed.gathered``); the
  frozen reference and reward model are sharded too (``rl --frozen-models shard``, gathered a
  unit at a time in their forward passes) or full copies in every process (``replicate``);
- the peak is the largest phase, never the sum: RL ``generate`` (KV cache), ``score``
  (reference, reward model and critic forward passes), ``backward`` (activations, logits)
  and ``step`` (gradients with AdamW state); SFT/RM/DPO ``backward``, ``step``, ``eval``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfkit.defaults import RL_ALGORITHMS
from rlhfkit.memory.shapes import ModelShape

GIB = 1024**3
FP32 = 4
# A CPU process of rlhfkit before any model: Python, torch, transformers, accelerate, peft, the
# tokenizer. Measured as the peak RSS of `rlhfkit sft` on a 2-layer tiny model (0.40 GiB on this
# project's machine; benchmarks/plan_vs_measured.py re-measures it as its "baseline" row).
CPU_PROCESS_BASELINE = 0.40 * GIB
# CUDA context, cuBLAS workspace and kernels: a usual allowance, outside torch's
# max_memory_allocated (the benchmark subtracts it when it compares with that figure).
CUDA_RUNTIME = 0.5 * GIB

CONFIGS = ("ddp", "fsdp2", "fsdp2-offload")
RL_ALGOS = RL_ALGORITHMS


@dataclass(frozen=True)
class Setup:
    """One run's settings, as the trainers count them (``rlhfkit plan`` fills in their defaults)."""

    algo: str  # sft | rm | dpo | ppo | grpo | rloo | reinforce++
    gpus: int = 1  # processes
    device: str = "cuda"  # cuda | cpu
    bf16: bool = True  # CUDA autocast (rlhfkit's mixed_precision auto on a GPU); always False on the CPU
    lora: bool = False
    lora_r: int = 16
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False
    batch_size: int = 8  # sft: rows per micro-batch; rm/dpo: lists per micro-batch; rl: prompts per rollout
    list_size: int = 2  # rm/dpo: responses (sequences) per list
    max_length: int = 512  # sft/rm/dpo: tokens per sequence
    prompt_length: int = 256  # rl
    new_tokens: int = 64  # rl
    samples_per_prompt: int = 1  # rl: K
    mini_batch_size: int = 8  # rl: rollout rows per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (rl: the minibatch is split into them)
    eval_batch_size: int = 0  # sequences per evaluation forward pass (0: no evaluation phase)
    critic: str = "none"  # ppo: value-head | reward-model (a separate critic of the reward model's shape)
    frozen_models: str = (
        "shard"  # rl under fsdp2: shard | replicate the reference and reward model (rl --frozen-models)
    )

    @property
    def rl(self) -> bool:
        return self.algo in RL_ALGOS


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a configuration keeps (module docstring)."""

    act: int  # matmul outputs (activations, logits, KV cache): 2 under bf16, 4 in fp32
    resid: int  # the residual stream between blocks: fp32 under autocast (fp32 + bf16 adds to fp32)
    norm: int  # bytes an RMSNorm keeps per hidden unit: its fp32 input and normalised output
    casts: bool  # autocast casts each linear's fp32 input itself: q, k, v (and gate, up) keep one copy each
    autocast_copies: bool  # fp32 weights read through bf16 copies kept for the backward pass
    gathered: int  # FSDP2's gathered weights and unsharded gradients
    dropout_mask: int = (
        1  # bytes per element of a dropout mask: bool on CUDA (fused kernel), a float noise tensor on the CPU
    )


def precision(setup: Setup, config: str) -> Precision:
    sharded = config != "ddp"
    if not setup.bf16:
        return Precision(
            act=4,
            resid=4,
            norm=8,
            casts=False,
            autocast_copies=False,
            gathered=4,
            dropout_mask=4 if setup.device == "cpu" else 1,
        )
    if sharded:  # bf16 weights in compute: a bf16 residual stream, norms upcast to fp32 inside
        return Precision(act=2, resid=2, norm=6, casts=False, autocast_copies=False, gathered=2)
    return Precision(act=2, resid=4, norm=8, casts=True, autocast_copies=True, gathered=4)


# ------------------------------------------------------------------ the networks
@dataclass(frozen=True)
class Network:
    """A model a run holds: a causal LM (logits over the vocabulary) or a sequence scorer
    (reward model, critic: a scalar head on the last hidden state)."""

    shape: ModelShape
    params: int
    trainable: int  # 0 for a frozen model
    lm_head: bool

    @property
    def matmul_params(self) -> int:
        """Weights read by matmuls (autocast's bf16 copies): all but the embedding tables, and a tied embedding again as the LM head."""
        s = self.shape
        return self.params - s.embed_params + (s.vocab * s.hidden if self.lm_head and s.tied else 0)

    @property
    def tail_params(self) -> int:
        """FSDP2's last unit, gathered from the end of the forward to the backward pass: the LM head (tied: the embedding)."""
        return self.shape.vocab * self.shape.hidden if self.lm_head else 0


def causal_lm(shape: ModelShape, trained: bool, lora: bool, lora_r: int, extra: int = 0) -> Network:
    """A policy: all of it trained, LoRA adapters only (``lora_r * shape.lora_params``), or frozen. ``extra``: a value head."""
    adapters = lora_r * shape.lora_params if lora and trained else 0
    trainable = (adapters + extra if lora else shape.params + extra) if trained else 0
    return Network(shape, shape.params + adapters + extra, trainable, lm_head=True)


def sequence_scorer(shape: ModelShape, trained: bool, lora: bool = False, lora_r: int = 16) -> Network:
    """A ``*ForSequenceClassification`` with one output: the body without the LM head, plus ``h -> 1``
    (decoders: no bias; BERT: with one). LoRA trains the adapters and a copy of the head."""
    h = shape.hidden
    head = h if shape.kind == "decoder" else h + 1
    params = shape.params - shape.head_params + head
    if not trained:
        return Network(shape, params, 0, lm_head=False)
    if lora:
        adapters = lora_r * shape.lora_params + head  # peft's modules_to_save: a trained copy of the head
        return Network(shape, params + adapters, adapters, lm_head=False)
    return Network(shape, params, params, lm_head=False)


# --------------------------------------------------------------- activation math
def layer_activation_bytes(
    shape: ModelShape, p: Precision, lora_modules: int = 0, lora_dropout: float = 0.0, repeated_kv: bool = True
) -> float:
    """Bytes one transformer block keeps for its backward pass, per token.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    sec. 4.1) count ``s b h (34 + 5 a s / h)`` bytes per GPT layer in 16-bit; with SDPA/flash
    attention the ``5 a s / h`` term (the ``T x T`` scores) is not kept. Redone here for the
    blocks rlhfkit trains (HF Llama/Qwen2: RMSNorm, SwiGLU, no dropout), tensor by tensor:

    - each of the two norms: its input and normalised output (``p.norm`` bytes per unit), and
      its output, the linears' input: once in fp32, or once per linear under autocast's casts
      (q, k, v; gate, up);
    - attention: q and, on a padded batch (transformers repeats them for GQA), k and v at
      ``a d`` each, the SDPA output and the ``o_proj`` input (a transposed copy);
    - SwiGLU: gate, SiLU(gate), up and their product (``4 I``); a GELU MLP keeps ``2 I``;
    - LoRA (peft, q and v): the base weights get no gradient, so autograd keeps none of the
      inputs only their gradient would need: not the norms' normalised outputs (frozen norm
      weights), the ``o_proj`` input, the MLP's inputs or the product into ``down``; the
      adapters keep their input (the norm output; under autocast a bf16 cast each; with
      dropout the dropped-out copy and its mask: bool on CUDA, fp32 noise on the CPU).

    BERT encoders (reward models on MiniLM) are counted with the same items, LayerNorm for RMSNorm.
    """
    h, ad, act = shape.hidden, shape.heads * shape.head_dim, p.act
    kv = ad if repeated_kv else shape.kv_heads * shape.head_dim
    gated = shape.gated_mlp
    if lora_modules:  # frozen base weights
        adapter_input = (
            1 if not p.casts and lora_dropout == 0 else 0
        )  # the norm output itself, shared by q's and v's adapters
        norms = 2 * FP32 * h + adapter_input * h * act
        attention = (ad + 2 * kv + ad) * act
        mlp = (3 if gated else 1) * shape.intermediate * act
    else:
        attn_inputs, mlp_inputs = (3, 2) if p.casts else (1, 1)
        norms = 2 * p.norm * h + (attn_inputs + mlp_inputs) * h * act
        attention = (ad + 2 * kv + ad + ad) * act
        mlp = (4 if gated else 2) * shape.intermediate * act
    lora = (
        lora_modules * h * ((act if (p.casts or lora_dropout > 0) else 0) + (p.dropout_mask if lora_dropout > 0 else 0))
    )
    return norms + attention + mlp + lora


def activation_bytes(
    shape: ModelShape,
    rows: int,
    tokens: int,
    p: Precision,
    *,
    checkpointing: bool = False,
    lora_modules: int = 0,
    lora_dropout: float = 0.0,
    padded_mask: bool = True,
) -> float:
    """Everything the forward pass of ``rows x tokens`` keeps for the backward pass, logits aside.

    ``L`` blocks (:func:`layer_activation_bytes`), the final norm and the head's input, and the
    ``(rows, 1, T, T)`` boolean mask transformers builds for a padded batch. Gradient
    checkpointing keeps only each block's input (the residual stream) and recomputes one block
    at a time in the backward pass.
    """
    n = rows * tokens
    layer = layer_activation_bytes(shape, p, lora_modules, lora_dropout)
    blocks = (shape.layers * shape.hidden * p.resid + layer) if checkpointing else shape.layers * layer
    final = (
        FP32 * shape.hidden if lora_modules else p.norm * shape.hidden + shape.hidden * p.act
    )  # LoRA: a frozen LM head
    return n * (blocks + final) + (rows * tokens * tokens if padded_mask else 0)


def forward_working_bytes(shape: ModelShape, rows: int, tokens: int, act: int) -> float:
    """A no-grad forward pass (generation's prefill, scoring, evaluation) keeps one block's
    tensors at a time; the largest moment is the MLP: the residual and the norm output (``2 h``)
    with gate, up and SiLU(gate) (``3 I``) alive together."""
    return rows * tokens * (2 * shape.hidden + (3 if shape.gated_mlp else 2) * shape.intermediate) * act


def logit_bytes(rows: int, positions: int, vocab: int, when: str, act: int) -> float:
    """Logits over the vocabulary at their largest moment, ``rows x positions x V`` elements.

    fp32 (the CPU): log-probs are ``logits.gather - logsumexp(logits)`` (``ops.logprobs_from_logits``).
    ``train``: the saved logits, the gather's gradient and the two temporaries of logsumexp's
    backward: 4 copies (16 bytes). ``score`` (no grad): the model's logits, their copy divided by
    the temperature and logsumexp's two temporaries: 4 copies. ``eval``: logits and 2 temporaries.
    bf16 (CUDA): logits in bf16, log-softmax upcast one row at a time; ``train`` keeps the fp32
    log-softmax (4) and builds the bf16 gradient of the logits twice (unbind, slice: 2 + 2);
    ``score``: logits and their divided copy in bf16 (2 + 2); ``eval``: the bf16 logits (2).
    """
    per_element = {
        ("train", 4): 16,
        ("score", 4): 16,
        ("eval", 4): 12,
        ("train", 2): 8,
        ("score", 2): 4,
        ("eval", 2): 2,
    }[(when, act)]
    return rows * positions * vocab * per_element


def kv_cache_bytes(shape: ModelShape, rows: int, positions: int, act: int) -> float:
    """Generation's KV cache (transformers' ``DynamicCache``): a key and a value of
    ``kv x d`` per layer, position and row: ``2 L kv d (P + N) rows`` elements."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * positions * rows * act


def adamw_bytes(trainable: int) -> float:
    """AdamW's first and second moments, fp32 (Loshchilov & Hutter 2019, Algorithm 2: m_t, v_t)."""
    return 2 * FP32 * trainable


# ------------------------------------------------------------------- the phases
@dataclass
class Estimate:
    """One configuration's memory on one device: each phase's components (bytes), and the
    CPU RAM each process holds for state offloaded from the device (``fsdp2-offload``)."""

    config: str
    phases: dict[str, dict[str, float]]
    host: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, float]:
        return {name: sum(parts.values()) for name, parts in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.totals
        return max(totals, key=totals.get)

    @property
    def peak(self) -> float:
        return max(self.totals.values())

    @property
    def breakdown(self) -> dict[str, float]:
        return self.phases[self.peak_phase]


COMPONENTS = (
    "weights",
    "gradients",
    "optimizer",
    "ddp_buckets",
    "autocast_copies",
    "gathered",
    "frozen_models",
    "activations",
    "logits",
    "kv_cache",
    "runtime",
)


def networks(setup: Setup, policy: ModelShape, reward: ModelShape | None) -> tuple[list[Network], list[Network]]:
    """What ``setup`` trains (the actor first) and what it holds frozen (``rl/trainer.load_models``):
    the policy (rm: the reward model) trained; for RL the reference (a full copy, none with
    LoRA: the adapter is switched off instead), the reward model, and PPO's value head or
    separate critic (started from the reward model, trained whole even with ``--lora``)."""
    if setup.algo == "rm":
        return [sequence_scorer(policy, True, setup.lora, setup.lora_r)], []
    value_head = policy.hidden + 1 if setup.algo == "ppo" and setup.critic == "value-head" else 0
    trained, frozen = [causal_lm(policy, True, setup.lora, setup.lora_r, value_head)], []
    if setup.rl:
        if not setup.lora:
            frozen.append(causal_lm(policy, trained=False, lora=False, lora_r=0))
        if reward is not None:
            frozen.append(sequence_scorer(reward, trained=False))
            if setup.algo == "ppo" and setup.critic == "reward-model":
                trained.append(sequence_scorer(reward, trained=True))
    return trained, frozen


def estimate(setup: Setup, policy: ModelShape, config: str, reward: ModelShape | None = None) -> Estimate:
    """Memory per device of ``setup`` on ``policy`` under ``config`` (ddp, fsdp2 or fsdp2-offload).

    ``reward``: the reward model's shape for RL (None: a Python reward function, no model), also
    the separate critic's with ``setup.critic == "reward-model"``. ``rm``: ``policy`` is the
    reward model's backbone.
    """
    p = precision(setup, config)
    n = setup.gpus
    sharded, offload = config != "ddp", config == "fsdp2-offload"
    lora_modules = 2 if setup.lora else 0  # peft's defaults: q and v
    notes: list[str] = []

    trained, frozen = networks(setup, policy, reward)

    # held for the whole run (after the optimizer's first step)
    share = 1 / n if sharded else 1.0
    weights = sum(net.params for net in trained) * FP32 * share
    optimizer = sum(adamw_bytes(net.trainable) for net in trained) * share
    grads = sum(net.trainable for net in trained) * FP32 * share
    shard_frozen = sharded and setup.frozen_models == "shard"  # rl/trainer: training.distributed.shard_frozen
    frozen_bytes = sum(net.params for net in frozen) * FP32 * (share if shard_frozen else 1.0)
    host = weights + optimizer + grads + (frozen_bytes if offload and shard_frozen else 0.0) if offload else 0.0
    base = {
        "weights": 0.0 if offload else weights,
        "optimizer": 0.0 if offload else optimizer,
        "ddp_buckets": sum(net.trainable for net in trained) * FP32 if (config == "ddp" and n > 1) else 0.0,
        "frozen_models": 0.0 if offload and shard_frozen else frozen_bytes,
        "runtime": CPU_PROCESS_BASELINE if setup.device == "cpu" else CUDA_RUNTIME,
    }

    def autocast(nets, grad: bool) -> float:
        """bf16 copies of the weights the forward passes read (cached for trained weights; saved for backward)."""
        if not p.autocast_copies:
            return 0.0
        return sum(2 * net.matmul_params for net in nets if grad or (net.trainable and not setup.lora))

    def gathered_units(net: Network, backward: bool) -> float:
        """FSDP2: the tail unit and two blocks gathered (and, in the backward pass, their unsharded gradients)."""
        if not sharded:
            return 0.0
        units = net.tail_params + 2 * net.shape.block_params
        grads_unsharded = (net.tail_params + net.shape.block_params) if backward and net.trainable else 0
        if backward and setup.grad_accum > 1 and net.trainable:  # no_sync: FSDP2 accumulates unsharded gradients
            grads_unsharded += net.trainable
        return units * p.gathered + grads_unsharded * p.gathered

    def phase(**parts: float) -> dict[str, float]:
        return {c: float(parts.get(c, base.get(c, 0.0))) for c in COMPONENTS}

    phases: dict[str, dict[str, float]] = {}

    # ---- training micro-batch: rows x tokens, logits at `positions` per row
    if setup.rl:
        rows, tokens = setup.mini_batch_size // setup.grad_accum, setup.prompt_length + setup.new_tokens
        positions = setup.new_tokens  # response_logits: only the positions predicting response tokens
        padded = False  # packed rows: the segments are the mask
    else:
        per_row = setup.list_size if setup.algo in ("rm", "dpo") else 1
        rows, tokens, positions = setup.batch_size * per_row, setup.max_length, setup.max_length
        padded = True
    accumulated = grads if setup.grad_accum > 1 and not sharded else 0.0  # earlier micro-batches' gradients
    best = None
    for net in trained:  # one network's step at a time (PPO with a separate critic: actor, then critic)
        acts = activation_bytes(
            net.shape,
            rows,
            tokens,
            p,
            checkpointing=setup.gradient_checkpointing,
            lora_modules=lora_modules,
            lora_dropout=setup.lora_dropout,
            padded_mask=padded,
        )
        logits = logit_bytes(rows, positions, net.shape.vocab, "train", p.act) if net.lm_head else 0.0
        parts = phase(
            gradients=accumulated,
            autocast_copies=autocast([net], grad=True),
            gathered=gathered_units(net, True),
            activations=acts,
            logits=logits,
        )
        if best is None or sum(parts.values()) > sum(best.values()):
            best = parts
    phases["backward"] = best
    phases["step"] = phase(gradients=0.0 if offload else grads)  # FSDP2 resharded everything after the backward pass

    actor = trained[0]
    if setup.rl:
        m = setup.batch_size * setup.samples_per_prompt  # rollout rows
        positions_all = setup.prompt_length + setup.new_tokens
        actor_gathered = actor.params * p.gathered if sharded else 0.0  # gathered() for the whole generation
        phases["generate"] = phase(
            autocast_copies=autocast([actor], grad=False),
            gathered=actor_gathered,
            kv_cache=kv_cache_bytes(policy, m, positions_all, p.act),
            activations=forward_working_bytes(policy, m, setup.prompt_length, p.act) + m * setup.prompt_length**2,
            logits=5 * m * policy.vocab * FP32,
        )  # one step's logits, log-softmax, warpers and probabilities, fp32
        # scoring runs its forward passes one after another: the policy's (reference; PPO: the actor
        # too) with its logits, the reward model's, the critic's
        policy_pass = forward_working_bytes(policy, m, positions_all, p.act)
        policy_logits = logit_bytes(m, setup.new_tokens, policy.vocab, "score", p.act)
        other = max(
            [
                forward_working_bytes(net.shape, m, positions_all, p.act)
                for net in (*frozen, *trained)
                if not net.lm_head
            ]
            or [0.0]
        )
        acts, logits = (other, 0.0) if other > policy_pass + policy_logits else (policy_pass, policy_logits)
        # PPO's old values (a value head: with the actor's logits) run the trained networks; the
        # critic-free algorithms only the frozen reference, their actor resharded after generation
        trained_forward = setup.algo == "ppo"
        # sharded frozen models gather their units during their own forward pass (one model at a time)
        frozen_gathered = max([gathered_units(net, False) for net in frozen] or [0.0]) if shard_frozen else 0.0
        phases["score"] = phase(
            autocast_copies=autocast(trained, grad=False),
            gathered=max(
                sum(gathered_units(net, False) for net in trained) if trained_forward else 0.0, frozen_gathered
            ),
            activations=acts,
            logits=logits,
        )
    elif setup.eval_batch_size:
        e, t = setup.eval_batch_size, setup.max_length
        eval_logits = logit_bytes(e, t, policy.vocab, "eval", p.act) if actor.lm_head else 0.0
        reference = causal_lm(policy, False, False, 0).params * FP32 if setup.algo == "dpo" and not setup.lora else 0.0
        phases["eval"] = phase(
            autocast_copies=autocast([actor], grad=False),
            gathered=gathered_units(actor, False),
            frozen_models=reference,
            activations=forward_working_bytes(actor.shape, e, t, p.act),
            logits=eval_logits,
        )
        if reference:
            notes.append("dpo eval: the reference policy is loaded for the KL of sampled responses (without --lora)")
    if setup.algo == "dpo":
        notes.append(
            "dpo: the reference log-probs are computed once before training by the policy itself (no second "
            "model held while training)"
        )
    if sharded and frozen:
        notes.append(
            "fsdp2: the frozen reference and reward model are "
            + (
                "sharded like the trained networks (rl --frozen-models shard)"
                if shard_frozen
                else "full copies in every process (rl --frozen-models replicate)"
            )
        )
    if setup.device == "cpu":
        notes.append(
            "cpu: the process's resident memory can exceed this: glibc keeps freed blocks in its heap (measured "
            "+0.4 GiB for one process, +1 GiB per process under FSDP2); MALLOC_MMAP_THRESHOLD_=131072 hands them back"
        )
    if offload:
        notes.append(
            "fsdp2-offload: weights, gradients and AdamW state (and sharded frozen models) live in CPU RAM "
            "(host per process)"
        )
    return Estimate(config, phases, host=host, notes=notes)
