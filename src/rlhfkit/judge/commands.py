"""``rlhfkit eval``: policy A against baseline B on the same prompts, by a judge.

Each prompt gets ``n`` samples from A and ``n`` from B; sample ``i`` of A is judged against
sample ``i`` of B. The math is in :mod:`.winrate`, the judges in :mod:`.judges`, the files in
:mod:`.report`.

``rlhfkit eval --best-of N --selector SPEC`` puts best-of-N of A on the policy side: for each
of A's sample slots, ``N`` answers of A, of which the selector (the proxy) keeps the best
(:mod:`.best_of`); the judge compares that answer with B's.

``rlhfkit eval --checkpoints RUN`` (:func:`run_checkpoint_eval`) is the over-optimisation curve
instead: the policy a run started from, each of its snapshots and its final policy, scored by
the run's proxy and by a gold judge, against sqrt(KL) to the start (:mod:`.overoptimisation`).
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
from rlhfkit.models.logprobs import policy_logprobs, response_logits
from rlhfkit.models.policy import inference_dtype, load_policy
from rlhfkit.models.policy_info import POLICY_INFO, read_policy_info
from rlhfkit.models.snapshots import SNAPSHOTS, Snapshot, list_snapshots, load_snapshot
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.ops import masked_sum, tempered
from rlhfkit.sampling import SamplingSettings, iter_samples

from .best_of import best_of_n_kl, pick_best
from .judges import LMPairwiseJudge, ScoreJudge, load_judge, pairwise_outcomes
from .overoptimisation import curve_markdown, curve_summary, gain_ci, mean_ci, plot_curve
from .report import write_report
from .winrate import lc_win_rate, lc_win_rate_ci, outcomes_from_scores, rates, win_rate_ci

__all__ = ["EvalConfig", "run_eval", "run_checkpoint_eval", "recorded_reference", "print_summary"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvalConfig(Options):
    """Win rate of a policy against a baseline by a judge, or a run's over-optimisation curve (--checkpoints).

    With ``--policy``: the win rate with intervals, a length-controlled win rate, KL of A to B and
    response lengths; with ``--best-of N --selector SPEC``, A's answers are best-of-N of the policy
    by the selector. With ``--checkpoints RUN``: every snapshot of the run scored by its proxy
    and by ``--judge`` against sqrt(KL) to its start (see docs/eval.md)."""

    policy: str | None = opt(None, "policy A: a causal LM folder, run folder or alias")
    checkpoints: str | None = opt(
        None,
        "instead of --policy: an 'rlhfkit rl --save-policy-every N' run folder; its start, snapshots and "
        "final policy are scored by the proxy and by --judge against sqrt(KL): the over-optimisation curve",
    )
    proxy: str | None = opt(
        None,
        "with --checkpoints: the proxy score, a reward-model folder, DPO run or module:function "
        "(default: the reward the run trained against, as its folder records it)",
    )
    baseline: str | None = opt(
        None,
        "baseline B (default: the reference recorded in A's folder by 'rlhfkit rl' or 'rlhfkit dpo'); "
        "with --checkpoints: the start of the curve (default: the policy the run started from)",
    )
    prompts: str = opt(help="prompts: text file (one per line) or JSONL with 'prompt' or 'messages'")
    judge: str = opt(
        help="the judge: a reward-model or classifier folder, a DPO run, module:function "
        "(or path/to/file.py:function), or lm:FOLDER (a causal LM asked 'A or B?' both ways round)"
    )
    samples_per_prompt: int = opt(
        1, "samples per prompt from each policy; sample i of A is judged against i of B", ge=1
    )
    best_of: int | None = opt(
        None,
        "judge best-of-N of --policy instead of its plain samples: each of A's samples is the one --selector "
        "scores highest of N drawn (N >= 2); its KL is the analytic log(N) - (N-1)/N",
    )
    selector: str | None = opt(
        None,
        "with --best-of: what picks the best of N, a reward-model folder, DPO run or module:function "
        "(the proxy; --judge stays the gold)",
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
        if self.policy and self.checkpoints:
            raise ConfigError(
                f"--policy {self.policy} and --checkpoints {self.checkpoints} are mutually exclusive: --policy "
                "compares one policy with a baseline, --checkpoints RUN draws a run's over-optimisation curve; give one"
            )
        if not self.policy and not self.checkpoints:
            raise ConfigError(
                "option --policy is required (policy A: a causal LM folder, run folder or alias), or --checkpoints "
                "RUN for the over-optimisation curve of an 'rlhfkit rl --save-policy-every N' run"
            )
        if self.checkpoints:
            for option, spec in (("--judge", self.judge), ("--proxy", self.proxy)):
                if spec and spec.startswith("lm:"):
                    raise ConfigError(
                        f"{option} {spec} with --checkpoints: an LM judge compares two answers and gives no "
                        "score per answer, which the curve plots; give a judge that scores each answer: a "
                        "reward-model folder, a DPO run or module:function"
                    )
        elif self.proxy:
            log.warning("eval: --proxy %s is ignored without --checkpoints (it is the curve's proxy)", self.proxy)
        if self.best_of is not None:
            if self.checkpoints:
                raise ConfigError(
                    f"--best-of {self.best_of} with --checkpoints: the curve scores each checkpoint's own samples, "
                    "and best-of-N is a policy of its own; evaluate it with --policy MODEL --best-of N, or drop --best-of"
                )
            if self.best_of < 2:
                raise ConfigError(
                    f"option --best-of must be >= 2, got {self.best_of}: best-of-1 is the policy itself; drop "
                    "--best-of (and --selector) to judge the policy's own samples"
                )
            if not self.selector:
                raise ConfigError(
                    f"--best-of {self.best_of} needs --selector: the reward-model folder, DPO run or module:function "
                    f"that keeps the best of the {self.best_of} samples (the proxy; --judge stays the gold)"
                )
            if self.selector.startswith("lm:"):
                raise ConfigError(
                    f"--selector {self.selector}: an LM judge compares two answers and gives no score per answer, "
                    "and best-of-N keeps the highest-scored of N; give a reward-model folder, a DPO run or "
                    "module:function"
                )
        elif self.selector:
            log.warning("eval: --selector %s is ignored without --best-of N (it picks the best of N)", self.selector)
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


@torch.no_grad()
def _sampled_kl_full(policy, reference, batches, temperature: float) -> Tensor:
    """``sum_t KL(pA(. | y_<t) || pB(. | y_<t))`` over each of A's sampled responses ``(P * n,)``:
    the exact KL over the vocabulary at every sampled prefix, summed. By the chain rule its mean
    over A's samples is unbiased for KL(A || B) of whole responses, like :func:`_sampled_kl`'s k1,
    but it is never negative and varies far less (the next token is averaged out, not sampled),
    which a curve against sqrt(KL) needs near the reference. Plain loop per response::

        for t in response positions: kl += sum_v pA(v) * (log pA(v) - log pB(v))
    """
    kls = []
    for s in batches:
        ids = torch.cat([s.query_ids, s.response_ids], 1)
        mask = torch.cat([s.query_mask, s.response_mask], 1)
        N = s.response_ids.shape[1]
        logits, _ = response_logits(policy, ids, mask, N)  # (B, N, V)
        d = reference.device
        ref_logits, _ = response_logits(reference, ids.to(d), mask.to(d), N)  # (B, N, V)
        for i in range(ids.shape[0]):  # one response at a time: three (N, V) float copies, not (B, N, V)
            lp = tempered(logits[i], temperature).float().log_softmax(-1)  # (N, V)
            lq = tempered(ref_logits[i].to(lp.device), temperature).float().log_softmax(-1)  # (N, V)
            per_token = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0)  # (N,): >= 0 but for rounding
            kls.append(masked_sum(per_token, s.response_mask[i], dim=0).cpu())
    return torch.stack(kls)


def _same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same folder (or, not being folders, are the same alias)."""

    def key(spec: str) -> str:
        path = Path(resolve_run_folder(str(Path(spec).expanduser())))
        return str(path.resolve()) if path.exists() else spec

    return key(a) == key(b)


