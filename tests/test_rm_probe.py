"""The reward model's linear-probe head start (rm/probe.py): the Newton solve against a
brute-force optimiser, the features it reads against the model's own scores, the text budget,
and rm train's use of it (log line, resume, scalar-label losses, LoRA)."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.config import from_dict
from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.data.readers import read_preferences
from rlhfkit.evaluation.scores import score_texts
from rlhfkit.models import probe_fit
from rlhfkit.models.reward import RewardModel
from rlhfkit.rm import probe
from rlhfkit.rm.train import RMTrainConfig, build_model, train_reward_model


def objective(d: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    return torch.nn.functional.softplus(-(d @ w)).mean() + 0.5 * l2 * (w @ w)


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_newton_solve_matches_a_long_plain_optimiser(l2):
    g = torch.Generator().manual_seed(0)
    true = torch.randn(8, generator=g, dtype=torch.float64)
    d = torch.randn(300, 8, generator=g, dtype=torch.float64)
    d[(d @ true) < 0] *= -1  # mostly in the true order ...
    d[:60] *= -1  # ... with noise
    w, steps = probe_fit.fit_pairwise_probe(d, l2)
    assert steps < 20
    ref = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [ref], max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = objective(d, ref, l2)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(w, ref.detach(), atol=1e-6)
    w_ = w.clone().requires_grad_(True)
    objective(d, w_, l2).backward()
    assert w_.grad.abs().max() < 1e-8  # first-order optimality


def test_the_l2_must_be_positive():
    with pytest.raises(ValueError, match="l2 must be > 0"):
        probe_fit.fit_pairwise_probe(torch.ones(3, 2), 0.0)


@pytest.fixture(params=["encoder", "decoder"])
def rm_and_data(request, tiny_encoder, tiny_lm, separable_tsv):
    rm = RewardModel.from_pretrained(tiny_encoder if request.param == "encoder" else tiny_lm, max_length=32)
    data = EncodedPreferences.build(read_preferences(separable_tsv)[:20], rm.encode, 32)
    return rm, data


def test_features_are_what_the_score_layer_reads(rm_and_data):
    rm, data = rm_and_data
    layer = probe_fit.head_layer(rm)
    assert layer is not None and layer.out_features == 1
    ids = list(range(len(data.texts)))
    feats = probe_fit.head_inputs(rm, layer, data, rm.pad, ids, batch_size=7, device="cpu")
    bias = layer.bias if layer.bias is not None else 0.0
    with torch.no_grad():
        expected = score_texts(rm, data, rm.pad, batch_size=5, device="cpu")
        assert torch.allclose(feats @ layer.weight[0] + bias, expected, atol=1e-5)
    assert rm.training  # left as it was


def test_the_probe_loads_its_fit_into_the_head(rm_and_data):
    rm, data = rm_and_data
    layer = probe_fit.head_layer(rm)
    bias_before = None if layer.bias is None else layer.bias.detach().clone()
    fit = probe.init_head_from_probe(rm, data, rm.pad, l2=1e-3, max_texts=10_000, batch_size=8, device="cpu", seed=0)
    assert fit.pairs == 20 * 6 and fit.texts == len(data.texts)
    scores = score_texts(rm, data, rm.pad, batch_size=8, device="cpu")
    pairs = probe_fit.pair_indices(data, list(range(len(data))))
    accuracy = sum(bool(scores[a] > scores[b]) for a, b in pairs) / len(pairs)
    assert accuracy == pytest.approx(
        fit.train_accuracy, abs=1 / len(pairs)
    )  # the reported fit is the model's own ordering
    assert accuracy > 0.5
    if bias_before is not None:
        assert torch.equal(layer.bias, bias_before)  # pairwise objectives do not see the bias


def test_the_text_budget_takes_whole_lists(rm_and_data):
    rm, data = rm_and_data
    fit = probe.init_head_from_probe(rm, data, rm.pad, l2=1e-2, max_texts=10, batch_size=8, device="cpu", seed=0)
    assert fit.texts <= 10 and fit.texts % 4 == 0 and fit.pairs == fit.texts // 4 * 6


def cfg(**kw) -> RMTrainConfig:
    base = dict(
        lr=3e-3,
        batch_size=8,
        eval_every=1000,
        save_every=1000,
        log_every=1,
        progress=False,
        report_to="none",
        warmup_ratio=0.0,
    )
    return from_dict(RMTrainConfig, base | kw)


def test_rm_train_starts_from_the_probe_and_says_so(tiny_encoder, separable_tsv, tmp_path):
    common = dict(model=str(tiny_encoder), train=str(separable_tsv), n_train=60, max_steps=1, lr=1e-9)
    train_reward_model(cfg(output=str(tmp_path / "probe"), head_init="probe", head_lr=None, **common))
    log = (tmp_path / "probe" / "run.log").read_text()
    assert "head: linear probe on the frozen backbone, 360 pairs of 237 texts" in log  # every unique text of 60 lists
    train_reward_model(cfg(output=str(tmp_path / "random"), **common))  # the default
    assert "head: the architecture's random start (--head-init random)" in (tmp_path / "random" / "run.log").read_text()
    # after one step at a negligible learning rate, the probed head already orders the held-out lists better
    probed = json_accuracy(tmp_path / "probe")
    random = json_accuracy(tmp_path / "random")
    assert probed > random + 0.3 and probed > 0.7, (probed, random)


def json_accuracy(out) -> float:
    import json

    return json.loads((out / "eval_report.json").read_text())["pairwise_accuracy"]


def test_scalar_label_losses_keep_the_random_head(tiny_encoder, tmp_path):
    rows = tmp_path / "labels.jsonl"
    rows.write_text("".join(f'{{"prompt": "p{i}", "response": "r{i}", "score": {i % 2}}}\n' for i in range(16)))
    out = tmp_path / "run"
    train_reward_model(
        cfg(model=str(tiny_encoder), train=str(rows), loss="binary", head_init="probe", max_steps=1, output=str(out))
    )
    assert (
        "head: random start (--head-init probe fits pairs; --loss binary trains on scalar labels)"
        in (out / "run.log").read_text()
    )


def test_under_lora_the_probe_fits_the_trainable_copy(tiny_lm, separable_tsv):
    c = cfg(model=str(tiny_lm), train=str(separable_tsv), output="unused", lora=True)
    rm = build_model(c, "cpu")
    layer = probe_fit.head_layer(rm)
    assert layer is not None and layer.weight.requires_grad
    data = EncodedPreferences.build(read_preferences(separable_tsv)[:10], rm.encode, 32)
    probe.init_head_from_probe(rm, data, rm.pad, l2=1e-2, max_texts=1000, batch_size=8, device="cpu", seed=0)
    scores = score_texts(rm, data, rm.pad, batch_size=8, device="cpu")
    feats = probe_fit.head_inputs(rm, layer, data, rm.pad, list(range(len(data.texts))), batch_size=8, device="cpu")
    assert torch.allclose(feats @ layer.weight[0], scores, atol=1e-5)  # the forward pass reads the layer the probe set
