"""``rlhfkit eval``: policy A against baseline B on the same prompts, by a judge.

Each prompt gets ``n`` samples from A and ``n`` from B; sample ``i`` of A is judged against
sample ``i`` of B. The math is in :mod:`.winrate`, the judges in :mod:`.judges`, the files in
:mod:`.report`.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhfkit.config import ConfigError, Options, opt
from rlhfkit.data.prompts import read_prompts
from rlhfkit.defaults import MAX_PROMPT_LENGTH
from rlhfkit.files import check_output_dir
from rlhfkit.models.hub import resolve_run_folder
from rlhfkit.models.implicit_reward import is_dpo_model, read_dpo_info
from rlhfkit.models.logprobs import policy_logprobs
from rlhfkit.models.policy import inference_dtype, load_policy
from rlhfkit.models.policy_info import POLICY_INFO, read_policy_info
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.ops import masked_sum
from rlhfkit.sampling import SamplingSettings, iter_samples

from .judges import LMPairwiseJudge, load_judge, pairwise_outcomes
from .report import write_report
from .winrate import lc_win_rate, lc_win_rate_ci, outcomes_from_scores, rates, win_rate_ci

__all__ = ["EvalConfig", "run_eval", "recorded_reference", "print_summary"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvalConfig(Options):
    """Win rate of policy A against baseline B by a judge, with intervals, a length-controlled
    win rate, KL of A to B and response lengths (see docs/eval.md)."""

    policy: str = opt(help="policy A: a causal LM folder, run folder or alias")
    baseline: str | None = opt(
        None, "baseline B (default: the reference recorded in A's folder by 'rlhfkit rl' or 'rlhfkit dpo')"
    )
    prompts: str = opt(help="prompts: text file (one per line) or JSONL with 'prompt' or 'messages'")
    judge: str = opt(
        help="the judge: a reward-model or classifier folder, a DPO run, module:function "
        "(or path/to/file.py:function), or lm:FOLDER (a causal LM asked 'A or B?' both ways round)"
    )
    samples_per_prompt: int = opt(
        1, "samples per prompt from each policy; sample i of A is judged against i of B", ge=1
    )
    n_prompts: int | None = opt(None, "use only the first N prompts", ge=1)
    max_new_tokens: int | None = opt(None, "response length limit (default: as recorded in A's folder, else 64)", ge=1)
    max_prompt_length: int = opt(MAX_PROMPT_LENGTH, "prompt tokens kept", ge=1)
    temperature: float = opt(1.0, "sampling temperature of both policies", gt=0)
    chat_template: bool | None = opt(
        None, "render prompts with the chat template (default: as recorded, else when the tokenizer has one)"
    )
    batch_size: int = opt(16, "sequences per generate call", ge=1)
    judge_batch_size: int = opt(32, "texts per judge forward pass", ge=1)
    bootstrap: int = opt(2000, "bootstrap resamples of the prompts for the intervals", ge=100)
    seed: int = opt(42, "seed of the samples and the bootstrap")
    output: str = opt("eval", "folder for summary.json, samples.jsonl, report.md and report.html")
    json: bool = opt(False, "print the summary as one JSON document on stdout")
    cpu: bool = opt(False, "run on the CPU even if a GPU is present")

    def validate(self) -> None:
        super().validate()
        check_output_dir(self.output)


def recorded_reference(policy: str) -> str | None:
    """The model ``policy`` was trained from, as its folder records it (rl's or dpo's info file)."""
    folder = resolve_run_folder(str(Path(policy).expanduser()))
    reference = read_policy_info(folder).get("reference")
    if not reference and is_dpo_model(policy):
        reference = read_dpo_info(folder).get("reference")
    return reference or None


@torch.no_grad()
def _samples(model, tokenizer, prompts, n, settings, chat, batch_size) -> tuple[list[str], Tensor, list[Tensor]]:
    """``n`` responses per prompt (prompt-major), their token lengths ``(P * n,)`` and the raw batches."""
    responses, lengths, batches = [], [], []
    for s in iter_samples(model, tokenizer, prompts, n, settings, chat=chat, batch_size=batch_size):
        responses += s.responses
        lengths.append(s.response_mask.sum(dim=1).cpu())
        batches.append(s)
    return responses, torch.cat(lengths), batches


@torch.no_grad()
def _sampled_kl(policy, baseline, batches, temperature: float) -> Tensor:
    """``sum_t log pA - log pB`` over each of A's sampled responses ``(P * n,)``: k1, unbiased for
    KL(A || B) on A's own samples (http://joschu.net/blog/kl-approx.html)."""
    kls = []
    for s in batches:
        ids = torch.cat([s.query_ids, s.response_ids], 1)
        mask = torch.cat([s.query_mask, s.response_mask], 1)
        lp = policy_logprobs(policy, ids, mask, s.response_ids, temperature)  # (B, N)
        d = baseline.device
        ref_lp = policy_logprobs(baseline, ids.to(d), mask.to(d), s.response_ids.to(d), temperature).to(lp.device)
        kls.append(masked_sum(lp - ref_lp, s.response_mask, dim=1).float().cpu())  # (B,)
    return torch.cat(kls)


