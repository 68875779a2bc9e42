"""Weighted preference lists: the ``weight`` field, its files, the weighted loss of ``rm train`` and
``dpo``, annotator agreement weights and ``annotate export --aggregate weighted``."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch

from rlhfkit import losses as L
from rlhfkit.annotate.agreement import annotator_weights, consensus_agreement
from rlhfkit.annotate.consensus import consensus_ranks
from rlhfkit.annotate.store import AnnotationStore, export_rankings, exported_lists
from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.data.readers import read_preferences
from rlhfkit.data.types import DataFormatError, PreferenceExample
from rlhfkit.data.writers import write_preferences
from tests.conftest import separable_lists, step_losses
from tests.conftest import weights as model_weights

# ------------------------------------------------------------------ the field and its files


def test_weight_must_be_positive_and_finite():
    assert PreferenceExample("p", ("a", "b"), (0, 1)).weight == 1.0
    for bad in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match=r"weight=.* \(x:3\) must be a positive finite number"):
            PreferenceExample("p", ("a", "b"), (0, 1), source="x:3", weight=bad)


def test_jsonl_formats_round_trip_the_weight_and_leave_unweighted_files_unchanged(tmp_path):
    lists = [
        PreferenceExample("p", ("a", "b", "c"), (0, 1, 2), weight=2.5),
        PreferenceExample("q", ("x", "y"), (0, 1)),
        PreferenceExample("r", ("u", "v", "w"), (0, 0, 1), weight=0.1),  # a tie: explicit ranks
    ]
    path = tmp_path / "w.jsonl"
    write_preferences(path, lists, "ranked")
    lines = path.read_text().splitlines()
    assert lines[0] == '{"prompt": "p", "responses": ["a", "b", "c"], "weight": 2.5}'
    assert lines[1] == '{"prompt": "q", "responses": ["x", "y"]}'  # weight 1: no key, as before
    assert read_preferences(path, allow_ties=True) == lists
    pairs = tmp_path / "pairs.jsonl"
    write_preferences(pairs, lists[:2], "pairs")
    assert [ex.weight for ex in read_preferences(pairs)] == [2.5, 2.5, 2.5, 1.0]
    with pytest.raises(
        ValueError, match=r"example 0 has weight 2.5, which plain TSV cannot store; write format 'ranked'"
    ):
        write_preferences(tmp_path / "w.tsv", lists[:1], "ranklist-tsv")


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "number 0"), ("-2", "number -2"), ('"2"', "string '2'"), ("true", "true"), ("NaN", "nan"), ("[1]", "array")],
)
def test_a_bad_weight_names_the_file_the_line_and_the_value(tmp_path, value, shown):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "responses": ["a", "b"]}\n' + f'{{"responses": ["a", "b"], "weight": {value}}}\n')
    with pytest.raises(
        DataFormatError,
        match=rf"{path}, line 2: 'weight' must be a positive finite number \(how much the list counts in training; "
        rf"1 = once\), got {shown}.*; fix the value or drop the key to weigh the list 1",
    ):
        read_preferences(path)


# ------------------------------------------------------------------ the weighted reduction


@pytest.mark.parametrize("b", [1, 3, 8, 31])
def test_weights_all_one_give_todays_loss_bit_for_bit(b):
    per_list = torch.rand(b, generator=torch.Generator().manual_seed(b), dtype=torch.float32) * 3
    for world, step_lists in ((1, b), (2, 2 * b + 1), (4, 4 * b)):
        today = per_list.sum() * (world / step_lists)
        step_weight = sum(1.0 for _ in range(step_lists))  # what the trainers sum
        assert torch.equal(L.weighted_list_sum(per_list, torch.ones(b), world / step_weight), today)


def test_weighted_list_sum_is_the_plain_loop():
    g = torch.Generator().manual_seed(0)
    per_list, w = torch.rand(7, generator=g), torch.rand(7, generator=g) + 0.1
    loop = sum(wi * li for wi, li in zip(w.tolist(), per_list.tolist())) * 0.3
    assert float(L.weighted_list_sum(per_list, w, 0.3)) == pytest.approx(loop, rel=1e-6)


LISTS = [
    ("say something", ("good good apple", "good river", "stone", "cloud cloud paper"), (0, 1, 2, 3)),
    ("tell me", ("quiet table", "light"), (0, 1)),
    ("ask", ("north", "bread bread", "music"), (0, 1, 2)),
]


def examples(weight_of_first: float, copies_of_first: int = 1) -> list[PreferenceExample]:
    first = PreferenceExample(*LISTS[0], weight=weight_of_first)
    return [first] * copies_of_first + [PreferenceExample(*x) for x in LISTS[1:]]


def grads_of(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, retain_graph=True))


def rm_micro_losses(tiny_encoder):
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rm.train import micro_loss, step_weight

    rm = RewardModel.from_pretrained(str(tiny_encoder), max_length=64)
    params = [p for p in rm.parameters() if p.requires_grad]

    def loss_of(exs, micro_batches):
        data = EncodedPreferences.build(exs, rm.encode, 64)
        scale = 1 / step_weight(data, [j for m in micro_batches for j in m])  # world 1
        return sum(micro_loss(rm, data, rm.pad, "pairwise", "cpu", scale, (m, True))[0] for m in micro_batches)

    return loss_of, params


def test_rm_weight_2_equals_the_list_twice_and_accumulation_keeps_it(tiny_encoder):
    loss_of, params = rm_micro_losses(tiny_encoder)
    weighted = loss_of(examples(2.0), [[0, 1, 2]])
    twice = loss_of(examples(1.0, copies_of_first=2), [[0, 1, 2, 3]])
    torch.testing.assert_close(weighted, twice, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_of(weighted, params), grads_of(twice, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the same step split into micro-batches (accumulation) gives the same loss and gradient
    split = loss_of(examples(2.0), [[0], [1, 2]])
    torch.testing.assert_close(split, weighted, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_of(split, params), grads_of(weighted, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # scaling every weight changes nothing: the mean is normalised by the step's total weight
    scaled = [PreferenceExample(*x, weight=w) for x, w in zip(LISTS, (6.0, 3.0, 3.0))]
    torch.testing.assert_close(loss_of(scaled, [[0, 1, 2]]), weighted, rtol=1e-6, atol=1e-7)


def test_dpo_weight_2_equals_the_list_twice(tiny_lm):
    from rlhfkit.data.examples import pad_right, policy_encoder
    from rlhfkit.dpo.train import micro_loss
    from rlhfkit.models.logprobs import SequenceLogprobs
    from rlhfkit.models.policy import load_policy

    policy, tok = load_policy(str(tiny_lm))
    model = SequenceLogprobs(policy)
    encode, pad = policy_encoder(tok, True, 64), partial(pad_right, tok.pad_token_id)
    params = [p for p in policy.parameters() if p.requires_grad]
    ref = -20 - 5 * torch.rand(9, generator=torch.Generator().manual_seed(0))

    def loss_of(exs, ids, total_weight):
        data = EncodedPreferences.build(exs, encode, 64)
        assert len(data.texts) == 9  # duplicates are encoded once: the same texts, the same reference
        return micro_loss(model, data, ref, pad, "dpo", 0.1, "cpu", 1 / total_weight, (ids, True))[0]

    weighted = loss_of(examples(2.0), [0, 1, 2], 4.0)
    twice = loss_of(examples(1.0, copies_of_first=2), [0, 1, 2, 3], 4.0)
    torch.testing.assert_close(weighted, twice, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads_of(weighted, params), grads_of(twice, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_weighted_rm_batch_8_x_accum_1_equals_batch_1_x_accum_8(tiny_lm, tmp_path):
    from rlhfkit.rm.train import train_reward_model
    from tests.test_rm_train import cfg

    data = tmp_path / "w.jsonl"
    rows = [{"responses": r, "weight": 0.25 + (i % 5) / 2} for i, r in enumerate(separable_lists(64))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = dict(model=str(tiny_lm), train=str(data), n_train=32, max_steps=3, max_grad_norm=0.0)
    one, eight = tmp_path / "b8", tmp_path / "b1x8"
    train_reward_model(cfg(output=str(one), batch_size=8, grad_accum=1, **common))
    train_reward_model(cfg(output=str(eight), batch_size=1, grad_accum=8, **common))
    assert step_losses(one) == pytest.approx(step_losses(eight), rel=1e-4)
    a, b = model_weights(one / "final"), model_weights(eight / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert "list weights: 0.25..2.25, mean" in (one / "run.log").read_text()


# ------------------------------------------------------------------ agreement weights

# Three annotators on two sets of 3 responses: a and b are careful (they differ on one pair of
# set 2), c reverses them.
HAND = [
    (1, "a", (0, 1, 2)),
    (1, "b", (0, 1, 2)),
    (1, "c", (2, 1, 0)),
    (2, "a", (0, 1, 2)),
    (2, "b", (0, 2, 1)),
    (2, "c", (2, 1, 0)),
]


def test_weighted_borda_consensus_by_hand():
    assert consensus_ranks([[0, 1, 2], [2, 1, 0]], [1.0, 0.1]) == (0, 1, 2)  # 0.2, 1.1, 2.0
    assert consensus_ranks([[0, 1, 2], [2, 1, 0]], [1.0, 1.0]) == (0, 0, 0)  # = unweighted
    assert consensus_ranks([[0, 2, 1], [2, 1, 0]], [1.0, 0.1]) == (0, 2, 1)  # 0.2, 2.1, 1.0
    with pytest.raises(ValueError, match="one positive weight per ranking"):
        consensus_ranks([[0, 1]], [0.0])


def test_annotator_weights_by_hand():
    # Round 1, every weight 1 (the plain leave-one-out agreement):
    #   a: set 1, consensus of b and reversed c ties everything -> undefined; set 2, b + c = (2, 3, 1)
    #      -> (1, 2, 0), tau(a) = (1 - 2) / 3 = -1/3.  Weight max(-1/3, 0.1) = 0.1.
    #   b: a + c ties everything on both sets -> no defined tau -> 1.
    #   c: set 1, a + b = (0, 1, 2): tau -1; set 2, a + b = (0, 3, 3) -> (0, 1, 1): tau-b = -2 / sqrt(3 * 2).
    plain = consensus_agreement(HAND)["annotators"]
    assert [x["consensus_tau"] for x in plain] == pytest.approx([-1 / 3, None, (-1 - 2 / math.sqrt(6)) / 2])
    assert annotator_weights(HAND, max_rounds=1) == pytest.approx({"a": 0.1, "b": 1.0, "c": 0.1})
    # Round 2 (a 0.1, b 1, c 0.1): a's others are now b's order (set 1: tau 1; set 2: (0, 2, 1), tau 1/3)
    #   -> 2/3; b's others still tie (0.1 a + 0.1 c) -> 1; c: -1 and -1/3 -> 0.1.
    assert annotator_weights(HAND, max_rounds=2) == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 0.1})
    # Round 3 on, the fixed point: b's others are 2/3 a + 0.1 c = a's order: set 1 tau 1, set 2 tau 1/3.
    #   a and b 2/3 each, c at the floor.
    assert annotator_weights(HAND) == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 0.1})
    assert annotator_weights(HAND, floor=0.05)["c"] == pytest.approx(0.05)
    # an annotator who shares no set keeps weight 1
    assert annotator_weights([*HAND, (3, "d", (1, 0))])["d"] == 1.0
    assert annotator_weights([]) == {}  # no shared set at all (every set ranked once): nobody to weigh
    with pytest.raises(ValueError, match=r"floor=0 must be in \(0, 1\]"):
        annotator_weights(HAND, floor=0)


# ------------------------------------------------------------------ export --aggregate weighted, read by rm train


@pytest.fixture
def hand_store(tmp_path):
    store = AnnotationStore(tmp_path / "a.db")
    store.add_prompts(["Name a fruit.", "Name a tree."])
    for name in "abc":
        store.add_user(name)
    sets = {
        1: store.add_generation_set(1, "m", ["good apple", "apple", "stone"]),
        2: store.add_generation_set(2, "m", ["good good oak", "oak", "cloud"]),
    }
    for set_id, name, ranks in HAND:
        store.add_ranking(sets[set_id], store.user_by_name(name).id, list(ranks))
    yield store
    store.close()


def test_export_weighted_is_read_back_and_trained_on(hand_store, tiny_encoder, tmp_path, capsys):
    from rlhfkit.annotate.cli import main as annotate_main
    from rlhfkit.cli import main

    rankings, _ = hand_store.list_rankings()
    lists = exported_lists(list(reversed(rankings)), "weighted")
    assert [x.annotator for x in lists] == [n for _, n, _ in HAND]
    assert [x.example.weight for x in lists] == pytest.approx([2 / 3, 2 / 3, 0.1] * 2)
    path = tmp_path / "w.jsonl"
    args = ["export", "--db", str(hand_store.path), "--aggregate", "weighted", "--output", str(path)]
    assert annotate_main(args) == 0
    assert f"wrote 6 ranking(s) to {path}" in capsys.readouterr().err
    read = read_preferences(path)
    assert [ex.weight for ex in read] == pytest.approx([2 / 3, 2 / 3, 0.1] * 2)
    assert export_rankings(hand_store, tmp_path / "hf", "hf", aggregate="weighted") == 6
    assert [ex.weight for ex in read_preferences(tmp_path / "hf")] == pytest.approx([2 / 3, 2 / 3, 0.1] * 2)
    out = tmp_path / "rm"
    rm_args = ["rm", "train", "--model", str(tiny_encoder), "--train", str(path), "--output", str(out)]
    assert main([*rm_args, "--max-steps", "2", "--batch-size", "3", "--no-progress", "--report-to", "none"]) == 0
    assert "list weights: 0.1..0.667, mean 0.478" in (out / "run.log").read_text()
    assert (out / "final" / "model.safetensors").exists()
