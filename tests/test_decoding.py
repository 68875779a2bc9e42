"""The decode loop (rlhfkit.decoding): the plain loop it replaces, generate's greedy output,
rows that leave the batch at their EOS, and the errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlhfkit.decoding import SamplingSettings, categorical_draw, decode
from rlhfkit.errors import UserError
from rlhfkit.models.logprobs import policy_logprobs
from rlhfkit.models.policy import load_policy
from rlhfkit.models.tiny import build_tiny_causal_lm
from rlhfkit.sampling import encode_queries, response_mask_from_eos, shared_prompt_cache

# Prompts of three lengths (left padding), one repeated (the shared-prompt prefill).
TEXTS = ["hello there", "a", "a mid-sized prompt", "hello there", "xyz"]
EOS_IDS = list(range(60, 100))  # many bytes end a response: rows end at different steps
GREEDY_EOS_IDS = [67, 92]  # the tiny model greedily repeats one token per prompt: two of them end


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return load_policy(str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "lm")))


def plain_loop(model, tok, texts, settings, uniforms, eos_ids):
    """The brute-force reference: each row alone, no padding, no cache, the whole sequence
    through the model at every step; step ``t`` draws with row ``i``'s slice of ``uniforms[t]``."""
    ids, logprobs = [], []
    temperature = settings.temperature if settings.temperature > 0 else 1.0
    for i, text in enumerate(texts):
        seq = tok(text, add_special_tokens=False)["input_ids"]
        row, row_lp = [], []
        for t in range(settings.max_new_tokens):
            logits = model(input_ids=torch.tensor([seq + row])).logits[:, -1].float()  # (1, V)
            lp = torch.log_softmax(logits / temperature, dim=-1)
            if settings.temperature > 0:
                token = int(categorical_draw(logits, settings, uniforms[t][i : i + 1], lp))
            else:
                token = int(logits.argmax())
            row.append(token)
            row_lp.append(float(lp[0, token]))
            if token in eos_ids:
                break
        ids.append(row)
        logprobs.append(row_lp)
    return ids, logprobs


def rows_of(decoded, eos_ids):
    mask, _ = response_mask_from_eos(decoded.response_ids, eos_ids)
    ids = [[t for t, m in zip(r, k) if m] for r, k in zip(decoded.response_ids.tolist(), mask.tolist())]
    lps = [[x for x, m in zip(r, k) if m] for r, k in zip(decoded.logprobs.tolist(), mask.tolist())]
    return ids, lps, mask


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(max_new_tokens=12, temperature=1.0),
        SamplingSettings(max_new_tokens=12, temperature=0.7, top_k=20),
        SamplingSettings(max_new_tokens=12, temperature=1.3, top_p=0.8),
        SamplingSettings(max_new_tokens=12, temperature=0),
    ],
)
@pytest.mark.parametrize("compact_fraction", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_decode_equals_the_plain_loop(policy, settings, compact_fraction, shared):
    model, tok = policy
    ids, mask = encode_queries(tok, TEXTS, 64, chat=False)
    torch.manual_seed(0)
    uniforms = [torch.rand(len(TEXTS), len(tok)) for _ in range(settings.max_new_tokens)]  # decode's draws, in order
    eos_ids = EOS_IDS if settings.temperature > 0 else GREEDY_EOS_IDS
    want_ids, want_lps = plain_loop(model, tok, TEXTS, settings, uniforms, eos_ids)
    torch.manual_seed(0)
    got = decode(
        model,
        ids,
        mask,
        settings,
        eos_ids,
        tok.pad_token_id,
        with_logprobs=True,
        prompt_cache=shared_prompt_cache(model, ids, mask) if shared else None,
        compact_fraction=compact_fraction,
    )
    got_ids, got_lps, rmask = rows_of(got, eos_ids)
    assert got_ids == want_ids
    assert len({len(r) for r in want_ids}) > 1  # rows ended at different steps
    for g, w in zip(got_lps, want_lps):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), atol=1e-5, rtol=0)
    assert (got.response_ids[rmask == 0] == tok.pad_token_id).all() and (got.logprobs[rmask == 0] == 0).all()
    assert got.response_ids.shape[1] == max(len(r) for r in want_ids)  # stops when the last row ends


@torch.no_grad()
def test_sampled_logprobs_equal_a_forward_pass(policy):
    model, tok = policy
    ids, mask = encode_queries(tok, TEXTS, 64, chat=False)
    torch.manual_seed(1)
    got = decode(
        model,
        ids,
        mask,
        SamplingSettings(max_new_tokens=10, temperature=0.8),
        EOS_IDS,
        tok.pad_token_id,
        with_logprobs=True,
    )
    rmask, _ = response_mask_from_eos(got.response_ids, EOS_IDS)
    forward = policy_logprobs(
        model, torch.cat([ids, got.response_ids], 1), torch.cat([mask, rmask], 1), got.response_ids, 0.8
    )
    real = rmask.bool()
    torch.testing.assert_close(got.logprobs[real], forward[real], atol=1e-5, rtol=0)


@torch.no_grad()
def test_greedy_decode_equals_generate(policy):
    model, tok = policy
    ids, mask = encode_queries(tok, TEXTS, 64, chat=False)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=GREEDY_EOS_IDS,
        pad_token_id=tok.pad_token_id,
    )[:, ids.shape[1] :]
    got = decode(model, ids, mask, SamplingSettings(max_new_tokens=12, temperature=0), GREEDY_EOS_IDS, tok.pad_token_id)
    assert torch.equal(got.response_ids, out)
    assert (out == tok.pad_token_id).any()  # some rows ended early


@torch.no_grad()
def test_ended_rows_leave_the_batch_and_change_no_token(policy):
    model, tok = policy
    ids, mask = encode_queries(tok, TEXTS * 4, 64, chat=False)  # (20, P)
    runs = {}
    for fraction in (0.0, 0.25, 1.0):
        torch.manual_seed(3)
        runs[fraction] = decode(
            model, ids, mask, SamplingSettings(max_new_tokens=16), EOS_IDS, tok.pad_token_id, compact_fraction=fraction
        )
    M, N = runs[1.0].response_ids.shape
    rmask, _ = response_mask_from_eos(runs[1.0].response_ids, EOS_IDS)
    assert runs[1.0].row_steps == M * N  # generate's cost: every row until the last ends
    assert runs[0.0].row_steps == int(rmask.sum())  # each row run exactly as long as its response
    assert runs[0.0].row_steps < runs[0.25].row_steps < runs[1.0].row_steps
    assert torch.equal(runs[0.0].response_ids, runs[1.0].response_ids)
    assert torch.equal(runs[0.25].response_ids, runs[1.0].response_ids)


def test_a_model_without_a_kv_cache_is_refused(policy):
    model, tok = policy

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None):
            return SimpleNamespace(logits=model(input_ids=input_ids).logits, cache=None)

    ids, mask = encode_queries(tok, TEXTS[:2], 64, chat=False)
    with pytest.raises(UserError, match=r"the policy \(NoCache\) returned no KV cache"):
        decode(NoCache(), ids, mask, SamplingSettings(max_new_tokens=4), EOS_IDS, tok.pad_token_id)
