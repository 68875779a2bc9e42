"""Sweep ``rlhfkit rl`` settings on the review example and measure gold-score gain per CPU-second.

The question (issue 20): are the online-RL defaults (passes per rollout ``ppo_epochs``,
``mini_batch_size``, ``lr``, ``kl_coef``) the ones that buy the most learning per second of
compute? ``rlhfkit rl --algo grpo`` makes 4 passes per rollout where TRL and verl make one;
either the extra passes pay for themselves and the table shows it, or the default changes.
A benchmark, not a test.

Set-up ("the review example"):

- **Policy**: ``--policy`` (default ``smollm2-135m``, the embedded SmolLM2-135M-Instruct; an
  SFT folder works too). Every run starts from it and keeps its KL to it.
- **Reward model**: ``--reward RM_FOLDER``, or else trained once on the shipped rank lists
  (``examples/reviews_ranklists.tsv``) with the settings of ``examples/pipeline_demo.yaml``'s
  ``reward_model:`` section, on ``--policy`` as the backbone (as the pipeline does), and kept
  in ``WORK/reward_model`` for the next sweep.
- **Training**: ``rlhfkit rl --algo A`` on ``examples/review_prompts.txt``, one run at a time,
  each in its own process. Everything not swept is rlhfkit's default, except the rollout's
  shape, set to the review example's: 8 prompts per rollout for ``ppo``, 2 prompts x 4
  samples for the group algorithms (8 responses either way), ``--max-new-tokens 32``, the
  chat template on. Logging extras that do not change the learning are off (``--report-to
  none``, ``--sample-every 0``, no progress bar), and ``--threads`` is fixed (default 1) so
  that every run computes the same way whatever else the machine runs.
- **Equal updates, unequal compute**: every run makes ``--max-steps`` updates (rollout plus
  optimisation), whatever the setting. Four passes per rollout cost more than one per update,
  so equal updates do not mean equal compute; the gain-per-CPU-second column accounts for that
  (and a setting that learns more per update but costs more per update shows up there).
- **Cost**: the run's CPU seconds (user + system of the ``rlhfkit rl`` process, from
  ``getrusage(RUSAGE_CHILDREN)`` before and after it) and its wall seconds, start to exit:
  loading the models and saving the policy included, which is the same for every setting.
- **Gold gain**: the gold rule :func:`rlhfkit.pipeline.simulated:lexicon_reward` (a sentiment
  lexicon the reward model was trained to imitate but never sees) on ``--eval-samples``
  answers to each of the first ``--n-eval-prompts`` held-out prompts
  (``examples/review_prompts_heldout.txt``), sampled by ``rlhfkit generate`` at temperature 1
  with the same ``--eval-seed`` for every policy: the final policy's mean score minus the
  starting policy's (scored once). The same sampling seed for both is common random numbers:
  where the policies agree, so do their samples.
- **Intervals**: over the seeds (``--seeds``, the runs' ``--seed``), 95%. The gain's is the
  t-interval of the per-seed gains. Gain per CPU-second is the ratio of the means (mean gain /
  mean CPU seconds), its interval the linearised (delta-method) t-interval of that ratio over
  the seeds. With one seed there is no interval.

Run it alone (another busy process moves the wall seconds, less the CPU seconds):
``.venv/bin/python benchmarks/rl_defaults.py --algos grpo --grid ppo_epochs=1,4``. Smoke run:
``--max-steps 1 --seeds 0 --grid ppo_epochs=1 --n-eval-prompts 2``. Each finished run is recorded in
``WORK/runs/NAME.json`` (and its policy and checkpoint removed unless ``--keep-models``), so a sweep
stopped midway and started again with the same options redoes only the runs it lacks. Results: the printed
tables and ``benchmarks/results/rl_defaults.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import machine  # noqa: E402

GOLD = "rlhfkit.pipeline.simulated:lexicon_reward"
GROUP_ALGOS = ("rloo", "grpo", "reinforce++")
# The review example's rollout: 8 responses per update either way (rlhfkit rl's own defaults otherwise).
SHAPE = {"ppo": {"batch_size": 8}, "group": {"batch_size": 2, "samples_per_prompt": 4}}
COMMON = ["--max-new-tokens", "32", "--chat-template", "--report-to", "none", "--sample-every", "0", "--no-progress"]
# examples/pipeline_demo.yaml's reward_model section, and what the pipeline adds to it.
RM_ARGS = [
    "--train", "examples/reviews_ranklists.tsv", "--prompt-column", "--allow-ties", "--eval-fraction", "0.2",
    "--loss", "pairwise", "--no-chat-template", "--max-steps", "24", "--log-every", "1", "--batch-size", "8",
    "--lr", "2e-5", "--head-lr", "1e-3", "--max-length", "96", "--freeze-layers", "24", "--eval-every", "1000",
    "--report-to", "none", "--no-progress",
]  # fmt: skip
# 97.5% quantiles of Student's t by degrees of freedom (1.96 past 30).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]
T975 += [2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96


def rlhfkit(args: list[str], log: Path, threads: int) -> dict:
    """Run ``rlhfkit ARGS`` (this interpreter's) with its output in ``log``; return its CPU and
    wall seconds. A failing run stops the sweep with the last lines of its log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "rlhfkit.cli", *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env
        )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"rlhfkit {args[0]} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": cpu, "wall_s": wall}


