"""The CUDA path: bf16 autocast by default, no CPU-only kernel on the GPU, and the trainers,
sampling and packed rows working on the device. Tests marked ``cuda`` skip without a GPU;
``make gpu-check`` (scripts/gpu_check.py) runs them on one. The two unmarked tests pin the
CPU side of the same rules and run everywhere."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rlhfkit.config import from_dict
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.tracking import read_metrics
from rlhfkit.training.run import _mixed_precision

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs these)")


def test_precision_is_fp32_on_the_cpu():
    assert _mixed_precision("auto", cpu=True) == "no"
    assert _mixed_precision("bf16", cpu=True) == "bf16"  # asked for explicitly: honoured


def test_the_cpu_matmul_kernel_is_never_applied_off_the_cpu():
    model = nn.Sequential(nn.Linear(8, 8))
    for choice in ("auto", "onednn"):
        assert apply_cpu_matmul(choice, torch.device("cuda"), model) is None
        assert type(model[0]) is nn.Linear


@pytest.mark.cuda
@needs_cuda
def test_auto_precision_is_bf16_on_cuda():
    assert _mixed_precision("auto", cpu=False) == "bf16"


@pytest.mark.cuda
@needs_cuda
def test_reward_model_trains_on_cuda_in_bf16_and_loads_on_the_cpu(tiny_lm, separable_tsv, tmp_path):
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rm.train import RMTrainConfig, train_reward_model

    out = tmp_path / "rm"
    final = train_reward_model(
        from_dict(
            RMTrainConfig,
            dict(
                model=str(tiny_lm),
                train=str(separable_tsv),
                n_train=90,
                output=str(out),
                epochs=4,
                lr=3e-3,
                batch_size=8,
                eval_every=1000,
                save_every=1000,
                log_every=1,
                progress=False,
                report_to="none",
                warmup_ratio=0.0,
            ),
        )
    )
    assert final["pairwise_accuracy"] > 0.9, final
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert all(r["memory/peak_gib"] > 0 for r in rows)
    assert "precision bf16" in (out / "run.log").read_text() and "device cuda" in (out / "run.log").read_text()
    texts = ["good good good apple river", "apple river"]
    on_cpu = RewardModel.from_pretrained(out).score(None, texts)
    on_gpu = RewardModel.from_pretrained(out, device="cuda").score(None, texts)
    assert on_cpu[0] > on_cpu[1]
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_dpo_trains_on_cuda_in_bf16_and_its_implicit_reward_scores_alike_on_the_cpu(tiny_lm, separable_tsv, tmp_path):
    from rlhfkit.dpo.train import DPOConfig, train_dpo
    from rlhfkit.models.implicit_reward import ImplicitReward

    out = tmp_path / "dpo"
    result = train_dpo(
        from_dict(
            DPOConfig,
            dict(
                policy=str(tiny_lm),
                train=str(separable_tsv),
                n_train=90,
                output=str(out),
                epochs=3,
                lr=1e-2,
                batch_size=8,
                eval_every=1000,
                save_every=1000,
                log_every=1,
                progress=False,
                report_to="none",
                warmup_ratio=0.0,
                eval_kl_prompts=2,
            ),
        )
    )
    assert result["eval/pairwise_accuracy"] > 0.9 and result["eval/kl"] > 0, result
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert rows[0]["train/loss"] == pytest.approx(
        math.log(2), abs=0.02
    )  # the reference pass ran under the same autocast
    assert all(r["memory/peak_gib"] > 0 for r in rows)
    texts = ["good good good apple river", "apple river"]
    on_cpu = ImplicitReward.from_pretrained(str(out)).score(["", ""], texts)
    on_gpu = ImplicitReward.from_pretrained(str(out), device="cuda").score(["", ""], texts)
    assert on_cpu[0] > on_cpu[1]
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_sampling_pass_logprobs_equal_a_forward_pass_on_cuda(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.models.logprobs import policy_logprobs
    from rlhfkit.sampling import SamplingSettings, encode_queries, response_mask_from_eos, sample

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).cuda().eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    # a repeated prompt: its rows start from one shared prefill (sampling.shared_prompt_cache)
    ids, mask = encode_queries(tok, ["the cat sat", "hi", "a longer prompt here", "hi"], 64, chat=False)
    ids, mask = ids.cuda(), mask.cuda()
    eos_ids = [tok.eos_token_id, *range(40, 46)]
    torch.manual_seed(0)
    response_ids, sampled = sample(
        model, tok, ids, mask, SamplingSettings(max_new_tokens=10, temperature=0.7), eos_ids, with_logprobs=True
    )
    assert response_ids.device.type == "cuda"
    rmask, _ = response_mask_from_eos(response_ids, eos_ids)
    forward = policy_logprobs(model, torch.cat([ids, response_ids], 1), torch.cat([mask, rmask], 1), response_ids, 0.7)
    real = rmask.bool()
    torch.testing.assert_close(sampled[real], forward[real], atol=1e-4, rtol=0)


@pytest.mark.cuda
@needs_cuda
def test_the_sampler_draws_from_the_filtered_softmax_on_cuda():
    from rlhfkit.decoding import SamplingSettings, categorical_draw

    logits = torch.log(torch.tensor([0.02, 0.05, 0.08, 0.15, 0.3, 0.4], device="cuda"))
    for settings, allowed in [
        (SamplingSettings(temperature=0.5), [0, 1, 2, 3, 4, 5]),
        (SamplingSettings(top_k=2), [4, 5]),
        (SamplingSettings(top_p=0.75), [3, 4, 5]),
    ]:
        tokens = categorical_draw(logits.repeat(40_000, 1), settings, torch.rand(40_000, 6, device="cuda"))
        assert tokens.device.type == "cuda"
        counts = torch.bincount(tokens, minlength=6).double().cpu() / 40_000
        expected = torch.zeros(6, dtype=torch.float64)
        p = torch.softmax(logits.double().cpu() / settings.temperature, -1)[allowed]
        expected[allowed] = p / p.sum()
        torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


@pytest.mark.cuda
@needs_cuda
def test_packed_rows_give_the_padded_logits_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.models.packing import packed_kwargs, use_packed_attention
    from rlhfkit.rl.rollout import pack_rows

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).cuda().eval()
    prefix, tails, responses = [5, 6, 7, 8], [[10, 11], [12], [10, 11]], [[20, 21, 22], [23], [24, 25]]
    q = [prefix + t for t in tails]
    P, N, M = max(map(len, q)), max(map(len, responses)), len(q)
    ids, am = torch.zeros(M, P + N, dtype=torch.long), torch.zeros(M, P + N, dtype=torch.long)
    for i in range(M):
        ids[i, P - len(q[i]) : P], am[i, P - len(q[i]) : P] = torch.tensor(q[i]), 1
        ids[i, P : P + len(responses[i])], am[i, P : P + len(responses[i])] = torch.tensor(responses[i]), 1
    ids, am = ids.cuda(), am.cuda()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
        use_packed_attention(model)
        packed_batch = pack_rows(am[:, :P], ids, am)
        packed = model(**packed_kwargs(packed_batch)).logits[0]
    real = am.bool()
    torch.testing.assert_close(packed[packed_batch.index[real]], padded[real], atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rl_runs_on_cuda_and_exports_the_policy(algo, tiny_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhfkit.rl.trainer import RLConfig, train_rl

    (tmp_path / "prompts.txt").write_text("alpha beta\ngamma delta\nepsilon zeta\neta theta\n", encoding="utf-8")
    (tmp_path / "reward.py").write_text(
        "def lower(prompts, responses):\n    return [sum(c.islower() for c in r) / max(len(r), 1) for r in responses]\n"
    )
    out = tmp_path / algo
    result = train_rl(
        from_dict(
            RLConfig,
            dict(
                algo=algo,
                policy=str(tiny_lm),
                prompts=str(tmp_path / "prompts.txt"),
                reward=f"{tmp_path / 'reward.py'}:lower",
                samples_per_prompt=4 if algo == "grpo" else 1,
                critic="value-head" if algo == "ppo" else "auto",
                max_new_tokens=8,
                max_steps=3,
                batch_size=4,
                mini_batch_size=4,
                lr=1e-3,
                output=str(out),
                progress=False,
                report_to="none",
            ),
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 3 and all(r["memory/peak_gib"] > 0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["rl/policy_loss"])) for r in rows)
    assert "precision bf16" in (out / "run.log").read_text()
    AutoModelForCausalLM.from_pretrained(result["final"])


def probe_start_run(tiny_lm, separable_tsv, out, cpu: bool) -> dict:
    from rlhfkit.rm.train import RMTrainConfig, train_reward_model

    return train_reward_model(
        from_dict(
            RMTrainConfig,
            dict(
                model=str(tiny_lm),
                train=str(separable_tsv),
                n_train=60,
                output=str(out),
                max_steps=1,
                lr=1e-9,
                batch_size=8,
                head_init="probe",
                head_lr=None,
                cpu=cpu,
                eval_every=1000,
                save_every=1000,
                log_every=1,
                progress=False,
                report_to="none",
                warmup_ratio=0.0,
            ),
        )
    )


@pytest.mark.cuda
@needs_cuda
def test_the_probe_head_start_on_cuda(tiny_lm, separable_tsv, tmp_path):
    """--head-init probe on the GPU: the model moved to the device before the probe, features read
    there, the fit on the CPU, loaded into the head; after one step at a negligible rate the
    held-out ordering is the probe's."""
    on_gpu = probe_start_run(tiny_lm, separable_tsv, tmp_path / "gpu", cpu=False)
    log = (tmp_path / "gpu" / "run.log").read_text()
    assert "head: linear probe on the frozen backbone, 360 pairs" in log and "device cuda" in log
    assert (
        on_gpu["pairwise_accuracy"] > 0.85
    )  # the same run on the CPU: 0.933 (one process holds one accelerator: not both here)


