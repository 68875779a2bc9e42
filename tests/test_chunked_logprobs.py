"""Log-probs and entropy from hidden states a chunk at a time equal today's path from full logits:
values and gradients (hidden states, LM head weight and bias), with padding, tied embeddings,
LoRA, packing, odd chunk sizes, and through the RL update (``rl --logprob-chunk-size``)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.config import from_dict
from rlhfkit.errors import UserError
from rlhfkit.models.chunked_logprobs import logprobs_from_hidden
from rlhfkit.models.logprobs import lm_head_weights, response_hidden, response_logits
from rlhfkit.ops import entropy_from_logits, logprobs_from_logits, masked_mean

ATOL = 1e-5


def _plain(hidden, weight, bias, labels, temperature):
    """Today's path: the full ``(B, N, V)`` logits, then ``rlhfkit.ops``."""
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature  # (B, N, V)
    return logprobs_from_logits(logits, labels), entropy_from_logits(logits)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_the_full_logits(chunk_size, temperature):
    torch.manual_seed(0)
    B, N, H, V = 3, 5, 8, 37  # 15 rows: chunks of 7 leave a ragged last chunk
    hidden = torch.randn(B, N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, N))
    mask = (torch.arange(N) < torch.tensor([5, 2, 4]).unsqueeze(1)).long()  # right padding
    a_lp, b_ent = torch.randn(B, N, dtype=torch.float64), torch.randn(B, N, dtype=torch.float64)

    def loss(lp, ent):  # both outputs feed the loss, padded positions excluded
        return masked_mean(lp * a_lp, mask) + masked_mean(ent * b_ent, mask)

    want_lp, want_ent = _plain(hidden, weight, bias, labels, temperature)
    want = torch.autograd.grad(loss(want_lp, want_ent), (hidden, weight, bias))
    got_lp, got_ent = logprobs_from_hidden(
        hidden, weight, labels, bias=bias, temperature=temperature, chunk_size=chunk_size, with_entropy=True
    )
    got = torch.autograd.grad(loss(got_lp, got_ent), (hidden, weight, bias))
    torch.testing.assert_close(got_lp, want_lp.float(), atol=ATOL, rtol=0)
    torch.testing.assert_close(got_ent, want_ent.float(), atol=ATOL, rtol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-5)


def test_log_probs_alone_and_no_bias_in_fp32():
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(29, 8, requires_grad=True)
    labels = torch.randint(0, 29, (2, 6))
    want_lp, _ = _plain(hidden, weight, None, labels, 1.0)
    want = torch.autograd.grad(want_lp.sum(), (hidden, weight))
    got_lp, entropy = logprobs_from_hidden(hidden, weight, labels, chunk_size=5)
    assert entropy is None
    got = torch.autograd.grad(got_lp.sum(), (hidden, weight))
    torch.testing.assert_close(got_lp, want_lp, atol=ATOL, rtol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-5)


def test_bad_shapes_and_chunk_sizes_say_what_to_pass():
    with pytest.raises(ValueError, match=r"labels must be hidden.shape\[:-1\]"):
        logprobs_from_hidden(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        logprobs_from_hidden(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long), chunk_size=0)


def _left_padded_batch(M: int = 3, P: int = 4, N: int = 5):
    torch.manual_seed(2)
    query_ids, response_ids = torch.randint(3, 200, (M, P)), torch.randint(3, 200, (M, N))
    query_mask = torch.ones(M, P, dtype=torch.long)
    query_mask[0, :2] = 0  # left padding
    response_mask = (torch.arange(N) < torch.tensor([5, 2, 4])[:M].unsqueeze(1)).long()
    return query_ids, query_mask, response_ids, response_mask


