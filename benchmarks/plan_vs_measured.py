"""``rlhfkit plan``'s estimate beside the measured peak memory of the same runs.

Each row trains for a few steps with rlhfkit's own command line, in fresh processes, and
records each process's peak: on the CPU its peak resident set (``VmHWM``, read by the
process itself as it exits, so loading, training and the final save are all inside), on a
GPU ``torch.cuda.max_memory_allocated()``. Beside it: ``rlhfkit plan --json`` for the same
settings (its ``per_device_gb``; on a GPU without the ``runtime`` row, which is the CUDA
context that ``max_memory_allocated`` does not see), and the ratio estimate / measured.

On the CPU each row runs twice: with glibc's defaults (what a user sees), and with
``MALLOC_MMAP_THRESHOLD_=131072``, which serves every block over 128 KiB from its own
mapping and so hands freed memory straight back to the system: that peak is the memory the
run really had alive, the quantity the estimate models. The gap between the two is glibc
keeping freed blocks in its heap (largest under FSDP2, whose gather buffers come and go
every block).

Rows (CPU, the real SmolLM2-135M unless ``--policy`` names another causal LM):

- ``baseline``: ``sft`` on a 2-layer tiny model: the process with no model to speak of;
- ``sft``, ``rm train``, ``rl --algo grpo`` (a Python reward function; also with ``--lora``), one process each;
- ``sft`` on 2 processes under ``examples/accelerate/ddp.yaml`` and ``fsdp2.yaml`` (``--cpu``: gloo).

Every sequence is as long as the estimate assumes: training texts are longer than
``--max-length`` (truncated), prompts longer than ``--max-prompt-length``.

    python benchmarks/plan_vs_measured.py                   # CPU, ~15 min on 2 busy cores
    python benchmarks/plan_vs_measured.py --only sft rm     # some rows
    python benchmarks/plan_vs_measured.py --device cuda --policy-config DIR   # on a GPU machine

``--policy-config DIR``: a folder with a causal LM's ``config.json`` and tokenizer files but no
weights (SmolLM2's are 2 MB, the weights 540 MB): the script saves a randomly initialised
model of that shape first. Memory does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = REPO / "examples" / "accelerate"
WORDS = (
    "river stone cloud paper green quiet table light music north bread apple window garden morning winter "
    "story letter friend market"
).split()


# ------------------------------------------------------------------ child process
def child(result_prefix: str, argv: list[str]) -> int:
    """Run ``rlhfkit ARGV`` in this process and write its peak memory when it exits."""

    def report() -> None:
        peak = {"rank": int(os.environ.get("RANK", "0")), "vmhwm_mib": _vmhwm_mib()}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        Path(f"{result_prefix}.rank{peak['rank']}.json").write_text(json.dumps(peak))

    atexit.register(report)
    from rlhfkit.cli import main

    return main(argv)


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# -------------------------------------------------------------------------- data
def _text(i: int, words: int) -> str:
    """Text ``i``: distinct for every ``i`` (rm train encodes each unique text once: repeats would shrink its batches)."""
    rng = random.Random(i)
    return f"Text {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def make_data(work: Path, n: int) -> dict[str, Path]:
    """Texts of ~500 words (past every --max-length here) and prompts of ~200 words."""
    files = {
        "sft": work / "sft.jsonl",
        "pairs": work / "pairs.tsv",
        "prompts": work / "prompts.txt",
        "reward": work / "rewards.py",
    }
    files["sft"].write_text(
        "".join(
            json.dumps({"prompt": f"Tell me a story, number {i}.", "response": _text(i, 500)}) + "\n" for i in range(n)
        )
    )
    files["pairs"].write_text("".join(f"{_text(2 * i, 500)}\t{_text(2 * i + 1, 500)}\n" for i in range(n)))
    files["prompts"].write_text("".join(_text(1000 + i, 200) + "\n" for i in range(n)))
    files["reward"].write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    return files


# --------------------------------------------------------------------------- rows
def rows(policy: str, tiny: str, f: dict[str, Path], cpu: bool) -> dict[str, dict]:
    """name -> (launcher, processes, rlhfkit argv without --output, plan argv)."""
    common = [
        "--no-progress",
        "--report-to",
        "none",
        "--cpu-matmul",
        "torch",
        "--save-every",
        "1000",
        *(["--cpu"] if cpu else []),
    ]
    sft = ["sft", "--train", str(f["sft"]), "--max-length", "256", "--n-samples", "0", *common]
    return {
        "baseline": {
            "launch": None,
            "procs": 1,
            "argv": [*sft, "--policy", tiny, "--batch-size", "4", "--max-steps", "2"],
            "plan": ["--model", tiny, "--algo", "sft", "--batch-size", "4", "--max-length", "256"],
        },
        "sft": {
            "launch": None,
            "procs": 1,
            "argv": [*sft, "--policy", policy, "--batch-size", "4", "--max-steps", "3"],
            "plan": ["--model", policy, "--algo", "sft", "--batch-size", "4", "--max-length", "256"],
        },
        "rm": {
            "launch": None,
            "procs": 1,
            "argv": [
                "rm",
                "train",
                "--model",
                policy,
                "--train",
                str(f["pairs"]),
                "--batch-size",
                "2",
                "--max-length",
                "256",
                "--max-steps",
                "3",
                *common,
            ],
            "plan": ["--model", policy, "--algo", "rm", "--batch-size", "2", "--max-length", "256"],
        },
        "grpo": {
            "launch": None,
            "procs": 1,
            "argv": [
                "rl",
                "--algo",
                "grpo",
                "--policy",
                policy,
                "--prompts",
                str(f["prompts"]),
                "--reward",
                f"{f['reward']}:length",
                "--batch-size",
                "4",
                "--samples-per-prompt",
                "4",
                "--mini-batch-size",
                "8",
                "--ppo-epochs",
                "1",
                "--max-steps",
                "2",
                "--max-new-tokens",
                "32",
                "--max-prompt-length",
                "64",
                "--sample-every",
                "0",
                *common,
            ],
            "plan": [
                "--model",
                policy,
                "--algo",
                "grpo",
                "--batch-size",
                "4",
                "--samples-per-prompt",
                "4",
                "--mini-batch-size",
                "8",
                "--max-new-tokens",
                "32",
                "--max-prompt-length",
                "64",
            ],
        },
        "grpo-lora": {
            "launch": None,
            "procs": 1,
            "argv": [
                "rl",
                "--algo",
                "grpo",
                "--policy",
                policy,
                "--prompts",
                str(f["prompts"]),
                "--reward",
                f"{f['reward']}:length",
                "--batch-size",
                "4",
                "--samples-per-prompt",
                "4",
                "--mini-batch-size",
                "8",
                "--ppo-epochs",
                "1",
                "--max-steps",
                "2",
                "--max-new-tokens",
                "32",
                "--max-prompt-length",
                "64",
                "--sample-every",
                "0",
                "--lora",
                *common,
            ],
            "plan": [
                "--model",
                policy,
                "--algo",
                "grpo",
                "--batch-size",
                "4",
                "--samples-per-prompt",
                "4",
                "--mini-batch-size",
                "8",
                "--max-new-tokens",
                "32",
                "--max-prompt-length",
                "64",
                "--lora",
            ],
        },
        "sft-ddp-2": {
            "launch": "ddp",
            "procs": 2,
            "argv": [*sft, "--policy", policy, "--batch-size", "2", "--max-steps", "3"],
            "plan": [
                "--model",
                policy,
                "--algo",
                "sft",
                "--batch-size",
                "2",
                "--max-length",
                "256",
                "--gpus",
                "2",
                "--sharding",
                "ddp",
            ],
        },
        "sft-fsdp2-2": {
            "launch": "fsdp2",
            "procs": 2,
            "argv": [*sft, "--policy", policy, "--batch-size", "2", "--max-steps", "3"],
            "plan": [
                "--model",
                policy,
                "--algo",
                "sft",
                "--batch-size",
                "2",
                "--max-length",
                "256",
                "--gpus",
                "2",
                "--sharding",
                "fsdp2",
            ],
        },
    }


RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: blocks over 128 KiB mapped alone, unmapped on free


def measure(name: str, row: dict, work: Path, extra_env: dict[str, str] | None = None) -> list[dict]:
    """Run the row; each process's peak."""
    prefix = work / name
    out = work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    script = [str(Path(__file__).resolve()), "--child", str(prefix), *row["argv"], "--output", str(out)]
    env = {
        **os.environ,
        **(extra_env or {}),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    }
    if row["launch"] is None:
        cmd = [sys.executable, *script]
    else:
        env["OMP_NUM_THREADS"] = "1"
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [
            accelerate,
            "launch",
            "--config_file",
            str(ACCELERATE / f"{row['launch']}.yaml"),
            "--num_processes",
            str(row["procs"]),
            "--main_process_port",
            "0",
            *script,
        ]
    log = work / f"{name}.log"
    with log.open("w") as fh:
        code = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); see {log}:\n" + "".join(log.read_text().splitlines(True)[-20:]))
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(row["procs"])]