def _lengths(x: Tensor) -> dict[str, Any]:
    v = x.tolist()
    return {"mean": statistics.fmean(v), "median": statistics.median(v), "min": min(v), "max": max(v)}


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Sample A and B, judge the pairs, and write summary.json, samples.jsonl, report.md and report.html.
    With ``cfg.best_of``: A's answer in each pair is the best of ``cfg.best_of`` of A's samples by
    ``cfg.selector``. With ``cfg.checkpoints``: :func:`run_checkpoint_eval`."""
    if cfg.checkpoints:
        return run_checkpoint_eval(cfg)
    assert cfg.policy is not None  # EvalConfig.validate: --policy or --checkpoints
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
    selector = None
    if cfg.best_of:
        assert cfg.selector is not None  # EvalConfig.validate: --best-of needs --selector
        selector = load_judge(cfg.selector, device=device, batch_size=cfg.judge_batch_size, option="--selector")
        assert isinstance(selector, ScoreJudge)  # lm: is refused by EvalConfig.validate
        if cfg.selector == cfg.judge:
            log.warning(
                "eval: --selector and --judge are the same (%s): best-of-N wins by the proxy that chose it, "
                "which says nothing about an independent judge",
                cfg.judge,
            )
    dtype = inference_dtype(None, device)
    policy, tokenizer = load_policy(cfg.policy, device=device, dtype=dtype, option="--policy")
    base, base_tokenizer = load_policy(baseline, device=device, dtype=dtype, option="--baseline")
    chat = use_chat_template(
        tokenizer, cfg.chat_template if cfg.chat_template is not None else info.get("chat_template"), cfg.policy
    )
    settings = SamplingSettings(max_new, cfg.temperature, 0, 1.0, cfg.max_prompt_length)
    n, k, P = cfg.samples_per_prompt, cfg.best_of or 1, len(prompts)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # k draws for each of A's n slots: (P * n * k,) prompt-major, slot-major
        a_resp, a_len, a_batches = _samples(policy, tokenizer, prompts, n * k, settings, chat, cfg.batch_size)
        torch.manual_seed(cfg.seed + 1)  # B's answers do not depend on --best-of: runs share them
        b_resp, b_len, _ = _samples(base, base_tokenizer, prompts, n, settings, chat, cfg.batch_size)
    same_vocab = base_tokenizer.get_vocab() == tokenizer.get_vocab()
    texts = [p.text for p in prompts for _ in range(n)]  # (P * n,) prompt-major, like the samples

    candidates: list[list[str]] = []
    cand_scores = chosen = None
    if selector is None:
        kl = _sampled_kl(policy, base, a_batches, cfg.temperature) if same_vocab else None
        kl_info: dict[str, Any] = {"kl_kind": "sampled k1"}
    else:
        cand_texts = [t for t in texts for _ in range(k)]  # (P * n * k,)
        cand_scores = selector.scores(cand_texts, a_resp).view(P * n, k)  # (P * n, k)
        chosen = pick_best(cand_scores)  # (P * n,)
        flat = torch.arange(P * n) * k + chosen  # (P * n,) into A's draws
        candidates = [a_resp[i * k : (i + 1) * k] for i in range(P * n)]
        a_resp, a_len = [a_resp[j] for j in flat.tolist()], a_len[flat]
        # KL(bon || B) = KL(bon || A) + E_bon[log pA - log pB]: the first analytic, the second k1 on the chosen answers
        kl_info = {"kl_kind": "analytic best-of-n", "kl_best_of_n": best_of_n_kl(k)}
        if _same_model(cfg.policy, baseline):
            kl = torch.full((P * n,), kl_info["kl_best_of_n"], dtype=torch.float64)  # exact: no sampling error
        elif same_vocab:
            k1 = _sampled_kl(policy, base, a_batches, cfg.temperature)[flat]  # (P * n,)
            kl = kl_info["kl_best_of_n"] + k1.double()
            kl_info = {**kl_info, "kl_kind": "analytic best-of-n + sampled k1 of A to B", "kl_k1": k1.mean().item()}
        else:
            kl = None
    if kl is None:
        log.warning("eval: %s and %s have different tokenizers; KL of A to B is not reported", cfg.policy, baseline)
    score_a = score_b = None
    inconsistent = torch.zeros(len(texts), dtype=torch.bool)
    if isinstance(judge, LMPairwiseJudge):
        outcomes, inconsistent = pairwise_outcomes(judge, texts, a_resp, b_resp)
    else:
        score_a, score_b = judge.scores(texts, a_resp), judge.scores(texts, b_resp)
        outcomes = outcomes_from_scores(score_a, score_b)
    o = outcomes.view(P, n)  # (P, n)
    diff = (a_len - b_len).double().view(P, n)  # (P, n) tokens of A minus tokens of B
    r = rates(o)
    lc = lc_win_rate(o, diff)
    summary: dict[str, Any] = {
        "policy": f"best-of-{k}({cfg.policy}) by {cfg.selector}" if selector is not None else cfg.policy,
        "policy_model": cfg.policy,
        "best_of": cfg.best_of,
        "selector": cfg.selector if selector is not None else None,
        "selector_kind": selector.kind if selector is not None else None,
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
        **{key: r[key] for key in ("win", "tie", "loss", "wins", "ties", "losses", "win_rate")},
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
        **kl_info,
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
    if cand_scores is not None and chosen is not None:  # --best-of: what the selector chose from
        summary["selector_score_policy"] = cand_scores.gather(1, chosen[:, None]).mean().item()
        summary["selector_score_candidates"] = cand_scores.mean().item()  # A's own samples, as without --best-of
        for i, row in enumerate(rows):
            row["chosen"] = int(chosen[i])
            row["candidates"] = candidates[i]
            row["candidates_scores"] = cand_scores[i].tolist()
    write_report(Path(cfg.output), summary, rows, a_len.tolist(), b_len.tolist())
    return summary


def _checkpoints(run: Path) -> list[Snapshot]:
    """The run's snapshots and final policy, in update order, or an error saying how to make them."""
    hint = (
        "run 'rlhfkit rl ... --save-policy-every N' to save the policy every N updates, then give its --output "
        "folder to --checkpoints"
    )
    if not run.is_dir():
        raise ConfigError(f"--checkpoints {run}: no such folder; {hint}")
    if not (run / SNAPSHOTS).is_dir():
        raise ConfigError(f"--checkpoints {run}: no {SNAPSHOTS}/ folder in it (no policy snapshots); {hint}")
    snaps = list_snapshots(run)
    if not any(s.path.parent.name == SNAPSHOTS for s in snaps):
        raise ConfigError(f"--checkpoints {run}: {run / SNAPSHOTS} holds no update-N snapshot; {hint}")
    return snaps


