"""Learning curves of the reward model: which rankings to ask for, ``random`` or ``uncertainty``.

The question (issue 19): does asking people about the sets the reward model is least sure of
reach the same held-out accuracy with fewer rankings? Target: ``uncertainty`` reaches
``random``'s final accuracy with at most 60% of the rankings. A benchmark, not a test.

Set-up (every choice, in the order the script makes it):

- **Texts.** ``examples/reviews_ranklists.tsv``: 600 lines of ``prompt<TAB>4 reviews`` over 30
  prompts ("Write a short review of the toaster.", one per product). Only the reviews are used;
  the shipped order is ignored (it disagrees with the gold rule on 238 of the 600 lines).
- **Split by prompt.** 6 of the 30 prompts (``--heldout-share`` 0.2, drawn once with
  ``--split-seed``, the same for every seed and both strategies) are held out; the pool is made
  of the other 24 only, so the held-out accuracy is on products the reward model never saw.
- **Candidate sets (the pool).** For each pool prompt, ``--rows-per-set`` (2) of its lines, in file
  order, are pooled into one candidate set: M = 8 reviews of the same product (fewer where
  a review repeats; a prompt's last set has 4 when its line count is odd). Pooling two lines
  gives the K-of-M choice room (with M = 4 and K = 3 there are only 4 subsets). Each set can be
  ranked once.
- **K = 3** (``--k``) of the M are shown and ranked. K = 3 rather than 2: a ranking of 3 yields
  3 ordered pairs for one annotator action (InstructGPT ranks K = 4..9 for the same reason),
  while K < M leaves the choice of which K to show, which ``uncertainty`` is about.
- **The simulated team (the gold rule, never shown to the model).** The gold score of a review
  is :func:`rlhfkit.pipeline.simulated.lexicon_score` (positive minus negative lexicon words per
  100 words). Three annotators (``TEAM``), each with a Plackett-Luce noise temperature T and a
  length bias b per word: annotator a ranks the shown texts by ``(gold + b * words) / T + G``
  with G standard Gumbel noise, which is the Plackett-Luce model and, for two texts, Bradley-Terry
  with P(i above j) = sigmoid(((u_i - u_j) / T)) (Luce 1959; Plackett 1975; the Gumbel-max
  trick, Yellott 1977). With a median gap of 21 points between two reviews of one line, the
  careful annotator (T = 4) orders such a pair right 99.5% of the time, the others (T = 8) 93%,
  before their length bias. Each set goes to one annotator drawn at random; the annotator and
  the noise of each (set, candidate) are drawn once per seed, so both strategies get the same
  answer when they ask the same question (common random numbers: the comparison is paired).
- **The learner.** The reward model ``RewardModel.from_pretrained(--backbone)`` (MiniLM-L6 by
  default) as a linear Bradley-Terry head on its frozen head inputs (``head_inputs``: what its
  score layer reads), i.e. the linear-probe half of LP-FT. The features of every text are
  computed once; each fit is then :func:`rlhfkit.models.probe_fit.fit_pairwise_probe` (Newton)
  on all ordered pairs of the lists ranked so far, with ``--l2`` 4.0 relative to the features'
  scale (``rm train --probe-l2``'s default; not tuned here).
- **Held-out metric.** Every line of the 6 held-out prompts, its 4 reviews ranked by the gold
  rule without noise; pairwise accuracy of the fitted head over all pairs whose gold scores
  differ (pairs the rule ties are left out).
- **Strategies, at equal budgets.** Both start from the same ``--seed-batch`` (10) random sets,
  each showing K of M drawn at random. Then batches of ``--batch`` (10) lists until
  ``--budget`` (120, half the pool) lists are ranked:
  ``random``: random unranked sets, random K of M each;
  ``uncertainty``: E = ``--ensemble`` (8) heads by :func:`rlhfkit.models.probe_fit.bootstrap_probes`
  on the lists ranked so far; for each unranked set, the K of M that
  :func:`rlhfkit.evaluation.uncertainty.select_candidates` picks (BALD disagreement, near-duplicates
  within ``--min-distance`` 0.2 skipped, the annotation app's default), and the batch is the b sets
  with the highest :func:`rlhfkit.evaluation.uncertainty.set_uncertainty` of those K. This is what
  ``rlhfkit annotate --selection uncertainty`` does, with a refit every batch.
- **Seeds and intervals.** ``--seeds`` (5) runs with seeds 0, 1, ...: the seed draws the seed
  batch, random's choices, the team's noise and the bootstrap. Each table cell is the mean over
  seeds with a 95% Student-t interval over seeds (mean +- t(0.975, n-1) * sd / sqrt(n)); the
  difference column is the paired t-interval of uncertainty - random.
- **Headline.** On the mean curves: the first budget at which ``uncertainty`` reaches
  ``random``'s accuracy at ``--budget``, as a share of ``--budget``; and the same per seed
  (each seed against its own random run).
- **Diagnostics (pool side only, no held-out data).** For the lists each strategy asked after the
  seed batch: the mean gold gap of the pairs shown, the share the team ordered against the gold
  rule, the share the rule ties, and how many pool prompts were covered. Beside them, the held-out
  accuracy of a probe fit on every pool set ranked in full (M of M, all 246 lists) by the same
  team: about what the pool and the features can teach at most.
  ``--ablation`` adds ``uncertain-sets`` (sets by uncertainty, a random K of each shown) and
  ``uncertain-k`` (random sets, the disputed K shown), to tell the two halves of the strategy apart.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/active_learning.py              # ~30 s on 2 busy cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/active_learning.py --seeds 20   # ~1 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/active_learning.py --seeds 10 --ablation --png /tmp/ablation.png

It prints the machine, the command line, a markdown table and the headline, draws
``--png`` (default ``docs/active_learning.png``) and writes ``benchmarks/results/active_learning.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# (name, Plackett-Luce temperature in lexicon points, length bias in lexicon points per word)
TEAM = (("careful", 4.0, 0.0), ("verbose", 8.0, 0.8), ("terse", 8.0, -0.5))

# t(0.975, df) for df = 1..30; beyond, the Cornish-Fisher expansion (scipy is not a dependency)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
T975 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass
class Args:
    seeds: int = field(default=5, metadata={"help": "runs per strategy, seeds 0..N-1 (>= 3 for an interval)"})
    batch: int = field(default=10, metadata={"help": "lists ranked per round (b); the ensemble is refit every round"})
    seed_batch: int = field(default=10, metadata={"help": "random lists both strategies start from"})
    budget: int = field(default=120, metadata={"help": "ranked lists at the end of the curve (capped at the pool)"})
    k: int = field(default=3, metadata={"help": "candidates shown and ranked per set (K of M)"})
    ensemble: int = field(default=8, metadata={"help": "bootstrap heads in the uncertainty ensemble (E)"})
    rows_per_set: int = field(default=2, metadata={"help": "shipped 4-review lines pooled into one candidate set"})
    min_distance: float = field(default=0.2, metadata={"help": "near-duplicate threshold of select_candidates"})
    l2: float = field(default=4.0, metadata={"help": "L2 of every probe fit, relative to the features' scale"})
    heldout_share: float = field(default=0.2, metadata={"help": "share of the prompts held out"})
    split_seed: int = field(default=0, metadata={"help": "seed of the prompt split (fixed across seeds)"})
    data: str = field(default="examples/reviews_ranklists.tsv", metadata={"help": "prompt<TAB>reviews TSV"})
    backbone: str = field(default="minilm-l6", metadata={"help": "reward model backbone (features frozen)"})
    max_length: int = field(default=64, metadata={"help": "tokens per (prompt, review)"})
    ablation: bool = field(
        default=False,
        metadata={
            "help": "also run uncertain-sets (sets by uncertainty, a random K shown) and uncertain-k (random "
            "sets, the disputed K shown), to see which half of the strategy helps or hurts"
        },
    )
    png: str = field(default="docs/active_learning.png", metadata={"help": "where to draw the curves"})
    threads: int = field(default=1, metadata={"help": "PyTorch threads"})

    def __post_init__(self):
        if self.seeds < 1:
            raise SystemExit(f"--seeds must be >= 1 (3 or more for an interval), got {self.seeds}")
        if not 2 <= self.k <= 4 * self.rows_per_set:
            raise SystemExit(
                f"--k must be in [2, M = 4 x --rows-per-set = {4 * self.rows_per_set}], got {self.k}: "
                "lower --k or pool more lines with --rows-per-set"
            )
        if self.batch < 1 or self.seed_batch < 1 or self.budget < self.seed_batch:
            raise SystemExit(
                f"need --batch >= 1, --seed-batch >= 1 and --budget >= --seed-batch, got {self.batch}, "
                f"{self.seed_batch}, {self.budget}"
            )
        if self.ensemble < 2:
            raise SystemExit(f"--ensemble must be >= 2 (one head cannot disagree with itself), got {self.ensemble}")


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", **f.metadata)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, **f.metadata)
    return Args(**vars(parser.parse_args(argv)))


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval over seeds; the interval is the mean itself for one seed."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, m, m
    df = len(xs) - 1
    z = 1.959964
    t = T975[df - 1] if df <= 30 else z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    half = t * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


# ----------------------------------------------------------------------------- data


@dataclass
class Pool:
    texts: list[tuple[str, str]]  # unique (prompt, review)
    gold: list[float]  # lexicon score of each text
    words: list[int]
    sets: list[list[int]]  # candidate sets: text ids, M each
    heldout_pairs: torch.Tensor  # (P, 2): (better, worse) text ids by the gold rule, no ties
    n_heldout_lists: int
    heldout_prompts: list[str]


def build_pool(args: Args) -> Pool:
    from rlhfkit.pipeline.simulated import lexicon_score

    by_prompt: dict[str, list[list[str]]] = defaultdict(list)
    for n, line in enumerate((ROOT / args.data).read_text().splitlines(), 1):
        cols = line.split("\t")
        if len(cols) < 3:
            raise SystemExit(f"{args.data}:{n}: expected prompt<TAB>review<TAB>review..., got {len(cols)} column(s)")
        by_prompt[cols[0]].append(cols[1:])
    prompts = sorted(by_prompt)
    n_out = max(1, round(args.heldout_share * len(prompts)))
    heldout = sorted(random.Random(args.split_seed).sample(prompts, n_out))

    index: dict[tuple[str, str], int] = {}

    def tid(prompt: str, review: str) -> int:
        return index.setdefault((prompt, review), len(index))

    sets, heldout_pairs, n_lists = [], [], 0
    for prompt in prompts:
        rows = by_prompt[prompt]
        if prompt in heldout:
            for row in rows:
                ids = list(dict.fromkeys(tid(prompt, r) for r in row))
                n_lists += 1
                scores = dict(zip(ids, (lexicon_score(r) for r in dict.fromkeys(row))))
                heldout_pairs += [(a, b) for a in ids for b in ids if scores[a] > scores[b]]
        else:
            for start in range(0, len(rows), args.rows_per_set):
                chunk = [r for row in rows[start : start + args.rows_per_set] for r in row]
                ids = list(dict.fromkeys(tid(prompt, r) for r in chunk))
                if len(ids) >= args.k:
                    sets.append(ids)
    texts = list(index)
    return Pool(
        texts=texts,
        gold=[lexicon_score(r) for _, r in texts],
        words=[len(r.split()) for _, r in texts],
        sets=sets,
        heldout_pairs=torch.tensor(heldout_pairs),
        n_heldout_lists=n_lists,
        heldout_prompts=heldout,
    )


def text_features(args: Args, texts: list[tuple[str, str]]) -> torch.Tensor:
    """The reward model's head inputs of every text, once: (N, D)."""
    from rlhfkit.data.collate import EncodedPreferences
    from rlhfkit.data.types import PreferenceExample
    from rlhfkit.models.probe_fit import head_inputs, head_layer
    from rlhfkit.models.reward import RewardModel

    rm = RewardModel.from_pretrained(args.backbone, max_length=args.max_length)
    # one single-response "list" per text, so that data.lists[j] == [j]
    examples = [PreferenceExample(p, (r,), (0,)) for p, r in texts]
    data = EncodedPreferences.build(examples, rm.encode, args.max_length, what="the reviews")
    assert [row[0] for row in data.lists] == list(range(len(texts)))
    return head_inputs(rm, head_layer(rm), data, rm.pad, list(range(len(texts))), 64, "cpu")


