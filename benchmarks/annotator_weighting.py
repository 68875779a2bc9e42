"""Which rankings a reward model should train on when one annotator of a team is bad: ``every``,
``consensus`` or ``weighted`` (``rlhfkit annotate export --aggregate``).

The question (issue 19): with several annotators per set, train on every ranking, on one
consensus list per set, or on every ranking weighted by its annotator's agreement with the
others (:func:`rlhfkit.annotate.agreement.annotator_weights`)? The winner becomes the default.
A benchmark, not a test.

Set-up (every choice, in the order the script makes it):

- **Texts, split, candidate sets and features**: those of ``benchmarks/active_learning.py``,
  imported from it (``build_pool``, ``text_features``): the 600 four-review lines of
  ``examples/reviews_ranklists.tsv``, 6 of the 30 prompts held out, the other 24 pooled into
  candidate sets of M ~ 8 reviews, MiniLM-L6 head inputs computed once.
- **The team.** Four annotators ranking by Plackett-Luce (a ranking sorts ``utility / T + G``,
  G standard Gumbel: Luce 1959, Plackett 1975, Yellott 1977) on the gold lexicon score:
  three careful ones (T = 4, no length bias; they order a median 21-point pair right 99.5% of
  the time) and a fourth, in each of the ``--bad`` scenarios: ``none`` (careful too: the
  control, where weighting must not hurt), ``reversed`` (ranks by minus
  the gold score, T = 4: adversarial or a misread instruction), ``noisy`` (T = 40: 63% right on
  that pair), ``length`` (T = 4 on the gold score plus 3 points per word: prefers long reviews).
- **Who ranks what.** Per seed and budget, ``--sets`` (30, 60 and 120) pool sets drawn at random; each shows K = 4
  (``--k``) of its M, drawn at random, to 2 or 3 annotators (drawn at random, 2 or 3 with equal
  chance), who all see the same K. So every aggregation trains on the same rankings: ~150 of
  them per 60 sets, a quarter by the bad annotator.
- **Aggregations.** ``every``: one list per ranking. ``consensus``: one list per set, the Borda
  mean rank of its rankings (``consensus_ranks``; ties kept, a fully tied consensus dropped),
  as ``exported_lists(..., "consensus")``. ``weighted``: one list per ranking, weighted by
  ``annotator_weights`` (default floor 0.1, iterated to its fixed point), as
  ``exported_lists(..., "weighted")``; ``weighted-1`` is the same with one round (the plain
  leave-one-out agreement), to show what the iteration adds. Reference, not a choice:
  ``oracle``, every ranking of the careful annotators only.
- **The learner.** A linear head on the frozen features trained by ``rm train``'s own objective:
  per-list ``rlhfkit.losses.pairwise_loss`` reduced by ``rlhfkit.losses.weighted_list_sum``
  (sum w_i l_i / sum w_i; every weight 1 except for ``weighted``), plus L2 ``--l2`` (4.0, as
  ``--probe-l2``) times the mean squared pairwise feature difference, minimised to
  convergence by L-BFGS in float64 (full batch: the step size and the batch split play no part).
- **Metric.** Pairwise accuracy on every pair of the held-out lines whose gold scores differ.
- **Seeds.** ``--seeds`` (20): seed s draws the sets, the shown K, the annotators and their noise,
  shared by every aggregation (paired comparison). Mean with a 95% Student-t interval over
  seeds, and the paired interval of each aggregation minus ``every``.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/annotator_weighting.py

It prints the machine, the command line, one markdown table per scenario and the mean
annotator weights, and writes ``benchmarks/results/annotator_weighting.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from active_learning import build_pool, t_interval, text_features

ROOT = Path(__file__).resolve().parents[1]
CAREFUL = ("ann", "bea", "cal")
BAD = "dan"
# scenario -> (sign of the gold score, Plackett-Luce temperature, length bias per word) of the bad annotator
SCENARIOS = {
    "none": (1.0, 4.0, 0.0),
    "reversed": (-1.0, 4.0, 0.0),
    "noisy": (1.0, 40.0, 0.0),
    "length": (1.0, 4.0, 3.0),
}
AGGREGATIONS = ("every", "consensus", "weighted", "weighted-1", "oracle")


@dataclass
class Args:
    seeds: int = field(default=20, metadata={"help": "runs per scenario, seeds 0..N-1 (>= 3 for an interval)"})
    sets: str = field(default="30,60,120", metadata={"help": "pool sets ranked per seed (comma-separated budgets)"})
    k: int = field(default=4, metadata={"help": "candidates shown and ranked per set (K of M)"})
    bad: str = field(default="none,reversed,noisy,length", metadata={"help": "scenarios of the fourth annotator"})
    floor: float = field(default=0.1, metadata={"help": "annotator_weights' floor"})
    l2: float = field(default=4.0, metadata={"help": "L2 of the head, relative to the features' scale"})
    rows_per_set: int = field(default=2, metadata={"help": "shipped 4-review lines pooled into one candidate set"})
    heldout_share: float = field(default=0.2, metadata={"help": "share of the prompts held out"})
    split_seed: int = field(default=0, metadata={"help": "seed of the prompt split (fixed across seeds)"})
    data: str = field(default="examples/reviews_ranklists.tsv", metadata={"help": "prompt<TAB>reviews TSV"})
    backbone: str = field(default="minilm-l6", metadata={"help": "reward model backbone (features frozen)"})
    max_length: int = field(default=64, metadata={"help": "tokens per (prompt, review)"})
    threads: int = field(default=1, metadata={"help": "PyTorch threads"})

    def __post_init__(self):
        unknown = sorted(set(self.bad.split(",")) - set(SCENARIOS))
        if unknown:
            raise SystemExit(f"--bad: unknown scenario(s) {unknown}; use a comma-separated subset of {list(SCENARIOS)}")
        if self.seeds < 1 or self.k < 2 or not all(n.isdigit() and int(n) >= 2 for n in self.sets.split(",")):
            raise SystemExit(
                f"need --seeds >= 1, --sets integers >= 2 and --k >= 2, got {self.seeds}, {self.sets}, {self.k}"
            )

    @property
    def budgets(self) -> list[int]:
        return [int(n) for n in self.sets.split(",")]


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Args):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, **f.metadata)
    return Args(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- one seed


def rank_by_team(pool, args: Args, scenario: str, seed: int, n_sets: int) -> list[tuple[int, str, list[int]]]:
    """(set index, annotator, shown text ids best first) of every ranking of one seed and budget."""
    rng = random.Random(f"{scenario}-{seed}-{n_sets}")
    g = torch.Generator().manual_seed(seed)
    sign, temp_bad, bias_bad = SCENARIOS[scenario]
    eligible = [j for j, s in enumerate(pool.sets) if len(s) >= args.k]
    rankings = []
    for j in rng.sample(eligible, min(n_sets, len(eligible))):
        shown = rng.sample(pool.sets[j], args.k)  # text ids
        for name in rng.sample((*CAREFUL, BAD), rng.choice((2, 3))):
            s, temp, bias = (sign, temp_bad, bias_bad) if name == BAD else (1.0, 4.0, 0.0)
            gumbel = -torch.log(
                -torch.log(torch.rand(len(shown), generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12))
            )
            # Plackett-Luce by the Gumbel-max trick: sort utility / T + Gumbel (Yellott 1977)
            key = {t: (s * pool.gold[t] + bias * pool.words[t]) / temp + float(gumbel[i]) for i, t in enumerate(shown)}
            rankings.append((j, name, sorted(shown, key=lambda t: -key[t])))
    return rankings


def aggregate(rankings, how: str, floor: float) -> list[tuple[list[int], list[int], float]]:
    """Training lists (text ids, ranks, weight) of one aggregation, as ``exported_lists`` makes them."""
    from rlhfkit.annotate.agreement import annotator_weights
    from rlhfkit.annotate.consensus import consensus_ranks

    if how == "consensus":
        by_set: dict[int, list[list[int]]] = {}
        for j, _, order in rankings:
            by_set.setdefault(j, []).append(order)
        lists = []
        for orders in by_set.values():
            ids = sorted(orders[0])  # one response order per set
            ranks = consensus_ranks([[o.index(t) for t in ids] for o in orders])
            if len(set(ranks)) > 1:
                lists.append((ids, list(ranks), 1.0))
        return lists
    weights: dict[str, float] = {}
    if how.startswith("weighted"):
        # (set, annotator, ranks of the set's texts in one shared order): what the store passes
        as_ranks = [(j, name, [order.index(t) for t in sorted(order)]) for j, name, order in rankings]
        weights = annotator_weights(as_ranks, floor=floor, max_rounds=1 if how == "weighted-1" else 50)
    keep = [r for r in rankings if how != "oracle" or r[1] != BAD]
    return [(order, list(range(len(order))), weights.get(name, 1.0)) for _, name, order in keep]


def fit_head(feats: torch.Tensor, lists, l2: float) -> torch.Tensor:
    """argmin_w  sum_i w_i pairwise_loss_i / sum_i w_i + lam/2 |w|^2 on frozen features: (D,), float64."""
    from rlhfkit import losses as L

    k = max(len(ids) for ids, _, _ in lists)
    idx = torch.tensor([ids + [ids[0]] * (k - len(ids)) for ids, _, _ in lists])  # (B, K) text ids, padded
    ranks = torch.tensor([r + [0] * (k - len(r)) for _, r, _ in lists])  # (B, K)
    mask = torch.tensor([[1] * len(ids) + [0] * (k - len(ids)) for ids, _, _ in lists])  # (B, K)
    weights = torch.tensor([w for _, _, w in lists], dtype=torch.float64)  # (B,)
    x = feats.double()
    better = (ranks[:, :, None] < ranks[:, None, :]) & mask.bool()[:, :, None] & mask.bool()[:, None, :]  # (B, K, K)
    b, i, j = better.nonzero(as_tuple=True)
    scale = float((x[idx[b, i]] - x[idx[b, j]]).pow(2).mean())  # as rm train --head-init probe
    lam = l2 * max(scale, 1e-12)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        per_list = L.pairwise_loss(x[idx] @ w, ranks, mask, reduction="none")  # (B,)
        loss = L.weighted_list_sum(per_list, weights, 1 / float(weights.sum())) + 0.5 * lam * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def heldout_accuracy(feats: torch.Tensor, w: torch.Tensor, pool) -> float:
    scores = feats.double() @ w  # (N,)
    hp = pool.heldout_pairs  # (P, 2) better, worse by the gold rule
    return float((scores[hp[:, 0]] > scores[hp[:, 1]]).double().mean())


# ----------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from rlhfkit.annotate.agreement import annotator_weights
    from rlhfkit.cpu import cpu_model

    pool = build_pool(args)
    feats = text_features(args, pool.texts)  # (N, D)
    t_feats = time.perf_counter() - t0
    # results[scenario][sets][aggregation]: held-out accuracy per seed
    results: dict[str, dict[int, dict[str, list[float]]]] = {}
    mean_weights: dict[str, dict[str, list[float]]] = {}
    n_rankings: dict[str, dict[int, list[int]]] = {}
    for scenario in args.bad.split(","):
        results[scenario], n_rankings[scenario] = {}, {}
        mean_weights[scenario] = {"careful": [], "bad": []}
        for n_sets in args.budgets:
            results[scenario][n_sets] = by_how = {how: [] for how in AGGREGATIONS}
            n_rankings[scenario][n_sets] = []
            for seed in range(args.seeds):
                rankings = rank_by_team(pool, args, scenario, seed, n_sets)
                n_rankings[scenario][n_sets].append(len(rankings))
                for how in AGGREGATIONS:
                    head = fit_head(feats, aggregate(rankings, how, args.floor), args.l2)
                    by_how[how].append(heldout_accuracy(feats, head, pool))
                w = annotator_weights(
                    [(j, name, [order.index(t) for t in sorted(order)]) for j, name, order in rankings],
                    floor=args.floor,
                )
                mean_weights[scenario]["careful"].append(statistics.fmean(w[n] for n in CAREFUL if n in w))
                mean_weights[scenario]["bad"].append(w.get(BAD, 1.0))
            print(
                f"{scenario}, {n_sets} sets: "
                + ", ".join(f"{how} {statistics.fmean(v):.4f}" for how, v in by_how.items()),
                flush=True,
            )
    wall = time.perf_counter() - t0

    print()
    print(f"command: {shlex.join([sys.executable.replace(str(ROOT) + '/', ''), *sys.argv])}")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at end "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}"
    )
    print(
        f"{args.seeds} seeds x {len(results)} scenarios x sets {args.sets}; K = {args.k}, 2-3 annotators per set; "
        f"held out: {len(pool.heldout_pairs)} gold pairs; features {tuple(feats.shape)} from {args.backbone} in "
        f"{t_feats:.0f} s; floor {args.floor}, l2 {args.l2}; run time {wall:.0f} s"
    )
    rows: dict[str, dict[int, dict[str, dict[str, tuple[float, float, float]]]]] = {}
    others = [how for how in AGGREGATIONS if how != "every"]
    for scenario, by_sets in results.items():
        mw = mean_weights[scenario]
        print()
        print(
            f"Bad annotator {scenario!r}: held-out pairwise accuracy of every, and of each aggregation minus every "
            f"(paired). Mean agreement weight: careful {statistics.fmean(mw['careful']):.2f}, "
            f"bad {statistics.fmean(mw['bad']):.2f}."
        )
        print()
        print(f"| sets (rankings) | every | {' | '.join(f'{how} - every' for how in others)} |")
        print(f"| ---: | ---: | {' | '.join('---:' for _ in others)} |")
        rows[scenario] = {}
        for n_sets, by_how in by_sets.items():
            every = t_interval(by_how["every"])
            rows[scenario][n_sets] = {"every": {"accuracy": every}}
            cells = []
            for how in others:
                d = t_interval([a - e for a, e in zip(by_how[how], by_how["every"])])
                rows[scenario][n_sets][how] = {"accuracy": t_interval(by_how[how]), "minus_every": d}
                cells.append(f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]")
            n = statistics.fmean(n_rankings[scenario][n_sets])
            print(f"| {n_sets} ({n:.0f}) | {every[0]:.4f} [{every[1]:.4f}, {every[2]:.4f}] | {' | '.join(cells)} |")
    print()
    print(f"Means over {args.seeds} seeds [95% Student-t interval over seeds; the difference's is paired].")
    out = ROOT / "benchmarks/results/annotator_weighting.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"args": asdict(args), "results": results, "rows": rows, "weights": mean_weights, "wall_s": wall}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
