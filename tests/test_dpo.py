"""DPO from rank lists: the losses against hand computation and their plain loops, the
encode-once batch against naive pair expansion, the cached reference, learning, resume,
invariances, every preference format, LoRA, and ``rm eval`` / ``score`` on a DPO run."""

from __future__ import annotations

import contextlib
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.config import from_dict
from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.data.examples import pad_right, policy_encoder
from rlhfkit.data.prompts import Prompt
from rlhfkit.data.readers import read_preferences
from rlhfkit.data.types import PreferenceExample
from rlhfkit.dpo.evaluate import sampled_kl
from rlhfkit.dpo.losses import dpo_loss, ipo_loss, list_losses, listwise_dpo_loss
from rlhfkit.dpo.train import REFERENCE_FILE, DPOConfig, micro_loss, train_dpo
from rlhfkit.errors import UserError
from rlhfkit.evaluation.scores import score_texts
from rlhfkit.losses import plackett_luce_loss
from rlhfkit.models.implicit_reward import DPO_INFO
from rlhfkit.models.logprobs import SequenceLogprobs
from rlhfkit.models.policy import load_policy
from rlhfkit.sampling import SamplingSettings
from rlhfkit.tracking import read_metrics
from tests.conftest import step_losses, weights


def cfg(**kw) -> DPOConfig:
    # cpu_matmul torch: one kernel in every run, so runs compared bit for bit cannot differ by auto's timing choice
    base = dict(
        lr=1e-2,
        batch_size=8,
        eval_every=1000,
        save_every=1000,
        log_every=1,
        progress=False,
        report_to="none",
        warmup_ratio=0.0,
        eval_kl_prompts=0,
        cpu_matmul="torch",
    )
    base.update(kw)
    return from_dict(DPOConfig, base)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# ------------------------------------------------------------------------- the losses
def test_losses_match_hand_computed_values():
    logprobs, ref = torch.tensor([[-1.0, -2.0, -4.0]]), torch.tensor([[-1.5, -1.5, -1.5]])  # h = 0.5, -0.5, -2.5
    ranks, mask = torch.tensor([[0, 1, 2]]), torch.ones(1, 3)
    # DPO, beta 1: -log sigmoid(h_w - h_l) over the pairs (0,1), (0,2), (1,2) = log(1 + e^-d), d = 1, 3, 2
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3)) + math.log1p(math.exp(-2))) / 3
    assert dpo_loss(logprobs, ref, ranks, mask, beta=1.0).item() == pytest.approx(expected, rel=1e-6)
    # beta scales the difference: beta 0.1 -> d = 0.1, 0.3, 0.2
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(-0.3)) + math.log1p(math.exp(-0.2))) / 3
    assert dpo_loss(logprobs, ref, ranks, mask, beta=0.1).item() == pytest.approx(expected, rel=1e-6)
    # IPO, tau 1, lengths 1, 2, 5: h/n = 0.5, -0.25, -0.5; (d - 1/2)^2 for d = 0.75, 1.0, 0.25
    ipo = ipo_loss(logprobs, ref, ranks, mask, beta=1.0, response_lengths=torch.tensor([[1, 2, 5]]))
    assert ipo.item() == pytest.approx((0.25**2 + 0.5**2 + 0.25**2) / 3, rel=1e-6)
    # listwise, beta 1: Plackett-Luce over 0 > 1 > 2, two choices
    expected = ((lse(0.5, -0.5, -2.5) - 0.5) + (lse(-0.5, -2.5) + 0.5)) / 2
    assert listwise_dpo_loss(logprobs, ref, ranks, mask, beta=1.0).item() == pytest.approx(expected, rel=1e-6)
    # n-choose-1 (slot 1 chosen): the softmax cross-entropy of the choice
    choice = listwise_dpo_loss(logprobs, ref, torch.tensor([[1, 0, 1]]), mask, beta=1.0)
    assert choice.item() == pytest.approx(lse(0.5, -0.5, -2.5) + 0.5, rel=1e-6)
    # a tie at the top (Breslow): both tied responses are chosen from the whole pool
    tie = listwise_dpo_loss(logprobs, ref, torch.tensor([[0, 0, 1]]), mask, beta=1.0)
    assert tie.item() == pytest.approx(((lse(0.5, -0.5, -2.5) - 0.5) + (lse(0.5, -0.5, -2.5) + 0.5)) / 2, rel=1e-6)