# ----------------------------------------------------------------------------- one run


class Team:
    """The simulated annotators of one seed: who ranks each set and their noise, drawn once."""

    def __init__(self, pool: Pool, seed: int):
        g = torch.Generator().manual_seed(10_000 + seed)
        self.pool = pool
        self.annotator = torch.randint(len(TEAM), (len(pool.sets),), generator=g).tolist()
        u = torch.rand(len(pool.sets), max(len(s) for s in pool.sets), generator=g, dtype=torch.float64)
        self.gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))  # (S, M_max), standard Gumbel

    def rank(self, j: int, shown: list[int]) -> list[int]:
        """Text ids of set j's shown candidates (positions in the set), best first."""
        _, temp, bias = TEAM[self.annotator[j]]
        ids = self.pool.sets[j]
        # Plackett-Luce by the Gumbel-max trick: sort utility / T + Gumbel (Yellott 1977)
        key = {
            i: (self.pool.gold[ids[i]] + bias * self.pool.words[ids[i]]) / temp + float(self.gumbel[j, i])
            for i in shown
        }
        return [ids[i] for i in sorted(shown, key=lambda i: -key[i])]


def list_pairs(order: list[int]) -> list[tuple[int, int]]:
    return [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]


def fit_and_score(feats: torch.Tensor, ranked: list[list[int]], pool: Pool, l2: float) -> float:
    """Held-out pairwise accuracy of the Bradley-Terry probe fit on every pair of the ranked lists."""
    from rlhfkit.models.probe_fit import fit_pairwise_probe

    pairs = torch.tensor([p for order in ranked for p in list_pairs(order)])  # (P, 2)
    diffs = feats[pairs[:, 0]] - feats[pairs[:, 1]]  # (P, D)
    scale = float(diffs.double().pow(2).mean())  # as rm train --head-init probe and bootstrap_probes
    w, _ = fit_pairwise_probe(diffs, l2 * max(scale, 1e-12))
    scores = feats.double() @ w  # (N,)
    hp = pool.heldout_pairs
    return float((scores[hp[:, 0]] > scores[hp[:, 1]]).double().mean())