def _lengths(x: Tensor) -> dict[str, Any]:
    v = x.tolist()
    return {"mean": statistics.fmean(v), "median": statistics.median(v), "min": min(v), "max": max(v)}


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Sample A and B, judge the pairs, and write summary.json, samples.jsonl, report.md and report.html."""
    baseline = cfg.baseline or recorded_reference(cfg.policy)
    if not baseline:
        raise ConfigError(
            f"--baseline is needed: {cfg.policy} records no reference (no {POLICY_INFO} from 'rlhfkit rl' nor "
            "rlhfkit_dpo.json from 'rlhfkit dpo'); pass --baseline MODEL, e.g. the SFT model it started from"
        )
    prompts = read_prompts(cfg.prompts)[: cfg.n_prompts]
    info = read_policy_info(resolve_run_folder(str(Path(cfg.policy).expanduser())))
    max_new = cfg.max_new_tokens or int(info.get("max_new_tokens", 64))
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    judge = load_judge(cfg.judge, device=device, batch_size=cfg.judge_batch_size)
    dtype = inference_dtype(None, device)
    policy, tokenizer = load_policy(cfg.policy, device=device, dtype=dtype, option="--policy")
    base, base_tokenizer = load_policy(baseline, device=device, dtype=dtype, option="--baseline")
    chat = use_chat_template(
        tokenizer, cfg.chat_template if cfg.chat_template is not None else info.get("chat_template"), cfg.policy
    )
    settings = SamplingSettings(max_new, cfg.temperature, 0, 1.0, cfg.max_prompt_length)
    n = cfg.samples_per_prompt

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        a_resp, a_len, a_batches = _samples(policy, tokenizer, prompts, n, settings, chat, cfg.batch_size)
        torch.manual_seed(cfg.seed + 1)
        b_resp, b_len, _ = _samples(base, base_tokenizer, prompts, n, settings, chat, cfg.batch_size)
    same_vocab = base_tokenizer.get_vocab() == tokenizer.get_vocab()
    kl = _sampled_kl(policy, base, a_batches, cfg.temperature) if same_vocab else None
    if kl is None:
        log.warning("eval: %s and %s have different tokenizers; KL of A to B is not reported", cfg.policy, baseline)

    texts = [p.text for p in prompts for _ in range(n)]  # (P * n,) prompt-major, like the samples
    score_a = score_b = None
    inconsistent = torch.zeros(len(texts), dtype=torch.bool)
    if isinstance(judge, LMPairwiseJudge):
        outcomes, inconsistent = pairwise_outcomes(judge, texts, a_resp, b_resp)
    else:
        score_a, score_b = judge.scores(texts, a_resp), judge.scores(texts, b_resp)
        outcomes = outcomes_from_scores(score_a, score_b)
    P = len(prompts)
    o = outcomes.view(P, n)  # (P, n)
    diff = (a_len - b_len).double().view(P, n)  # (P, n) tokens of A minus tokens of B
    r = rates(o)
    lc = lc_win_rate(o, diff)
    summary: dict[str, Any] = {
        "policy": cfg.policy,
        "baseline": baseline,
        "baseline_from": "--baseline" if cfg.baseline else "recorded reference",
        "judge": cfg.judge,
        "judge_kind": "lm-pairwise" if isinstance(judge, LMPairwiseJudge) else judge.kind,
        "n_prompts": P,
        "samples_per_prompt": n,
        "n_pairs": P * n,
        "max_new_tokens": max_new,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "output": cfg.output,
        **{k: r[k] for k in ("win", "tie", "loss", "wins", "ties", "losses", "win_rate")},
        "win_rate_ci": win_rate_ci(o, cfg.bootstrap, cfg.seed),
        "lc_win_rate": lc["lc_win_rate"],
        "lc_win_rate_ci": lc_win_rate_ci(o, diff, cfg.bootstrap, cfg.seed),
        "lc_length_coef": lc["length_coef"],
        "lc_ties": "half a win and half a loss (target 0.5)",
        "ci_level": 0.95,
        "bootstrap_resamples": cfg.bootstrap,
        "position_inconsistent": int(inconsistent.sum().item()),
        "score_policy": score_a.mean().item() if score_a is not None else None,
        "score_baseline": score_b.mean().item() if score_b is not None else None,
        "kl": kl.mean().item() if kl is not None else None,
        "kl_std_error": (kl.std().item() / math.sqrt(len(kl))) if kl is not None and len(kl) > 1 else None,
        "length_policy": _lengths(a_len),
        "length_baseline": _lengths(b_len),
    }
    rows = [
        {
            "prompt_index": i // n,
            "sample": i % n,
            "prompt": texts[i],
            "policy": a_resp[i],
            "baseline": b_resp[i],
            "verdict": {1: "win", 0: "tie", -1: "loss"}[int(outcomes[i])],
            "position_inconsistent": bool(inconsistent[i]),
            "tokens_policy": int(a_len[i]),
            "tokens_baseline": int(b_len[i]),
            **({"score_policy": score_a[i].item(), "score_baseline": score_b[i].item()} if score_a is not None else {}),
            **({"kl": kl[i].item()} if kl is not None else {}),
        }
        for i in range(len(texts))
    ]
    write_report(Path(cfg.output), summary, rows, a_len.tolist(), b_len.tolist())
    return summary


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """The summary as one JSON document, or a few readable lines."""
    if as_json:
        print(json.dumps(summary, ensure_ascii=False))
        return
    lo, hi = summary["win_rate_ci"]
    llo, lhi = summary["lc_win_rate_ci"]
    print(f"{summary['policy']} vs {summary['baseline']} by {summary['judge']} ({summary['n_pairs']} pairs)")
    print(f"  win {summary['win']:.1%}  tie {summary['tie']:.1%}  loss {summary['loss']:.1%}")
    print(f"  win rate {summary['win_rate']:.1%} [{lo:.1%}, {hi:.1%}]")
    print(f"  length-controlled win rate {summary['lc_win_rate']:.1%} [{llo:.1%}, {lhi:.1%}]")
    if summary["kl"] is not None:
        print(f"  KL(A || B) {summary['kl']:.3f} nats per response")
    print(f"  wrote {summary.get('output', '')}")
