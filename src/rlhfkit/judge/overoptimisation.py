"""The over-optimisation curve: a run's checkpoints scored by the proxy it optimised and by a gold
judge, against ``sqrt(KL)`` to the policy it started from (Gao et al. 2022, *Scaling Laws for
Reward Model Overoptimization*, arXiv:2210.10760, fig. 1).

The pieces here are pure (no models, no sampling): the score intervals, :func:`curve_summary`
(the checkpoint the gold judge likes best, and whether the proxy kept rising after the gold
fell), :func:`plot_curve` and :func:`curve_markdown`. ``rlhfkit eval --checkpoints``
(:func:`rlhfkit.judge.commands.run_checkpoint_eval`) builds the rows; the pipeline's report reads
them. A row is one checkpoint::

    {"name": "update-4", "update": 4, "path": "runs/rl/snapshots/update-4",
     "kl": 0.81, "sqrt_kl": 0.9, "n": 32,                 # KL to the reference, nats per response
     "proxy": 1.2, "proxy_ci": [1.0, 1.4],                # mean score and its 95% interval
     "proxy_gain": 0.5, "proxy_gain_ci": [0.3, 0.7],      # minus the reference's, paired by prompt
     "gold": 3.1, "gold_ci": [2.5, 3.6], "gold_gain": 0.4, "gold_gain_ci": [-0.1, 0.9]}

The first row is the reference (KL 0, gains 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from .winrate import bootstrap_indices, percentile_interval

__all__ = ["mean_ci", "gain_ci", "curve_summary", "plot_curve", "curve_markdown"]


def mean_ci(scores: Tensor, n_resamples: int = 2000, seed: int = 42, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean score, resampling PROMPTS with replacement.

    ``scores (P, n)``: ``n`` samples of each of ``P`` prompts; a prompt's samples stay together.
    Plain loop::

        for idx in bootstrap_indices(P, R, seed):
            stats.append(mean(scores[i].mean() for i in idx))
        interval = percentiles(stats, 2.5, 97.5)
    """
    per_prompt = scores.double().mean(dim=1)  # (P,)
    idx = bootstrap_indices(per_prompt.numel(), n_resamples, seed)  # (R, P)
    return percentile_interval(per_prompt[idx].mean(dim=1), level)


def gain_ci(
    scores: Tensor, ref_scores: Tensor, n_resamples: int = 2000, seed: int = 42, level: float = 0.95
) -> list[float]:
    """Interval of ``mean(scores) - mean(ref_scores)``, paired by prompt: each resample draws the
    same prompts for both (``scores``, ``ref_scores``: ``(P, n)`` on the same prompts), so the
    prompts' own difficulty, shared by both, drops out of the interval."""
    diff = scores.double().mean(dim=1) - ref_scores.double().mean(dim=1)  # (P,)
    idx = bootstrap_indices(diff.numel(), n_resamples, seed)  # (R, P)
    return percentile_interval(diff[idx].mean(dim=1), level)


def _gain(row: dict[str, Any], first: dict[str, Any], key: str) -> tuple[float, list[float] | None]:
    """``row``'s gain over the reference (the first row), and its interval when the row has one."""
    if f"{key}_gain" in row:
        return row[f"{key}_gain"], row.get(f"{key}_gain_ci")
    return row[key] - first[key], None


