"""The report's view across rounds (``rounds: N``): one row per round and one picture."""

from __future__ import annotations

import re
from pathlib import Path

ROUND = re.compile(r"^round-(\d+)/(.+)$")

COLUMNS = (
    ("round", "round"),
    ("rankings", "rankings (this round)"),
    ("rankings_total", "rankings (so far)"),
    ("waited_s", "annotator time (s)"),
    ("agreement_tau", "agreement with consensus (Kendall tau)"),
    ("rm_accuracy", "reward model held-out pairwise accuracy"),
    ("score", "policy score (this round's reward model)"),
    ("gold", "gold score"),
    ("reference_gold", "gold score of the starting policy"),
    ("kl", "KL to the starting policy (nats)"),
)


def split_stage(name: str) -> tuple[int | None, str]:
    """``round-3/reward_model`` -> (3, ``reward_model``); a one-pass stage -> (None, name)."""
    m = ROUND.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def round_rows(results: dict) -> list[dict]:
    """One dict per round (keys of :data:`COLUMNS`, ``None`` where a stage did not run) from the stage results."""
    rounds: dict[int, dict] = {}
    for name, res in results.items():
        r, stage = split_stage(name)
        if r is None:
            continue
        row = rounds.setdefault(r, {key: None for key, _ in COLUMNS} | {"round": r})
        summary = res.summary
        if stage == "preferences":
            row["rankings"] = summary.get("rankings_this_round")
            row["rankings_total"] = summary.get("rankings_total")
            row["waited_s"] = summary.get("waited_s")
            row["agreement_tau"] = (summary.get("agreement") or {}).get("consensus_tau")
        elif stage == "reward_model":
            row["rm_accuracy"] = summary.get("pairwise_accuracy")
        elif stage == "evaluation" and summary.get("rows"):
            trained = summary["rows"][0]
            ref = next((x for x in summary["rows"] if x["name"] == "reference"), {})
            row["score"], row["kl"] = trained.get("score"), trained.get("kl")
            row["gold"], row["reference_gold"] = trained.get("gold"), ref.get("gold")
    return [rounds[r] for r in sorted(rounds)]


def fmt(v: object) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_rounds(rows: list[dict], path: Path) -> Path | None:
    """Four panels against the round: reward-model accuracy; gold score; KL; rankings and annotator time."""
    if len(rows) < 1:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r[key] is None else float(r[key]) for r in rows]

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    axes[0].plot(x, series("rm_accuracy"), "o-")
    axes[0].set_title("reward model: held-out pairwise accuracy", fontsize=9)
    axes[1].plot(x, series("gold"), "o-", label="policy")
    if any(r["reference_gold"] is not None for r in rows):
        axes[1].plot(x, series("reference_gold"), "--", color="grey", label="starting policy")
        axes[1].legend(fontsize=8)
    axes[1].set_title("gold score (the annotators' rule)", fontsize=9)
    axes[2].plot(x, series("kl"), "o-", color="tab:red")
    axes[2].set_title("KL to the starting policy (nats)", fontsize=9)
    axes[3].bar(x, series("rankings"), color="tab:green", label="rankings")
    axes[3].set_title("rankings collected (bars), annotator time (line, s)", fontsize=9)
    twin = axes[3].twinx()
    twin.plot(x, series("waited_s"), "o-", color="black")
    twin.set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(x)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