def _proxy_spec(cfg: EvalConfig, run: Path, info: dict[str, Any]) -> tuple[str, str]:
    """``(spec, where it came from)`` of the curve's proxy: ``--proxy``, else the run's recorded reward."""
    if cfg.proxy:
        return cfg.proxy, "--proxy"
    reward = info.get("reward")
    if not reward:
        raise ConfigError(
            f"--proxy is needed: {run} records no reward in its {POLICY_INFO}; pass --proxy with the reward model "
            "(or module:function) the run trained against"
        )
    kind, _, rest = str(reward).partition(":")
    if kind in ("rm", "function") and rest:  # rl --reward's forced kinds: the same specs as a judge's
        reward = rest
    elif kind in ("classifier", "human") and rest:
        raise ConfigError(
            f"--proxy is needed: {run} trained against --reward {reward}, which eval cannot score with; pass "
            "--proxy with a reward-model folder, DPO run or module:function that scores like it"
        )
    return str(reward), "the run's reward"


def _load_proxy(spec: str, source: str, device: torch.device, batch_size: int) -> ScoreJudge:
    try:
        proxy = load_judge(spec, device=device, batch_size=batch_size, option="--proxy")
    except ConfigError as e:
        if source == "--proxy":
            raise
        raise ConfigError(
            f"--proxy is needed: the run's recorded reward {spec!r} does not load here ({e}); pass --proxy "
            "(a relative path in the run's record is relative to where the run was started)"
        ) from None
    assert isinstance(proxy, ScoreJudge)  # lm: is refused by EvalConfig.validate and _proxy_spec's input
    return proxy