def curve_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Which checkpoint the gold judge scores highest, and whether the proxy kept rising after the gold fell.

    ``rows``: the checkpoints in update order, the reference first (keys ``name``, ``gold``,
    ``gold_ci``, ``proxy``; ``update``, ``path``, ``kl``, ``sqrt_kl`` are copied into ``best``).
    Returns ``best`` (the row with the highest mean gold score, the earliest on a tie, so the one
    nearer the reference), ``best_index``, ``proxy_rose_after_gold_fell``, ``gold_fell_at`` (the
    first checkpoint that shows it, or None) and a one-sentence ``message``.

    The flag: some checkpoint after the best has its gold interval wholly below the best's (the
    two 95% intervals do not overlap: a drop larger than the noise of either) while its proxy
    mean is above the best's. Disjoint intervals are a conservative test, which suits a best
    chosen as the maximum of noisy means.
    """
    if not rows:
        raise ValueError("curve_summary needs at least one row")
    b = max(range(len(rows)), key=lambda i: rows[i]["gold"])  # max() keeps the first of equals
    best = rows[b]
    dropped = [j for j in range(b + 1, len(rows)) if rows[j]["gold_ci"][1] < best["gold_ci"][0]]
    fell = [j for j in dropped if rows[j]["proxy"] > best["proxy"]]
    where = f"{best['name']} (sqrt KL {best.get('sqrt_kl', float('nan')):.2f}, gold {best['gold']:.4g})"
    if fell:
        j = rows[fell[0]]
        message = (
            f"Over-optimisation: the gold judge peaked at {where} and by {j['name']} fell below that "
            f"checkpoint's 95% interval (gold {j['gold']:.4g}) while the proxy kept rising "
            f"({best['proxy']:.4g} -> {j['proxy']:.4g}); prefer {best['name']} to the last update."
        )
    elif len(rows) == 1:
        message = f"One checkpoint only, {where}: a curve needs the reference and at least one snapshot."
    elif b == 0:
        message = (
            f"The gold judge scores the start, {where}, highest: no checkpoint of the run improved on it by the gold."
        )
    elif b == len(rows) - 1:
        message = (
            f"The gold judge is highest at the last checkpoint, {where}: no sign of over-optimisation "
            "yet, and a longer run may still gain."
        )
    elif dropped:
        message = (
            f"The gold judge is highest at {where} and fell below that checkpoint's 95% interval by "
            f"{rows[dropped[0]]['name']}, but the proxy fell with it: the run got worse by both, not over-optimised."
        )
    else:
        message = (
            f"The gold judge is highest at {where}; no later checkpoint fell below its 95% interval, "
            "so the later dip is within the noise."
        )
    keys = ("name", "update", "path", "kl", "sqrt_kl", "gold", "proxy")
    return {
        "best": {k: best[k] for k in keys if k in best},
        "best_index": b,
        "proxy_rose_after_gold_fell": bool(fell),
        "gold_fell_at": rows[fell[0]]["name"] if fell else None,
        "message": message,
    }


def _align_zero(ax: Any, ax2: Any) -> None:
    """Set both y ranges so that 0 sits at the same height on the two axes (each range grows, none shrinks)."""
    down, up = [], []
    for a in (ax, ax2):
        lo, hi = a.get_ylim()
        down.append(max(-lo, 0.0))
        up.append(max(hi, 0.0))
    shares = [d / (d + u) if d + u > 0 else 0.0 for d, u in zip(down, up)]
    r = min(max(shares), 0.9)  # the share of the height below 0, common to both
    for a, d, u, s in zip((ax, ax2), down, up, shares):
        if r == 0:
            a.set_ylim(0.0, u or 1.0)
        elif s < r:
            a.set_ylim(-r * u / (1 - r), u)
        else:
            a.set_ylim(-d, d * (1 - r) / r)


def plot_curve(rows: list[dict[str, Any]], path: str | Path, summary: dict[str, Any] | None = None) -> Path:
    """The curve as a PNG at ``path``: the gold judge's and the proxy's gain over the reference
    against ``sqrt(KL)``, on twin y axes (their units differ: gold on the left, proxy on the
    right) whose zeros are aligned, with 95% intervals as error bars; a star marks the best
    checkpoint by the gold judge (``summary``: :func:`curve_summary`'s, computed if not given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary or curve_summary(rows)
    x = [r["sqrt_kl"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax2 = ax.twinx()
    handles = []
    for a, key, color, style, label in (
        (ax, "gold", "tab:orange", "-", "gold judge"),
        (ax2, "proxy", "tab:blue", "--", "proxy"),
    ):
        gains = [_gain(r, rows[0], key) for r in rows]
        y = [g for g, _ in gains]
        err = None
        if all(ci is not None for _, ci in gains):
            err = [[max(g - ci[0], 0.0) for g, ci in gains], [max(ci[1] - g, 0.0) for g, ci in gains]]
        h = a.errorbar(x, y, yerr=err, color=color, ls=style, marker="o", ms=4, capsize=2, label=label)
        handles.append(h)
        a.set_ylabel(f"{label}: score minus the reference's", color=color)
        a.tick_params(axis="y", colors=color)
    b = summary["best_index"]
    star = ax.plot(
        [x[b]],
        [_gain(rows[b], rows[0], "gold")[0]],
        marker="*",
        ms=15,
        color="tab:red",
        ls="none",
        zorder=5,
        label=f"best by gold: {rows[b]['name']}",
    )[0]
    handles.append(star)
    ax.axhline(0.0, color="gray", lw=0.6)
    _align_zero(ax, ax2)
    ax.set_xlabel("sqrt(KL to the reference)   [KL in nats per response]")
    title = "Over-optimisation: gold and proxy against sqrt(KL)"
    if summary["proxy_rose_after_gold_fell"]:
        title += "\nthe proxy kept rising after the gold fell"
    ax.set_title(title, fontsize=10)
    ax.legend(handles=handles, fontsize=8, loc="best")
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _ci(v: float, ci: list[float] | None) -> str:
    return f"{v:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else f"{v:.4g}"


def curve_markdown(result: dict[str, Any], image: str | None = "curve.png") -> str:
    """``curve.md``: what was scored, the one-sentence verdict, the plot (``image``, relative to
    the Markdown file; None: no image) and one table row per checkpoint, the best in bold."""
    rows = result["rows"]
    out = [
        "# Over-optimisation curve",
        "",
        f"Run `{result['run']}`, reference `{result['reference']}`; gold judge `{result['judge']}` "
        f"({result['judge_kind']}), proxy `{result['proxy']}` ({result['proxy_kind']}); "
        f"{result['n_prompts']} prompts x {result['samples_per_prompt']} samples, seed {result['seed']}.",
        "",
        result["message"],
        "",
    ]
    if image:
        out += [f"![gold and proxy against sqrt(KL)]({image})", ""]
    out += [
        "| checkpoint | update | KL | sqrt KL | proxy [95%] | gold [95%] | proxy gain | gold gain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        name = f"**{r['name']}**" if i == result["best_index"] else r["name"]
        out.append(
            f"| {name} | {r['update']} | {r['kl']:.3g} | {r['sqrt_kl']:.3g} | {_ci(r['proxy'], r.get('proxy_ci'))} "
            f"| {_ci(r['gold'], r.get('gold_ci'))} | {_ci(*_gain(r, rows[0], 'proxy'))} "
            f"| {_ci(*_gain(r, rows[0], 'gold'))} |"
        )
    out += [
        "",
        "KL: nats per response to the reference, on each checkpoint's own samples (the exact next-token KL",
        "summed over the response). Intervals: 95% percentile bootstraps over prompts, the gains paired by",
        "prompt. Read it like Gao et al. 2022 (arXiv:2210.10760), fig. 1: the proxy rises with KL; the gold",
        "rises, peaks and may fall. See docs/eval.md.",
        "",
    ]
    return "\n".join(out)
