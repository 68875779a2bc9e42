"""Reward sources: functions, reward-model folders (re-tokenised text), classifiers, dispatch."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.rl.reward_sources import (
    REWARD_SOURCES,
    ClassifierSource,
    FunctionSource,
    RewardModelSource,
    RewardOptions,
    RewardSourceError,
    load_reward_source,
    register_reward_source,
)


@pytest.fixture
def reward_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(
        "def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
        "def too_few(prompts, responses):\n    return [1.0]\n"
        "def has_nan(prompts, responses):\n    return [float('nan')] * len(responses)\n"
        "NOT_A_FUNCTION = 3\n",
        encoding="utf-8",
    )
    return f


@pytest.fixture(scope="module")
def tiny_rm_dirs(tiny_lm, tiny_encoder, tmp_path_factory):
    """A decoder reward model on the policy's tokenizer, and an encoder one on MiniLM's WordPiece."""
    from rlhfkit.models.reward import RewardModel

    root = tmp_path_factory.mktemp("rms")
    torch.manual_seed(0)
    RewardModel.from_pretrained(tiny_lm).save_pretrained(root / "dec")
    RewardModel.from_pretrained(tiny_encoder).save_pretrained(root / "enc")
    return root / "dec", root / "enc"


def test_function_source_from_file_and_module(reward_file, monkeypatch):
    src = load_reward_source(f"{reward_file}:length")
    assert isinstance(src, FunctionSource)
    assert src(["p", "q"], ["ab", ""]).tolist() == [2.0, 0.0]
    monkeypatch.syspath_prepend(str(reward_file.parent))
    src = load_reward_source("my_rewards:length")
    assert src(["p"], ["abc"]).dtype == torch.float32


@pytest.mark.parametrize(
    "fn, match",
    [
        ("too_few", "returned 1 scores for 2 responses"),
        ("has_nan", "non-finite scores"),
    ],
)
def test_function_source_output_is_checked(reward_file, fn, match):
    src = load_reward_source(f"{reward_file}:{fn}")
    with pytest.raises(RewardSourceError, match=match):
        src(["a", "b"], ["x", "y"])


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("missing/file.py:f", "file missing/file.py does not exist"),
    ],
)
def test_function_source_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        load_reward_source(spec)


def test_function_source_needs_a_function(reward_file):
    with pytest.raises(ConfigError, match="has no function 'NOT_A_FUNCTION'"):
        load_reward_source(f"{reward_file}:NOT_A_FUNCTION")


def test_reward_model_source_reencodes_text_with_its_own_tokenizer(tiny_lm, tiny_rm_dirs):
    """Policy tokens -> text -> the RM's WordPiece ids; scores equal the RM's own scoring of the text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rl.critic import ActorCritic
    from rlhfkit.rl.rollout import encode_queries, response_mask_from_eos, score_rollout

    _, enc_dir = tiny_rm_dirs
    src = load_reward_source(str(enc_dir))
    assert isinstance(src, RewardModelSource) and src.model.meta.kind == "encoder"
    policy_tok = AutoTokenizer.from_pretrained(tiny_lm)
    policy = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    prompts = ["great movie", "the plot was"]
    qi, qm = encode_queries(policy_tok, prompts, 64, chat=False)
    texts = [" loved it", " dull and slow"]
    ids = [policy_tok(t, add_special_tokens=False)["input_ids"] + [2] for t in texts]
    n = max(map(len, ids))
    ri = torch.tensor([x + [0] * (n - len(x)) for x in ids])
    rm_mask, _ = response_mask_from_eos(ri, [2])
    r = score_rollout(
        ActorCritic(policy), policy, src, policy_tok, prompts, qi, qm, ri, rm_mask, temperature=1.0, eos_ids=[2]
    )
    assert r.responses == texts
    rm = RewardModel.from_pretrained(enc_dir)
    torch.testing.assert_close(r.scores, rm.score(prompts, texts), atol=1e-6, rtol=0)
    # the two tokenizers really differ: the RM never sees the policy's byte ids
    assert rm.encode(prompts[0], texts[0])[0]["input_ids"] != qi[0].tolist() + ids[0]


def test_reward_model_source_scores_are_independent_of_batch_padding(tiny_rm_dirs):
    dec_dir, _ = tiny_rm_dirs
    src = load_reward_source(str(dec_dir))
    alone = src(["p"], ["short"])
    batched = src(["p", "another prompt"], ["short", "a much, much longer response than the first"])
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def three_label_classifier(tiny_encoder, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("clf") / "sentiment"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder,
        num_labels=3,
        id2label={0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"},
        label2id={"NEGATIVE": 0, "NEUTRAL": 1, "POSITIVE": 2},
    )
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(path)
    return path


@pytest.mark.parametrize("transform", ["logit", "logit-diff", "prob", "logprob"])
def test_classifier_source_reads_the_chosen_label(three_label_classifier, transform):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = load_reward_source(str(three_label_classifier), RewardOptions(label="positive", transform=transform))
    assert isinstance(src, ClassifierSource) and src.label_index == 2
    prompts, responses = ["The film", "I think"], [" was wonderful.", " it is bad"]
    tok = AutoTokenizer.from_pretrained(three_label_classifier)
    model = AutoModelForSequenceClassification.from_pretrained(three_label_classifier).eval()
    with torch.no_grad():
        z = model(**tok([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True)).logits
    expected = {
        "logit": z[:, 2],
        "logit-diff": z[:, 2] - z[:, :2].amax(-1),
        "prob": z.softmax(-1)[:, 2],
        "logprob": z.log_softmax(-1)[:, 2],
    }[transform]
    torch.testing.assert_close(src(prompts, responses), expected, atol=1e-5, rtol=0)


def test_classifier_source_unknown_label(three_label_classifier):
    with pytest.raises(ConfigError, match=r"has labels \['NEGATIVE', 'NEUTRAL', 'POSITIVE'\]"):
        ClassifierSource(str(three_label_classifier), RewardOptions(label="joy"))


def test_a_causal_lm_is_not_a_reward(tiny_lm):
    with pytest.raises(ConfigError, match="not a reward model or sequence classifier"):
        load_reward_source(str(tiny_lm))


def test_registered_kinds_dispatch_by_prefix(tiny_rm_dirs, monkeypatch):
    dec_dir, _ = tiny_rm_dirs
    assert isinstance(load_reward_source(f"rm:{dec_dir}"), RewardModelSource)
    calls = []

    def human(spec, options):
        calls.append(spec)
        return lambda prompts, responses: torch.zeros(len(responses))

    monkeypatch.setitem(REWARD_SOURCES, "human", None)
    register_reward_source("human", human)
    src = load_reward_source("human")
    assert calls == [""] and src(["p"], ["r"]).tolist() == [0.0]
