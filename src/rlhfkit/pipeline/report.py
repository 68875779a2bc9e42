"""``report.html`` (self-contained: pictures inlined, opens offline) and ``report.md``."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from rlhfkit.pipeline.rounds_report import COLUMNS, fmt, plot_rounds, round_rows, split_stage

STAGE_TITLES = {
    "sft": "1. Supervised fine-tuning",
    "preferences": "2. Preference data",
    "reward_model": "3. Reward model",
    "ppo": "4. PPO",
    "rloo": "4. RLOO",
    "grpo": "4. GRPO",
    "reinforce++": "4. REINFORCE++",
    "dpo": "4. DPO",
    "evaluation": "5. Evaluation on held-out prompts",
    "judge": "6. Win rates against the starting policy, by the gold judge",
}
POLICY_STAGES = ("ppo", "rloo", "grpo", "reinforce++", "dpo")
# pictures each stage writes, in the order they are shown
PICTURES = {
    "sft": ["curves.png"],
    "reward_model": ["curves.png", "eval_scores.png"],
    **{name: ["curves.png"] for name in POLICY_STAGES},
    "evaluation": ["reward_vs_kl.png"],
}


def summarize(results: dict) -> str:
    """One paragraph: did the score go up, at what KL, how does best-of-n compare (and the gold score, when known)."""
    ev = results.get("evaluation")
    rounds = [name for name in results if split_stage(name)[1] == "evaluation" and split_stage(name)[0] is not None]
    if ev is None and rounds:  # rounds: the last round's evaluation, against the starting policy
        ev = results[rounds[-1]]
    if ev is None or not ev.summary.get("rows"):
        return "The evaluation did not run, so there is no before/after comparison."
    rows = ev.summary["rows"]
    ref = next(r for r in rows if r["name"] == "reference")
    bons = [r for r in rows if r["name"].startswith("best-of-")]
    trained = [r for r in rows[: rows.index(ref)]]
    sentences = []
    for pol in trained:
        delta = pol["score"] - ref["score"]
        method = "PPO" if pol["name"] in ("policy", "ppo") else pol["name"].upper()
        label = f"after {method}"
        text = (
            f"The mean reward-model score on {ev.summary.get('n_prompts', '?')} held-out prompts "
            f"{'went up' if delta > 0 else 'did not go up'}: {ref['score']:.3f} for the starting policy, {pol['score']:.3f} "
            f"{label} ({delta:+.3f}), at a KL to the starting policy of {pol['kl']:.2f} nats per response."
        )
        if "gold" in pol and "judge" not in results:  # the judge stage's gold numbers come with intervals
            text += f" The gold score (a judge no model trained on) moved {ref['gold']:.3f} -> {pol['gold']:.3f}."
        near = min(bons, key=lambda r: abs(r["kl"] - pol["kl"])) if bons else None  # best-of-n at the closest KL
        if near is not None:
            cmp = "beats" if pol["score"] > near["score"] else "does not beat"
            text += f" At a similar KL, {near['name']} (KL {near['kl']:.2f}) scores {near['score']:.3f}, so {method} {cmp} best-of-n there."
        sentences.append(text)
    judged = results.get("judge")
    for r in judged.summary.get("rows", []) if judged is not None else []:
        lo, hi = r["win_rate_ci"]
        sentences.append(
            f"By the gold judge ({r['judge']}), {r['name']} wins {r['win_rate']:.1%} [{lo:.1%}, {hi:.1%}] of its comparisons "
            f"with the starting policy (gold {r['score_baseline']:.3f} -> {r['score_policy']:.3f})."
        )
    return " ".join(sentences)


def _img_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _summary_rows(name: str, summary: dict) -> list[tuple[str, str]]:
    name = split_stage(name)[1]
    if name.startswith("overoptimisation/"):
        name = "overoptimisation"
    keep = {
        "overoptimisation": [
            "message",
            "judge",
            "points",
            "best",
            "best_update",
            "best_gold",
            "best_exported",
            "proxy_rose_after_gold_fell",
        ],
        "sft": ["n_train_examples", "step", "train/loss", "eval/loss", "train/tokens_per_s"],
        "preferences": [
            "source",
            "n_prompts",
            "k",
            "n_lists",
            "n_pairs",
            "n_with_ties",
            "n_no_preference",
            "n_duplicate_answers",
            "round",
            "selection",
            "aggregate",
            "sets_pushed",
            "quota",
            "rankings_this_round",
            "rankings_total",
            "annotators",
            "waited_s",
            "agreement",
            "annotator_weights",
        ],
        "reward_model": [
            "n_lists",
            "n_pairs",
            "pairwise_accuracy",
            "list_exact_accuracy",
            "kendall_tau",
            "accuracy_first_vs_second",
            "accuracy_first_vs_last",
            "length_corr",
            "length_warning",
        ],
        **{
            name: [
                "n_prompts",
                "step",
                "rl/score_mean",
                "rl/reward_mean",
                "rl/kl",
                "rl/kl_k3",
                "rl/kl_coef",
                "rl/entropy",
                "rl/clipfrac",
                "rl/approx_kl",
                "rl/explained_variance",
                "rl/equal_score_groups",
                "rl/response_length",
                "rl/tokens_per_s",
            ]
            for name in POLICY_STAGES
        },
        "dpo": [
            "step",
            "train/loss",
            "eval/pairwise_accuracy",
            "eval/list_exact_accuracy",
            "eval/reward_margin",
            "eval/logps_margin",
            "eval/kl",
            "train/tokens_per_s",
        ],
        "evaluation": ["n_prompts", "max_new_tokens", "temperature"],
        "judge": ["n_prompts"],
    }[name]
    items = [(k, v) for k, v in summary.items() if not isinstance(v, (list,)) and k != "samples"]
    if keep is not None:
        items = [(k, summary[k]) for k in keep if k in summary]
    return [(k, _fmt(v)) for k, v in items][:24]


def _comparison(rows: list[dict], results: dict) -> tuple[list[str], list[list[str]]]:
    """The evaluation table: every trained policy, the reference and best-of-n on the same held-out
    prompts: reward-model score, gold score (when known), KL to the reference, training time."""
    gold = "gold" in rows[0]
    header = (
        ["model", "mean score"]
        + (["gold score"] if gold else [])
        + ["KL to start (nats)", "KL is", "training time (s)"]
    )
    table = []
    for r in rows:
        stage = results.get(r["name"])
        seconds = f"{stage.seconds:.0f}" if stage is not None and r["name"] != "reference" else ""
        table.append(
            [r["name"], f"{r['score']:.4f}"]
            + ([f"{r['gold']:.4f}"] if gold else [])
            + [f"{r['kl']:.3f}", r["kl_kind"], seconds]
        )
    return header, table


def _table(head: list[str], rows: list[list[str]]) -> tuple[list[str], str]:
    """One table as Markdown lines (ending with a blank line) and as HTML (cells escaped)."""
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    page = (
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        + "</table>"
    )
    return md + [""], page


def _win_rates(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The judge stage's table: each policy against the starting policy by the gold judge (``rlhfkit eval``)."""
    head = ["policy", "pairs", "win rate (95% interval)", "length-controlled", "gold score", "starting policy's"]
    head.append("KL (nats)")

    def ci(r: dict, key: str) -> str:
        lo, hi = r[f"{key}_ci"]
        return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"

    cells = [
        [r["name"], str(r.get("pairs")), ci(r, "win_rate"), ci(r, "lc_win_rate")]
        + [f"{r['score_policy']:.3f}", f"{r['score_baseline']:.3f}"]
        + [f"{r['kl']:.2f}" + (" (analytic)" if "analytic" in str(r.get("kl_kind")) else "")]
        for r in rows
    ]
    return head, cells


