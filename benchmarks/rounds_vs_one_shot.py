"""Three rounds of InstructGPT's loop against one pass with the same total number of rankings.

The question (issue 19): is asking people about the current policy's samples, round after round,
at least as good as ranking the same number of samples of the starting policy once? Target: the
loop's final policy is at least as good by the gold rule (which no model ever sees), and the
table says by how much. A benchmark, not a test.

Set-up:

- **Loop**: ``examples/pipeline_rounds.yaml`` as shipped: SFT on SmolLM2-135M, then ``--rounds``
  (3) rounds of: sample ``candidates`` per prompt from the current policy for the round's
  ``n_prompts`` prompts (the next ones of the file each round), the simulated team ranks
  ``quota`` sets in the annotation app over HTTP, a reward model on every ranking so far, PPO
  for ``rl.max_steps`` updates from the last round's policy (KL to the SFT model).
- **One pass**: the same file with ``rounds: 1``, ``n_prompts`` and ``quota`` times the rounds
  (the same prompts, the same number of rankings by the same team) and ``rl.max_steps`` times
  the rounds (the same number of PPO updates), from the loop's SFT model (the SFT stage is
  skipped, so both start from the same weights).
- **Judge**: the team's gold rule (:func:`rlhfkit.pipeline.simulated.lexicon_reward`, the
  sentiment lexicon) through ``rlhfkit eval`` on the held-out prompts
  (``examples/review_prompts_heldout.txt``, 40 prompts x ``--samples`` answers): each final
  policy against the SFT model, and the loop against the one pass directly. Intervals are
  ``rlhfkit eval``'s bootstrap over prompts (95%).

Run it alone (timings are printed too, and another busy process on a 2-core machine slows
both sides): ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rounds_vs_one_shot.py`` (~15 min on
a 2-core CPU). Results: ``benchmarks/results/rounds_vs_one_shot.json`` and the printed table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import machine  # noqa: E402

GOLD = "rlhfkit.pipeline.simulated:lexicon_reward"


def rlhfkit(*args: str) -> float:
    """Run ``rlhfkit ARGS`` (this interpreter's), fail loudly, return the wall time."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], check=True, cwd=REPO)
    return time.time() - t0


def evaluate(work: Path, name: str, policy: Path, baseline: Path, args: argparse.Namespace) -> dict:
    out = work / f"eval-{name}"
    rlhfkit(
        "eval",
        "--policy",
        str(policy),
        "--baseline",
        str(baseline),
        "--judge",
        GOLD,
        "--prompts",
        str(REPO / "examples" / "review_prompts_heldout.txt"),
        "--samples-per-prompt",
        str(args.samples),
        "--max-new-tokens",
        "32",
        "--seed",
        str(args.seed),
        "--output",
        str(out),
    )
    return json.loads((out / "summary.json").read_text())


def gold_ci(eval_folder: Path, side: str = "policy", n_resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval over prompts of the mean gold score of one side of an ``rlhfkit eval``."""
    import random

    per_prompt: dict[int, list[float]] = {}
    for line in (eval_folder / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        per_prompt.setdefault(row["prompt_index"], []).append(row[f"score_{side}"])
    means = [sum(v) / len(v) for v in per_prompt.values()]
    rng = random.Random(seed)
    draws = sorted(sum(rng.choice(means) for _ in means) / len(means) for _ in range(n_resamples))
    return [draws[int(0.025 * n_resamples)], draws[int(0.975 * n_resamples) - 1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="outputs/rounds-vs-one-shot", help="working folder (kept)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4, help="answers per held-out prompt in the evaluation")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "examples" / "pipeline_rounds.yaml").read_text())
    r = args.rounds
    loop = {**base, "output": str(work / "loop"), "rounds": r, "title": f"{r} rounds"}
    one = json.loads(json.dumps(base))
    one.update(output=str(work / "one-pass"), rounds=1, title="one pass", policy=str(work / "loop" / "sft" / "final"))
    one["sft"] = {"skip": True}
    one["preferences"]["n_prompts"] *= r
    one["preferences"]["quota"] *= r
    one["rl"]["max_steps"] *= r
    seconds = {}
    for name, cfg in (("loop", loop), ("one-pass", one)):
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        seconds[name] = rlhfkit("pipeline", "--config", str(path))
    sft = work / "loop" / "sft" / "final"
    final = {
        "loop": work / "loop" / f"round-{r}" / "ppo" / "final",
        "one-pass": work / "one-pass" / "round-1" / "ppo" / "final",
    }
    results = {name: evaluate(work, name, final[name], sft, args) for name in final}
    results["loop-vs-one-pass"] = evaluate(work, "loop-vs-one-pass", final["loop"], final["one-pass"], args)
    for name in final:
        results[name]["gold_ci"] = gold_ci(work / f"eval-{name}")
    rankings = {}
    for name in final:
        rounds = sorted((work / name).glob("round-*/preferences/round.json"))
        rankings[name] = json.loads(rounds[-1].read_text())["rankings_total"]
    report = {"machine": machine(), "seconds": seconds, "rankings": rankings, "results": results, "args": vars(args)}
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "rounds_vs_one_shot.json").write_text(json.dumps(report, indent=2))

    def ci(s: dict, key: str) -> str:
        lo, hi = s[f"{key}_ci"]
        return f"{s[key]:.3f} [{lo:.3f}, {hi:.3f}]"

    print(f"\nmachine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs")
    print(
        "| policy | rankings | gold score (policy) | gold score (SFT) | win rate vs SFT (gold) | KL to SFT | wall time (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in final:
        s = results[name]
        print(
            f"| {name} | {rankings[name]} | {s['score_policy']:.3f} [{s['gold_ci'][0]:.3f}, {s['gold_ci'][1]:.3f}] | "
            f"{s['score_baseline']:.3f} | {ci(s, 'win_rate')} | "
            f"{s['kl']:.2f} | {seconds[name]:.0f} |"
        )
    s = results["loop-vs-one-pass"]
    print(
        f"\nloop against one pass, by the gold rule: win rate {ci(s, 'win_rate')}, gold {s['score_policy']:.3f} vs {s['score_baseline']:.3f}"
    )


if __name__ == "__main__":
    main()
