"""The files ``rlhfkit eval`` writes: ``summary.json``, ``samples.jsonl`` (every pair and its
verdict), ``report.md`` and ``report.html`` (the plots embedded as base64 PNGs)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

__all__ = ["write_report", "markdown"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows shared by the Markdown and the HTML."""
    lo, hi = s["win_rate_ci"]
    llo, lhi = s["lc_win_rate_ci"]
    rows = [
        ("policy (A)", s["policy"]),
        ("baseline (B)", f"{s['baseline']} ({s['baseline_from']})"),
        ("judge", f"{s['judge']} ({s['judge_kind']})"),
        ("pairs", f"{s['n_pairs']} ({s['n_prompts']} prompts x {s['samples_per_prompt']})"),
        ("win / tie / loss", f"{_pct(s['win'])} / {_pct(s['tie'])} / {_pct(s['loss'])}"),
        ("win rate (wins + ties/2)", f"{_pct(s['win_rate'])} [{_pct(lo)}, {_pct(hi)}] (95% bootstrap over prompts)"),
        ("length-controlled win rate", f"{_pct(s['lc_win_rate'])} [{_pct(llo)}, {_pct(lhi)}]"),
    ]
    if s["judge_kind"] == "lm-pairwise":
        rows.append(("position-inconsistent pairs (ties)", str(s["position_inconsistent"])))
    if s["score_policy"] is not None:
        rows.append(("mean judge score A / B", f"{s['score_policy']:.4g} / {s['score_baseline']:.4g}"))
    if s.get("best_of"):
        rows.append(("selector (picks A's best of N)", f"{s['selector']} ({s['selector_kind']})"))
        rows.append(
            (
                "mean selector score, chosen / all drawn",
                f"{s['selector_score_policy']:.4g} / {s['selector_score_candidates']:.4g}",
            )
        )
    if s["kl"] is not None:
        kind = s.get("kl_kind", "sampled k1")
        rows.append((f"KL of A to B, {kind}", f"{s['kl']:.4g} nats per response (s.e. {s['kl_std_error'] or 0:.2g})"))
    la, lb = s["length_policy"], s["length_baseline"]
    rows.append(("tokens per response A", f"mean {la['mean']:.1f}, median {la['median']:g}"))
    rows.append(("tokens per response B", f"mean {lb['mean']:.1f}, median {lb['median']:g}"))
    return rows


def markdown(summary: dict[str, Any]) -> str:
    out = ["# rlhfkit eval", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v.replace('|', '/')} |" for k, v in _lines(summary)]
    out += [
        "",
        "The length-controlled win rate is the logistic regression of the verdict on the length",
        "difference read at equal length: the length term of AlpacaEval's (Dubois et al. 2024,",
        "arXiv:2404.04475). See docs/eval.md.",
        "",
    ]
    return "\n".join(out)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(summary: dict[str, Any], a_len: list[int], b_len: list[int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 1.6))
    left = 0.0
    for key, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
        ax.barh([0], [summary[key]], left=left, color=color, label=f"{key} {_pct(summary[key])}")
        left += summary[key]
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("share of pairs (A against B)")
    ax.legend(ncol=3, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.6))
    bars = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3))
    top = max(a_len + b_len + [1])
    bins = list(range(0, top + 2, max(1, (top + 1) // 20)))
    ax.hist(b_len, bins=bins, alpha=0.6, label="B (baseline)")
    ax.hist(a_len, bins=bins, alpha=0.6, label="A (policy)")
    ax.set_xlabel("response tokens")
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    hist = _png(fig)
    plt.close(fig)
    return [bars, hist]


def write_report(
    out: Path, summary: dict[str, Any], rows: list[dict[str, Any]], a_len: list[int], b_len: list[int]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "samples.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    (out / "report.md").write_text(markdown(summary), encoding="utf-8")
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in _lines(summary))
    images = "".join(f'<p><img src="{src}" alt="plot"></p>' for src in _plots(summary, a_len, b_len))
    examples = "".join(
        f"<tr><td>{html.escape(r['prompt'])}</td><td>{html.escape(r['policy'])}</td>"
        f"<td>{html.escape(r['baseline'])}</td><td>{r['verdict']}</td></tr>"
        for r in rows[:20]
    )
    page = (
        "<!doctype html><html><head><meta charset=utf-8><title>rlhfkit eval</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td{border-bottom:1px solid #ddd;"
        "padding:2px 8px;vertical-align:top}</style></head><body><h1>rlhfkit eval</h1>"
        f"<table>{table}</table>{images}<h2>First pairs</h2>"
        f"<table><tr><th>prompt</th><th>A</th><th>B</th><th>verdict</th></tr>{examples}</table>"
        "<p>Length-controlled win rate: the length term of AlpacaEval's (Dubois et al. 2024, arXiv:2404.04475).</p>"
        "</body></html>\n"
    )
    (out / "report.html").write_text(page, encoding="utf-8")
