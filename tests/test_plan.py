"""rlhfkit plan: the parameter, optimizer, activation and KV-cache math against brute force
(models built on the meta device, a real AdamW step, the tensors autograd saves, a real
DynamicCache), invariances over processes, LoRA, and the command line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhfkit.cli import main
from rlhfkit.memory.estimate import (
    COMPONENTS,
    FP32,
    Precision,
    Setup,
    activation_bytes,
    adamw_bytes,
    estimate,
    kv_cache_bytes,
)
from rlhfkit.memory.shapes import KNOWN, decoder_shape, parse_size, resolve_shape, shape_for_size

SMOL = KNOWN["smollm2-135m"]
FP32_PRECISION = Precision(act=4, resid=4, norm=8, casts=False, autocast_copies=False, gathered=4, dropout_mask=4)


def _meta_count(model_cls, config) -> tuple[int, int]:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-1.7b", "qwen2.5-0.5b", "qwen2.5-7b", "llama-3.1-8b"])
def test_known_shapes_count_what_transformers_builds(name):
    s = KNOWN[name]
    kw = dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        tie_word_embeddings=s.tied,
    )
    model_cls, config = (
        (Qwen2ForCausalLM, Qwen2Config(**kw)) if name.startswith("qwen") else (LlamaForCausalLM, LlamaConfig(**kw))
    )
    assert _meta_count(model_cls, config) == (s.params, s.block_params)


def test_published_sizes():
    assert SMOL.params == 134_515_008  # "135M"
    assert round(KNOWN["qwen2.5-7b"].params / 1e9, 2) == 7.62 and round(KNOWN["llama-3.1-8b"].params / 1e9, 2) == 8.03


def test_a_folder_is_counted_exactly_and_lora_matches_peft(tiny_lm):
    from peft import LoraConfig, get_peft_model

    shape = resolve_shape(str(tiny_lm))
    model = LlamaForCausalLM.from_pretrained(tiny_lm)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.block_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert (shape.hidden, shape.layers, shape.vocab, shape.tied) == (16, 2, model.config.vocab_size, True)
    lora = get_peft_model(model, LoraConfig(r=8))
    assert 8 * shape.lora_params == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    formula = decoder_shape("x", 16, 2, 2, 2, 32, model.config.vocab_size, True)  # the tiny config's numbers
    assert (formula.params, formula.lora_params) == (shape.params, shape.lora_params)


def test_sizes_become_llama_like_shapes_near_the_size():
    assert parse_size("135M") == 135_000_000 and parse_size("1.5b") == 1_500_000_000 and parse_size("7") is None
    for n in (135e6, 500e6, 3e9, 7e9, 70e9):
        s = shape_for_size(int(n))
        assert s.approx and abs(s.params / n - 1) < 0.1, (n, s)
    assert resolve_shape("7B").approx and resolve_shape("Qwen/Qwen2.5-7B-Instruct") == KNOWN["qwen2.5-7b"]


def test_adamw_state_is_two_fp32_moments_per_trained_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 16)).sum().backward()
    opt.step()
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert held == adamw_bytes(sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("lora_dropout", [None, 0.0, 0.05])
def test_activation_bytes_match_what_autograd_saves(lora_dropout):
    """fp32, a padded batch (transformers repeats k and v for grouped-query attention then);
    full fine-tuning, and LoRA (frozen base weights keep fewer inputs) with and without dropout."""
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    lora = lora_dropout is not None
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=lora_dropout)).base_model.model.train()
    shape = decoder_shape("t", 64, 3, 4, 2, 160, 300, True)
    rows, tokens = 3, 40
    mask = torch.ones(rows, tokens, dtype=torch.long)
    mask[0, -5:] = 0
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 300, (rows, tokens)), attention_mask=mask)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in weights)
    final = (
        rows * tokens * (4 * 64 if lora else 8 * 64 + 64 * 4)
    )  # the final norm and the LM head's input: not run here
    estimated = activation_bytes(
        shape, rows, tokens, FP32_PRECISION, lora_modules=2 if lora else 0, lora_dropout=lora_dropout or 0.0
    )
    assert estimated - final == pytest.approx(measured, rel=0.06)


def test_kv_cache_formula_matches_a_dynamic_cache(tiny_lm):
    model = LlamaForCausalLM.from_pretrained(tiny_lm).eval()
    shape = resolve_shape(str(tiny_lm))
    prompt, new, rows = 7, 9, 3
    cache = DynamicCache()
    with torch.no_grad():
        model.generate(
            torch.randint(3, 200, (rows, prompt)),
            attention_mask=torch.ones(rows, prompt, dtype=torch.long),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            past_key_values=cache,
            pad_token_id=0,
        )
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    # the last sampled token is never fed back: the cache holds prompt + new - 1 positions
    assert held == kv_cache_bytes(shape, rows, prompt + new - 1, 4)


def _setup(**kw) -> Setup:
    return Setup(
        **{
            "algo": "grpo",
            "device": "cpu",
            "bf16": False,
            "batch_size": 4,
            "samples_per_prompt": 4,
            "prompt_length": 64,
            "new_tokens": 32,
            **kw,
        }
    )


def test_fsdp2_shards_weights_and_adds_the_gathered_units():
    one, two = estimate(_setup(algo="sft", gpus=2), SMOL, "ddp"), estimate(_setup(algo="sft", gpus=2), SMOL, "fsdp2")
    assert two.phases["step"]["weights"] == pytest.approx(SMOL.params * FP32 / 2)
    assert two.phases["step"]["optimizer"] == pytest.approx(adamw_bytes(SMOL.params) / 2)
    assert two.phases["step"]["gradients"] == pytest.approx(SMOL.params * FP32 / 2)
    tail = SMOL.vocab * SMOL.hidden  # the tied embedding, LM head with it
    assert two.phases["backward"]["gathered"] == (tail + 2 * SMOL.block_params) * 4 + (tail + SMOL.block_params) * 4
    assert one.phases["step"]["ddp_buckets"] == SMOL.params * FP32 and two.phases["step"]["ddp_buckets"] == 0
    rollout = estimate(_setup(gpus=2), SMOL, "fsdp2").phases["generate"]
    assert rollout["gathered"] == SMOL.params * 4  # gathered() holds the actor's full weights for generation


def test_more_processes_never_cost_more_under_fsdp2_and_ddp_does_not_depend_on_them():
    for algo in ("sft", "rm", "grpo", "ppo"):
        for device, bf16 in (("cpu", False), ("cuda", True)):
            s = _setup(algo=algo, device=device, bf16=bf16, critic="value-head" if algo == "ppo" else "none")
            sharded = [estimate(replace(s, gpus=n), SMOL, "fsdp2").peak for n in (1, 2, 4, 8, 16)]
            assert sharded == sorted(sharded, reverse=True), (algo, device, sharded)
            data_parallel = {estimate(replace(s, gpus=n), SMOL, "ddp").peak for n in (2, 4, 8, 16)}
            assert len(data_parallel) == 1, (algo, device)


def test_fsdp2_shards_the_frozen_models_unless_replicated():
    s = _setup(gpus=4)
    sharded, replicated = (estimate(replace(s, frozen_models=m), SMOL, "fsdp2") for m in ("shard", "replicate"))
    assert sharded.phases["step"]["frozen_models"] == SMOL.params * FP32 / 4
    assert replicated.phases["step"]["frozen_models"] == SMOL.params * FP32
    assert sharded.phases["score"]["gathered"] > 0 and sharded.peak < replicated.peak
    ddp = estimate(replace(s, frozen_models="shard"), SMOL, "ddp")  # only FSDP2 shards anything
    assert ddp.phases["step"]["frozen_models"] == SMOL.params * FP32


def test_lora_trains_adapters_only_and_drops_the_reference_copy():
    full, lora = estimate(_setup(), SMOL, "ddp"), estimate(_setup(lora=True, lora_r=8), SMOL, "ddp")
    adapters = 8 * SMOL.lora_params
    assert lora.phases["step"]["gradients"] == adapters * FP32 and lora.phases["step"]["optimizer"] == adamw_bytes(
        adapters
    )
    assert full.phases["step"]["frozen_models"] == SMOL.params * FP32 and lora.phases["step"]["frozen_models"] == 0
    assert lora.peak < full.peak


def test_the_peak_is_the_largest_phase_not_the_sum():
    e = estimate(_setup(), SMOL, "ddp")
    assert set(e.phases) == {"generate", "score", "backward", "step"}
    assert e.peak == max(sum(p.values()) for p in e.phases.values()) and e.breakdown == e.phases[e.peak_phase]
    assert all(set(p) == set(COMPONENTS) for p in e.phases.values())
    assert e.phases["generate"]["kv_cache"] == kv_cache_bytes(SMOL, 16, 96, 4) and e.phases["backward"]["kv_cache"] == 0


def test_gradient_checkpointing_and_bf16_cut_activations():
    base = estimate(_setup(algo="sft"), SMOL, "ddp").phases["backward"]["activations"]
    ckpt = estimate(_setup(algo="sft", gradient_checkpointing=True), SMOL, "ddp").phases["backward"]["activations"]
    half = estimate(_setup(algo="sft", device="cuda", bf16=True), SMOL, "ddp").phases["backward"]["activations"]
    assert ckpt < base / 5 and half < base


PLAN_KEYS = {
    "model",
    "reward_model",
    "algo",
    "gpus",
    "device",
    "precision",
    "settings",
    "lengths",
    "device_memory_gb",
    "config",
    "per_device_gb",
    "peak_phase",
    "fits",
    "host_gb",
    "breakdown",
    "phases",
    "configs",
    "recommended",
    "accelerate_config",
    "notes",
}


def test_plan_json_is_one_object_whose_total_is_its_breakdown(capsys):
    assert main(["plan", "--model", "SmolLM2-135M", "--algo", "grpo", "--gpus", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) == PLAN_KEYS | {"micro_batch"}  # rl: the largest update micro-batch that fits
    assert set(plan["breakdown"]) == set(COMPONENTS) and set(plan["configs"]) == {"ddp", "fsdp2", "fsdp2-offload"}
    assert plan["per_device_gb"] == pytest.approx(sum(plan["breakdown"].values()), abs=1e-3)
    assert plan["config"] == plan["recommended"] == "ddp" and plan["fits"]
    for summary in plan["configs"].values():
        assert summary["per_device_gb"] == pytest.approx(sum(summary["breakdown"].values()), abs=1e-3)
        assert summary["per_device_gb"] == pytest.approx(max(summary["phases"].values()), abs=1e-3)


def test_plan_config_name_and_the_table(capsys):
    assert main(["plan", "--model", "7B", "--algo", "sft", "--gpus", "8", "--sharding", "fsdp2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config"] == "fsdp2" and list(plan["configs"]) == ["fsdp2"] and plan["model"]["approximate"]
    assert (
        main(["plan", "--model", "Llama-3.1-8B", "--algo", "ppo", "--reward-model", "Llama-3.1-8B", "--gpus", "8"]) == 0
    )
    table = capsys.readouterr().out
    for needle in (
        "GiB per device",
        "ddp",
        "fsdp2-offload",
        "generate phase",
        "total per device",
        "fits in 80 GiB",
        "frozen models",
        "sharded like the trained networks",
    ):
        assert needle in table, needle


def test_nothing_fits_names_the_changes_that_would(capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "Qwen2.5-7B",
                "--algo",
                "grpo",
                "--device-memory-gb",
                "40",
                "--frozen-models",
                "replicate",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["recommended"] is None and not plan["fits"]
    assert any(c.startswith("--lora") for c in plan["changes_that_fit"])


def test_ppo_critics_and_the_reward_model():
    from rlhfkit.memory.estimate import networks

    s = _setup(algo="ppo", samples_per_prompt=1)
    head = networks(replace(s, critic="value-head"), SMOL, None)
    assert [n.trainable for n in head[0]] == [SMOL.params + SMOL.hidden + 1] and [n.params for n in head[1]] == [
        SMOL.params
    ]
    trained, frozen = networks(replace(s, critic="reward-model", lora=True), SMOL, SMOL)
    scorer = SMOL.params + SMOL.hidden  # tied: the body keeps the embedding, a 576 -> 1 head replaces the LM head
    assert [n.trainable for n in trained] == [16 * SMOL.lora_params, scorer]  # the critic trains whole, also with LoRA
    assert [n.params for n in frozen] == [scorer]  # LoRA: no reference copy; the reward model stays


@pytest.mark.parametrize("algo", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_plan_plans_with_the_trainers_own_defaults(algo, tmp_path):
    """What plan assumes when an option is not given is what the trainer does when it is not
    given: both read rlhfkit.defaults; this holds every trainer's config to that table."""
    from dataclasses import fields

    from rlhfkit.config import from_dict
    from rlhfkit.plan.commands import PlanConfig, make_setup

    if algo == "sft":
        from rlhfkit.sft.train import SFTConfig as cls

        values = {"train": "t.jsonl"}
    elif algo == "rm":
        from rlhfkit.rm.train import RMTrainConfig as cls

        values = {"train": "t.tsv"}
    elif algo == "dpo":
        from rlhfkit.dpo.train import DPOConfig as cls

        values = {"train": "t.tsv"}
    else:
        from rlhfkit.rl.trainer import RLConfig as cls

        values = {"algo": algo, "reward": "m:f", "prompts": "p.txt"}
    trainer = from_dict(cls, {**values, "output": str(tmp_path / "o")})
    setup = make_setup(from_dict(PlanConfig, {"model": "135M", "algo": algo}), None)
    names = {f.name for f in fields(cls)}
    assert setup.batch_size == trainer.batch_size and setup.lora_dropout == trainer.lora_dropout
    if algo in ("ppo", "grpo"):
        assert (setup.prompt_length, setup.new_tokens) == (trainer.max_prompt_length, trainer.max_new_tokens)
        assert (setup.samples_per_prompt, setup.mini_batch_size) == (
            trainer.samples_per_prompt,
            trainer.mini_batch_size,
        )
    else:
        assert setup.max_length == trainer.max_length and "eval_batch_size" in names