def run_checkpoint_eval(cfg: EvalConfig) -> dict[str, Any]:
    """The over-optimisation curve of the run ``cfg.checkpoints`` (Gao et al. 2022, arXiv:2210.10760, fig. 1).

    For the policy the run started from (the reference: KL 0), every ``snapshots/update-N`` in
    update order and ``final/``: ``cfg.samples_per_prompt`` samples of each of the same prompts,
    drawn with the same seed for every checkpoint; their scores by the proxy (``cfg.proxy``,
    default the run's recorded reward) and by the gold judge ``cfg.judge``, each a mean with a
    bootstrap interval over prompts and a gain over the reference paired by prompt; and the
    sampled KL of the checkpoint to the reference (k1 on its own samples, as :func:`run_eval`).
    Writes ``curve.json`` (what this returns), ``curve.png``, ``curve.md`` and
    ``curve_samples.jsonl`` under ``cfg.output``; the summary keys (``best``,
    ``proxy_rose_after_gold_fell``, ``message``) are :func:`.overoptimisation.curve_summary`'s.
    """
    run = Path(cfg.checkpoints or "").expanduser()
    snaps = _checkpoints(run)
    info = snaps[0].info
    start = info.get("policy") or info.get("reference")
    reference = cfg.baseline or start
    if not reference:
        raise ConfigError(
            f"--baseline is needed: {snaps[0].path / POLICY_INFO} records no starting policy; pass --baseline "
            "MODEL, the policy the run started from"
        )
    proxy_spec, proxy_from = _proxy_spec(cfg, run, info)
    if proxy_spec == cfg.judge:
        log.warning("eval: the proxy and the gold judge are the same (%s); the two curves will coincide", cfg.judge)
    prompts = read_prompts(cfg.prompts)[: cfg.n_prompts]
    max_new = cfg.max_new_tokens or int(info.get("max_new_tokens", 64))
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    judge = load_judge(cfg.judge, device=device, batch_size=cfg.judge_batch_size)
    assert isinstance(judge, ScoreJudge)  # lm: is refused by EvalConfig.validate
    proxy = _load_proxy(proxy_spec, proxy_from, device, cfg.judge_batch_size)
    dtype = inference_dtype(None, device)
    ref_model, tokenizer = load_policy(reference, device=device, dtype=dtype, option="--baseline")
    chat = use_chat_template(
        tokenizer, cfg.chat_template if cfg.chat_template is not None else info.get("chat_template"), reference
    )
    settings = SamplingSettings(max_new, cfg.temperature, 0, 1.0, cfg.max_prompt_length)
    n, P = cfg.samples_per_prompt, len(prompts)
    texts = [p.text for p in prompts for _ in range(n)]  # (P * n,) prompt-major, like the samples

    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    ref_scores: dict[str, Tensor] = {}
    for snap in [None, *snaps]:  # the reference first
        if snap is None:
            name, update, path, snap_info = "reference", 0, reference, {}
            model, tok = ref_model, tokenizer
        else:
            name, update, path, snap_info = snap.path.name, snap.update, str(snap.path), snap.info
            model, tok = load_snapshot(snap, device=device, dtype=dtype)
        log.info("eval --checkpoints: %s (update %d)", name, update)
        if tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"--checkpoints {run}: {path} has another tokenizer than the reference {reference}, so its KL "
                "cannot be measured; pass --baseline with the policy the run started from"
            )
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # the same seed for every checkpoint: common random numbers
            responses, lengths, batches = _samples(model, tok, prompts, n, settings, chat, cfg.batch_size)
        if snap is None:
            kl = kl_k1 = torch.zeros(len(texts))
        else:
            kl = _sampled_kl_full(model, ref_model, batches, cfg.temperature)
            kl_k1 = _sampled_kl(model, ref_model, batches, cfg.temperature)
        scores = {"proxy": proxy.scores(texts, responses).view(P, n), "gold": judge.scores(texts, responses).view(P, n)}
        if snap is None:
            ref_scores = scores
        row: dict[str, Any] = {"name": name, "update": update, "path": path, "n": P * n}
        row["kl"] = kl.mean().item()
        row["kl_std_error"] = kl.std().item() / math.sqrt(len(kl)) if len(kl) > 1 else None
        row["sqrt_kl"] = math.sqrt(row["kl"])
        row["kl_k1"] = kl_k1.mean().item()  # the estimator of eval --policy, for comparison
        for key, s in scores.items():
            row[key] = s.mean().item()
            row[f"{key}_ci"] = mean_ci(s, cfg.bootstrap, cfg.seed)
            row[f"{key}_gain"] = row[key] - ref_scores[key].mean().item()
            row[f"{key}_gain_ci"] = gain_ci(s, ref_scores[key], cfg.bootstrap, cfg.seed)
        row["length_mean"] = lengths.double().mean().item()
        row["train_kl"] = snap_info.get("rl/kl")  # the run's own estimate at that update, for comparison
        row["train_score_mean"] = snap_info.get("rl/score_mean")
        rows.append(row)
        flat = {k: v.flatten() for k, v in scores.items()}
        samples += [
            {
                "checkpoint": name,
                "prompt_index": i // n,
                "sample": i % n,
                "prompt": texts[i],
                "response": responses[i],
                "tokens": int(lengths[i]),
                "proxy": flat["proxy"][i].item(),
                "gold": flat["gold"][i].item(),
                "kl": kl[i].item(),
            }
            for i in range(len(texts))
        ]

    summary = curve_summary(rows)
    result: dict[str, Any] = {
        "run": str(run),
        "reference": reference,
        "reference_from": "--baseline" if cfg.baseline else "the run's starting policy",
        "judge": cfg.judge,
        "judge_kind": judge.kind,
        "proxy": proxy_spec,
        "proxy_kind": proxy.kind,
        "proxy_from": proxy_from,
        "prompts": cfg.prompts,
        "n_prompts": P,
        "samples_per_prompt": n,
        "max_new_tokens": max_new,
        "temperature": cfg.temperature,
        "seed": cfg.seed,
        "ci_level": 0.95,
        "bootstrap_resamples": cfg.bootstrap,
        "output": cfg.output,
        **summary,
        "rows": rows,
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "curve_samples.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples), encoding="utf-8"
    )
    plot_curve(rows, out / "curve.png", summary)
    (out / "curve.md").write_text(curve_markdown(result), encoding="utf-8")
    return result


