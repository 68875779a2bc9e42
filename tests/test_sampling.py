"""Prompt files, the chat-template rule, and the one sampling path every command uses."""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.data.prompts import Prompt, read_prompts
from rlhfkit.data.types import DataFormatError
from rlhfkit.decoding import categorical_draw
from rlhfkit.errors import UserError
from rlhfkit.models.policy import load_policy
from rlhfkit.models.tiny import EOS, PAD, build_tiny_causal_lm
from rlhfkit.models.tokenizers import ensure_distinct_pad, use_chat_template
from rlhfkit.sampling import (
    SamplingSettings,
    encode_queries,
    render_prompt,
    response_mask_from_eos,
    sample,
    sample_texts,
    shared_prompt_cache,
)

PROMPTS = [Prompt("hi"), Prompt("a much longer prompt than the first one"), Prompt("mid-sized prompt")]
EOS_ID, PAD_ID = 2, 0


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "lm")


@pytest.fixture(scope="module")
def policy(tiny_path):
    return load_policy(str(tiny_path))


# ------------------------------------------------------------------------ prompts
def test_read_prompts_text_jsonl_messages_and_bom(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufefffirst prompt\n\n  second  \r\n".encode("utf-8"))
    assert read_prompts(txt) == [Prompt("first prompt"), Prompt("  second  ")]  # BOM and CR dropped

    jl = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "Review:"},
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]},
    ]
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = read_prompts(jl)
    assert got[0] == Prompt("Review:")
    assert got[1].text == "hi" and got[1].messages[0] == {"role": "system", "content": "be nice"}


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"text": "x"}', "line 2: expected an object with a 'prompt'"),
        ('{"prompt": "  "}', "line 2: 'prompt' must be a non-empty string"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            "ends with an assistant turn",
        ),
    ],
)
def test_read_prompts_errors_name_the_line(tmp_path, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=match):
        read_prompts(f)