def _model_parity(model, chunk_size: int = 4, temperature: float = 0.8, packed=None):
    """Gradients on every trainable parameter of ``model``: chunked path vs full logits."""
    q, qm, resp, rm = _left_padded_batch()
    ids, am, N = torch.cat([q, resp], 1), torch.cat([qm, rm], 1), resp.shape[1]
    params = [p for p in model.parameters() if p.requires_grad]

    logits, _ = response_logits(model, ids, am, N, packed=packed)
    want_lp = logprobs_from_logits(logits / temperature, resp)
    want_ent = entropy_from_logits(logits / temperature)
    want = torch.autograd.grad(masked_mean(want_lp + 0.1 * want_ent, rm), params)

    hidden = response_hidden(model, ids, am, N, packed=packed)  # (M, N, H)
    weight, bias = lm_head_weights(model)
    got_lp, got_ent = logprobs_from_hidden(
        hidden, weight, resp, bias=bias, temperature=temperature, chunk_size=chunk_size, with_entropy=True
    )
    got = torch.autograd.grad(masked_mean(got_lp + 0.1 * got_ent, rm), params)
    real = rm.bool()
    torch.testing.assert_close(got_lp[real], want_lp[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_ent[real], want_ent[real], atol=ATOL, rtol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-4)


def test_a_tied_embedding_model_gets_the_same_gradients(tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    _model_parity(model)


def test_an_untied_head_with_a_bias_gets_the_same_gradients(tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, tie_word_embeddings=False)
    head = model.get_output_embeddings()
    torch.manual_seed(3)
    model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    _model_parity(model, chunk_size=3)


def test_the_onednn_linear_head_of_the_cpu_is_read_as_a_linear(tiny_lm):
    from rlhfkit.models.cpu_linear import OneDNNLinear, use_onednn_linear

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    use_onednn_linear(model)  # what --cpu-matmul onednn does to every Linear, the LM head included
    assert type(model.get_output_embeddings()) is OneDNNLinear
    _model_parity(model, chunk_size=5)


def test_a_lora_model_gets_the_same_adapter_gradients(tiny_lm):
    from rlhfkit.models.lora import with_lora
    from rlhfkit.training.options import LoraOptions

    model = with_lora(AutoModelForCausalLM.from_pretrained(tiny_lm), LoraOptions(lora_dropout=0.0), "CAUSAL_LM")
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0: give the adapters something to differentiate through
            torch.nn.init.normal_(p, std=0.1)
    assert all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    _model_parity(model, chunk_size=7)


def test_the_packed_forward_gives_the_same_gradients(tiny_lm):
    from rlhfkit.models.packing import use_packed_attention
    from rlhfkit.rl.rollout import pack_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    use_packed_attention(model)
    q, qm, resp, rm = _left_padded_batch()
    _model_parity(model, packed=pack_rows(qm, torch.cat([q, resp], 1), torch.cat([qm, rm], 1)))


def test_lora_on_the_lm_head_is_refused_naming_the_option(tiny_lm):
    from types import SimpleNamespace

    from rlhfkit.models.lora import with_lora

    opts = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target=["q_proj", "lm_head"])
    model = with_lora(AutoModelForCausalLM.from_pretrained(tiny_lm, tie_word_embeddings=False), opts, "CAUSAL_LM")
    with pytest.raises(
        UserError, match=r"--logprob-chunk-size: the model's output layer is a peft\..*Pass --logprob-chunk-size 0"
    ):
        lm_head_weights(model)


# ---------------------------------------------------------------- through the RL update
def _rollout(tiny_lm):
    from rlhfkit.models.logprobs import policy_logprobs
    from rlhfkit.rl.rollout import Rollout

    actor = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    q, qm, resp, rm = _left_padded_batch()
    M, N = resp.shape
    with torch.no_grad():
        logprobs = policy_logprobs(actor, torch.cat([q, resp], 1), torch.cat([qm, rm], 1), resp, 0.8)
    r = Rollout(
        prompts=["p"] * M,
        responses=["r"] * M,
        query_ids=q,
        query_mask=qm,
        response_ids=resp,
        response_mask=rm,
        ended=torch.ones(M, dtype=torch.bool),
        old_logprobs=(logprobs + 0.1 * torch.randn(M, N)) * rm,
        ref_logprobs=(logprobs + 0.3 * torch.randn(M, N)) * rm,
        old_values=torch.randn(M, N) * rm,
        scores=torch.randn(M),
    )
    return actor, r


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_the_rl_update_is_the_same_with_a_logprob_chunk_size(tiny_lm, tmp_path, algo):
    from rlhfkit.rl.critic import ActorCritic
    from rlhfkit.rl.trainer import RLConfig, UpdateBatch, actor_micro_loss, joint_micro_loss

    actor, r = _rollout(tiny_lm)
    M, N = r.response_mask.shape
    torch.manual_seed(4)
    advantages = torch.randn(M, N) * r.response_mask
    batch = UpdateBatch(r, advantages, advantages, kl_coef=0.3)
    rows = torch.arange(M)
    common = {
        "reward": "m:f",
        "prompts": "p.txt",
        "output": str(tmp_path / "o"),
        "algo": algo,
        "temperature": 0.8,
        "entropy_coef": 0.01,
        "packing": False,
    }
    if algo == "ppo":  # the actor with a value head: one forward pass, the joint loss
        net = ActorCritic(actor, None, value_head=True)
        torch.nn.init.normal_(net.value_head.summary.weight)
        micro_loss = joint_micro_loss
    else:  # GRPO: the actor alone, its k3 KL term in the loss
        net, micro_loss = actor, actor_micro_loss
        common["kl_penalty"] = "loss"
    params = [p for p in net.parameters() if p.requires_grad]
    results = []
    for chunk in (0, 4):
        cfg = from_dict(RLConfig, {**common, "logprob_chunk_size": chunk})
        loss, stats = micro_loss(cfg, net, batch, rows, rows)
        results.append((loss, stats, torch.autograd.grad(loss, params)))
    (loss0, stats0, grads0), (loss1, stats1, grads1) = results
    torch.testing.assert_close(loss1, loss0, atol=ATOL, rtol=1e-5)
    assert stats1.keys() == stats0.keys()
    for k in stats0:
        torch.testing.assert_close(stats1[k], stats0[k], atol=ATOL, rtol=1e-5, msg=k)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_run_with_a_logprob_chunk_size_ends_with_the_same_weights(tiny_lm, tmp_path, algo):
    """End to end (packed rows, the value head for PPO, temperature 0.8, an entropy bonus): two
    updates with ``--logprob-chunk-size 5`` end where the full-logits run ends."""
    from safetensors.torch import load_file

    from rlhfkit.rl.trainer import RLConfig, train_rl

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["red apple", "a quiet river", "green stone and bread", "north light"]) + "\n")
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def lower(prompts, responses):\n    return [sum(c.islower() for c in r) / 8 for r in responses]\n"
    )
    weights = []
    for chunk in (0, 5):
        out = tmp_path / f"run{chunk}"
        cfg = dict(
            policy=str(tiny_lm),
            reward=f"{rewards}:lower",
            prompts=str(prompts),
            output=str(out),
            algo=algo,
            max_steps=2,
            batch_size=4,
            mini_batch_size=4 if algo == "ppo" else 8,
            max_new_tokens=6,
            temperature=0.8,
            entropy_coef=0.01,
            lr=1e-2,
            sample_every=0,
            progress=False,
            report_to="none",
            save_every=1000,
            logprob_chunk_size=chunk,
        )
        train_rl(from_dict(RLConfig, cfg))
        weights.append(load_file(str(out / "final" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    start = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    assert any(not torch.allclose(weights[0][k], start[k]) for k in weights[0] if k in start)  # it did train
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-5, rtol=1e-4, msg=name)