def random_lists(b: int = 16, k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs, ref = -20 * torch.rand(b, k, generator=g), -20 * torch.rand(b, k, generator=g)
    ranks = torch.randint(0, 3, (b, k), generator=g)  # many ties
    ranks[: b // 2] = torch.stack([torch.randperm(k, generator=g) for _ in range(b // 2)])  # half strict
    mask = torch.ones(b, k)
    for row in range(b):
        mask[row, int(torch.randint(1, k + 1, (1,), generator=g)) :] = 0  # 1..K real slots
    lengths = torch.randint(1, 30, (b, k), generator=g)
    return logprobs, ref, ranks, mask, lengths


def plain_loss(loss: str, logprobs, ref, ranks, mask, beta, lengths) -> list[float]:
    """The loops kept in the losses' docstrings."""
    out = []
    for b in range(logprobs.shape[0]):
        real = [k for k in range(logprobs.shape[1]) if mask[b][k]]
        h = {k: float(logprobs[b][k] - ref[b][k]) for k in real}
        pairs = [(w, lo) for w in real for lo in real if ranks[b][w] < ranks[b][lo]]
        if loss == "dpo":
            terms = [-F.logsigmoid(torch.tensor(beta * (h[w] - h[lo]), dtype=torch.float64)).item() for w, lo in pairs]
        elif loss == "ipo":
            terms = [
                (h[w] / float(lengths[b][w]) - h[lo] / float(lengths[b][lo]) - 1 / (2 * beta)) ** 2 for w, lo in pairs
            ]
        else:
            terms = [
                lse(*[beta * h[j] for j in real if ranks[b][j] >= ranks[b][i]]) - beta * h[i]
                for i in real
                if any(ranks[b][j] > ranks[b][i] for j in real)
            ]
        out.append(sum(terms) / len(terms) if terms else 0.0)
    return out


@pytest.mark.parametrize("loss", ["dpo", "ipo", "listwise"])
def test_vectorised_losses_match_their_plain_loops(loss):
    logprobs, ref, ranks, mask, lengths = random_lists()
    got = list_losses(loss, logprobs.double(), ref.double(), ranks, mask, 0.3, lengths)
    assert got.tolist() == pytest.approx(
        plain_loss(loss, logprobs.double(), ref.double(), ranks, mask, 0.3, lengths), rel=1e-9, abs=1e-12
    )


def test_listwise_equals_dpo_at_k2_and_plackett_luce_on_strict_lists():
    logprobs, ref, _, _, _ = random_lists(b=32, k=2, seed=1)
    ranks, mask = torch.stack([torch.randperm(2) for _ in range(32)]), torch.ones(32, 2)
    torch.testing.assert_close(
        listwise_dpo_loss(logprobs, ref, ranks, mask, 0.5, reduction="none"),
        dpo_loss(logprobs, ref, ranks, mask, 0.5, reduction="none"),
    )
    logprobs, ref, _, _, _ = random_lists(b=8, k=5, seed=2)
    ranks, mask = torch.stack([torch.randperm(5) for _ in range(8)]), torch.ones(8, 5)
    torch.testing.assert_close(
        listwise_dpo_loss(logprobs, ref, ranks, mask, 0.5, reduction="none"),
        plackett_luce_loss(0.5 * (logprobs - ref), ranks, mask, reduction="none"),
    )


@pytest.mark.parametrize("loss", ["dpo", "ipo", "listwise"])
def test_padded_slots_get_zero_gradient_and_never_nan(loss):
    logprobs, ref, ranks, mask, lengths = random_lists(seed=3)
    logprobs = logprobs.masked_fill(mask == 0, float("nan")).requires_grad_(True)
    ref = ref.masked_fill(mask == 0, float("inf"))
    per_list = list_losses(loss, logprobs, ref, ranks, mask, 0.2, lengths)
    per_list.sum().backward()
    assert torch.isfinite(per_list).all() and torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[mask == 0] == 0).all()
    tied = (ranks == ranks[:, :1]).all(dim=1) | (mask.sum(1) < 2)  # lists with no comparison: 0, no gradient
    assert (per_list[tied] == 0).all() and (logprobs.grad[tied] == 0).all()


# ------------------------------------------------------------ batches and the reference
EXAMPLES = [
    PreferenceExample("say something", ("good good apple", "good river", "stone", "cloud cloud paper"), (0, 1, 2, 3)),
    PreferenceExample("tell me", ("quiet table", "light"), (0, 1)),
    PreferenceExample("ask", ("north", "bread bread", "music"), (0, 1, 1)),  # a tie: no pair between the last two
]


def test_encode_once_batch_gives_the_loss_and_gradients_of_naive_pair_expansion(tiny_lm):
    policy, tok = load_policy(str(tiny_lm))
    model = SequenceLogprobs(policy)
    data = EncodedPreferences.build(EXAMPLES, policy_encoder(tok, True, 64), 64)
    assert len(data.texts) == 9  # 9 sequences, where pair expansion forwards 2 * (6 + 1 + 2) = 18
    pad = partial(pad_right, tok.pad_token_id)
    ref = -20 - 5 * torch.rand(len(data.texts), generator=torch.Generator().manual_seed(0))
    params = [p for p in policy.parameters() if p.requires_grad]

    loss, _ = micro_loss(model, data, ref, pad, "dpo", 0.1, "cpu", 1 / len(EXAMPLES), ([0, 1, 2], True))
    grads = torch.autograd.grad(loss, params)

    naive = []
    for j, ex in enumerate(EXAMPLES):  # every pair on its own: chosen and rejected forwarded separately
        per_pair = []
        for w, lo in ex.ordered_pairs():
            tw, tl = data.lists[j][w], data.lists[j][lo]
            lw, ll = model(**pad([data.texts[tw]])), model(**pad([data.texts[tl]]))
            per_pair.append(-F.logsigmoid(0.1 * ((lw - ref[tw]) - (ll - ref[tl]))).squeeze())
        naive.append(torch.stack(per_pair).mean())
    naive_loss = torch.stack(naive).mean()
    naive_grads = torch.autograd.grad(naive_loss, params)
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_sequence_logprobs_count_response_tokens_only(tiny_lm):
    policy, tok = load_policy(str(tiny_lm))
    model = SequenceLogprobs(policy)
    encode, pad = policy_encoder(tok, False, 64), partial(pad_right, tok.pad_token_id)
    (a, n_a, _), (b, _, _) = encode("a long prompt here", "yes"), encode("other", "yes")
    assert sum(a["response_mask"]) == sum(b["response_mask"]) == 4  # "yes" + EOS
    with torch.no_grad():
        both = model(**pad([a, b]))
        logits = policy(input_ids=torch.tensor([a["input_ids"]])).logits[0]
        brute = sum(torch.log_softmax(logits[t - 1], -1)[a["input_ids"][t]] for t in range(n_a, len(a["input_ids"])))
    torch.testing.assert_close(both[0], brute, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], both[1])  # same response, different prompt: conditioned on the prompt