@pytest.mark.parametrize("algo", ["sft", "dpo", "grpo", "ppo"])
def test_an_encoder_as_the_policy_warns_that_it_cannot_be_one(algo, tiny_encoder, caplog, capsys):
    import logging

    with caplog.at_level(logging.WARNING, logger="rlhfkit.plan.commands"):
        assert main(["plan", "--model", str(tiny_encoder), "--algo", algo]) == 0
    assert f"--model {tiny_encoder} is an encoder (BERT-shaped): it cannot be a policy" in caplog.text
    assert f"--algo {algo} cannot train it" in caplog.text and "plan --algo rm" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhfkit.plan.commands"):
        assert main(["plan", "--model", str(tiny_encoder), "--algo", "rm"]) == 0  # a reward model backbone: fine
    assert "cannot be a policy" not in caplog.text
    capsys.readouterr()


# ------------------------------------------------ the run's real lengths: --prompts / --train
# The tiny tokenizer is byte-level: one token per byte, one per special token. Its ChatML
# template renders a prompt as "<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n":
# 1 + 5 + len(text) + 1 + 1 + 1 + 10 = len(text) + 19 tokens.
def _plan_json(capsys, argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_with_prompts_uses_their_longest_rendered_length(tiny_lm, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("ab\nhello\nabcd\n")
    common = ["--model", str(tiny_lm), "--algo", "grpo", "--device", "cpu", "--prompts", str(prompts)]
    out = _plan_json(capsys, common)
    assert out["settings"]["prompt_length"] == 5 + 19
    assert {k: out["lengths"][k] for k in ("count", "p50", "p95", "longest", "over_limit")} == {
        "count": 3,
        "p50": 4 + 19,
        "p95": 5 + 19,
        "longest": 5 + 19,
        "over_limit": 0,
    }
    plain = _plan_json(capsys, [*common, "--no-chat-template"])  # the raw text: one token per byte
    assert plain["settings"]["prompt_length"] == 5
    cut = _plan_json(capsys, [*common, "--max-prompt-length", "20"])  # cut as the rollout cuts it
    assert cut["settings"]["prompt_length"] == 20 and cut["lengths"]["over_limit"] == 3
    assert main(["plan", *common]) == 0
    table = capsys.readouterr().out
    assert f"lengths: 3 prompts of --prompts {prompts}: median 23, p95 24, longest 24 tokens" in table
    assert "24 + 64 tokens" in table
    without = _plan_json(capsys, common[:-2])  # no file: the maximum
    assert without["settings"]["prompt_length"] == 256 and without["lengths"] is None


def test_plan_with_train_uses_the_longest_prompt_and_response(tiny_lm, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "ab", "chosen": "cde", "rejected": "f"},  # 2 + 3 + EOS = 6; 2 + 1 + 1 = 4
        {"prompt": "hello", "chosen": "x" * 20, "rejected": "y"},  # 5 + 20 + 1 = 26; 7
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(tiny_lm), "--algo", "dpo", "--device", "cpu", "--train", str(data), "--no-chat-template"]
    out = _plan_json(capsys, argv)
    assert out["settings"]["max_length"] == 26
    assert (out["lengths"]["count"], out["lengths"]["p50"]) == (4, 6)
    assert out["settings"]["list_size"] == 2 and out["lengths"]["list_size"] == 2
    assert _plan_json(capsys, [*argv, "--max-length", "16"])["settings"]["max_length"] == 16
    tsv = tmp_path / "lists.tsv"  # rank lists with a prompt column: "q" + response + EOS
    tsv.write_text("q\ta\tbb\tccc\n")
    lists = _plan_json(capsys, [*argv[:-2], str(tsv), "--no-chat-template", "--prompt-column"])
    assert (lists["settings"]["max_length"], lists["settings"]["list_size"]) == (1 + 3 + 1, 3)
    assert (
        _plan_json(capsys, [*argv[:-2], str(tsv), "--no-chat-template", "--prompt-column", "--list-size", "2"])[
            "settings"
        ]["list_size"]
        == 2
    )


def test_plan_with_sft_train_uses_the_longest_example_as_sft_encodes_it(tiny_lm, tmp_path, capsys):
    from transformers import AutoTokenizer

    from rlhfkit.data.instructions import read_sft_data
    from rlhfkit.sft.data import EncodedSFT

    data = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": "ab", "response": "cde"},  # 2 + 3 + EOS = 6
        {"prompt": "hello", "response": "x" * 20},  # 5 + 20 + 1 = 26
        {"prompt": "q", "response": "r"},  # 3
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model", str(tiny_lm), "--algo", "sft", "--device", "cpu", "--train", str(data)]
    plain = _plan_json(capsys, [*argv, "--no-chat-template"])
    assert plain["settings"]["max_length"] == 26
    assert {k: plain["lengths"][k] for k in ("count", "p50", "longest", "what")} == {
        "count": 3,
        "p50": 6,
        "longest": 26,
        "what": "sequences",
    }
    # the same lengths as the trainer's own encoding, with and without the chat template
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    for chat, flag in ((False, "--no-chat-template"), (True, "--chat-template")):
        encoded = EncodedSFT.build(read_sft_data(data), tok, max_length=512, chat_template=chat)
        longest = max(encoded.length(i) for i in range(len(encoded)))
        assert _plan_json(capsys, [*argv, flag])["settings"]["max_length"] == longest
    cut = _plan_json(capsys, [*argv, "--no-chat-template", "--max-length", "10"])
    assert cut["settings"]["max_length"] == 10 and cut["lengths"]["over_limit"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n')
    assert main(["plan", *argv[:-1], str(bad)]) == 2
    assert "--train: " in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--algo", "grpo", "--prompts", "{missing}"], "--prompts"),
        (["--algo", "dpo", "--train", "{missing}"], "--train"),
        (["--algo", "sft", "--train", "{missing}"], "--train: instruction data file .*missing.txt.* does not exist"),
    ],
)
def test_plan_with_a_bad_data_file_names_the_option(tiny_lm, tmp_path, capsys, argv, match):
    import re

    argv = [a.replace("{missing}", str(tmp_path / "missing.txt")) for a in argv]
    assert main(["plan", "--model", str(tiny_lm), "--device", "cpu", *argv]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_plan_with_prompts_needs_a_tokenizer(tmp_path, tiny_lm, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("ab\n")
    assert main(["plan", "--model", "7B", "--algo", "grpo", "--prompts", str(prompts)]) == 2
    assert "--prompts needs a tokenizer to count tokens, and --model 7B gives none" in capsys.readouterr().err
    out = _plan_json(
        capsys, ["--model", "7B", "--algo", "grpo", "--prompts", str(prompts), "--tokenizer", str(tiny_lm)]
    )
    assert out["settings"]["prompt_length"] == 2 + 19


def test_plan_names_the_largest_update_micro_batch_that_fits(capsys):
    """For RL the plan says which micro-batch rl --micro-batch-size auto would take with this
    memory: the largest divisor of the minibatch whose peak fits, in the first configuration it fits."""
    argv = ["--model", "smollm2-135m", "--algo", "grpo", "--batch-size", "16", "--samples-per-prompt", "8"]
    argv += ["--mini-batch-size", "64", "--max-new-tokens", "512", "--device-memory-gb", "24"]
    out = _plan_json(capsys, argv)
    setup = Setup(**{"algo": "grpo", "gpus": 1, "device": "cuda", "bf16": True, **out["settings"]})
    peaks = {r: estimate(replace(setup, grad_accum=64 // r), SMOL, "ddp").peak for r in (1, 2, 4, 8, 16, 32, 64)}
    want = max(r for r, p in peaks.items() if p <= 24 * 1024**3)
    assert not out["fits"] and out["micro_batch"] == {"config": "ddp", "rows": want, "grad_accum": 64 // want}
    assert main(["plan", *argv]) == 0
    assert f"-> update micro-batch under ddp: the largest that fits is {want} rows (planned above: 64)" in (
        capsys.readouterr().out
    )
    assert "micro_batch" not in _plan_json(capsys, ["--model", "smollm2-135m", "--algo", "sft"])