def reward_model(args: argparse.Namespace, work: Path) -> str:
    """``--reward``, or the review example's reward model, trained once into ``WORK/reward_model``."""
    if args.reward:
        return args.reward
    folder = work / "reward_model"
    cmd = ["rm", "train", *RM_ARGS, "--model", args.policy, "--seed", "42", "--threads", str(args.threads)]
    record = work / "reward_model.json"
    if record.exists() and json.loads(record.read_text())["command"] == cmd and folder.is_dir():
        print(f"reward model: {folder} (trained by an earlier sweep)", flush=True)
        return str(folder)
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished or differently trained one
    print(f"training the reward model into {folder} (examples/pipeline_demo.yaml's settings) ...", flush=True)
    cost = rlhfkit([*cmd, "--output", str(folder)], work / "reward_model.log", args.threads)
    record.write_text(json.dumps({"command": cmd, **cost}, indent=2))
    print(f"      {cost['cpu_s']:.0f} CPU s, {cost['wall_s']:.0f} s", flush=True)
    return str(folder)


def gold_score(policy: str, out: Path, args: argparse.Namespace, prompts: Path) -> dict:
    """Sample the held-out prompts with ``policy`` (``--eval-seed``) and score the answers by the gold rule."""
    from rlhfkit.pipeline.simulated import lexicon_reward

    cmd = ["generate", "--policy", policy, "--prompts", str(prompts), "--samples-per-prompt", str(args.eval_samples)]
    cmd += ["--max-new-tokens", "32", "--chat-template", "--seed", str(args.eval_seed), "--output", str(out)]
    cost = rlhfkit(cmd, out.with_suffix(".log"), args.threads)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    scores = lexicon_reward([r["prompt"] for r in rows], [r["response"] for r in rows])
    return {"gold": statistics.fmean(scores), "n_answers": len(rows), "eval_cpu_s": cost["cpu_s"]}


def option_key(item: str, key: str, option: str) -> str:
    """``key`` as an RLConfig field name, or exit naming the bad ``option`` ``item``."""
    from rlhfkit.rl.trainer import RLConfig

    key = key.strip().replace("-", "_")
    if key not in {f.name for f in dataclasses.fields(RLConfig)}:
        raise SystemExit(f"{option} {item!r}: {key!r} is not an option of 'rlhfkit rl' (see rlhfkit rl --help)")
    if key in ("algo", "seed", "max_steps", "output", "policy", "reward", "prompts"):
        raise SystemExit(f"{option} {item!r}: {key} is set by the sweep itself (--algos, --seeds, --max-steps, ...)")
    return key


