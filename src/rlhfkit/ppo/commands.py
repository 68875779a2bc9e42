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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import Tensor

from rlhfkit.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "GenerateConfig", "BonConfig", "PPOEvalConfig", "run_generate", "run_bon", "run_ppo_eval",
    "expected_best_of_n", "best_of_n_kl", "print_eval_table",
]


# ------------------------------------------------------------------------- configs
@dataclass
class SamplingOptions:
    """Options every sampling command shares."""

    policy: str = field(default="smollm2-135m", metadata={"help": "model to sample from: alias, folder or hub id"})
    prompts: str = field(default="", metadata={"help": "prompts: text file (one per line) or JSONL with 'prompt' or 'messages'"})
    max_new_tokens: int = field(default=64, metadata={"help": "response length limit"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept (longer prompts keep their end)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_k: int = field(default=0, metadata={"help": "top-k filter, 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus filter, 1 = off"})
    chat_template: bool = field(default=False, metadata={"help": "render prompts with the chat template ('messages' rows always are)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per generate call"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even if a GPU is present"})

    def __post_init__(self):
        if not self.prompts:
            raise ConfigError("option 'prompts' is required (--prompts FILE)")
        for name in ("max_new_tokens", "max_prompt_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self.temperature}, {self.top_k}, {self.top_p}")


@dataclass
class RewardFlags:
    """How to read the reward source (see ``rlhfkit ppo --help``)."""

    reward: str = field(default="", metadata={"help": "reward: an rlhfkit reward-model folder, a HF sequence classifier, or module:function"})
    reward_label: str | None = field(default=None, metadata={"help": "classifier rewards: label name or index (default: the last)"})
    reward_transform: Literal["logit", "logit-diff", "prob", "logprob"] = field(default="logit", metadata={"help": "classifier rewards: score from the label's logits"})
    reward_text: Literal["prompt+response", "response"] = field(default="prompt+response", metadata={"help": "classifier rewards: the text it reads"})
    reward_batch_size: int = field(default=32, metadata={"help": "texts per reward-model forward pass"})

    def _check_reward(self):
        if not self.reward:
            raise ConfigError("option 'reward' is required (--reward RM_DIR | CLASSIFIER | module:function)")

    def reward_source(self, device):
        from rlhfkit.ppo.reward_sources import RewardOptions, load_reward_source

        return load_reward_source(self.reward, RewardOptions(
            label=self.reward_label, transform=self.reward_transform, text=self.reward_text,
            batch_size=self.reward_batch_size, device=device))


@dataclass
class GenerateConfig(SamplingOptions):
    """Sample responses from a policy: one JSON line per response, {"prompt", "response"}."""

    n: int = field(default=1, metadata={"help": "responses per prompt"})
    output: str | None = field(default=None, metadata={"help": "JSONL file to write (default: stdout)"})

    def __post_init__(self):
        super().__post_init__()
        if self.n < 1:
            raise ConfigError(f"option 'n' must be >= 1, got {self.n}")


@dataclass
class BonConfig(SamplingOptions, RewardFlags):
    """Best-of-n: sample n responses per prompt and keep the highest-scoring one."""

    n: int = field(default=4, metadata={"help": "responses sampled per prompt"})
    output: str | None = field(default=None, metadata={"help": "JSONL of the best responses {prompt, response, score, scores} (default: stdout)"})
    ranked_output: str | None = field(default=None, metadata={"help": "also write every list, best first, as 'ranked' JSONL (rejection-sampling data)"})

    def __post_init__(self):
        SamplingOptions.__post_init__(self)
        self._check_reward()
        if self.n < 1:
            raise ConfigError(f"option 'n' must be >= 1, got {self.n}")
        if self.ranked_output and self.n < 2:
            raise ConfigError("--ranked-output needs --n >= 2: a ranking needs at least two responses")


@dataclass
class PPOEvalConfig(RewardFlags):
    """Held-out comparison: PPO policy vs reference vs best-of-n, mean score and KL to the reference."""

    policy: str = field(default="", metadata={"help": "the trained policy (e.g. RUN/policy)"})
    reference: str | None = field(default=None, metadata={"help": "the reference model (default: as recorded in POLICY/rlhfkit_ppo.json)"})
    prompts: str = field(default="", metadata={"help": "held-out prompts: text file or JSONL"})
    n_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    bon: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16], metadata={"help": "best-of-n sizes to evaluate"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "response length limit (default: as in training, else 64)"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature (default: as in training, else 1)"})
    chat_template: bool | None = field(default=None, metadata={"help": "render prompts with the chat template (default: as in training)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per generate call"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    output: str = field(default="ppo_eval", metadata={"help": "folder for ppo_eval.json and reward_vs_kl.png"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of the table"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even if a GPU is present"})

    def __post_init__(self):
        self._check_reward()
        for name in ("policy", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"option '{name}' is required (--{name} ...)")
        if not self.bon or any(n < 1 for n in self.bon):
            raise ConfigError(f"option 'bon' must list sizes >= 1, got {self.bon}")
        if self.n_prompts is not None and self.n_prompts < 1:
            raise ConfigError(f"option 'n_prompts' must be >= 1, got {self.n_prompts}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"option 'temperature' must be > 0 (KL needs a sampling distribution), got {self.temperature}")


# ------------------------------------------------------------------------ sampling
@dataclass
class Samples:
    """Sampled responses of one generate call: ``B`` rows, prompt-major."""

    prompts: list[Any]  # (B,) Prompt objects
    query_ids: Tensor  # (B, P)
    query_mask: Tensor  # (B, P)
    response_ids: Tensor  # (B, N)
    response_mask: Tensor  # (B, N)
    responses: list[str]  # (B,)


def _device(cpu: bool) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


def iter_samples(model, tokenizer, prompts: list, n: int, settings, batch_size: int) -> Iterator[Samples]:
    """Sample ``n`` responses per prompt in batches of ``batch_size`` rows (prompt ``i``'s n first)."""
    from rlhfkit.ppo.rollout import (
        decode_responses, encode_queries, eos_token_ids, render_prompt, response_mask_from_eos, sample_responses)

    chat = settings.chat_template or any(p.messages for p in prompts)
    eos_ids = eos_token_ids(model, tokenizer)
    flat = [p for p in prompts for _ in range(n)]  # (P * n,) prompt-major
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        texts = [render_prompt(tokenizer, p, chat) for p in chunk]
        query_ids, query_mask = encode_queries(tokenizer, texts, settings.max_prompt_length, chat)
        query_ids, query_mask = query_ids.to(model.device), query_mask.to(model.device)
        response_ids = sample_responses(model, tokenizer, query_ids, query_mask, settings, eos_ids)
        response_mask, _ = response_mask_from_eos(response_ids, eos_ids)
        yield Samples(chunk, query_ids, query_mask, response_ids, response_mask,
                      decode_responses(tokenizer, response_ids, response_mask, eos_ids))


def _settings(cfg, max_new_tokens: int, temperature: float, chat_template: bool):
    from rlhfkit.ppo.rollout import GenerationSettings

    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=getattr(cfg, "top_k", 0),
                              top_p=getattr(cfg, "top_p", 1.0), max_prompt_length=cfg.max_prompt_length,
                              chat_template=chat_template)


def _sample_texts(cfg: SamplingOptions, n: int) -> tuple[list, list[list[str]]]:
    """(prompts, responses[i][j]) for ``cfg``'s policy and prompts, seeded."""
    from rlhfkit.generation import load_policy
    from rlhfkit.ppo.rollout import read_prompts

    prompts = read_prompts(cfg.prompts)
    model, tokenizer = load_policy(cfg.policy, device=_device(cfg.cpu))
    settings = _settings(cfg, cfg.max_new_tokens, cfg.temperature, cfg.chat_template)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        flat = [r for s in iter_samples(model, tokenizer, prompts, n, settings, cfg.batch_size) for r in s.responses]
    return prompts, [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


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
    """Sample ``cfg.n`` responses per prompt; write (and return) ``{"prompt", "response"}`` rows."""
    prompts, responses = _sample_texts(cfg, cfg.n)
    rows = [{"prompt": p.text, "response": r} for p, rs in zip(prompts, responses) for r in rs]
    _write_jsonl(rows, cfg.output)
    return rows


# ------------------------------------------------------------------------------ bon
def run_bon(cfg: BonConfig) -> list[dict[str, Any]]:
    """Best-of-n: one row per prompt ``{"prompt", "response", "score", "scores"}``; optional ranked lists."""
    prompts, responses = _sample_texts(cfg, cfg.n)
    reward = cfg.reward_source(_device(cfg.cpu))
    flat_prompts = [p.text for p, rs in zip(prompts, responses) for _ in rs]
    scores = reward(flat_prompts, [r for rs in responses for r in rs]).view(len(prompts), cfg.n).tolist()  # (P, n)
    rows, ranked = [], []
    for p, rs, ss in zip(prompts, responses, scores):
        order = sorted(range(cfg.n), key=lambda j: -ss[j])  # best first; stable on ties
        rows.append({"prompt": p.text, "response": rs[order[0]], "score": ss[order[0]], "scores": ss})
        unique = list(dict.fromkeys(rs[j] for j in order))  # a ranking cannot hold one text twice
        if len(unique) >= 2:
            ranked.append((p.text, unique))
    _write_jsonl(rows, cfg.output)
    if cfg.ranked_output:
        from rlhfkit.data.types import PreferenceExample, strict_ranks
        from rlhfkit.data.writers import write_preferences

        skipped = len(prompts) - len(ranked)
        if skipped:
            logger.warning("--ranked-output: %d prompt(s) had fewer than 2 distinct responses and were left out", skipped)
        if ranked:
            write_preferences(cfg.ranked_output, [PreferenceExample(p, tuple(rs), strict_ranks(len(rs))) for p, rs in ranked], "ranked")
    return rows


# ------------------------------------------------------------------------- ppo-eval
def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n nats (arXiv:2009.01325, appendix G.3)."""
    return math.log(n) - (n - 1) / n


def expected_best_of_n(scores: Tensor, n: int) -> Tensor:
    """Unbiased estimate of ``E[max of n samples]`` per row from ``K >= n`` samples ``scores (P, K)``.

    Averages the max over all ``C(K, n)`` subsets of size ``n`` (a U-statistic): with the
    row sorted ascending, ``x_(i)`` is the max of ``C(i - 1, n - 1)`` of them, so
    ``estimate = sum_i C(i - 1, n - 1) / C(K, n) * x_(i)`` for ``i = n..K``. Plain loop::

        for row in scores:
            subsets = itertools.combinations(row.tolist(), n)
            estimate = mean(max(s) for s in subsets)

    Returns:
        ``(P,)`` estimates.
    """
    k = scores.shape[1]
    if not 1 <= n <= k:
        raise ValueError(f"expected_best_of_n: need 1 <= n <= K, got n={n}, K={k}")
    x = scores.double().sort(dim=1).values  # (P, K) ascending
    weights = torch.tensor([math.comb(i - 1, n - 1) for i in range(1, k + 1)], dtype=torch.float64) / math.comb(k, n)  # (K,)
    return (x * weights).sum(dim=1)


@torch.no_grad()
def _sample_logprobs(model, ref_model, tokenizer, prompts, n, settings, batch_size) -> tuple[list[str], list[str], Tensor]:
    """Sample from ``model``; texts and the per-response KL estimate ``sum_t log p - log p_ref`` (B,)."""
    from rlhfkit.ops import masked_sum
    from rlhfkit.ppo.rollout import policy_logprobs

    texts, responses, kls = [], [], []
    for s in iter_samples(model, tokenizer, prompts, n, settings, batch_size):
        texts += [p.text for p in s.prompts]
        responses += s.responses
        if ref_model is None:
            continue
        ids = torch.cat([s.query_ids, s.response_ids], 1)
        mask = torch.cat([s.query_mask, s.response_mask], 1)
        lp = policy_logprobs(model, ids, mask, s.response_ids, settings.temperature)  # (B, N)
        ref_lp = policy_logprobs(ref_model, ids.to(ref_model.device), mask.to(ref_model.device), s.response_ids.to(ref_model.device),
                                 settings.temperature).to(lp.device)
        kls.append(masked_sum(lp - ref_lp, s.response_mask, dim=1).float().cpu())  # k1, unbiased on own samples
    return texts, responses, (torch.cat(kls) if kls else torch.zeros(len(texts)))


def _policy_info(policy: str) -> dict[str, Any]:
    from rlhfkit.ppo.trainer import POLICY_INFO

    f = Path(policy) / POLICY_INFO
    return json.loads(f.read_text()) if f.is_file() else {}


def run_ppo_eval(cfg: PPOEvalConfig) -> dict[str, Any]:
    """Score and KL for the policy, the reference and best-of-n; writes JSON and a PNG to ``cfg.output``."""
    from rlhfkit.generation import load_policy
    from rlhfkit.ppo.rollout import read_prompts

    info = _policy_info(cfg.policy)
    reference = cfg.reference or info.get("reference")
    if not reference:
        raise ConfigError(f"--reference is needed: {cfg.policy} has no rlhfkit_ppo.json naming the model it was trained from")
    temperature = cfg.temperature if cfg.temperature is not None else float(info.get("temperature", 1.0))
    max_new = cfg.max_new_tokens or int(info.get("max_new_tokens", 64))
    chat = cfg.chat_template if cfg.chat_template is not None else bool(info.get("chat_template", False))
    prompts = read_prompts(cfg.prompts)[: cfg.n_prompts]
    device = _device(cfg.cpu)
    policy, tokenizer = load_policy(cfg.policy, device=device)
    ref_model, _ = load_policy(reference, device=device)
    reward = cfg.reward_source(device)
    settings = _settings(cfg, max_new, temperature, chat)
    k = max(cfg.bon)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        p_texts, p_resp, p_kl = _sample_logprobs(policy, ref_model, tokenizer, prompts, 1, settings, cfg.batch_size)
        r_texts, r_resp, _ = _sample_logprobs(ref_model, None, tokenizer, prompts, k, settings, cfg.batch_size)
    p_scores = reward(p_texts, p_resp)  # (P,)
    r_scores = reward(r_texts, r_resp).view(len(prompts), k)  # (P, K)

    rows = [
        {"name": "policy", "score": p_scores.mean().item(), "kl": p_kl.mean().item(), "kl_kind": "sampled"},
        {"name": "reference", "score": r_scores.mean().item(), "kl": 0.0, "kl_kind": "exact"},
    ]
    for n in sorted(set(cfg.bon)):
        rows.append({"name": f"best-of-{n}", "score": expected_best_of_n(r_scores, n).mean().item(),
                     "kl": best_of_n_kl(n), "kl_kind": "analytic"})
    report = {
        "policy": cfg.policy, "reference": reference, "reward": cfg.reward, "n_prompts": len(prompts),
        "max_new_tokens": max_new, "temperature": temperature, "rows": rows,
        "policy_kl_std_error": (p_kl.std().item() / math.sqrt(len(p_kl))) if len(p_kl) > 1 else None,
        "samples": [{"prompt": t, "policy": a, "reference": r_resp[i * k]} for i, (t, a) in enumerate(zip(p_texts, p_resp))][:8],
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppo_eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    _plot_reward_vs_kl(rows, out / "reward_vs_kl.png")
    report["plot"] = str(out / "reward_vs_kl.png")
    return report


def _plot_reward_vs_kl(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bon = [r for r in rows if r["name"].startswith("best-of-")]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([r["kl"] for r in bon], [r["score"] for r in bon], marker="o", label="best-of-n (reference samples)")
    for r in bon:
        ax.annotate(r["name"].removeprefix("best-of-"), (r["kl"], r["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for r, marker in ((rows[0], "*"), (rows[1], "s")):
        ax.scatter([r["kl"]], [r["score"]], marker=marker, s=90, label=r["name"], zorder=3)
    ax.set_xlabel("KL to the reference (nats per response)")
    ax.set_ylabel("mean reward-model score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_eval_table(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, ensure_ascii=False))
        return
    print(f"{report['n_prompts']} held-out prompts, reward {report['reward']}")
    print(f"{'':14s} {'score':>10s} {'KL (nats)':>10s}")
    for r in report["rows"]:
        print(f"{r['name']:14s} {r['score']:10.4f} {r['kl']:10.4f}  ({r['kl_kind']})")
    print(f"report: {Path(report['plot']).parent / 'ppo_eval.json'}, plot: {report['plot']}")