def test_read_prompts_refuses_undecodable_missing_and_empty_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        UserError, match=r"--prompts .*latin1\.txt is not UTF-8 text \(byte 0xe9 on line 1\); save it as UTF-8"
    ):
        read_prompts(bad)
    with pytest.raises(UserError, match=r"--prompts .*nowhere\.txt does not exist"):
        read_prompts(tmp_path / "nowhere.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataFormatError, match="holds no prompts"):
        read_prompts(tmp_path / "blank.txt")


# -------------------------------------------------------------- the chat-template rule
def test_one_chat_template_rule(policy, tiny_path, tmp_path):
    _, tok = policy
    assert use_chat_template(tok, None, "m") is True  # default: the template when there is one
    assert use_chat_template(tok, False, "m") is False
    plain = type(tok).from_pretrained(tiny_path)
    plain.chat_template = None
    assert use_chat_template(plain, None, "m") is False  # default without one: plain text
    with pytest.raises(
        UserError, match="--chat-template: the tokenizer of m has no chat template; pass --no-chat-template"
    ):
        use_chat_template(plain, True, "m")
    assert render_prompt(tok, Prompt("hello"), chat=False) == "hello"
    assert (
        render_prompt(tok, Prompt("hello"), chat=True) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = Prompt("x", ({"role": "user", "content": "x"},))
    assert render_prompt(tok, chat, chat=False).endswith("<|im_start|>assistant\n")  # messages always chat
    with pytest.raises(UserError, match="a prompt has 'messages' .* no chat template"):
        render_prompt(plain, chat, chat=False)


# ------------------------------------------------------------------- loading
def test_load_policy_defaults(policy, tiny_path):
    model, tokenizer = policy
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert not model.training and next(model.parameters()).dtype == torch.float32
    bf16, _ = load_policy(str(tiny_path), dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


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
        ensure_distinct_pad(tokenizer, model)
    assert tokenizer.pad_token_id == len(tokenizer) - 1 != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


# ------------------------------------------------------------------ sampling
def test_encode_queries_left_pads_and_keeps_the_end_of_long_prompts(policy):
    _, tok = policy
    ids, mask = encode_queries(tok, ["abcdef", "xy"], max_prompt_length=4, chat=False)
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert tok.decode(ids[0]) == "cdef" and ids[1, 0] == PAD_ID


def test_response_mask_includes_the_first_eos_and_nothing_after():
    ids = torch.tensor(
        [
            [5, 6, EOS_ID, 7, EOS_ID],  # EOS at 2: tokens after it are not the response
            [5, 6, 7, 8, 9],  # cut at the length limit: all real
            [EOS_ID, 5, 5, 5, 5],  # empty response: the EOS alone is real
            [5, PAD_ID, 6, EOS_ID, PAD_ID],  # a sampled pad id before EOS is a real token
        ]
    )
    mask, ended = response_mask_from_eos(ids, [EOS_ID])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert ended.tolist() == [True, False, True, True]


def test_sampled_responses_are_pad_after_eos(policy):
    model, tok = policy
    eos_ids = list(range(3, 120))  # most bytes end the response: EOS shows up early and often
    ids, mask = encode_queries(tok, ["hello there", "a"], 64, chat=False)
    torch.manual_seed(0)
    response_ids = sample(model, tok, ids, mask, SamplingSettings(max_new_tokens=12), eos_ids)
    rmask, ended = response_mask_from_eos(response_ids, eos_ids)
    assert ended.all()
    assert (response_ids[rmask == 0] == PAD_ID).all()
    assert response_ids.shape[1] <= 12


def test_sample_texts_shapes_and_response_only_decoding(policy):
    model, tokenizer = policy
    out = sample_texts(
        model, tokenizer, PROMPTS, 4, SamplingSettings(max_new_tokens=8), chat=True, seed=0, batch_size=5
    )
    assert len(out) == 3 and all(len(r) == 4 and all(isinstance(t, str) for t in r) for r in out)
    assert not any("<|im_start|>" in t or "assistant\n" in t for r in out for t in r)


def test_seed_reproduces_and_leaves_the_global_rng_alone(policy):
    model, tokenizer = policy
    settings = SamplingSettings(max_new_tokens=8)
    state = torch.get_rng_state()
    a = sample_texts(model, tokenizer, PROMPTS, 2, settings, chat=True, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == sample_texts(model, tokenizer, PROMPTS, 2, settings, chat=True, seed=3)
    assert a != sample_texts(model, tokenizer, PROMPTS, 2, settings, chat=True, seed=4)


def test_greedy_output_does_not_depend_on_batching_or_padding(policy):
    model, tokenizer = policy
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    one = sample_texts(model, tokenizer, PROMPTS, 2, greedy, chat=True, batch_size=1)
    six = sample_texts(model, tokenizer, PROMPTS, 2, greedy, chat=True, batch_size=6)
    assert one == six
    assert all(r[0] == r[1] for r in one)  # greedy: the n samples coincide


def test_a_repeated_prompt_is_computed_once_and_samples_as_before(policy, monkeypatch):
    model, tok = policy
    texts = ["hello there", "a", "hello there", "a", "a mid-sized one"]  # left padding of three lengths
    ids, mask = encode_queries(tok, texts, 64, chat=False)
    assert shared_prompt_cache(model, ids[[0, 1, 4]], mask[[0, 1, 4]]) is None  # all distinct: nothing to share
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        cache = shared_prompt_cache(model, ids, mask)
    finally:
        hook.remove()
    assert rows == [(3, ids.shape[1] - 1)]  # one prefill row per distinct prompt, all but its last token
    assert cache.get_seq_length() == ids.shape[1] - 1
    greedy = SamplingSettings(max_new_tokens=10, temperature=0)
    eos_ids = list(range(100, 110))
    shared = sample(model, tok, ids, mask, greedy, eos_ids)
    monkeypatch.setattr("rlhfkit.sampling.shared_prompt_cache", lambda *a: None)
    assert torch.equal(shared, sample(model, tok, ids, mask, greedy, eos_ids))
    assert torch.equal(shared[0], shared[2]) and torch.equal(shared[1], shared[3])


def test_generation_stops_at_eos_and_drops_it(policy):
    model, tokenizer = policy
    text = render_prompt(tokenizer, PROMPTS[0], chat=True)
    ids, mask = encode_queries(tokenizer, [text], 64, chat=True)
    torch.manual_seed(0)  # the same draws sample_texts(seed=0) makes
    tokens = sample(model, tokenizer, ids, mask, SamplingSettings(max_new_tokens=10), [-1])[0].tolist()  # no EOS
    cut = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    # Declare the token at position `cut` an end token: the response must stop right before it.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(EOS), tokens[cut]]
    try:
        ((response,),) = sample_texts(
            model, tokenizer, PROMPTS[:1], 1, SamplingSettings(max_new_tokens=10), chat=True, seed=0
        )
    finally:
        model.generation_config.eos_token_id = saved
    assert response == tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    assert response != tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize(
    "settings, allowed",
    [
        (SamplingSettings(temperature=1.0), [0, 1, 2, 3, 4, 5]),
        (SamplingSettings(temperature=0.5), [0, 1, 2, 3, 4, 5]),
        (SamplingSettings(temperature=1.0, top_k=2), [4, 5]),
        (SamplingSettings(temperature=1.0, top_p=0.75), [3, 4, 5]),  # the smallest set of top tokens holding >= 0.75
    ],
)
def test_the_sampler_draws_from_the_filtered_softmax(settings, allowed):
    """Exponential-race draws: frequencies over 40,000 rows match the (renormalised, filtered)
    softmax of logits / temperature, and filtered tokens never come up."""
    logits = torch.log(torch.tensor([0.02, 0.05, 0.08, 0.15, 0.3, 0.4]))
    scores = logits.repeat(40_000, 1)  # (M, V)
    torch.manual_seed(0)
    tokens = categorical_draw(scores, settings, torch.rand(scores.shape))  # (M,)
    counts = torch.bincount(tokens, minlength=6).double() / 40_000
    expected = torch.zeros(6, dtype=torch.float64)
    p = torch.softmax(logits.double() / settings.temperature, -1)[allowed]
    expected[allowed] = p / p.sum()
    assert (counts[[i for i in range(6) if i not in allowed]] == 0).all()
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)  # ~4 standard errors at 40,000 draws


def test_empty_prompt_is_refused_with_a_fix(policy):
    model, tokenizer = policy
    with pytest.raises(UserError, match="prompt 0 .* encodes to no tokens"):
        encode_queries(tokenizer, [""], 8, chat=True)
