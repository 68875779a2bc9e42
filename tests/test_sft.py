"""Supervised fine-tuning: loss masking, chat templates, packing, data errors, learning, resume, invariances, CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import ConfigError, from_dict
from rlhfkit.data.examples import IGNORE_INDEX, SFTExample, chat_segments, encode_example
from rlhfkit.data.instructions import read_sft_data
from rlhfkit.data.types import DataFormatError
from rlhfkit.errors import RunStopped, UserError
from rlhfkit.sft.cli import main
from rlhfkit.sft.data import (
    EncodedSFT,
    block_causal_mask,
    collate,
    pack_examples,
)
from rlhfkit.sft.losses import sft_loss, token_nll
from rlhfkit.sft.train import SFTConfig, model_token_nll, train_sft
from rlhfkit.tracking import read_metrics

QA = [("color of the sky?", "blue"), ("2+2?", "four"), ("capital of France?", "paris"), ("say hi", "hello there")]


@pytest.fixture(scope="module")
def lm32(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 32): big enough to memorise a handful of replies in ~150 steps."""
    from rlhfkit.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-llama-32", hidden_size=32)


@pytest.fixture(scope="module")
def tok():
    from rlhfkit.models.tiny import byte_tokenizer

    return byte_tokenizer()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def qa_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "response": r} for _ in range(8) for p, r in QA])


@pytest.fixture
def mixed_jsonl(tmp_path) -> Path:
    """24 rows of varied lengths, prompt/response and chat rows mixed."""
    rows = []
    for i in range(24):
        if i % 3 == 0:
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"count to {i % 5 + 1}"},
                        {"role": "assistant", "content": " ".join(str(k) for k in range(1, i % 5 + 2))},
                    ]
                }
            )
        else:
            rows.append({"prompt": f"repeat {'ab' * (i % 4 + 1)}", "response": "ab" * (i % 7 + 1)})
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def cfg(**kw) -> SFTConfig:
    base = dict(
        lr=1e-2,
        batch_size=8,
        eval_every=1000,
        save_every=1000,
        log_every=1,
        progress=False,
        report_to="none",
        warmup_ratio=0.0,
        scheduler="constant",
        n_samples=0,
    )
    base.update(kw)
    return from_dict(SFTConfig, base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def step_losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


def targets_text(tok, labels) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


# ----------------------------------------------------------------------- the loss
def test_token_nll_matches_brute_force_loop():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.4] = IGNORE_INDEX
    nll, mask = token_nll(logits, labels)
    expected, counted = torch.zeros(B, T - 1, dtype=torch.float64), []
    for b in range(B):
        for t in range(T - 1):
            if labels[b, t + 1] != IGNORE_INDEX:
                expected[b, t] = -torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
                counted.append((b, t))
    torch.testing.assert_close(nll, expected)
    assert mask.nonzero().tolist() == [list(c) for c in counted]
    # Exactly the counted positions receive gradient: the loss reads nothing else.
    sft_loss(nll, mask, len(counted)).backward()
    touched = (logits.grad.abs().sum(-1) > 0)[:, :-1]
    assert touched.nonzero().tolist() == [list(c) for c in counted]
    assert logits.grad[:, -1].abs().sum() == 0