def test_learns_separable_lists_from_log_2_with_the_cached_reference(tiny_lm, separable_tsv, tmp_path):
    out = tmp_path / "run"
    result = train_dpo(
        cfg(policy=str(tiny_lm), train=str(separable_tsv), n_train=90, output=str(out), epochs=3, eval_kl_prompts=2)
    )
    assert result["finished"] and result["eval/pairwise_accuracy"] > 0.9, result
    assert step_losses(out)[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert result["eval/logps_margin"] > result["eval/ref_logps_margin"] and result["eval/kl"] > 0
    assert json.loads((out / "final" / DPO_INFO).read_text())["reference"] == str(Path(tiny_lm).resolve())
    assert (out / "best" / DPO_INFO).is_file() and (out / "curves.png").is_file()

    cached = load_file(str(out / REFERENCE_FILE))  # equals a fresh pass of the reference
    policy, tok = load_policy(str(tiny_lm))
    train_ex = read_preferences(separable_tsv)[:90]
    data = EncodedPreferences.build(train_ex, policy_encoder(tok, True, 512), 512)
    fresh = score_texts(SequenceLogprobs(policy), data, partial(pad_right, tok.pad_token_id), 7, "cpu")
    torch.testing.assert_close(cached["train"], fresh, rtol=1e-5, atol=1e-5)
    assert cached["eval"].shape == (120,)


def test_kl_is_zero_against_itself_and_uses_the_samples(tiny_lm):
    policy, tok = load_policy(str(tiny_lm))
    prompts = [Prompt("hello"), Prompt("good day")]
    kl = sampled_kl(
        policy,
        lambda: contextlib.nullcontext(policy),
        tok,
        prompts,
        SamplingSettings(max_new_tokens=8),
        chat=True,
        batch_size=2,
        seed=0,
    )
    assert kl["kl"] == pytest.approx(0.0, abs=1e-6) and kl["kl_response_tokens"] > 0


def test_resume_reuses_the_reference_and_matches_the_uninterrupted_run(tiny_lm, separable_tsv, tmp_path, monkeypatch):
    from rlhfkit.dpo import train as T

    common = dict(
        policy=str(tiny_lm),
        train=str(separable_tsv),
        n_train=64,
        epochs=2,
        batch_size=8,
        save_every=3,
        scheduler="cosine",
        warmup_ratio=0.2,
    )
    full, split = tmp_path / "full", tmp_path / "split"
    train_dpo(cfg(output=str(full), **common))
    part = train_dpo(cfg(output=str(split), stop_after_steps=5, **common))
    assert not part["finished"] and (split / REFERENCE_FILE).is_file()

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again on --resume")

    monkeypatch.setattr(T, "score_texts", no_second_pass)
    train_dpo(cfg(output=str(split), resume=True, **common))
    a, b = weights(full / "final"), weights(split / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert step_losses(full) == pytest.approx(step_losses(split), abs=1e-6)


def test_batch_4_x_accum_1_equals_batch_1_x_accum_4(tiny_lm, separable_tsv, tmp_path):
    common = dict(policy=str(tiny_lm), train=str(separable_tsv), max_steps=3, max_grad_norm=0.0, loss="listwise")
    one, four = tmp_path / "b4", tmp_path / "b1x4"
    train_dpo(cfg(output=str(one), batch_size=4, grad_accum=1, **common))
    train_dpo(cfg(output=str(four), batch_size=1, grad_accum=4, **common))
    assert step_losses(one) == pytest.approx(step_losses(four), rel=1e-5)
    a, b = weights(one / "final"), weights(four / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


# ------------------------------------------------------------------ formats and errors
def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "fmt, loss", [("pairs", "ipo"), ("hh", "dpo"), ("choice", "listwise"), ("ranked", "listwise"), ("ranked", "dpo")]
)
def test_every_preference_format_trains(fmt, loss, tiny_lm, tmp_path):
    rows = []
    for i in range(8):
        if fmt == "pairs":
            rows.append({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"})
        elif fmt == "hh":
            start = f"\n\nHuman: q{i}\n\nAssistant:"
            rows.append({"chosen": start + f" good {i}", "rejected": start + f" bad {i}"})
        elif fmt == "choice":
            rows.append({"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}", f"c{i}"], "choice": i % 3})
        else:
            rows.append(
                {
                    "prompt": f"q{i}",
                    "responses": [f"a{i}", f"b{i}", f"c{i}"],
                    "ranks": [0, 0, 1] if i % 2 else [0, 1, 2],
                }
            )
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    result = train_dpo(
        cfg(
            policy=str(tiny_lm),
            train=str(data),
            output=str(tmp_path / "o"),
            max_steps=2,
            batch_size=4,
            loss=loss,
            allow_ties=fmt == "ranked",
            eval_fraction=0.25,
            eval_kl_prompts=1,
        )
    )
    assert result["finished"] and math.isfinite(result["train/loss"]) and "eval/kl" in result


def test_scored_rows_and_bad_files_are_refused_like_rm_train(tiny_lm, tmp_path):
    scored = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "response": "a", "score": 1.0}] * 4)
    with pytest.raises(UserError, match=r"s\.jsonl:1: DPO learns from comparisons"):
        train_dpo(cfg(policy=str(tiny_lm), train=str(scored), output=str(tmp_path / "o"), max_steps=1))
    ties = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 0, 1]}])
    with pytest.raises(UserError, match=r"t\.jsonl, line 1: .*allow_ties"):
        train_dpo(cfg(policy=str(tiny_lm), train=str(ties), output=str(tmp_path / "o"), max_steps=1))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ LoRA and CLI