@pytest.mark.cuda
@needs_cuda
def test_chunked_logprobs_under_bf16_autocast_match_the_models_own_logits_on_cuda(tiny_lm):
    """``--logprob-chunk-size`` on a GPU: the LM head's matmul runs in bf16 under autocast as the
    model's own head does, the log-softmax in fp32; values and gradients as the full logits give."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.chunked_logprobs import logprobs_from_hidden
    from rlhfkit.models.logprobs import lm_head_weights, response_hidden, response_logits
    from rlhfkit.ops import logprobs_from_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).cuda()
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 12), device="cuda")
    mask = torch.ones_like(ids)
    labels = ids[:, 4:]
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = response_logits(model, ids, mask, 8)
        want = logprobs_from_logits(logits, labels)
        want_grads = torch.autograd.grad(want.sum(), params)
        hidden = response_hidden(model, ids, mask, 8)
        weight, bias = lm_head_weights(model)
        got, _ = logprobs_from_hidden(hidden, weight, labels, bias=bias, chunk_size=5)
        got_grads = torch.autograd.grad(got.sum(), params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), atol=2e-2, rtol=0)  # bf16 matmuls: both paths round alike
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@needs_cuda
def test_micro_batch_auto_reads_the_gpus_free_memory(tiny_lm, tmp_path, capsys):
    """``rl --micro-batch-size auto`` on a GPU: the budget is the card's free memory (accelerate's
    get_max_memory), the choice printed with the device."""
    from rlhfkit.rl.micro_batch import free_bytes
    from rlhfkit.rl.trainer import RLConfig, train_rl

    free = free_bytes(torch.device("cuda", 0))
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < free <= total
    prompts = tmp_path / "p.txt"
    prompts.write_text("red apple\na quiet river\n")
    rewards = tmp_path / "r.py"
    rewards.write_text("def n(prompts, responses):\n    return [len(r) / 8 for r in responses]\n")
    cfg = dict(
        policy=str(tiny_lm), reward=f"{rewards}:n", prompts=str(prompts), output=str(tmp_path / "run"), algo="grpo",
        max_steps=1, batch_size=2, samples_per_prompt=4, mini_batch_size=8, max_new_tokens=6, sample_every=0,
        progress=False, report_to="none", micro_batch_size="auto",
    )  # fmt: skip
    train_rl(from_dict(RLConfig, cfg))
    assert "--micro-batch-size auto: 8 rows (--grad-accum 1)" in capsys.readouterr().out
    assert " on cuda" in (tmp_path / "run" / "run.log").read_text()


@pytest.mark.cuda
@needs_cuda
def test_a_step_with_fused_adamw_never_waits_for_the_gpu(tmp_path):
    """No host sync inside ``train_step`` (torch's sync debug mode raises on one), and a NaN
    micro-batch is skipped on the device and named by the check that follows."""
    from accelerate import Accelerator

    from rlhfkit.errors import RunStopped
    from rlhfkit.training.options import RunOptions
    from rlhfkit.training.run import Run
    from rlhfkit.training.step import check_finite, train_step

    run = Run(RunOptions(output=str(tmp_path / "out")), "cuda-step", Accelerator(), None)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 1)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    x = torch.randn(8, 16, device="cuda")

    def loss_fn(rows, poison=False):
        loss = model(x[rows]).pow(2).mean()
        return (loss * float("nan") if poison else loss), {"loss": loss.detach()}

    before = [p.detach().clone() for p in model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(run, model, optimizer, [slice(0, 4), slice(4, 8)], loss_fn, max_grad_norm=1.0, where="step 1")
        after_first = [p.detach().clone() for p in model.parameters()]  # device copies: no sync
        train_step(
            run, model, optimizer, [slice(0, 4)], lambda r: loss_fn(r, poison=True), max_grad_norm=1.0, where="step 2"
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not all(torch.equal(a, b) for a, b in zip(before, after_first))  # step 1 trained
    assert all(torch.equal(a, b) for a, b in zip(after_first, model.parameters()))  # step 2 was skipped
    with pytest.raises(RunStopped, match=r"non-finite loss \(nan\) at step 2, micro-batch 0\. The optimizer skipped"):
        check_finite(run)
