"""Packed batches with shared prefixes give the padded batch's outputs and gradients, and a
PPO update run on them equals the padded one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlhfkit.models.logprobs import response_logits
from rlhfkit.models.packing import (
    pack,
    packed_kwargs,
    packing_unsupported,
    use_packed_attention,
)
from rlhfkit.rl.critic import ActorCritic, Critic
from rlhfkit.rl.rollout import pack_rows


def gqa_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama with grouped-query attention (4 heads, 2 key/value heads), like SmolLM2."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def batch(prefix: list[int], query_tails: list[list[int]], responses: list[list[int]]):
    """Queries left-padded, responses right-padded: (input_ids, attention_mask, query_mask)."""
    q = [prefix + t for t in query_tails]
    P, N, M = max(map(len, q)), max(map(len, responses)), len(q)
    ids = torch.zeros(M, P + N, dtype=torch.long)
    am = torch.zeros(M, P + N, dtype=torch.long)
    for i in range(M):
        ids[i, P - len(q[i]) : P], am[i, P - len(q[i]) : P] = torch.tensor(q[i]), 1
        ids[i, P : P + len(responses[i])], am[i, P : P + len(responses[i])] = torch.tensor(responses[i]), 1
    return ids, am, am[:, :P], N


CASES = {
    "shared system prompt": (
        [5, 6, 7, 8, 9],
        [[10, 11], [12], [13, 14, 15], [10, 11]],
        [[20, 21, 22], [23], [24, 25], [26, 27, 28]],
    ),
    "nothing shared": ([], [[10, 11], [12], [13, 14, 15]], [[20, 21], [23, 24, 25], [26]]),
    "identical prompts": ([5, 6, 7], [[8], [8], [8]], [[20, 21], [22], [23, 24, 25]]),
}


@pytest.mark.parametrize("case", CASES)
def test_packed_logits_and_gradients_equal_the_padded_batch(case):
    model = gqa_model()
    ids, am, qm, _ = batch(*CASES[case])
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    padded = model(input_ids=ids, attention_mask=am, position_ids=pos).logits  # (M, T, V)
    use_packed_attention(model)
    packed_batch = pack_rows(qm, ids, am)
    assert packed_batch.length < int(am.sum()) or case == "nothing shared"  # the shared prefix is computed once
    assert packed_batch.length <= int(am.sum())
    packed = model(**packed_kwargs(packed_batch)).logits[0]  # (L, V)
    real = am.bool()
    torch.testing.assert_close(packed[packed_batch.index[real]], padded[real], atol=1e-5, rtol=1e-5)
    loss_padded = (padded.log_softmax(-1)[..., 3] * am).sum()
    loss_packed = (packed[packed_batch.index.clamp(min=0)].log_softmax(-1)[..., 3] * am).sum()
    grads = [torch.autograd.grad(loss, list(model.parameters())) for loss in (loss_padded, loss_packed)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)  # unpacked use still works


def test_pack_layout_root_groups_and_limits():
    ids, am, qm, _ = batch([5, 6], [[7, 8, 9], [7, 8, 10], [11, 12, 13]], [[1], [2], [3]])
    b = pack(ids, am, groups=[[0, 1], [2]], share_until=qm.sum(1))
    # all rows share 5 6 (the root); rows 0 and 1 further share 7 8 (their group), row 2 nothing more
    assert [(s.start, s.end, s.parent) for s in b.segments] == [
        (0, 2, None),
        (2, 4, 0),
        (4, 6, 1),
        (6, 8, 1),
        (8, 12, 0),
    ]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 2, 3, 4, 5]
    assert b.index[0].tolist()[-6:] == [0, 1, 2, 3, 4, 5] and b.index[1].tolist()[-6:] == [0, 1, 2, 3, 6, 7]
    assert b.index[2].tolist()[-6:] == [0, 1, 8, 9, 10, 11]
    same = pack(ids[:1].repeat(3, 1), am[:1].repeat(3, 1), groups=[[0, 1, 2]], share_until=qm.sum(1))
    assert [s.end - s.start for s in same.segments] == [4, 2, 2, 2]  # each row keeps its last query token


def test_a_three_level_tree_gives_the_padded_outputs():
    """Group-sampled RL: a system prompt shared by all, a prompt shared by its K samples."""
    model = gqa_model()
    prefix = [5, 6, 7]
    ids, am, qm, _ = batch(prefix, [[8, 9], [8, 9], [10, 11, 12], [10, 11, 12]], [[20, 21], [22], [23, 24, 25], [26]])
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    padded = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    use_packed_attention(model)
    b = pack(ids, am, groups=[[0, 1], [2, 3]], share_until=qm.sum(1))
    assert len({s.parent for s in b.segments}) == 4  # none (the root), the root, two prompt groups
    packed = model(**packed_kwargs(b)).logits[0]
    real = am.bool()
    torch.testing.assert_close(packed[b.index[real]], padded[real], atol=1e-5, rtol=1e-5)
    # gradients reach the root through every grandchild (one split per tensor, joined by autograd)
    loss_padded = (padded.log_softmax(-1)[..., 3] * am).sum()
    loss_packed = (packed[b.index.clamp(min=0)].log_softmax(-1)[..., 3] * am).sum()
    grads = [torch.autograd.grad(loss, list(model.parameters())) for loss in (loss_padded, loss_packed)]
    for a, g in zip(*grads):
        torch.testing.assert_close(g, a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("critic", ["value-head", "separate"])
def test_response_logits_and_values_are_the_same_packed(critic):
    actor = gqa_model(0)
    ids, am, qm, N = batch(*CASES["shared system prompt"])
    separate = None
    if critic == "separate":
        from transformers import LlamaForSequenceClassification

        config = LlamaConfig(**{**gqa_model(1).config.to_dict(), "num_labels": 1, "pad_token_id": 0})
        torch.manual_seed(1)
        separate = Critic(LlamaForSequenceClassification(config).eval())
    ac = ActorCritic(actor, separate)
    if ac.value_head is not None:
        torch.nn.init.normal_(ac.value_head.summary.weight)
    logits, values = ac(ids, am, N, 0.7)
    use_packed_attention(actor)
    if separate is not None:
        use_packed_attention(separate.model)
    p_logits, p_values = ac(ids, am, N, 0.7, packed=pack_rows(qm, ids, am))
    real = am[:, -N:].bool()
    torch.testing.assert_close(p_logits[real], logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_values[real], values[real], atol=1e-5, rtol=1e-5)


def test_models_that_cannot_pack_say_why():
    eager = AutoModelForCausalLM.from_config(gqa_model().config, attn_implementation="eager")
    assert "eager" in packing_unsupported(eager)
    assert packing_unsupported(gqa_model()) is None
    logits, _ = response_logits(gqa_model(), *batch(*CASES["nothing shared"])[:2], 3)  # the unpacked path needs nothing
    assert logits.shape[1] == 3


def test_a_ppo_update_on_packed_rows_equals_the_padded_update(tiny_lm, tmp_path):
    from safetensors.torch import load_file

    from rlhfkit.config import from_dict
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rl.trainer import PPOConfig, train_ppo

    RewardModel.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {'x' * (i % 4)}{i}\n" for i in range(8)))  # chat template: a shared opening
    for critic in ("reward-model", "value-head"):
        weights = {}
        for packing in (True, False):
            out = tmp_path / f"{critic}-{packing}"
            train_ppo(
                from_dict(
                    PPOConfig,
                    dict(
                        policy=str(tiny_lm),
                        reward=str(tmp_path / "rm"),
                        critic=critic,
                        prompts=str(prompts),
                        output=str(out),
                        max_steps=2,
                        batch_size=8,
                        mini_batch_size=4,
                        grad_accum=2,
                        max_new_tokens=6,
                        lr=1e-3,
                        packing=packing,
                        seed=5,
                        progress=False,
                        report_to="none",
                        sample_every=0,
                        cpu=True,
                    ),
                )
            )
            weights[packing] = load_file(str(out / "final" / "model.safetensors"))
        for k in weights[False]:
            torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-6, msg=f"{critic}: {k}")
