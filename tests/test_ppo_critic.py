"""Critics: the value head and a separate critic from a reward model; what load_critic refuses."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.models.logprobs import position_ids_from_mask
from rlhfkit.rl.critic import ActorCritic, Critic, load_critic


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_value_head_starts_at_zero_and_reads_the_state_before_each_token(tiny_lm):
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    model = ActorCritic(actor).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    logits, values = model(ids, mask, n_response=2, temperature=2.0)
    assert logits.shape == (1, 2, actor.config.vocab_size) and values.shape == (1, 2)
    assert (values == 0).all()
    full = actor(ids, attention_mask=mask).logits  # (1, 5, V): position 2 predicts token 3
    torch.testing.assert_close(logits, full[:, 2:4] / 2.0, atol=1e-5, rtol=0)


def test_critic_from_a_reward_model_values_every_prefix_like_its_score(tiny_lm, tmp_path):
    from transformers import AutoTokenizer

    from rlhfkit.models.reward import RewardModel

    torch.manual_seed(0)
    RewardModel.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    critic = load_critic("reward-model", tok, reward=str(tmp_path / "rm"), policy=str(tiny_lm))
    assert isinstance(critic, Critic)
    rm = RewardModel.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        values = critic(ids, torch.ones_like(ids), n_response=2)  # (1, 2): states after tokens 0..2 and 0..3
        for t, end in enumerate((3, 4)):
            prefix = ids[:, :end]
            torch.testing.assert_close(values[0, t], rm(prefix, torch.ones_like(prefix))[0], atol=1e-5, rtol=0)


def test_critic_from_the_policy_starts_at_zero(tiny_lm):
    from transformers import AutoTokenizer

    critic = load_critic("policy", AutoTokenizer.from_pretrained(tiny_lm), reward=None, policy=str(tiny_lm))
    ids = torch.tensor([[5, 6, 7]])
    assert (critic(ids, torch.ones_like(ids), 2) == 0).all()


def test_load_critic_refusals(tiny_lm, tiny_encoder, tmp_path):
    from transformers import AutoTokenizer

    from rlhfkit.models.reward import RewardModel

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert load_critic("value-head", tok, reward=None, policy=str(tiny_lm)) is None
    with pytest.raises(ConfigError, match="--critic reward-model needs --reward to be a reward-model folder"):
        load_critic("reward-model", tok, reward=None, policy=str(tiny_lm))
    RewardModel.from_pretrained(tiny_encoder).save_pretrained(tmp_path / "enc")
    with pytest.raises(ConfigError, match="is an encoder .* a critic must be a decoder"):
        load_critic("reward-model", tok, reward=str(tmp_path / "enc"), policy=str(tiny_lm))