def write_report(cfg, results: dict, out: Path, total_seconds: float) -> tuple[Path, Path, str]:
    paragraph = summarize(results)
    md = [
        f"# {cfg.title}",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')}; pipeline wall time {total_seconds:.0f} s "
        f"(stages reused from an earlier run count their original time below).",
        "",
        "## Summary",
        "",
        paragraph,
        "",
    ]
    body = [
        f"<h1>{html.escape(cfg.title)}</h1>",
        f"<p class=meta>Written {time.strftime('%Y-%m-%d %H:%M')}; pipeline wall time {total_seconds:.0f} s.</p>",
        "<h2>Summary</h2>",
        f"<p class=summary>{html.escape(paragraph)}</p>",
    ]
    prefs = results.get("preferences") or next(
        (res for name, res in results.items() if split_stage(name)[1] == "preferences"), None
    )
    if prefs and "simulated team" in str(prefs.summary.get("source", "")):
        note = (
            "The rankings in this run come from a SIMULATED TEAM of annotators: scripted labellers that rank the "
            "policy's samples in the annotation app by a rule, each with its own noise and bias "
            "(rlhfkit.annotate.team). They are not people."
        )
        md += [f"> {note}", ""]
        body.append(f"<p class=note>{html.escape(note)}</p>")
    elif prefs and "simulated" in str(prefs.summary.get("source", "")):
        note = (
            "The preference data in this run comes from a SIMULATED ANNOTATOR: a scripted labeller that ranks the "
            "model's own samples by a sentiment-lexicon rule (rlhfkit.pipeline.simulated). It is not human feedback."
        )
        md += [f"> {note}", ""]
        body.append(f"<p class=note>{html.escape(note)}</p>")

    rows = round_rows(results)
    if rows:
        picture = plot_rounds(rows, out / "rounds.png")
        table_md, table_html = _table([t for _, t in COLUMNS], [[fmt(r[k]) for k, _ in COLUMNS] for r in rows])
        md += ["## Rounds", "", *table_md]
        body.append("<h2>Rounds</h2>" + table_html)
        if picture is not None:
            md += ["![rounds](rounds.png)", ""]
            body.append(
                f"<figure><img alt='rounds' src='{_img_data(picture)}'><figcaption>rounds.png</figcaption></figure>"
            )

    md += ["## Stages", "", "| stage | seconds | status |", "|---|---|---|"]
    body.append("<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>status</th></tr>")
    for name, res in results.items():
        status = "reused (complete, same config)" if res.reused else "ran"
        md.append(f"| {name} | {res.seconds:.0f} | {status} |")
        body.append(f"<tr><td>{name}</td><td>{res.seconds:.0f}</td><td>{status}</td></tr>")
    body.append("</table>")
    md.append("")

    for name, res in results.items():
        r, base = split_stage(name)
        title = STAGE_TITLES.get(base, base) if r is None else f"Round {r}: {STAGE_TITLES.get(base, base)[3:]}"
        if base.startswith("overoptimisation/"):
            title = (
                f"4. Over-optimisation: {base.split('/')[1].upper()} by the gold judge and the proxy against sqrt(KL)"
            )
        md += [f"## {title}", ""]
        body.append(f"<h2>{html.escape(title)}</h2>")
        rows = _summary_rows(name, res.summary)
        if rows:
            md += ["| metric | value |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows] + [""]
            body.append(
                "<table>"
                + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
                + "</table>"
            )
        per_annotator = res.summary.get("agreement_by_annotator") if base == "preferences" else None
        if per_annotator:  # Kendall tau of each annotator with the consensus of the others, on shared sets
            head = ["annotator", "shared sets", "agreement with the consensus (Kendall tau)"]
            cells = [
                [str(a.get("annotator")), str(a.get("consensus_sets")), fmt(a.get("consensus_tau"))]
                for a in per_annotator
            ]
            table_md, table_html = _table(head, cells)
            md += table_md
            body.append(table_html)
        if base == "judge" and res.summary.get("rows"):
            table_md, table_html = _table(*_win_rates(res.summary["rows"]))
            md += table_md
            body.append(table_html)
        if base == "evaluation" and res.summary.get("rows"):
            table_md, table_html = _table(*_comparison(res.summary["rows"], results))
            md += table_md
            body.append(table_html)
        for pic in PICTURES.get(base, ["curve.png"] if base.startswith("overoptimisation/") else []):
            path = res.folder / pic
            if path.is_file():
                rel = path.relative_to(out)
                md += [f"![{name} {pic}]({rel.as_posix()})", ""]
                body.append(
                    f"<figure><img alt='{html.escape(name)} {html.escape(pic)}' src='{_img_data(path)}'><figcaption>{html.escape(str(rel))}</figcaption></figure>"
                )
        samples = res.summary.get("samples") if base == "evaluation" else None
        if samples:
            trained = [
                r["name"]
                for r in res.summary["rows"]
                if r["name"] != "reference" and not r["name"].startswith("best-of-")
            ]
            columns = ["prompt", "before (starting policy)"] + [
                f"after {t.upper() if t != 'policy' else 'PPO'}" for t in trained
            ]
            keys = ["prompt", "reference"] + ["policy" if i == 0 else t for i, t in enumerate(trained)]
            title = "The same prompts, before and after " + ", ".join(c.removeprefix("after ") for c in columns[2:])
            md += [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            body.append(
                f"<h3>{html.escape(title)}</h3><table><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
                + "</tr>"
            )
            for s in samples:
                cells = [str(s.get(k, "")) for k in keys]
                md.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ")[:300] for c in cells) + " |")
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            body.append("</table>")
            md.append("")

    css = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#1d2433}"
        "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccd;padding:4px 8px;text-align:left;vertical-align:top}"
        "img{max-width:100%}.note{background:#fff6d8;padding:.6em;border-left:4px solid #e0b400}"
        ".summary{font-size:1.08em;background:#eef4ff;padding:.8em}.meta{color:#667}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.title)}</title><style>{css}</style></head><body>{''.join(body)}</body></html>"
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page, encoding="utf-8")
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"summary": paragraph}, indent=2), encoding="utf-8")
    return html_path, md_path, paragraph
