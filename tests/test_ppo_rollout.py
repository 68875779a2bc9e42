"""Rollouts: the log-probs of the sampling distribution, and masking invariance of logprobs, values and scores."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.ops import logprobs_from_logits
from rlhfkit.rl.critic import ActorCritic, Critic
from rlhfkit.rl.rewards import compute_rewards
from rlhfkit.rl.rollout import score_rollout
from rlhfkit.sampling import encode_queries, response_mask_from_eos

EOS, PAD = 2, 0


def load_lm(path, seed_offset: float | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if seed_offset is not None:  # a second, different model on the same vocabulary
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(seed_offset * torch.randn(p.shape, generator=g))
    return model, tok


def text_reward(prompts, responses):
    """A deterministic function of the exact texts, so any change in them shows."""
    return torch.tensor([float(sum(map(ord, p + "|" + r)) % 997) for p, r in zip(prompts, responses)])


def test_rollout_logprobs_are_those_of_the_sampling_distribution(tiny_lm):
    """old_logprobs = log softmax(logits / T) at the sampled tokens, as generate sampled them."""
    model, tok = load_lm(tiny_lm)
    ids, mask = encode_queries(tok, ["the cat sat", "hi"], 64, chat=False)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=6,
        min_new_tokens=6,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    response_ids = out.sequences[:, ids.shape[1] :]
    expected = logprobs_from_logits(torch.stack(out.logits, 1) / 0.7, response_ids)
    r = score_rollout(
        ActorCritic(model),
        model,
        text_reward,
        tok,
        ["a", "b"],
        ids,
        mask,
        response_ids,
        torch.ones_like(response_ids),
        temperature=0.7,
        eos_ids=[EOS],
    )
    torch.testing.assert_close(r.old_logprobs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.ref_logprobs, expected, atol=1e-5, rtol=0)  # reference = same weights here


# ------------------------------------------------------------- masking invariance
@pytest.fixture
def actor_critic_pair(tiny_lm, tmp_path):
    """Both critics, with non-trivial values: a random value head, and a critic from a (random) reward model."""
    from rlhfkit.models.reward import RewardModel

    actor, tok = load_lm(tiny_lm)
    with_head = ActorCritic(actor)
    torch.manual_seed(3)
    torch.nn.init.normal_(with_head.value_head.summary.weight)
    rm = RewardModel.from_pretrained(tiny_lm)
    torch.nn.init.normal_(rm.hf_model.score.weight)
    separate = ActorCritic(load_lm(tiny_lm)[0], Critic(rm.hf_model))
    ref, _ = load_lm(tiny_lm, seed_offset=0.05)
    return tok, ref, {"value-head": with_head.eval(), "critic": separate.eval()}


@pytest.mark.parametrize("kind", ["value-head", "critic"])
def test_left_padding_and_post_eos_tokens_change_nothing(actor_critic_pair, kind):
    tok, ref, models = actor_critic_pair
    model = models[kind]
    q = tok("the cat", add_special_tokens=False)["input_ids"]
    long_q = tok("a much longer prompt here", add_special_tokens=False)["input_ids"]
    resp = tok("xyz", add_special_tokens=False)["input_ids"] + [EOS]  # 4 real tokens incl. EOS

    def run(queries, responses, n):
        P = max(len(x) for x in queries)
        qi = torch.tensor([[PAD] * (P - len(x)) + x for x in queries])
        qm = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in queries])
        ri = torch.tensor([x + [PAD] * (n - len(x)) for x in responses])
        rm, _ = response_mask_from_eos(ri, [EOS])
        texts = [tok.decode(x) for x in queries]
        return score_rollout(model, ref, text_reward, tok, texts, qi, qm, ri, rm, temperature=1.0, eos_ids=[EOS])

    alone = run([q], [resp], 4)
    # the same row next to a longer prompt (3+ tokens of left padding), with garbage after its EOS
    garbage = resp + [77, 88, 99, EOS, 5]
    batched = run([long_q, q], [tok("hello", add_special_tokens=False)["input_ids"], garbage], 9)
    assert batched.response_mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    for name in ("old_logprobs", "ref_logprobs", "old_values"):
        a, b = getattr(alone, name)[0], getattr(batched, name)[1, :4]
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)
        assert (getattr(batched, name)[1, 4:] == 0).all(), f"{name} is not zero after EOS"
    assert alone.responses[0] == batched.responses[1] == "xyz"
    assert alone.scores[0] == batched.scores[1]
    assert not torch.equal(alone.old_logprobs, alone.ref_logprobs)  # the reference really is another model


def test_score_lands_on_the_last_real_token_eos_included(actor_critic_pair):
    """With the rollout's mask, the score is rewarded at the EOS slot, or at the last token when cut."""
    tok, ref, models = actor_critic_pair
    ri = torch.tensor([[10, 11, EOS, PAD, PAD], [10, 11, 12, 13, 14]])  # ended at 2; cut at the limit
    rm, ended = response_mask_from_eos(ri, [EOS])
    qi = torch.tensor([[20, 21], [PAD, 22]])
    qm = (qi != PAD).long()
    r = score_rollout(
        models["value-head"],
        ref,
        lambda p, s: torch.tensor([3.0, -2.0]),
        tok,
        ["a", "b"],
        qi,
        qm,
        ri,
        rm,
        temperature=1.0,
        eos_ids=[EOS],
    )
    assert r.ended.tolist() == [True, False] and ended.tolist() == [True, False]
    rewards, kl = compute_rewards(r.scores, r.old_logprobs, r.ref_logprobs, r.response_mask, kl_coef=0.0)
    assert rewards.tolist() == [[0, 0, 3.0, 0, 0], [0, 0, 0, 0, -2.0]]


