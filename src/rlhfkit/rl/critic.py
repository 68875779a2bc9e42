"""The actor and its critic as one module: logits and values for the response tokens.

Two critics, as the seeds describe them:

- ``value-head``: a linear head on the actor's last hidden state (the actor/critic heads of
  one network). One forward pass gives logits and values; the value loss also trains the
  shared backbone.
- a separate model (InstructGPT, arXiv:2203.02155 sec. 3.5: "we initialize the value
  function from the RM"): a decoder sequence classifier whose head, applied at every
  position, gives per-token values. It must share the policy's tokenizer, since it reads
  the policy's token ids.

Layout of every forward: ``input_ids = [query_ids | response_ids]`` of shape ``(B, P + N)``
(queries left-padded, responses right-padded), ``attention_mask`` likewise. The logits and
values for response token ``t`` are read at position ``P - 1 + t``: the state *before* the
token is chosen. Position ids come from the attention mask, so left padding shifts nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rlhfkit.config import ConfigError
from rlhfkit.models.logprobs import position_ids_from_mask, response_hidden, response_logits, response_positions
from rlhfkit.models.packing import PackedBatch, packed_kwargs
from rlhfkit.models.reward import RewardModel
from rlhfkit.ops import tempered

logger = logging.getLogger(__name__)

__all__ = ["ActorCritic", "Critic", "ValueHead", "load_critic"]


class ValueHead(nn.Module):
    """``V(s_t) = w . h_t + b`` on the actor's last hidden state; starts at 0 everywhere."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden ``(B, N, H)`` -> values ``(B, N)`` (float32)."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