def run(
    strategy: str, seed: int, args: Args, pool: Pool, feats: torch.Tensor, team: Team
) -> tuple[list[float], list[list[int]]]:
    """Held-out accuracy after the seed batch and after every batch, up to the budget; and the
    ranked lists (text ids, best first, in the order asked)."""
    from rlhfkit.evaluation.uncertainty import ensemble_scores, select_candidates, set_uncertainty
    from rlhfkit.models.probe_fit import bootstrap_probes

    start = random.Random(seed)  # the same seed batch for both strategies
    rng = random.Random(f"{strategy}-{seed}")
    budget = min(args.budget, len(pool.sets))
    first = start.sample(range(len(pool.sets)), args.seed_batch)
    asked = [(j, start.sample(range(len(pool.sets[j])), args.k)) for j in first]
    ranked = [team.rank(j, shown) for j, shown in asked]
    left = sorted(set(range(len(pool.sets))) - set(first))
    curve = [fit_and_score(feats, ranked, pool, args.l2)]
    rounds = 0
    while len(ranked) < budget:
        b = min(args.batch, budget - len(ranked))
        by_uncertainty = strategy in ("uncertainty", "uncertain-sets")  # which sets
        disputed_k = strategy in ("uncertainty", "uncertain-k")  # which K of each set's M
        if not (by_uncertainty or disputed_k):
            batch = [(j, rng.sample(range(len(pool.sets[j])), args.k)) for j in rng.sample(left, b)]
        else:
            heads = bootstrap_probes(
                feats, [list_pairs(o) for o in ranked], n_heads=args.ensemble, l2=args.l2, seed=1000 * seed + rounds
            )  # (E, D)
            scores = ensemble_scores(feats, heads)  # (E, N)
            scored = []
            for j in left if by_uncertainty else rng.sample(left, b):
                ids = pool.sets[j]
                s = scores[:, ids]  # (E, M)
                disputed = select_candidates(s, args.k, [pool.texts[i][1] for i in ids], args.min_distance)
                # the ablation uncertain-sets picks a set by its most disputed K but shows a random K
                shown = disputed if disputed_k else rng.sample(range(len(ids)), args.k)
                scored.append((-set_uncertainty(s[:, disputed]), j, shown))
            batch = [(j, shown) for _, j, shown in (sorted(scored) if by_uncertainty else scored)[:b]]
        ranked += [team.rank(j, shown) for j, shown in batch]
        taken = {j for j, _ in batch}
        left = [j for j in left if j not in taken]
        curve.append(fit_and_score(feats, ranked, pool, args.l2))
        rounds += 1
    return curve, ranked