def test_lora_reference_is_the_disabled_adapter_and_export_is_merged(tiny_lm, separable_tsv, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    result = train_dpo(
        cfg(
            policy=str(tiny_lm),
            train=str(separable_tsv),
            n_train=90,
            output=str(out),
            max_steps=6,
            lora=True,
            lora_r=4,
            lr=5e-2,
            eval_kl_prompts=2,
        )
    )
    assert result["eval/kl"] != 0.0 and step_losses(out)[0] == pytest.approx(math.log(2), abs=1e-5)
    policy, tok = load_policy(str(tiny_lm))
    data = EncodedPreferences.build(read_preferences(separable_tsv)[:90], policy_encoder(tok, True, 512), 512)
    fresh = score_texts(SequenceLogprobs(policy), data, partial(pad_right, tok.pad_token_id), 16, "cpu")
    torch.testing.assert_close(load_file(str(out / REFERENCE_FILE))["train"], fresh, rtol=1e-5, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(out / "final")  # a plain causal LM, adapter merged
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_cli_trains_then_rm_eval_and_score_read_the_run(tiny_lm, separable_tsv, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "dpo",
            "--policy",
            str(tiny_lm),
            "--train",
            str(separable_tsv),
            "--n-train",
            "90",
            "--output",
            str(out),
            "--epochs",
            "2",
            "--lr",
            "1e-2",
            "--batch-size",
            "8",
            "--eval-kl-prompts",
            "0",
            "--no-progress",
            "--report-to",
            "none",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0 and "policy saved to" in printed and "implicit-reward accuracy" in printed, printed
    trained = json.loads((out / "eval_report.json").read_text())

    assert main(["rm", "eval", "--model", str(out), "--eval", str(separable_tsv), "--n-skip", "90", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_lists"] == 30  # the run's best/ export, read through its implicit reward
    best_step_metrics = [r for r in read_metrics(out / "metrics.jsonl") if "eval/pairwise_accuracy" in r]
    assert metrics["pairwise_accuracy"] == pytest.approx(
        max(r["eval/pairwise_accuracy"] for r in best_step_metrics), abs=1e-9
    )
    assert trained["eval/pairwise_accuracy"] <= metrics["pairwise_accuracy"] + 1e-9

    assert main(["score", "--model", str(out / "final"), "good good good apple river", "apple river"]) == 0
    scores = [float(x) for x in capsys.readouterr().out.split()]
    assert len(scores) == 2 and scores[0] > scores[1]


def test_hh_file_with_an_empty_chosen_answer_trains(tiny_lm, tmp_path):
    """HH-RLHF's empty preferred answers are data: DPO reads them as the end token alone, as rm train does."""
    from tests.test_rm_train import hh_rows

    train = tmp_path / "hh.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in hh_rows(12, empty_chosen=3)))
    examples = read_preferences(train)
    assert sum(r == "" for ex in examples for r in ex.responses) == 1
    out = tmp_path / "dpo"
    assert (
        main(
            [
                "dpo",
                "--policy",
                str(tiny_lm),
                "--train",
                str(train),
                "--output",
                str(out),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--lr",
                "1e-3",
                "--log-every",
                "1",
                "--eval-kl-prompts",
                "0",
                "--no-progress",
                "--report-to",
                "none",
            ]
        )
        == 0
    )
    losses = step_losses(out)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------------ --logprob-chunk-size
def test_sequence_logprobs_in_chunks_match_the_full_logits(tiny_lm):
    """``SequenceLogprobs(chunk_size=c)``: the same log pi(y|x) and the same gradients as the
    full-logits pass, on right-padded rows whose responses start at different places."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_lm)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 9))
    attention = torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 5 + [0] * 4])
    response = torch.tensor([[0] * 4 + [1] * 5, [0] * 2 + [1] * 5 + [0] * 2, [0] * 3 + [1] * 2 + [0] * 4])
    params = [p for p in policy.parameters() if p.requires_grad]
    want = SequenceLogprobs(policy)(ids, attention, response)  # (3,)
    want_grads = torch.autograd.grad(want.sum(), params)
    for chunk in (1, 4, 64):
        got = SequenceLogprobs(policy, chunk_size=chunk)(ids, attention, response)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for g, w in zip(torch.autograd.grad(got.sum(), params), want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_a_dpo_run_with_a_logprob_chunk_size_ends_with_the_same_weights(tiny_lm, separable_tsv, tmp_path):
    common = dict(policy=str(tiny_lm), train=str(separable_tsv), max_steps=3, loss="listwise", batch_size=4)
    full, chunked = tmp_path / "full", tmp_path / "chunked"
    train_dpo(cfg(output=str(full), **common))
    train_dpo(cfg(output=str(chunked), logprob_chunk_size=5, **common))
    assert step_losses(chunked) == pytest.approx(step_losses(full), rel=1e-5, abs=1e-6)
    a, b = weights(full / "final"), weights(chunked / "final")
    start = weights(Path(tiny_lm))
    assert any(not torch.allclose(a[k], start[k]) for k in a if k in start)  # it did train
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
