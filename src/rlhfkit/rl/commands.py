"""``rlhfkit generate``, ``rlhfkit bon`` and ``rlhfkit ppo-eval``: sampling without training.

- ``generate``: plain sampling, ``n`` responses per prompt, to JSONL.
- ``bon``: best-of-n. Sample ``n`` responses per prompt, score them all, keep the best;
  optionally write every list, best first, as ``ranked`` JSONL (rejection-sampling data
  for fine-tuning or for a reward model).
- ``ppo-eval``: on held-out prompts, the mean score and the mean KL to the reference of
  the PPO policy, of the reference, and of best-of-n for several ``n``: does PPO beat
  best-of-n at the same KL? Best-of-n's KL is analytic, ``log n - (n - 1) / n`` (Stiennon
  et al. 2020, arXiv:2009.01325, appendix G.3); its expected score is estimated without
  bias from ``K >= n`` samples per prompt (:func:`expected_best_of_n`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlhfkit.config import ConfigError, opt, require
from rlhfkit.data.prompts import Prompt, read_prompts
from rlhfkit.data.types import PreferenceExample, strict_ranks
from rlhfkit.data.writers import write_preferences
from rlhfkit.defaults import MAX_PROMPT_LENGTH
from rlhfkit.evaluation.best_of import best_of_n_kl
from rlhfkit.files import check_output_dir, check_output_file
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.logprobs import policy_logprobs
from rlhfkit.models.policy import inference_dtype, load_policy
from rlhfkit.models.policy_info import read_policy_info
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.ops import masked_sum
from rlhfkit.rl.reward_sources import RewardOptions, RewardSourceOptions, load_reward_source
from rlhfkit.sampling import (
    SamplingOptions,
    SamplingSettings,
    iter_samples,
    sample_texts,
)
from rlhfkit.tracking import Progress

logger = logging.getLogger(__name__)

__all__ = [
    "GenerateConfig",
    "BonConfig",
    "PPOEvalConfig",
    "run_generate",
    "run_bon",
    "run_ppo_eval",
    "expected_best_of_n",
    "best_of_n_kl",
    "print_eval_table",
]


# ------------------------------------------------------------------------- configs
@dataclass(kw_only=True)
class GenerateConfig(SamplingOptions):
    """Sample responses from a policy: one JSON line per response, {"prompt", "response"}."""

    samples_per_prompt: int = opt(1, "responses sampled per prompt", ge=1, was=("n",))
    output: str | None = opt(None, "JSONL file to write (default: stdout)")
    batch_size: int = opt(16, "sequences per generate call", ge=1)
    seed: int = opt(42, "sampling seed")
    cpu: bool = opt(False, "run on the CPU even if a GPU is present")

    def validate(self) -> None:
        super().validate()
        if self.output:
            check_output_file(self.output)


@dataclass(kw_only=True)
class BonConfig(GenerateConfig, RewardSourceOptions):
    """Best-of-n: sample n responses per prompt and keep the highest-scoring one."""

    samples_per_prompt: int = opt(4, "responses sampled per prompt (the n of best-of-n)", ge=1, was=("n",))
    output: str | None = opt(None, "JSONL of the best responses {prompt, response, score, scores} (default: stdout)")
    ranked_output: str | None = opt(
        None, "also write every list, best first, as 'ranked' JSONL (rejection-sampling data)"
    )

    def validate(self) -> None:
        super().validate()
        require(
            not self.ranked_output or self.samples_per_prompt >= 2,
            "--ranked-output needs --samples-per-prompt >= 2: a ranking needs at least two responses",
        )
        if self.ranked_output:
            check_output_file(self.ranked_output, "--ranked-output")


@dataclass(kw_only=True)
class PPOEvalConfig(RewardSourceOptions):
    """Held-out comparison: trained policies vs their reference vs best-of-n, mean score and KL to the reference."""

    policy: list[str] = opt(
        help="the trained policies (e.g. RUN/policy), each PATH or NAME=PATH; all share one reference"
    )
    reference: str | None = opt(None, "the reference model (default: as recorded in POLICY/rlhfkit_ppo.json)")
    gold: str | None = opt(
        None,
        "a second scorer, module:function or a reward-model folder, scored on the same samples: "
        "e.g. the rule simulated preferences came from, which the reward model never saw",
    )
    prompts: str = opt(help="held-out prompts: text file or JSONL")
    n_prompts: int | None = opt(None, "use only the first N prompts", ge=1)
    bon: list[int] = opt(factory=lambda: [1, 2, 4, 8, 16], help="best-of-n sizes to evaluate")
    max_new_tokens: int | None = opt(None, "response length limit (default: as in training, else 64)", ge=1)
    max_prompt_length: int = opt(MAX_PROMPT_LENGTH, "prompt tokens kept", ge=1)
    temperature: float | None = opt(None, "sampling temperature (default: as in training, else 1)", gt=0)
    chat_template: bool | None = opt(
        None, "render prompts with the chat template (default: as in training, else when the tokenizer has one)"
    )
    batch_size: int = opt(16, "sequences per generate call", ge=1)
    seed: int = opt(42, "sampling seed")
    output: str = opt("ppo_eval", "folder for ppo_eval.json and reward_vs_kl.png")
    json: bool = opt(False, "print one JSON object instead of the table")
    cpu: bool = opt(False, "run on the CPU even if a GPU is present")

    def validate(self) -> None:
        super().validate()
        require(bool(self.bon) and all(n >= 1 for n in self.bon), f"option --bon must list sizes >= 1, got {self.bon}")
        check_output_dir(self.output)


def _device(cpu: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def _sample_texts(cfg: GenerateConfig) -> tuple[list[Prompt], list[list[str]]]:
    """(prompts, responses[i][j]) for ``cfg``'s policy and prompts, seeded."""
    prompts = read_prompts(cfg.prompts)
    device = _device(cfg.cpu)
    model, tokenizer = load_policy(cfg.policy, device=device, dtype=inference_dtype(None, device))
    apply_cpu_matmul("auto", device, model)
    chat = use_chat_template(tokenizer, cfg.chat_template, cfg.policy)
    return prompts, sample_texts(
        model,
        tokenizer,
        prompts,
        cfg.samples_per_prompt,
        cfg.settings(),
        chat=chat,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )


def _write_jsonl(rows: list[dict[str, Any]], path: str | None) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ------------------------------------------------------------------------ generate
def run_generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Sample ``cfg.samples_per_prompt`` responses per prompt; write (and return) ``{"prompt", "response"}`` rows."""
    prompts, responses = _sample_texts(cfg)
    rows = [{"prompt": p.text, "response": r} for p, rs in zip(prompts, responses) for r in rs]
    _write_jsonl(rows, cfg.output)
    return rows


# ------------------------------------------------------------------------------ bon
def run_bon(cfg: BonConfig) -> list[dict[str, Any]]:
    """Best-of-n: one row per prompt ``{"prompt", "response", "score", "scores"}``; optional ranked lists."""
    prompts, responses = _sample_texts(cfg)
    n = cfg.samples_per_prompt
    reward = cfg.load_reward(_device(cfg.cpu))
    flat_prompts = [p.text for p, rs in zip(prompts, responses) for _ in rs]
    scores = reward(flat_prompts, [r for rs in responses for r in rs]).view(len(prompts), n).tolist()  # (P, n)
    rows, ranked = [], []
    for p, rs, ss in zip(prompts, responses, scores):
        order = sorted(range(n), key=lambda j: -ss[j])  # best first; stable on ties
        rows.append({"prompt": p.text, "response": rs[order[0]], "score": ss[order[0]], "scores": ss})
        unique = list(dict.fromkeys(rs[j] for j in order))  # a ranking cannot hold one text twice
        if len(unique) >= 2:
            ranked.append((p.text, unique))
    _write_jsonl(rows, cfg.output)
    if cfg.ranked_output:
        skipped = len(prompts) - len(ranked)
        if skipped:
            logger.warning(
                "--ranked-output: %d prompt(s) had fewer than 2 distinct responses and were left out", skipped
            )
        if ranked:
            write_preferences(
                cfg.ranked_output,
                [PreferenceExample(p, tuple(rs), strict_ranks(len(rs))) for p, rs in ranked],
                "ranked",
            )
    return rows


# ------------------------------------------------------------------------- ppo-eval
def expected_best_of_n(scores: Tensor, n: int, values: Tensor | None = None) -> Tensor:
    """Unbiased estimate of ``E[max of n samples]`` per row from ``K >= n`` samples ``scores (P, K)``;
    with ``values (P, K)``, of the value of the sample the scores pick (e.g. its gold score).

    Averages over all ``C(K, n)`` subsets of size ``n`` (a U-statistic): with the row sorted
    ascending by score, the ``i``-th is the pick of ``C(i - 1, n - 1)`` of them, so
    ``estimate = sum_i C(i - 1, n - 1) / C(K, n) * x_(i)`` for ``i = n..K``. Plain loop::

        for row in range(P):
            subsets = itertools.combinations(range(K), n)
            estimate = mean(values[row][max(s, key=lambda j: scores[row][j])] for s in subsets)

    Returns:
        ``(P,)`` estimates.
    """
    k = scores.shape[1]
    if not 1 <= n <= k:
        raise ValueError(f"expected_best_of_n: need 1 <= n <= K, got n={n}, K={k}")
    order = scores.double().argsort(dim=1, stable=True)  # (P, K) ascending by score
    x = (values if values is not None else scores).double().gather(1, order)
    weights = torch.tensor([math.comb(i - 1, n - 1) for i in range(1, k + 1)], dtype=torch.float64) / math.comb(
        k, n
    )  # (K,)
    return (x * weights).sum(dim=1)


@torch.no_grad()
def _sample_logprobs(
    model, ref_model, tokenizer, prompts, n, settings, chat, batch_size, what: str
) -> tuple[list[str], list[str], Tensor]:
    """Sample from ``model``; texts and the per-response KL estimate ``sum_t log p - log p_ref`` (B,)."""
    texts, responses, kls = [], [], []
    progress = Progress(math.ceil(len(prompts) * n / batch_size), f"ppo-eval: {what}", "batch")
    for s in iter_samples(model, tokenizer, prompts, n, settings, chat=chat, batch_size=batch_size):
        texts += [p.text for p in s.prompts]
        responses += s.responses
        if ref_model is not None:
            ids = torch.cat([s.query_ids, s.response_ids], 1)
            mask = torch.cat([s.query_mask, s.response_mask], 1)
            lp = policy_logprobs(model, ids, mask, s.response_ids, settings.temperature)  # (B, N)
            ref_lp = policy_logprobs(
                ref_model,
                ids.to(ref_model.device),
                mask.to(ref_model.device),
                s.response_ids.to(ref_model.device),
                settings.temperature,
            ).to(lp.device)
            kls.append(masked_sum(lp - ref_lp, s.response_mask, dim=1).float().cpu())  # k1, unbiased on own samples
        progress.update(1)
    progress.close()
    return texts, responses, (torch.cat(kls) if kls else torch.zeros(len(texts)))


def _named(policy: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare path is named by its run folder."""
    name, _, path = policy.rpartition("=")
    return (name, path) if name else (Path(path).parent.name or path, path)