def test_lora_reference_is_the_actor_with_its_adapter_off(tiny_lm):
    """No second copy of the weights: the reference pass runs the LoRA actor with the adapter disabled."""
    from peft import LoraConfig, get_peft_model

    actor, tok = load_lm(tiny_lm)
    base, _ = load_lm(tiny_lm)
    n_base = sum(p.numel() for p in base.parameters())
    lora = get_peft_model(
        actor, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B starts at 0 (adapter = identity): make it matter
            torch.nn.init.normal_(p)
    model = ActorCritic(lora).eval()
    qi, qm = encode_queries(tok, ["the cat", "a dog ran"], 64, chat=False)
    ri = torch.tensor([[10, 11, 12, EOS], [13, 14, 15, 16]])
    rm, _ = response_mask_from_eos(ri, [EOS])
    r = score_rollout(model, None, text_reward, tok, ["a", "b"], qi, qm, ri, rm, temperature=1.0, eos_ids=[EOS])
    expected_ref = score_rollout(
        ActorCritic(base), base, text_reward, tok, ["a", "b"], qi, qm, ri, rm, temperature=1.0, eos_ids=[EOS]
    ).old_logprobs
    torch.testing.assert_close(r.ref_logprobs, expected_ref, atol=1e-5, rtol=0)
    assert (r.old_logprobs - r.ref_logprobs).abs().max() > 1e-3
    n_model = sum(p.numel() for p in model.parameters())
    n_extra = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "value_head" in n)
    assert n_model == n_base + n_extra  # one copy of the base weights


# ----------------------------------------------------- old log-probs from the sampling pass
def test_sampling_pass_logprobs_equal_a_forward_pass(tiny_lm):
    """The saving: old_logprobs recorded while sampling are those of a forward pass over the
    finished sequences (what the PPO ratio divides by), on every real token, early EOS included."""
    from rlhfkit.models.logprobs import policy_logprobs
    from rlhfkit.sampling import SamplingSettings, sample

    model, tok = load_lm(tiny_lm)
    # a repeated prompt: its rows start from one shared prefill (sampling.shared_prompt_cache)
    ids, mask = encode_queries(tok, ["the cat sat", "hi", "a longer prompt here", "hi", "the cat sat"], 64, chat=False)
    eos_ids = [EOS, *range(40, 46)]  # some rows end early
    torch.manual_seed(0)
    response_ids, sampled = sample(
        model, tok, ids, mask, SamplingSettings(max_new_tokens=10, temperature=0.7), eos_ids, with_logprobs=True
    )
    rmask, ended = response_mask_from_eos(response_ids, eos_ids)
    assert ended.any() and not ended.all()
    full_ids, full_mask = torch.cat([ids, response_ids], 1), torch.cat([mask, rmask], 1)
    forward = policy_logprobs(model, full_ids, full_mask, response_ids, 0.7)
    real = rmask.bool()
    torch.testing.assert_close(sampled[real], forward[real], atol=2e-5, rtol=0)


def test_an_update_from_sampling_pass_logprobs_equals_one_from_a_forward_pass(tiny_lm, tmp_path):
    from safetensors.torch import load_file

    from rlhfkit.config import from_dict
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rl.trainer import PPOConfig, train_ppo

    RewardModel.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(8)))
    weights = {}
    for source in ("sampling", "forward"):
        out = tmp_path / source
        train_ppo(
            from_dict(
                PPOConfig,
                dict(
                    policy=str(tiny_lm),
                    reward=str(tmp_path / "rm"),
                    critic="reward-model",
                    prompts=str(prompts),
                    output=str(out),
                    max_steps=2,
                    batch_size=8,
                    mini_batch_size=4,
                    max_new_tokens=6,
                    lr=1e-3,
                    rollout_logprobs=source,
                    seed=3,
                    progress=False,
                    report_to="none",
                    sample_every=0,
                    cpu=True,
                ),
            )
        )
        weights[source] = load_file(str(out / "final" / "model.safetensors"))
    for k in weights["forward"]:
        torch.testing.assert_close(weights["sampling"][k], weights["forward"][k], rtol=1e-4, atol=1e-6, msg=k)
