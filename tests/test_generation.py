"""rlhfkit.generation (used by the annotation server): loading a policy and sampling from it."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.generation import ensure_pad_token, format_prompt, load_policy, sample_responses
from rlhfkit.models.tiny import EOS, PAD, build_tiny_causal_lm

PROMPTS = ["hi", "a much longer prompt than the first one", "mid-sized prompt"]




@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "lm")


@pytest.fixture(scope="module")
def policy(tiny_path):
    return load_policy(str(tiny_path))


def test_load_policy_defaults(policy):
    model, tokenizer = policy
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_load_policy_dtype(tiny_path):
    model, _ = load_policy(str(tiny_path), dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int3' is not supported; use one of fp32"):
        load_policy(str(tiny_path), dtype="int3")


def test_a_pad_token_equal_to_eos_is_replaced_with_a_warning(tmp_path):
    from transformers import AutoTokenizer

    path = build_tiny_causal_lm(tmp_path / "lm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(path)
    with pytest.warns(UserWarning, match=r"pad token was the EOS token '<\|im_end\|>'; padding with '<\|endoftext\|>'"):
        model, tokenizer = load_policy(str(path))
    assert tokenizer.pad_token == PAD and model.config.pad_token_id == tokenizer.pad_token_id


def test_a_new_pad_token_is_added_when_none_is_free(policy):
    model, tokenizer = policy
    model, tokenizer = type(model)(model.config), type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.eos_token = PAD  # <|endoftext|> is now EOS, so it cannot pad
    tokenizer.pad_token = None
    with pytest.warns(UserWarning, match=r"pad token was missing; padding with '<\|pad\|>'"):
        ensure_pad_token(model, tokenizer)
    assert tokenizer.pad_token_id == len(tokenizer) - 1 != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_shapes_and_response_only_decoding(policy):
    model, tokenizer = policy
    out = sample_responses(model, tokenizer, PROMPTS, 4, max_new_tokens=8, seed=0, batch_size=5)
    assert len(out) == 3 and all(len(r) == 4 and all(isinstance(t, str) for t in r) for r in out)
    assert not any("<|im_start|>" in t or "assistant\n" in t for r in out for t in r)


def test_seed_reproduces_and_leaves_the_global_rng_alone(policy):
    model, tokenizer = policy
    state = torch.get_rng_state()
    a = sample_responses(model, tokenizer, PROMPTS, 2, max_new_tokens=8, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == sample_responses(model, tokenizer, PROMPTS, 2, max_new_tokens=8, seed=3)
    assert a != sample_responses(model, tokenizer, PROMPTS, 2, max_new_tokens=8, seed=4)


def test_greedy_output_does_not_depend_on_batching_or_padding(policy):
    model, tokenizer = policy
    one = sample_responses(model, tokenizer, PROMPTS, 2, max_new_tokens=12, temperature=0, batch_size=1)
    six = sample_responses(model, tokenizer, PROMPTS, 2, max_new_tokens=12, temperature=0, batch_size=6)
    assert one == six
    assert all(r[0] == r[1] for r in one)  # greedy: the n samples coincide


def test_generation_stops_at_eos_and_drops_it(policy):
    model, tokenizer = policy
    enc = tokenizer([format_prompt(tokenizer, PROMPTS[0])], return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)  # the same draws sample_responses(seed=0) makes
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    tokens = out[0, enc["input_ids"].shape[1]:].tolist()
    cut = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    # Declare the token at position `cut` an end token: the response must stop right before it.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(EOS), tokens[cut]]
    try:
        (response,), = sample_responses(model, tokenizer, PROMPTS[:1], 1, max_new_tokens=10, seed=0)
    finally:
        model.generation_config.eos_token_id = saved
    assert response == tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    assert response != tokenizer.decode(tokens, skip_special_tokens=True)


def test_raw_prompts_without_the_chat_template(policy):
    model, tokenizer = policy
    assert format_prompt(tokenizer, "hello", use_chat_template=False) == "hello"
    assert format_prompt(tokenizer, "hello").startswith("<|im_start|>user\nhello")
    out = sample_responses(model, tokenizer, ["hello"], 2, max_new_tokens=4, use_chat_template=False, seed=0)
    assert len(out[0]) == 2


def test_bad_arguments(policy):
    model, tokenizer = policy
    with pytest.raises(ValueError, match="n, batch_size and max_new_tokens must be >= 1"):
        sample_responses(model, tokenizer, PROMPTS, 0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        sample_responses(model, tokenizer, PROMPTS, 1, top_p=0)
    tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="padding_side == 'left'; load the model with load_policy"):
            sample_responses(model, tokenizer, PROMPTS, 1)
    finally:
        tokenizer.padding_side = "left"