def _evaluate_policy(
    name, path, ref_model, tokenizer, prompts, settings, chat, cfg, reward, gold, device
) -> dict[str, Any]:
    """One policy's row: mean score (and gold score) of one sample per prompt, and its KL to the reference."""
    policy, _ = load_policy(path, device=device, dtype=inference_dtype(None, device))
    apply_cpu_matmul("auto", device, policy)
    texts, responses, kl = _sample_logprobs(
        policy, ref_model, tokenizer, prompts, 1, settings, chat, cfg.batch_size, f"{name} samples"
    )
    row = {
        "name": name,
        "score": reward(texts, responses).mean().item(),
        "kl": kl.mean().item(),
        "kl_kind": "sampled",
        "kl_std_error": (kl.std().item() / math.sqrt(len(kl))) if len(kl) > 1 else None,
        "responses": responses,
    }
    if gold is not None:
        row["gold"] = gold(texts, responses).mean().item()
    return row


def run_ppo_eval(cfg: PPOEvalConfig) -> dict[str, Any]:
    """Score (and gold score) and KL for each policy, the reference and best-of-n; JSON and a PNG in ``cfg.output``."""
    policies = [_named(p) for p in cfg.policy]
    if len(policies) == 1 and "=" not in cfg.policy[0]:
        policies = [("policy", policies[0][1])]
    info = read_policy_info(policies[0][1])
    reference = cfg.reference or info.get("reference")
    if not reference:
        raise ConfigError(
            f"--reference is needed: {policies[0][1]} has no rlhfkit_ppo.json naming the model it was trained from"
        )
    temperature = cfg.temperature if cfg.temperature is not None else float(info.get("temperature", 1.0))
    max_new = cfg.max_new_tokens or int(info.get("max_new_tokens", 64))
    prompts = read_prompts(cfg.prompts)[: cfg.n_prompts]
    device = _device(cfg.cpu)
    ref_model, tokenizer = load_policy(
        reference, device=device, dtype=inference_dtype(None, device), option="--reference"
    )
    apply_cpu_matmul("auto", device, ref_model)
    chat = use_chat_template(
        tokenizer, cfg.chat_template if cfg.chat_template is not None else info.get("chat_template"), reference
    )
    reward = cfg.load_reward(device)
    gold = load_reward_source(cfg.gold, RewardOptions(device=device)) if cfg.gold else None
    settings = SamplingSettings(max_new, temperature, 0, 1.0, cfg.max_prompt_length)
    k = max(cfg.bon)

    rows, samples = [], {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # the first policy, then the reference, on one seeded stream; other policies anew
        for i, (name, path) in enumerate(policies):
            if i:
                torch.manual_seed(cfg.seed)
            rows.append(
                _evaluate_policy(name, path, ref_model, tokenizer, prompts, settings, chat, cfg, reward, gold, device)
            )
            samples[name] = rows[-1].pop("responses")
        if len(policies) > 1:
            torch.manual_seed(cfg.seed + 1)
        r_texts, r_resp, _ = _sample_logprobs(
            ref_model, None, tokenizer, prompts, k, settings, chat, cfg.batch_size, f"{k} reference samples per prompt"
        )
    r_scores = reward(r_texts, r_resp).view(len(prompts), k)  # (P, K)
    r_gold = gold(r_texts, r_resp).view(len(prompts), k) if gold is not None else None
    rows.append(
        {
            "name": "reference",
            "score": r_scores.mean().item(),
            "kl": 0.0,
            "kl_kind": "exact",
            **({"gold": r_gold.mean().item()} if r_gold is not None else {}),
        }
    )
    for n in sorted(set(cfg.bon)):
        row = {
            "name": f"best-of-{n}",
            "score": expected_best_of_n(r_scores, n).mean().item(),
            "kl": best_of_n_kl(n),
            "kl_kind": "analytic",
        }
        if r_gold is not None:  # the gold score of the sample the reward model picks
            row["gold"] = expected_best_of_n(r_scores, n, r_gold).mean().item()
        rows.append(row)
    first = policies[0][0]
    report = {
        "policy": cfg.policy,
        "reference": reference,
        "reward": cfg.reward,
        "gold": cfg.gold,
        "n_prompts": len(prompts),
        "max_new_tokens": max_new,
        "temperature": temperature,
        "rows": rows,
        "policy_kl_std_error": rows[0]["kl_std_error"],
        "samples": [
            {
                "prompt": p.text,
                "policy": samples[first][i],
                "reference": r_resp[i * k],
                **{name: samples[name][i] for name, _ in policies[1:]},
            }
            for i, p in enumerate(prompts)
        ][:8],
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppo_eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    _plot_reward_vs_kl(rows, len(policies), out / "reward_vs_kl.png")
    report["plot"] = str(out / "reward_vs_kl.png")
    return report


def _plot_reward_vs_kl(rows: list[dict[str, Any]], n_policies: int, path: Path) -> None:
    """Score against KL for best-of-n, the reference and each policy; beside it the gold score,
    when there is one, so over-optimisation of the proxy shows (Gao et al. 2022, arXiv:2210.10760, fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("score", "mean reward-model score (proxy)")] + ([("gold", "mean gold score")] if "gold" in rows[0] else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    bon = [r for r in rows if r["name"].startswith("best-of-")]
    markers = "*^vD<>ph"
    for ax, (key, label) in zip(axes[0], keys):
        ax.plot([r["kl"] for r in bon], [r[key] for r in bon], marker="o", label="best-of-n (reference samples)")
        for r in bon:
            ax.annotate(
                r["name"].removeprefix("best-of-"),
                (r["kl"], r[key]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        for i, r in enumerate(rows[:n_policies] + [rows[n_policies]]):
            ax.scatter(
                [r["kl"]],
                [r[key]],
                marker="s" if r["name"] == "reference" else markers[i % len(markers)],
                s=90,
                label=r["name"],
                zorder=3,
            )
        ax.set_xlabel("KL to the reference (nats per response)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_eval_table(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, ensure_ascii=False))
        return
    print(f"{report['n_prompts']} held-out prompts, reward {report['reward']}")
    gold = "gold" in report["rows"][0]
    print(f"{'':14s} {'score':>10s}" + (f" {'gold':>10s}" if gold else "") + f" {'KL (nats)':>10s}")
    for r in report["rows"]:
        print(
            f"{r['name']:14s} {r['score']:10.4f}"
            + (f" {r['gold']:10.4f}" if gold else "")
            + f" {r['kl']:10.4f}  ({r['kl_kind']})"
        )
    print(f"report: {Path(report['plot']).parent / 'ppo_eval.json'}, plot: {report['plot']}")