def test_loss_unchanged_by_prompt_positions_changed_by_response_positions(lm32, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm32).eval()
    ex = SFTExample("What colour is the sky at noon?", "blue")
    ids, labels, _, _ = encode_example(tok, ex, max_length=256)
    data = EncodedSFT([ids], [labels], ["x"], 0)
    batch = collate(data, [[0]], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
    base = sft_loss(*token_nll(logits, batch.labels), 1.0)
    n_prompt = labels.index(next(t for t in labels if t != IGNORE_INDEX))
    noisy = logits.clone()
    noisy[:, : n_prompt - 1] += 5 * torch.randn_like(noisy[:, : n_prompt - 1])  # positions predicting prompt tokens
    torch.testing.assert_close(sft_loss(*token_nll(noisy, batch.labels), 1.0), base)
    changed_labels = batch.labels.clone()
    changed_labels[:, 1:n_prompt] = IGNORE_INDEX  # already ignored: nothing changes
    torch.testing.assert_close(sft_loss(*token_nll(logits, changed_labels), 1.0), base)
    noisy = logits.clone()
    noisy[:, n_prompt - 1] += 5 * torch.randn_like(noisy[:, n_prompt - 1])  # predicts the first reply token
    assert not torch.allclose(sft_loss(*token_nll(noisy, batch.labels), 1.0), base)


# ----------------------------------------------------------------- tokenising
def test_plain_format_masks_the_prompt_and_ends_with_eos(tok):
    ids, labels, cut, _ = encode_example(tok, SFTExample("Say hi", "hi there"), max_length=64, chat_template=False)
    n_prompt = len(tok("Say hi")["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert targets_text(tok, labels) == "hi there<|im_end|>" and not cut


def test_prompt_response_rows_see_what_generation_sees(tok):
    from rlhfkit.data.prompts import Prompt
    from rlhfkit.sampling import render_prompt

    ids, labels, _, _ = encode_example(tok, SFTExample("Say hi", "hi there"), max_length=128)
    before = tok(render_prompt(tok, Prompt("Say hi"), chat=True), add_special_tokens=False)["input_ids"]
    assert ids[: len(before)] == before  # the prompt side is exactly the sampling-time prompt
    assert all(t == IGNORE_INDEX for t in labels[: len(before)])
    assert tok.decode(ids[len(before) :]) == targets_text(tok, labels) == "hi there<|im_end|>"


def test_chat_template_trains_assistant_turns_only(tok):
    msgs = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    )
    ex = SFTExample("2+2?", "4", messages=msgs)
    ids, labels, _, split_all = encode_example(tok, ex, max_length=256)
    assert split_all
    assert tok.decode(ids) == tok.apply_chat_template(list(msgs), tokenize=False).rstrip("\n")
    assert targets_text(tok, labels) == "Hello!<|im_end|>4<|im_end|>"
    # every target token sits inside an assistant turn: brute force over positions
    for i, lab in enumerate(labels):
        turn = tok.decode(ids[:i]).rsplit("<|im_start|>", 1)[-1]  # the turn token i continues
        in_reply = turn.startswith("assistant\n") and "<|im_end|>" not in turn
        assert (lab != IGNORE_INDEX) == in_reply, (i, turn)
    _, last_only, _, _ = encode_example(tok, ex, max_length=256, assistant_turns="last")
    assert targets_text(tok, last_only) == "4<|im_end|>"


def test_template_without_prefix_renderings_falls_back_to_the_last_turn(tok, caplog):
    from rlhfkit.models.tiny import byte_tokenizer

    odd = byte_tokenizer()
    odd.chat_template = (  # hides earlier replies once a later turn follows (as templates that drop reasoning do)
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' and not loop.last %}(earlier reply){% else %}{{ message['content'] }}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    msgs = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    )
    segments, split_all = chat_segments(odd, msgs)
    assert not split_all and [s for s, target in segments if target] == ["4<|im_end|>"]
    with caplog.at_level(logging.WARNING):
        data = EncodedSFT.build([SFTExample("2+2?", "4", messages=msgs)], odd, max_length=256, what="odd.jsonl")
    assert targets_text(odd, data.labels[0]) == "4<|im_end|>"
    assert "only their final assistant turn is trained" in caplog.text


def test_long_examples_are_truncated_counted_and_kept(tok, caplog):
    long_prompt, long_reply = "p" * 300, "r" * 300
    exs = [SFTExample(long_prompt, "short"), SFTExample("hi", long_reply), SFTExample("hi", "ok")]
    with caplog.at_level(logging.WARNING):
        data = EncodedSFT.build(exs, tok, max_length=64, chat_template=False, what="long.jsonl")
    assert len(data) == 3 and data.n_truncated == 2
    assert "long.jsonl: 2 of 3 examples are longer than max_length=64 and were truncated" in caplog.text
    assert all(data.length(i) <= 64 for i in range(3))
    assert targets_text(tok, data.labels[0]) == "short<|im_end|>"  # the prompt lost its start, the reply is whole
    assert tok.decode(data.input_ids[0]).endswith("p" * 10 + "short<|im_end|>")
    assert data.labels[1][-1] != tok.eos_token_id and data.n_targets(1) >= 32  # a cut reply keeps >= half, no EOS


# ------------------------------------------------------------------- packing
def test_pack_examples_uses_every_example_once_within_max_length():
    lengths = [5, 60, 33, 12, 64, 1, 30, 31, 7, 40, 24]
    rows = pack_examples(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) == 5  # ceil(307 / 64): best-fit reaches the lower bound here
    with pytest.raises(ValueError, match="more than max_length=64"):
        pack_examples([65], 64)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_per_token_losses_as_separate_examples(lm32, tok, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm32, attn_implementation=attn).eval()
    exs = [SFTExample(p, r) for p, r in QA]
    data = EncodedSFT.build(exs, tok, max_length=128)
    rows = [[0, 1, 2], [3]]  # the second row is shorter: padding too
    packed = collate(data, rows, tok.pad_token_id, packed=True)
    with torch.no_grad():
        nll, mask = model_token_nll(model, packed, attn)
        naive, _ = token_nll(
            model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits, packed.labels
        )
        for b, row in enumerate(rows):
            start = 0
            for i in row:
                alone = collate(data, [[i]], tok.pad_token_id)
                ref, ref_mask = model_token_nll(model, alone)
                n = data.length(i)
                torch.testing.assert_close(nll[b, start : start + n - 1], ref[0], atol=1e-5, rtol=1e-5)
                assert torch.equal(mask[b, start : start + n - 1], ref_mask[0])
                assert not mask[b, start + n - 1 : start + n].any()  # the next example's first token is no target
                start += n
    assert mask.sum() == sum(data.n_targets(i) for i in range(len(data)))
    # the check has teeth: the same row without the block mask attends across examples
    assert (naive - nll).abs()[mask].max() > 1e-3


def test_block_causal_mask_brute_force():
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    m = block_causal_mask(seq_ids)[:, 0]
    for b in range(2):
        for i in range(6):
            for j in range(6):
                same = seq_ids[b, i] == seq_ids[b, j] and seq_ids[b, i] >= 0
                assert bool(m[b, i, j]) == bool((same and j <= i) or i == j), (b, i, j)


# ---------------------------------------------------------------- data errors
@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "a", "response": "b"', r"line 3: is not valid JSON .*each line must be one JSON object"),
        (
            '["a", "b"]',
            r"line 3: is array .*expected a JSON object \{\"prompt\": str, \"response\": str\} or \{\"messages\"",
        ),
        ('{"prompt": "a", "answer": "b"}', r"line 3: has no 'response' \(keys: answer, prompt\)"),
        ('{"prompt": "a", "response": 7}', r"line 3: 'response' must be a string, got number 7"),
        ('{"prompt": "a", "response": "  "}', r"line 3: 'response' is empty or only whitespace"),
        ('{"prompt": ["a"], "response": "b"}', r"line 3: 'prompt' must be a string, got array"),
        ('{"messages": []}', r"line 3: 'messages' must be a non-empty list"),
        (
            '{"messages": [{"role": "user"}]}',
            r"line 3: messages\[0\] must be an object \{\"role\": str, \"content\": str\}",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}]}',
            r"line 3: 'messages' ends with a 'user' turn; the last turn must be the assistant reply",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}',
            r"line 3: messages\[1\] is an empty assistant turn",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "response": "y"}',
            r"line 3: has both 'messages' and 'response'",
        ),
        ("", r"line 3: is empty; remove it"),
    ],
)
def test_bad_lines_name_file_line_and_problem(tmp_path, line, match):
    good = '{"prompt": "a", "response": "b"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, " + match):
        read_sft_data(path)