class Critic(nn.Module):
    """A separate value model: a decoder ``*ForSequenceClassification`` read at every position.

    Initialised from a reward model, the value of a prefix starts as the reward model's
    score of that prefix.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str]:
        """The blocks FSDP shards one by one."""
        return list(getattr(self.model, "_no_split_modules", None) or [])

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, n_response: int, packed: PackedBatch | None = None
    ) -> Tensor:
        """Values ``(B, N)`` for the last ``N`` tokens of ``input_ids (B, P + N)`` (``packed``: as in :func:`~rlhfkit.models.logprobs.response_logits`)."""
        backbone = getattr(self.model, self.model.base_model_prefix)
        if packed is not None:
            keep = response_positions(packed, input_ids.shape[1], n_response)  # (B, N)
            hidden = backbone(**packed_kwargs(packed), use_cache=False).last_hidden_state[0, keep]  # (B, N, H)
        else:
            hidden = backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state[:, -n_response - 1 : -1]  # (B, N, H)
        return self.model.score(hidden).squeeze(-1).float()  # (B, N)


class ActorCritic(nn.Module):
    """The trained networks of PPO: the actor (a causal LM) and a value head or a critic.

    ``forward`` returns the actor's response logits divided by the sampling temperature
    (so the policy being optimised is the distribution that was sampled) and the values.
    With LoRA on the actor, :meth:`reference` disables the adapter: the same weights then
    are the frozen reference model, and no second copy is held.
    """

    def __init__(self, actor: nn.Module, critic: Critic | None = None, value_head: bool = True):
        super().__init__()
        self.actor = actor
        self.critic = critic
        self.value_head = ValueHead(_hidden_size(actor)) if critic is None and value_head else None

    @property
    def _no_split_modules(self) -> list[str]:
        """The blocks FSDP shards one by one: the actor's and the critic's."""
        names = list(getattr(self.actor, "_no_split_modules", None) or [])
        return names + [n for n in (self.critic._no_split_modules if self.critic is not None else []) if n not in names]

    # FSDP2 (accelerate) shards the embeddings and the final norm + LM head as units of their
    # own when the prepared model names them; ActorCritic names its actor's. Then the root
    # unit holds only the value head, and the actor alone (generation, reference and old
    # log-probabilities) runs without the root's parameters.
    base_model_prefix = "decoder"

    @property
    def decoder(self) -> nn.Module:
        """The actor's transformer body (its final norm is a direct child)."""
        actor = self.actor.get_base_model() if hasattr(self.actor, "get_base_model") else self.actor
        return actor.base_model

    def get_input_embeddings(self) -> nn.Module:
        return self.actor.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.actor.get_output_embeddings()

    @property
    def has_values(self) -> bool:
        """False for the critic-free algorithms: no value network is built or held."""
        return self.critic is not None or self.value_head is not None

    @property
    def is_lora(self) -> bool:
        return hasattr(self.actor, "disable_adapter")

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        n_response: int,
        temperature: float = 1.0,
        packed: PackedBatch | None = None,
        hidden_only: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``(logits (B, N, V), values (B, N))`` for the response tokens of ``input_ids (B, P + N)``
        (values 0 without a value network). ``hidden_only``: the actor's last hidden states
        ``(B, N, H)`` instead of the logits (``rl --logprob-chunk-size``; the temperature is then the caller's)."""
        if hidden_only:
            hidden = response_hidden(self.actor, input_ids, attention_mask, n_response, packed=packed)  # (B, N, H)
            if self.value_head is not None:
                return hidden, self.value_head(hidden)
            if self.critic is not None:
                return hidden, self.critic(input_ids, attention_mask, n_response, packed=packed)
            return hidden, torch.zeros(hidden.shape[:2], device=hidden.device)
        logits, hidden = response_logits(
            self.actor, input_ids, attention_mask, n_response, output_hidden=self.value_head is not None, packed=packed
        )
        if self.value_head is not None:
            values = self.value_head(hidden)  # (B, N)
        elif self.critic is not None:
            values = self.critic(input_ids, attention_mask, n_response, packed=packed)  # (B, N)
        else:
            values = torch.zeros(logits.shape[:2], device=logits.device)
        return tempered(logits, temperature), values

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference policy: the actor with its LoRA adapter disabled."""
        if not self.is_lora:
            raise RuntimeError(
                "ActorCritic.reference() needs a LoRA actor; without LoRA keep a frozen copy of the policy"
            )
        with self.actor.disable_adapter():
            yield self.actor

    def critic_parameters(self) -> list[nn.Parameter]:
        module = self.critic if self.critic is not None else self.value_head
        return [p for p in module.parameters() if p.requires_grad] if module is not None else []

    def actor_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.actor.parameters() if p.requires_grad]


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


def load_critic(spec: str, policy_tokenizer, *, reward: str | None, policy: str) -> Critic | None:
    """The critic ``--critic`` names: ``None`` for ``value-head``, else a :class:`Critic`.

    ``reward-model`` starts from the ``--reward`` folder (InstructGPT), ``policy`` from the
    policy's weights with a new zero head, anything else from that model folder or hub id.
    """

    if spec == "value-head":
        return None
    source = {"reward-model": reward, "policy": policy}.get(spec, spec)
    if source is None:
        raise ConfigError("--critic reward-model needs --reward to be a reward-model folder")
    rm = RewardModel.from_pretrained(source, option=f"--critic {spec}")
    if rm.meta.kind != "decoder":
        raise ConfigError(
            f"--critic {spec}: {source} is an encoder ({rm.hf_model.config.model_type}); a critic must be a decoder "
            "that reads the policy's tokens. Use --critic value-head, or --critic policy."
        )
    if rm.tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise ConfigError(
            f"--critic {spec}: {source} has a different tokenizer than the policy, but the critic reads the policy's "
            "token ids to value each response token. Use --critic value-head, --critic policy, or a reward model "
            "trained from the policy's base model."
        )
    if spec == "policy":  # a fresh head: start every value at 0, like the value head
        nn.init.zeros_(rm.hf_model.score.weight)
    rm.hf_model.config.pad_token_id = policy_tokenizer.pad_token_id
    return Critic(rm.hf_model)