def asked_stats(pool: Pool, ranked: list[list[int]]) -> dict[str, float]:
    """What a strategy asked after the seed batch, from the pool side only (no held-out data):
    the gold gap of the pairs shown, the share the team ordered against the gold rule, the
    share the gold rule ties, and how many prompts the lists covered."""
    pairs = [p for order in ranked for p in list_pairs(order)]
    gaps = [pool.gold[a] - pool.gold[b] for a, b in pairs]
    return {
        "gold_gap": statistics.fmean(abs(g) for g in gaps),
        "against_gold": statistics.fmean(g < 0 for g in gaps),
        "gold_ties": statistics.fmean(g == 0 for g in gaps),
        "prompts": len({pool.texts[order[0]][0] for order in ranked}),
    }


# ----------------------------------------------------------------------------- report


def draw(path: Path, ns: list[int], curves: dict[str, list[list[float]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for (name, runs), color in zip(curves.items(), ("tab:gray", "tab:blue", "tab:orange", "tab:green")):
        cells = [t_interval([r[i] for r in runs]) for i in range(len(ns))]
        style = "-" if name in ("random", "uncertainty") else "--"
        ax.plot(ns, [c[0] for c in cells], style, marker="o", ms=3, color=color, label=name)
        ax.fill_between(ns, [c[1] for c in cells], [c[2] for c in cells], color=color, alpha=0.2, lw=0)
    ax.set_xlabel("ranked lists (K of M shown per list)")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title="mean, 95% t-interval over seeds", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def reach(curve: list[float], target: float, ns: list[int]) -> int | None:
    return next((n for n, acc in zip(ns, curve) if acc >= target), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from rlhfkit.cpu import cpu_model

    pool = build_pool(args)
    feats = text_features(args, pool.texts)  # (N, D)
    t_feats = time.perf_counter() - t0
    budget = min(args.budget, len(pool.sets))
    ns = [args.seed_batch]
    while ns[-1] < budget:
        ns.append(min(ns[-1] + args.batch, budget))

    strategies = ["random", "uncertainty"] + (["uncertain-sets", "uncertain-k"] if args.ablation else [])
    curves: dict[str, list[list[float]]] = {name: [] for name in strategies}
    asked: dict[str, list[dict[str, float]]] = {name: [] for name in strategies}
    for seed in range(args.seeds):
        team = Team(pool, seed)
        for strategy in curves:
            curve, ranked = run(strategy, seed, args, pool, feats, team)
            curves[strategy].append(curve)
            asked[strategy].append(asked_stats(pool, ranked[args.seed_batch :]))
        print(
            f"seed {seed}: final random {curves['random'][-1][-1]:.4f}, uncertainty {curves['uncertainty'][-1][-1]:.4f}"
        )
    # every pool set ranked in full (M of M) by the same team: what the pool can teach at most
    full = statistics.fmean(
        fit_and_score(
            feats, [Team(pool, s).rank(j, list(range(len(pool.sets[j])))) for j in range(len(pool.sets))], pool, args.l2
        )
        for s in range(args.seeds)
    )
    wall = time.perf_counter() - t0

    m_sizes = [len(s) for s in pool.sets]
    print()
    print(f"command: {shlex.join([sys.executable.replace(str(ROOT) + '/', ''), *sys.argv])}")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}"
    )
    print(
        f"pool: {len(pool.sets)} candidate sets over {len(pool.texts)} texts "
        f"(M = {min(m_sizes)}..{max(m_sizes)}, mean {statistics.fmean(m_sizes):.1f}), K = {args.k}; held out: "
        f"{pool.n_heldout_lists} lists of {len(pool.heldout_prompts)} prompts, {len(pool.heldout_pairs)} gold pairs; "
        f"features {tuple(feats.shape)} from {args.backbone} in {t_feats:.0f} s; team {TEAM}"
    )
    print(
        f"{args.seeds} seeds, seed batch {args.seed_batch}, batches of {args.batch}, budget {budget} lists, "
        f"E = {args.ensemble}, l2 {args.l2}, min distance {args.min_distance}; run time {wall:.0f} s"
    )
    print()
    print("| lists ranked | random | uncertainty | uncertainty - random |")
    print("| ---: | ---: | ---: | ---: |")
    rows = []
    for i, n in enumerate(ns):
        r = t_interval([c[i] for c in curves["random"]])
        u = t_interval([c[i] for c in curves["uncertainty"]])
        d = t_interval([cu[i] - cr[i] for cu, cr in zip(curves["uncertainty"], curves["random"])])
        rows.append({"lists": n, "random": r, "uncertainty": u, "difference": d})
        print(
            f"| {n} | {r[0]:.4f} [{r[1]:.4f}, {r[2]:.4f}] | {u[0]:.4f} [{u[1]:.4f}, {u[2]:.4f}] "
            f"| {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |"
        )
    print()
    print(f"Means over {args.seeds} seeds [95% Student-t interval over seeds; the difference's is paired].")
    print(f"Every pool set ranked in full (M of M, {len(pool.sets)} lists) by the same team: {full:.4f}.")

    mean_r = [statistics.fmean(c[i] for c in curves["random"]) for i in range(len(ns))]
    mean_u = [statistics.fmean(c[i] for c in curves["uncertainty"]) for i in range(len(ns))]
    n_u = reach(mean_u, mean_r[-1], ns)
    per_seed = [reach(cu, cr[-1], ns) for cu, cr in zip(curves["uncertainty"], curves["random"])]
    shares = [f"{n / budget:.0%}" if n else "never" for n in per_seed]
    if n_u is None:
        verdict = f"does not reach it within {budget} lists: target (<= 60% of the rankings) not met"
    else:
        share = n_u / budget
        met = "met" if share <= 0.6 else "not met"
        verdict = f"reaches it at {n_u} of {budget} lists = {share:.0%} of the rankings (target <= 60%: {met})"
    print(f"Headline: random's final mean accuracy is {mean_r[-1]:.4f}; uncertainty {verdict}.")
    print(f"Per seed (each against its own random run's final accuracy): {', '.join(shares)}.")

    if args.ablation:
        print()
        print(
            "Ablation, uncertainty's two halves apart (mean accuracy, and difference to random with its paired t-interval):"
        )
        print("| lists ranked | uncertain-sets (random K) | uncertain-k (random sets) |")
        print("| ---: | ---: | ---: |")
        for i, n in enumerate(ns):
            cells = []
            for name in ("uncertain-sets", "uncertain-k"):
                d = t_interval([ca[i] - cr[i] for ca, cr in zip(curves[name], curves["random"])])
                m = statistics.fmean(c[i] for c in curves[name])
                cells.append(f"{m:.4f} ({d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}])")
            print(f"| {n} | {' | '.join(cells)} |")
    print()
    print(
        f"What each strategy asked after the seed batch (pool side, mean over seeds; {budget - args.seed_batch} lists):"
    )
    for name, stats in asked.items():
        m = {key: statistics.fmean(st[key] for st in stats) for key in stats[0]}
        print(
            f"  {name}: mean |gold gap| of the pairs shown {m['gold_gap']:.1f} points, ordered against the gold "
            f"rule by the team {m['against_gold']:.1%}, tied by the gold rule {m['gold_ties']:.1%}, "
            f"prompts covered {m['prompts']:.1f} of {len(set(p for p, _ in pool.texts)) - len(pool.heldout_prompts)}"
        )

    title = (
        f"{args.backbone} probe, K={args.k} of M~{statistics.fmean(m_sizes):.0f}, {args.seeds} seeds, "
        f"batches of {args.batch}, E={args.ensemble}"
    )
    draw(ROOT / args.png, ns, curves, title)
    print(f"curves: {args.png}")
    out = ROOT / "benchmarks/results/active_learning.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": asdict(args),
                "lists": ns,
                "curves": curves,
                "rows": rows,
                "full_pool": full,
                "asked": asked,
                "wall_s": wall,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