def test_reader_accepts_both_formats_and_missing_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "ok.jsonl",
        [
            {"response": "no prompt"},
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ],
    )
    a, b = read_sft_data(path)
    assert (a.prompt, a.response, a.messages, a.source) == ("", "no prompt", None, f"{path}:1")
    assert (b.prompt, b.response, len(b.messages)) == ("u", "a", 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sft_data(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(batch_size=0), r"option --batch-size must be >= 1, got 0"),
        (dict(lr=0.0), r"option --lr must be > 0, got 0.0"),
        (dict(eval="e.jsonl", eval_fraction=0.1), r"give either --eval FILE or --eval-fraction"),
        (dict(eval_fraction=1.5), r"option --eval-fraction must be < 1, got 1.5"),
        (dict(max_length=4), r"option --max-length must be >= 8, got 4"),
        (dict(mixed_precision="fp8"), r"option --mixed-precision got 'fp8'; choose one of auto, no, bf16"),
        (dict(packin=True), r"unknown option\(s\) 'packin'"),
    ],
)
def test_config_errors_name_the_option(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(SFTConfig, {"train": "t.jsonl", "output": "o", **bad})


# --------------------------------------------------------------- training runs
def test_tiny_model_learns_and_greedy_generation_reproduces_replies(lm32, qa_jsonl, tmp_path):
    from rlhfkit.data.prompts import Prompt
    from rlhfkit.models.policy import load_policy
    from rlhfkit.sampling import SamplingSettings, sample_texts

    out = tmp_path / "run"
    result = train_sft(
        cfg(policy=str(lm32), train=str(qa_jsonl), eval=str(qa_jsonl), output=str(out), epochs=60, lr=5e-3, n_samples=2)
    )
    rows = read_metrics(out / "metrics.jsonl")
    first_eval = next(r["eval/loss"] for r in rows if "eval/loss" in r)
    assert first_eval > 5.0 and result["eval/loss"] < 0.1, (first_eval, result)
    assert result["finished"] and result["step"] == 240
    for f in (
        "final/model.safetensors",
        "final/tokenizer.json",
        "best/config.json",
        "curves.png",
        "metrics.jsonl",
        "config.yaml",
        "samples.jsonl",
        "checkpoint/trainer_state.json",
    ):
        assert (out / f).exists(), f
    model, tokenizer = load_policy(str(out / "final"))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    replies = sample_texts(
        model, tokenizer, [Prompt(p) for p, _ in QA], 1, SamplingSettings(max_new_tokens=20, temperature=0.0), chat=True
    )
    assert [r[0] for r in replies] == [r for _, r in QA]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["generated"] for s in samples] == [s["reference"] for s in samples] == ["blue", "four"]