def settings(grid: list[str], design: str, named: list[str] | None = None) -> list[dict[str, str]]:
    """The settings to run from ``--grid KEY=V1,V2`` options: every combination (``product``) or
    each key's values alone, the other keys at their defaults (``axes``); then each ``--setting``
    (``defaults``, or several ``KEY=V`` separated by spaces, run together as one setting)."""
    axes: dict[str, list[str]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid {item!r}: write KEY=V1,V2,..., e.g. --grid ppo_epochs=1,4")
        axes[option_key(item, key, "--grid")] = [v.strip() for v in values.split(",")]
    out: list[dict[str, str]] = []
    if axes and design == "product":
        out = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    elif axes:
        out = [{key: value} for key, values in axes.items() for value in values]
    for item in named or []:
        setting: dict[str, str] = {}
        for part in [] if item.strip() == "defaults" else item.split():
            key, sep, value = part.partition("=")
            if not sep or not value or "," in value:
                raise SystemExit(f"--setting {item!r}: write 'defaults' or KEY=V KEY=V ..., one value per key")
            setting[option_key(item, key, "--setting")] = value.strip()
        if setting in out:
            raise SystemExit(f"--setting {item!r}: that setting is already in the sweep")
        out.append(setting)
    return out or [{}]


def flags(setting: dict[str, str]) -> list[str]:
    out = []
    for key, value in setting.items():
        flag = "--" + key.replace("_", "-")
        if value.lower() in ("true", "false"):
            out.append(flag if value.lower() == "true" else "--no-" + flag[2:])
        else:
            out += [flag, value]
    return out


def label(setting: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"


def run_metrics(run: Path) -> dict:
    """From the run's metrics.jsonl: the last update's proxy score and KL, and the wall seconds
    of its updates (rollout, optimisation and both) summed over the run; empty if absent."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "rl/score_mean" in r]
    if not rows:
        return {}
    out = {k: rows[-1][k] for k in ("rl/score_mean", "rl/kl") if k in rows[-1]}
    for phase in ("rollout", "optimise", "update"):
        out[f"{phase}_s"] = sum(r.get(f"time/{phase}_s", 0.0) for r in rows)
    return out


def summarise(runs: list[dict]) -> dict:
    """Means over the seeds with 95% intervals: the gain's t-interval, and the ratio of means
    gain/CPU-second with its delta-method t-interval (residuals ``g - r * c``)."""
    g = [r["gain"] for r in runs]
    c = [r["cpu_s"] for r in runs]
    n = len(runs)
    out = {
        "seeds": [r["seed"] for r in runs],
        "gain": statistics.fmean(g),
        "cpu_s": statistics.fmean(c),
        "wall_s": statistics.fmean(r["wall_s"] for r in runs),
        **{k: statistics.fmean(r.get(k, 0.0) for r in runs) for k in ("rollout_s", "optimise_s")},
    }
    out["gain_per_cpu_s"] = out["gain"] / out["cpu_s"]
    if n > 1:
        half = t975(n - 1) * statistics.stdev(g) / math.sqrt(n)
        out["gain_ci"] = [out["gain"] - half, out["gain"] + half]
        resid = [gi - out["gain_per_cpu_s"] * ci for gi, ci in zip(g, c)]
        half = t975(n - 1) * statistics.stdev(resid) / (math.sqrt(n) * out["cpu_s"])
        out["gain_per_cpu_s_ci"] = [out["gain_per_cpu_s"] - half, out["gain_per_cpu_s"] + half]
    return out


def is_default(algo: str, setting: dict[str, str]) -> bool:
    """Whether every option of ``setting`` is at ``rlhfkit rl --algo ALGO``'s default (the sweep's shape aside)."""
    from rlhfkit.config import from_dict
    from rlhfkit.rl.trainer import RLConfig

    base = dict(policy="p", reward="m:f", prompts="x", output="o", algo=algo, max_new_tokens=32)
    base.update(SHAPE["ppo" if algo == "ppo" else "group"])
    default = from_dict(RLConfig, base)
    given = from_dict(RLConfig, {**base, **setting})
    return all(getattr(given, k) == getattr(default, k) for k in setting)


def paired(runs: list[dict], base: list[dict]) -> dict:
    """Seed-matched differences against ``base`` (the defaults): gain, and gain per CPU-second
    (each seed's own ratio), with 95% t-intervals over the seeds they share."""
    by_seed = {r["seed"]: r for r in base}
    pairs = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
    out: dict = {"n": len(pairs)}
    for key, f in (("gain", lambda r: r["gain"]), ("gain_per_cpu_s", lambda r: r["gain"] / r["cpu_s"])):
        d = [f(a) - f(b) for a, b in pairs]
        out[key] = statistics.fmean(d) if d else float("nan")
        if len(d) > 1:
            half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
            out[f"{key}_ci"] = [out[key] - half, out[key] + half]
    return out


def report_tables(files: list[str]) -> str:
    """Tables from saved sweeps (``--report A.json B.json``): every (algorithm, setting) of their runs,
    the defaults first, with seed-matched differences against the defaults. Sweeps are merged by
    setting; the defaults' runs may come from one sweep and the others from another (the same
    seeds, policy, reward model and evaluation: checked)."""
    records = [json.loads(Path(f).read_text()) for f in files]
    keys = ("policy", "reward", "max_steps", "n_eval_prompts", "eval_samples", "eval_seed", "threads")
    first = records[0]["args"]
    for rec, f in zip(records, files):
        differ = [k for k in keys if rec["args"].get(k) != first.get(k)]
        if differ or rec["start"]["gold"] != records[0]["start"]["gold"]:
            raise SystemExit(f"--report: {f} was run with other {', '.join(differ) or 'starting gold'} than {files[0]}")
    groups: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        for r in rec["runs"]:
            name = "defaults" if is_default(r["algo"], r["setting"]) else label(r["setting"])
            groups.setdefault((r["algo"], name), []).append(r)
    out = []
    for algo in dict.fromkeys(a for a, _ in groups):
        base = groups.get((algo, "defaults"), [])
        names = sorted((n for a, n in groups if a == algo), key=lambda n: (n != "defaults", n))
        lines = [
            f"**{algo}** (gold score of the starting policy {records[0]['start']['gold']:.3f})",
            "",
            "| setting | seeds | gold gain | CPU s | gain per 1000 CPU s | vs defaults: gain | vs defaults: per 1000 CPU s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in names:
            runs = groups[(algo, name)]
            s_ = summarise(runs)

            def ci(d: dict, key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
                v = f"{d[key] * scale:+{fmt}}" if key in d else "-"
                if f"{key}_ci" in d:
                    lo, hi = (x * scale for x in d[f"{key}_ci"])
                    v += f" [{lo:+{fmt}}, {hi:+{fmt}}]"
                return v

            versus = paired(runs, base) if name != "defaults" and base else {}
            lines.append(
                f"| {name} | {len(runs)} | {ci(s_, 'gain')} | {s_['cpu_s']:.0f} | {ci(s_, 'gain_per_cpu_s', 1000.0)} | "
                f"{ci(versus, 'gain') if versus else ''} | {ci(versus, 'gain_per_cpu_s', 1000.0) if versus else ''} |"
            )
        out.append("\n".join(lines))
    m = records[0]["machine"]
    a = records[0]["args"]
    caption = (
        f"{a['max_steps']} updates per run from {a['policy']}; gold gain on {a['n_eval_prompts']} held-out prompts x "
        f"{a['eval_samples']} answers; means over seeds with 95% t-intervals; 'vs defaults': seed-matched differences "
        f"(each seed's gain per CPU-second its own ratio); {a['threads']} thread(s) per run; machine: {m['cpu']}, "
        f"{m['cpus']} CPUs. Sweeps: {', '.join(files)}."
    )
    return "\n\n".join(out) + "\n\n" + caption


def table(algo: str, rows: list[tuple[str, dict]], start_gold: float) -> str:
    def ci(s: dict, key: str, scale: float = 1.0, fmt: str = ".3f") -> str:
        v = f"{s[key] * scale:{fmt}}"
        if f"{key}_ci" in s:
            lo, hi = (x * scale for x in s[f"{key}_ci"])
            v += f" [{lo:{fmt}}, {hi:{fmt}}]"
        return v

    lines = [
        f"**{algo}** (gold score of the starting policy {start_gold:.3f})",
        "",
        "| setting | seeds | gold gain | CPU s | wall s (rollout + optimise) | gain per 1000 CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in rows:
        lines.append(
            f"| {name} | {len(s['seeds'])} | {ci(s, 'gain')} | {s['cpu_s']:.0f} | "
            f"{s['wall_s']:.0f} ({s['rollout_s']:.0f} + {s['optimise_s']:.0f}) | "
            f"{ci(s, 'gain_per_cpu_s', 1000.0, '.2f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rl_defaults.py",
        description=__doc__.split("\n\n")[0],
        epilog="Example: rl_defaults.py --algos grpo --grid ppo_epochs=1,4 --seeds 0,1,2 --max-steps 8",
    )
    ap.add_argument("--algos", default="grpo", help="comma-separated: ppo, rloo, grpo, reinforce++ (default: grpo)")
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an 'rlhfkit rl' option and its values, e.g. ppo_epochs=1,4 lr=1e-5,3e-5 kl_coef=0.02,0.05 "
        "mini_batch_size=4,8 (one key per --grid, repeat it for several; true/false for switches); "
        "none: rlhfkit's defaults alone",
    )
    ap.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="'K=V K=V'",
        help="one more setting: 'defaults', or several options run together, e.g. "
        "'clip_eps_high=0.28 dynamic_sampling=true' (repeat it for several)",
    )
    ap.add_argument(
        "--design",
        choices=("product", "axes"),
        default="product",
        help="with several --grid keys: every combination, or each key varied alone (default: product)",
    )
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default: 0,1,2)")
    ap.add_argument("--max-steps", type=int, default=8, help="updates per run, equal for every setting (default: 8)")
    ap.add_argument("--policy", default="smollm2-135m", help="starting policy: alias or SFT folder")
    ap.add_argument("--reward", default=None, help="reward-model folder (default: train the review example's once)")
    ap.add_argument("--n-eval-prompts", type=int, default=40, help="held-out prompts scored (default: all 40)")
    ap.add_argument("--eval-samples", type=int, default=4, help="answers per held-out prompt (default: 4)")
    ap.add_argument("--eval-seed", type=int, default=0, help="sampling seed of every evaluation (default: 0)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of every run (default: 1)")
    ap.add_argument("--work", default="outputs/rl-defaults", help="working folder, kept (default: %(default)s)")
    ap.add_argument("--output", default=str(HERE / "results" / "rl_defaults.json"), help="JSON result file")
    ap.add_argument(
        "--keep-models",
        action="store_true",
        help="keep each run's policy and checkpoint (about 2 GB a run; by default only its metrics and logs stay)",
    )
    ap.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="no runs: print the tables of saved sweeps (merged by setting), with seed-matched differences "
        "against the defaults",
    )
    args = ap.parse_args(argv)
    if args.report:
        print(report_tables(args.report))
        return 0

    algos = [a.strip() for a in args.algos.split(",")]
    for a in algos:
        if a not in ("ppo", *GROUP_ALGOS):
            raise SystemExit(f"--algos: unknown algorithm {a!r}; use ppo, rloo, grpo or reinforce++")
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = settings(args.grid, args.design, args.setting)
    if args.max_steps < 1 or args.n_eval_prompts < 1 or args.eval_samples < 1 or args.threads < 1:
        raise SystemExit("--max-steps, --n-eval-prompts, --eval-samples and --threads must be >= 1")
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = machine()
    t0 = time.perf_counter()

    (work / "runs").mkdir(exist_ok=True)
    prompts = work / f"heldout-{args.n_eval_prompts}.txt"
    heldout = (REPO / "examples" / "review_prompts_heldout.txt").read_text().splitlines()
    prompts.write_text("\n".join(heldout[: args.n_eval_prompts]) + "\n")
    reward = reward_model(args, work)
    print(f"scoring the starting policy {args.policy} on {args.n_eval_prompts} held-out prompts ...", flush=True)
    start = gold_score(args.policy, work / "start.jsonl", args, prompts)
    print(f"      gold {start['gold']:.3f} ({start['n_answers']} answers)", flush=True)

    total = len(seeds) * len(algos) * len(grid)
    print(
        f"{total} runs: {len(algos)} algorithm(s) x {len(grid)} setting(s) x {len(seeds)} seed(s), "
        f"{args.max_steps} updates each, one at a time",
        flush=True,
    )
    runs: list[dict] = []
    # the ETA: each remaining run at its setting's mean time so far (run and evaluation), else at the overall mean
    plan = [(algo, setting) for _ in seeds for algo in algos for setting in grid]
    took: dict[tuple[str, str], list[float]] = {(a, label(st)): [] for a, st in plan}
    for seed in seeds:  # seed by seed, every setting each time: a drift of the machine hits all of them
        for algo in algos:
            shape = SHAPE["ppo" if algo == "ppo" else "group"]
            for setting in grid:
                i = len(runs) + 1
                name = f"{algo}-{'-'.join(f'{k}{v}' for k, v in setting.items()) or 'defaults'}-seed{seed}"
                out = work / "runs" / name
                cmd = ["rl", "--algo", algo, "--policy", args.policy, "--reward", reward]
                cmd += ["--prompts", "examples/review_prompts.txt", "--output", str(out), "--seed", str(seed)]
                cmd += ["--max-steps", str(args.max_steps), "--threads", str(args.threads), *COMMON]
                cmd += flags({**{k: str(v) for k, v in shape.items()}, **setting})
                record_file = work / "runs" / f"{name}.json"
                evaluation = {k: getattr(args, k) for k in ("n_eval_prompts", "eval_samples", "eval_seed")}
                done = json.loads(record_file.read_text()) if record_file.exists() else None
                if done and done["command"] == "rlhfkit " + " ".join(cmd) and done.get("evaluation") == evaluation:
                    runs.append(done)  # finished by an earlier, interrupted sweep: nothing to redo
                    print(
                        f"[{i}/{total}] {algo} {label(setting)} seed {seed}: done before, gold gain {done['gain']:+.3f}"
                    )
                    continue
                shutil.rmtree(out, ignore_errors=True)  # a run of an earlier sweep: this one replaces it
                print(f"[{i}/{total}] {algo} {label(setting)} seed {seed} ...", flush=True)
                run_t0 = time.perf_counter()
                cost = rlhfkit(cmd, work / "runs" / f"{name}.log", args.threads)
                score = gold_score(str(out / "final"), work / "runs" / f"{name}.gold.jsonl", args, prompts)
                run = {
                    "algo": algo,
                    "setting": setting,
                    "seed": seed,
                    **cost,
                    "gold": score["gold"],
                    "gain": score["gold"] - start["gold"],
                    "eval_cpu_s": score["eval_cpu_s"],
                    **run_metrics(out),
                    "command": "rlhfkit " + " ".join(cmd),
                    "evaluation": evaluation,
                }
                runs.append(run)
                record_file.write_text(json.dumps(run, indent=2))  # a sweep stopped later keeps this run
                if not args.keep_models:  # ~2 GB a run (the policy, its checkpoint and optimizer state)
                    for folder in ("final", "checkpoint"):
                        shutil.rmtree(out / folder, ignore_errors=True)
                took[(algo, label(setting))].append(time.perf_counter() - run_t0)
                eta = sum(
                    statistics.fmean(took[(a, label(st))] or [t for ts in took.values() for t in ts])
                    for a, st in plan[i:]
                )
                print(
                    f"      gold gain {run['gain']:+.3f}, {run['cpu_s']:.0f} CPU s, {run['wall_s']:.0f} s wall "
                    f"(+{score['eval_cpu_s']:.0f} CPU s to evaluate); ETA {eta / 60:.1f} min",
                    flush=True,
                )

    results, tables = [], []
    for algo in algos:
        rows = []
        for setting in grid:
            mine = [r for r in runs if r["algo"] == algo and r["setting"] == setting]
            s = {"algo": algo, "setting": setting, **summarise(mine)}
            results.append(s)
            rows.append((label(setting), s))
        tables.append(table(algo, rows, start["gold"]))
    m = env
    caption = (
        f"{args.max_steps} updates per run; gold gain on {args.n_eval_prompts} held-out prompts x "
        f"{args.eval_samples} answers (mean over seeds, 95% t-interval); CPU and wall seconds of the whole "
        f"'rlhfkit rl' process ({args.threads} thread(s)), in brackets the wall seconds of the updates' rollouts "
        f"and optimisation; gain per CPU-second: ratio of the means, 95% delta-method t-interval; machine: {m['cpu']}, {m['cpus']} CPUs, "
        f"load {m['loadavg']} at the start."
    )
    report = "\n\n".join(tables) + "\n\n" + caption
    print("\n" + report)
    record = {
        "command": " ".join(["benchmarks/rl_defaults.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "machine": env,
        "reward_model": reward,
        "gold": GOLD,
        "start": start,
        "results": results,
        "runs": runs,
        "total_s": time.perf_counter() - t0,
        "table_markdown": report,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