def plan(argv: list[str], device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", "plan", *argv, "--device", device, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout)


def machine_line(device: str) -> str:
    import torch

    from rlhfkit.cpu import cpu_model

    line = (
        f"{cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; torch {torch.__version__} "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()})"
    )
    if device == "cuda":
        line += f"; GPU {torch.cuda.get_device_name(0)}"
    return line


def random_model(config_dir: Path, target: Path) -> Path:
    """A randomly initialised causal LM of ``config_dir``'s shape, with its tokenizer, at ``target``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(target)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(target)
    return target


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[3:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--policy", default="smollm2-135m", help="causal LM to train (alias or folder)")
    ap.add_argument(
        "--policy-config", help="a folder with config.json and tokenizer only: train a random model of that shape"
    )
    ap.add_argument("--only", nargs="*", help="rows to run (default: all that this machine can)")
    ap.add_argument("--work", help="working folder (kept); default a temporary one, removed afterwards")
    ap.add_argument("--json-out", help="also write the table as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from rlhfkit.models.hub import resolve_model
    from rlhfkit.models.tiny import build_tiny_causal_lm

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="plan-vs-measured-"))
    work.mkdir(parents=True, exist_ok=True)
    policy = (
        str(random_model(Path(args.policy_config), work / "policy"))
        if args.policy_config
        else resolve_model(args.policy)
    )
    tiny = str(build_tiny_causal_lm(work / "tiny"))
    table = rows(policy, tiny, make_data(work, 64), cpu=args.device == "cpu")
    names = args.only or list(table)
    if args.device == "cuda":
        import torch

        names = [n for n in names if table[n]["procs"] <= torch.cuda.device_count()]
    print(f"machine: {machine_line(args.device)}", flush=True)
    print(f"policy: {policy}\n", flush=True)
    cpu = args.device == "cpu"
    if cpu:
        print(
            "| run | processes | estimate GiB (peak phase) | peak RSS GiB | estimate / RSS | peak RSS, freed memory returned "
            "| estimate / that |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    else:
        print(
            "| run | processes | estimate GiB without runtime (peak phase) | max_memory_allocated GiB | estimate / measured |"
        )
        print("| --- | --- | --- | --- | --- |", flush=True)
    results = []
    for name in names:
        row = table[name]
        estimate = plan(row["plan"], args.device)
        if cpu:
            est = estimate["per_device_gb"]
            peaks = measure(name, row, work)
            live = measure(name, row, work, RETURN_FREED)
            measured, returned = (max(p["vmhwm_mib"] for p in runs) / 1024 for runs in (peaks, live))
            line = f"{measured:.2f} | {est / measured:.2f} | {returned:.2f} | {est / returned:.2f}"
        else:
            est = estimate["per_device_gb"] - estimate["breakdown"]["runtime"]
            peaks, live = measure(name, row, work), []
            measured = returned = max(p.get("cuda_max_allocated_mib", 0.0) for p in peaks) / 1024
            line = f"{measured:.2f} | {est / measured:.2f}"
        results.append(
            {
                "run": name,
                "processes": row["procs"],
                "estimate_gib": est,
                "peak_phase": estimate["peak_phase"],
                "measured_gib": measured,
                "ratio": est / measured,
                "measured_returned_gib": returned,
                "ratio_returned": est / returned,
                "breakdown": estimate["breakdown"],
                "per_process": peaks,
                "per_process_returned": live,
                "argv": row["argv"],
            }
        )
        print(f"| {name} | {row['procs']} | {est:.2f} ({estimate['peak_phase']}) | {line} |", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine_line(args.device), "rows": results}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