def test_lora_learns_and_saves_a_merged_plain_model(lm32, qa_jsonl, tmp_path, tok):
    from transformers import AutoModelForCausalLM

    from rlhfkit.sft.train import evaluate_sft

    out = tmp_path / "lora"
    result = train_sft(
        cfg(
            policy=str(lm32),
            train=str(qa_jsonl),
            eval=str(qa_jsonl),
            output=str(out),
            epochs=10,
            lora=True,
            lora_r=8,
            lora_dropout=0.0,
            lr=5e-2,
        )
    )
    first = next(r["eval/loss"] for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r)
    # Adapters on q/v of a random model with tied, small embeddings cannot sharpen the logits
    # much (full fine-tuning reaches < 0.1 above); they must still move the loss clearly.
    assert result["eval/loss"] < first - 0.15, (first, result["eval/loss"])
    saved = weights(out / "final")
    assert saved and not any("lora" in k for k in saved), "LoRA adapters are merged on save"
    base = load_file(str(lm32 / "model.safetensors"))
    assert not torch.equal(
        saved["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    torch.testing.assert_close(saved["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    merged = AutoModelForCausalLM.from_pretrained(out / "final")  # a plain causal LM that scores like the adapted one
    data = EncodedSFT.build(read_sft_data(qa_jsonl), tok, max_length=512)
    reloaded = evaluate_sft(merged, data, tok.pad_token_id, 16, "cpu")
    assert reloaded["loss"] == pytest.approx(result["eval/loss"], abs=1e-4)


def test_resume_after_stop_matches_uninterrupted_run_with_packing(lm32, mixed_jsonl, tmp_path):
    common = dict(
        policy=str(lm32),
        train=str(mixed_jsonl),
        epochs=2,
        batch_size=2,
        packing=True,
        max_length=96,
        save_every=3,
        scheduler="cosine",
        warmup_ratio=0.2,
    )
    full = tmp_path / "full"
    res = train_sft(cfg(output=str(full), **common))
    assert res["step"] >= 10, res
    split = tmp_path / "split"
    part = train_sft(cfg(output=str(split), stop_after_steps=7, **common))  # "killed" mid-epoch 1
    assert not part["finished"] and not (split / "final").exists()
    assert json.loads((split / "checkpoint" / "trainer_state.json").read_text())["step"] == 7
    train_sft(cfg(output=str(split), resume=True, **common))
    a, b = weights(full / "final"), weights(split / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert step_losses(full) == pytest.approx(step_losses(split), abs=1e-6)


def test_batch_4_x_accum_1_equals_batch_1_x_accum_4(lm32, mixed_jsonl, tmp_path):
    common = dict(policy=str(lm32), train=str(mixed_jsonl), max_steps=3, max_grad_norm=0.0)
    one, four = tmp_path / "b4", tmp_path / "b1x4"
    train_sft(cfg(output=str(one), batch_size=4, grad_accum=1, **common))
    train_sft(cfg(output=str(four), batch_size=1, grad_accum=4, **common))
    assert step_losses(one) == pytest.approx(step_losses(four), rel=1e-5)
    a, b = weights(one / "final"), weights(four / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_non_finite_loss_stops_and_keeps_good_checkpoint(lm32, qa_jsonl, tmp_path, monkeypatch):
    from rlhfkit.sft import train as T

    real, calls = T.token_nll, {"n": 0}

    def poisoned(*args, **kwargs):  # the 5th training batch produces a NaN loss
        calls["n"] += 1
        nll, mask = real(*args, **kwargs)
        return (nll * float("nan"), mask) if calls["n"] == 5 else (nll, mask)

    monkeypatch.setattr(T, "token_nll", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(
        RunStopped, match=r"non-finite loss \(nan\) at step 5 .*examples from .*qa\.jsonl:\d+.*\(step 4\) is intact"
    ):
        train_sft(cfg(policy=str(lm32), train=str(qa_jsonl), output=str(out), batch_size=4, max_steps=8, save_every=2))
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4  # the last good checkpoint, untouched by the failing step
    for name, t in load_file(str(out / "checkpoint" / "model.safetensors")).items():
        assert torch.isfinite(t).all(), name
    assert not (out / "final").exists()


def test_existing_run_needs_resume_and_chat_rows_need_a_template(lm32, qa_jsonl, tmp_path):
    c = dict(policy=str(lm32), train=str(qa_jsonl), output=str(tmp_path / "o"), max_steps=1)
    train_sft(cfg(**c))
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train_sft(cfg(**c))
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        train_sft(cfg(**{**c, "output": str(tmp_path / "new")}, resume=True))
    import shutil

    plain = Path(shutil.copytree(lm32, tmp_path / "no-template"))
    (plain / "chat_template.jinja").unlink()
    with pytest.raises(
        UserError, match="--chat-template: the tokenizer of .* has no chat template; pass --no-chat-template"
    ):
        train_sft(cfg(**{**c, "policy": str(plain), "output": str(tmp_path / "p")}, chat_template=True))
    assert not (tmp_path / "p").exists()  # refused before anything was written
    assert train_sft(cfg(**{**c, "policy": str(plain), "output": str(tmp_path / "p2")}))[
        "finished"
    ]  # default: plain text


# ------------------------------------------------------------------------ CLI
def test_cli_trains_and_reports(lm32, mixed_jsonl, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "--policy",
            str(lm32),
            "--train",
            str(mixed_jsonl),
            "--eval-fraction",
            "0.25",
            "--output",
            str(out),
            "--max-steps",
            "4",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--packing",
            "--max-length",
            "128",
            "--no-progress",
            "--report-to",
            "none",
            "--n-samples",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"model saved to {out / 'final'} after 4 steps" in printed and "eval loss" in printed
    assert (out / "final" / "model.safetensors").exists() and (out / "curves.png").exists()


def test_cli_errors_exit_2_with_the_line(lm32, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    assert main(["--policy", str(lm32), "--train", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "bad.jsonl, line 2: has no 'response'" in capsys.readouterr().err
    assert main(["--train", str(bad), "--output", str(tmp_path / "o"), "--batch-size", "0"]) == 2
    assert "option --batch-size must be >= 1" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "--packing" in capsys.readouterr().out


# ----------------------------------------------------------------------- --logprob-chunk-size
@pytest.mark.parametrize("packed", [False, True])
def test_the_loss_from_hidden_states_in_chunks_matches_the_full_logits(lm32, tok, packed):
    """``--logprob-chunk-size``: the same per-token NLL, mask and gradients as the model's full
    logits, on unpacked (padded) and packed rows, for chunk sizes below and above the row count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm32)
    exs = [SFTExample(p, r) for p, r in QA]
    data = EncodedSFT.build(exs, tok, max_length=128)
    rows = [[0, 1, 2], [3]] if packed else [[0], [1], [2], [3]]
    batch = collate(data, rows, tok.pad_token_id, packed=packed)
    params = [p for p in model.parameters() if p.requires_grad]
    want, want_mask = model_token_nll(model, batch)
    want_grads = torch.autograd.grad(sft_loss(want, want_mask, int(want_mask.sum())), params)
    for chunk in (1, 5, 4096):
        got, mask = model_token_nll(model, batch, chunk_size=chunk)
        assert torch.equal(mask, want_mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        grads = torch.autograd.grad(sft_loss(got, mask, int(mask.sum())), params)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_an_sft_run_with_a_logprob_chunk_size_ends_with_the_same_weights(lm32, mixed_jsonl, tmp_path):
    common = dict(policy=str(lm32), train=str(mixed_jsonl), max_steps=3, eval_fraction=0.2, eval_every=2)
    full, chunked = tmp_path / "full", tmp_path / "chunked"
    a_res = train_sft(cfg(output=str(full), **common))
    b_res = train_sft(cfg(output=str(chunked), logprob_chunk_size=7, **common))
    assert step_losses(chunked) == pytest.approx(step_losses(full), rel=1e-5, abs=1e-6)
    assert b_res["eval/loss"] == pytest.approx(a_res["eval/loss"], rel=1e-5)
    a, b = weights(full / "final"), weights(chunked / "final")
    start = weights(lm32)
    assert any(not torch.allclose(a[k], start[k]) for k in a if k in start)  # it did train
    for k in a:  # Adam turns a rounding-level gradient difference on a barely used embedding row into ~2e-5
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=k)