def _print_curve(result: dict[str, Any]) -> None:
    print(
        f"{result['run']}: {len(result['rows'])} checkpoints, gold {result['judge']}, proxy {result['proxy']} "
        f"({result['n_prompts']} prompts x {result['samples_per_prompt']})"
    )
    print(f"  {'checkpoint':16s} {'sqrt KL':>8s} {'proxy':>10s} {'gold':>10s}")
    for i, r in enumerate(result["rows"]):
        mark = "  <- best by gold" if i == result["best_index"] else ""
        print(f"  {r['name']:16s} {r['sqrt_kl']:8.3f} {r['proxy']:10.4g} {r['gold']:10.4g}{mark}")
    print(f"  {result['message']}")
    print(f"  wrote {result['output']}/curve.png, curve.md, curve.json")


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """The summary as one JSON document, or a few readable lines."""
    if as_json:
        print(json.dumps(summary, ensure_ascii=False))
        return
    if "rows" in summary:  # eval --checkpoints
        _print_curve(summary)
        return
    lo, hi = summary["win_rate_ci"]
    llo, lhi = summary["lc_win_rate_ci"]
    print(f"{summary['policy']} vs {summary['baseline']} by {summary['judge']} ({summary['n_pairs']} pairs)")
    print(f"  win {summary['win']:.1%}  tie {summary['tie']:.1%}  loss {summary['loss']:.1%}")
    print(f"  win rate {summary['win_rate']:.1%} [{lo:.1%}, {hi:.1%}]")
    print(f"  length-controlled win rate {summary['lc_win_rate']:.1%} [{llo:.1%}, {lhi:.1%}]")
    if summary["kl"] is not None:
        how = f" ({summary['kl_kind']})" if summary.get("best_of") else ""
        print(f"  KL(A || B) {summary['kl']:.3f} nats per response{how}")
    print(f"  wrote {summary.get('output', '')}")
