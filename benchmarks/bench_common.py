"""Helpers the benchmarks share: peak memory of this process, the machine and library versions
that go into every result file, the training-loop clock, running each side in a subprocess, and
for the rank-list comparisons their shared options, pre-truncation and the paired bootstrap."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

PACKAGES = ("rlhfkit", "torch", "transformers", "accelerate", "peft", "datasets", "trl")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class LoopClock:
    """Times the loop identically on both sides with global PyTorch hooks.

    ``start``: the first ``nn.Module`` forward after ``install()`` (the hook then removes
    itself). At the end of every ``optimizer.step()``: wall time, this process's CPU time
    (what the loop computed, whatever else the machine runs) and its peak RSS so far, so
    the memory figure covers loading and the loop but not the saving after it.
    :meth:`summary` groups the steps into updates and leaves the first update out of the
    per-update figures when there are at least two.
    """

    def __init__(self):
        self.start: float | None = None
        self.start_cpu: float | None = None
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.peak_rss_mib = 0.0

    def install(self) -> None:
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._fwd = register_module_forward_pre_hook(self._on_forward)
        self._opt = register_optimizer_step_post_hook(self._on_step)

    def remove(self) -> None:
        self._fwd.remove()
        self._opt.remove()

    def _on_forward(self, module, args):
        self.start, self.start_cpu = time.perf_counter(), time.process_time()
        self._fwd.remove()

    def _on_step(self, optimizer, args, kwargs):
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())
        self.peak_rss_mib = peak_rss_mib()

    def summary(self, steps_per_update: int) -> dict[str, Any]:
        if self.start is None or not self.step_ends:
            raise RuntimeError("the loop ran no forward or no optimizer step")
        n = len(self.step_ends)
        if n % steps_per_update:
            raise RuntimeError(f"{n} optimizer steps is not a whole number of updates of {steps_per_update}")
        updates = n // steps_per_update
        last = [(u + 1) * steps_per_update - 1 for u in range(updates)]  # the step that ends each update
        wall = [self.step_ends[i] for i in last]
        cpu = [self.step_cpu[i] for i in last]
        per_update = lambda ends, start: (ends[-1] - ends[0]) / (updates - 1) if updates > 1 else ends[-1] - start  # noqa: E731
        return {
            "loop_s": wall[-1] - self.start,
            "loop_cpu_s": cpu[-1] - self.start_cpu,
            "optimizer_steps": n,
            "updates": updates,
            "first_update_s": wall[0] - self.start,
            "s_per_update": per_update(wall, self.start),
            "cpu_s_per_update": per_update(cpu, self.start_cpu),
            "peak_rss_mib": self.peak_rss_mib,
        }


def set_threads(n: int) -> None:
    """``n`` PyTorch threads for this process's kernels, one inter-op thread."""
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def machine() -> dict:
    """CPU count, load average at the start (the other jobs a timing competes with), versions."""
    from rlhfkit.cpu import cpu_model

    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "isa_caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ},
        "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "versions": versions(),
    }


def work_folder(work_dir: str | None, prefix: str) -> tuple[Path, bool]:
    """The benchmark's working folder and whether to keep it: ``work_dir`` if given (kept),
    else a new temporary folder (removed after a good run)."""
    import tempfile

    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work, work_dir is not None


def run_child(script: str | Path, work: Path, name: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script --config WORK/args.yaml ARGS`` in a fresh interpreter, its output in
    ``WORK/NAME.log``; return the result it wrote to ``WORK/NAME.json`` plus the whole
    process's wall time and peak RSS (its own rusage). A failing child stops the benchmark
    with the last lines of its log."""
    import json
    import subprocess
    import sys
    import time

    log = work / f"{name}.log"
    cmd = [sys.executable, str(Path(script).resolve()), "--config", str(work / "args.yaml"), *args]
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=Path(script).resolve().parent.parent,
            env={**os.environ, **(env or {})},
        )
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{name} failed (exit {code}); last lines of {log}:\n{tail}")
    result = json.loads((work / f"{name}.json").read_text())
    result["process_s"] = time.perf_counter() - t0
    result["process_peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


@dataclass
class ComparisonArgs:
    """The options every rlhfkit-vs-TRL benchmark on rank lists has; each benchmark derives its
    ``Args`` from this, adds its own and may give these other defaults by declaring them again."""

    data: str = field(default="", metadata={"help": "rank-list TSV (one list per line, best first)"})
    n_train: int = field(default=400, metadata={"help": "train on the first N lists"})
    n_eval: int = field(default=200, metadata={"help": "evaluate on N held-out lists starting at --eval-start"})
    eval_start: int = field(default=400, metadata={"help": "0-based index of the first held-out list"})
    max_length: int = field(
        default=64, metadata={"help": "tokens per text, special/EOS tokens included (texts are pre-truncated to fit)"}
    )
    batch_size: int = field(default=8, metadata={"help": "lists per optimizer step (TRL: their C(K,2) pairs each)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate, both sides"})
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "share of steps warming up (linear schedule), both sides"}
    )
    epochs: int = field(default=1, metadata={"help": "passes over the training lists"})
    seed: int = field(default=42, metadata={"help": "seed for both sides (the first one, with --seeds above 1)"})
    seeds: int = field(
        default=1,
        metadata={
            "help": "train each side this many times, with seeds --seed, --seed+1, ...: the table shows "
            "the means over the runs, and the accuracy interval resamples the runs as well as the held-out lists"
        },
    )
    eval_batch_size: int = field(default=64, metadata={"help": "texts per forward pass when evaluating"})
    threads: int = field(
        default=1,
        metadata={
            "help": "PyTorch CPU threads per side (0: PyTorch's default, one per core); see rm_vs_trl.py's docstring"
        },
    )
    order: str = field(default="ours,trl", metadata={"help": "which side runs first: ours,trl or trl,ours"})
    output: str = field(default="", metadata={"help": "JSON result file"})
    work_dir: str | None = field(
        default=None,
        metadata={"help": "keep data, models and logs here (default: a temporary folder, removed after a good run)"},
    )
    side: Literal["ours", "trl"] | None = field(
        default=None, metadata={"help": "internal: run one side in this process"}
    )

    at_least_one: ClassVar[tuple[str, ...]] = ("n_train", "n_eval", "batch_size", "epochs", "eval_batch_size", "seeds")

    def __post_init__(self):
        from rlhfkit.config import ConfigError

        if self.threads < 0 or self.lr <= 0:
            raise ConfigError(f"options 'threads' must be >= 0 and 'lr' > 0, got {self.threads} and {self.lr}")
        for name in self.at_least_one:
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.eval_start < self.n_train:
            raise ConfigError(
                f"--eval-start {self.eval_start} overlaps the {self.n_train} training lists; use --eval-start >= --n-train"
            )
        if self.max_length < 8:
            raise ConfigError(f"option 'max_length' must be at least 8, got {self.max_length}")
        if sorted(self.order.split(",")) != ["ours", "trl"]:
            raise ConfigError(f"option 'order' got {self.order!r}; use ours,trl or trl,ours")


def steps_per_run(n_lists: int, lists_per_step: int, epochs: int) -> int:
    """Optimizer steps of both sides: rlhfkit's count (ceil per epoch), TRL's for C(K,2) pairs per list."""
    return epochs * math.ceil(n_lists / lists_per_step)


def timed(train: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Run ``train()`` under a :class:`LoopClock` (one optimizer step per update); returns
    ``({"loop_s", "steps", "step_ends_s", "call_s", "peak_rss_mib"}, what train returned)``:
    the loop from its first forward to its last optimizer step, the whole call, and the peak
    RSS at the last optimizer step (loading and the loop, not the saving after it)."""
    clock = LoopClock()
    clock.install()
    t0 = time.perf_counter()
    value = train()
    call_s = time.perf_counter() - t0
    clock.remove()
    summary = clock.summary(1)
    return {
        "loop_s": summary["loop_s"],
        "steps": summary["optimizer_steps"],
        "call_s": call_s,
        "step_ends_s": [t - clock.start for t in clock.step_ends],
        "peak_rss_mib": summary["peak_rss_mib"],
    }, value


def per_list_counts(data, scores, pairwise_accuracy: float) -> dict[str, list[int]]:
    """``list_correct`` and ``list_pairs`` of every list of ``data`` (an ``EncodedPreferences``)
    under per-text ``scores``: what :func:`paired_bootstrap` resamples. Checked against the
    evaluation's ``pairwise_accuracy``."""
    out: dict[str, list[int]] = {"list_correct": [], "list_pairs": []}
    for ex, idx in zip(data.examples, data.lists):
        r = scores[idx].tolist()
        pairs = ex.ordered_pairs()
        out["list_correct"].append(sum(r[a] > r[b] for a, b in pairs))
        out["list_pairs"].append(len(pairs))
    assert abs(sum(out["list_correct"]) / sum(out["list_pairs"]) - pairwise_accuracy) < 1e-9
    return out


def paired_bootstrap(
    ours: list[dict[str, Any]], trl: list[dict[str, Any]], seed: int, n: int = 2000
) -> dict[str, list[float]]:
    """95% intervals of ours - TRL for pairwise and list-exact accuracy, each side's accuracy
    being the mean over its runs (one per seed; ``ours`` and ``trl`` hold each run's
    :func:`per_list_counts`).

    Each of the ``n`` replicates resamples the held-out lists (the same lists for both sides:
    paired) and, independently on each side, its runs, so the interval holds the seed-to-seed
    spread as well as the choice of held-out lists. With one run a side it is the plain paired
    bootstrap over lists. The run level is a crude estimate with 3 runs; it cannot narrow the
    interval below the list level's, only widen it.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = np.asarray(ours[0]["list_pairs"], dtype=np.int64)  # (m,) the same lists on both sides
    for run in ours + trl:
        if run["list_pairs"] != ours[0]["list_pairs"]:
            raise ValueError("the runs were evaluated on different held-out lists")
    correct = {
        side: np.asarray([r["list_correct"] for r in runs], dtype=np.int64)
        for side, runs in (("ours", ours), ("trl", trl))
    }  # (runs, m)
    exact = {side: (c == pairs).astype(np.float64) for side, c in correct.items()}  # (runs, m)
    m = pairs.shape[0]
    pw, ex = np.empty(n), np.empty(n)
    for i in range(n):
        lists = rng.integers(m, size=m)
        runs = {side: rng.integers(c.shape[0], size=c.shape[0]) for side, c in correct.items()}
        mean_correct = {side: correct[side][runs[side]][:, lists].sum() / len(runs[side]) for side in correct}
        pw[i] = (mean_correct["ours"] - mean_correct["trl"]) / pairs[lists].sum()
        ex[i] = exact["ours"][runs["ours"]][:, lists].mean() - exact["trl"][runs["trl"]][:, lists].mean()
    ci = lambda v: [float(np.sort(v)[int(0.025 * n)]), float(np.sort(v)[int(0.975 * n) - 1])]  # noqa: E731
    return {"pairwise_accuracy": ci(pw), "list_exact_accuracy": ci(ex)}


def mean_over_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's result over its runs (one per seed), in the shape of a single run's, so a
    benchmark's report reads it unchanged: the mean loop time and accuracies, lists/s as all
    the runs' lists over all their loop time, the largest peak RSS; ``runs`` keeps each run and
    ``pairwise_accuracy_runs`` each run's held-out pairwise accuracy. The rest (steps, batch
    shape, threads) is the first run's; the runs differ only in their seed."""
    if len(runs) == 1:
        return {**runs[0], "runs": runs, "pairwise_accuracy_runs": [runs[0]["eval"]["pairwise_accuracy"]]}
    out = dict(runs[0])
    total_loop = sum(r["loop_s"] for r in runs)
    out["lists_per_s"] = sum(r["lists_per_s"] * r["loop_s"] for r in runs) / total_loop
    for key in ("loop_s", "call_s"):
        out[key] = sum(r[key] for r in runs) / len(runs)
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    out["eval"] = dict(runs[0]["eval"])
    for key in ("pairwise_accuracy", "list_exact_accuracy", "kendall_tau"):
        if key in out["eval"]:
            out["eval"][key] = sum(r["eval"][key] for r in runs) / len(runs)
    out["runs"] = runs
    out["pairwise_accuracy_runs"] = [r["eval"]["pairwise_accuracy"] for r in runs]
    return out


def runs_line(args: Any, ours: dict[str, Any], trl: dict[str, Any]) -> list[str]:
    """The report's line on the runs behind each mean (nothing with one seed)."""
    if args.seeds == 1:
        return []
    fmt = lambda side: " ".join(f"{a:.4f}" for a in side["pairwise_accuracy_runs"])  # noqa: E731
    return [
        f"Each side trained {args.seeds} times (seeds {args.seed}..{args.seed + args.seeds - 1}); the table shows means. "
        f"Held-out pairwise accuracy per seed: rlhfkit {fmt(ours)}; TRL {fmt(trl)}."
    ]


def interval_caption(args: Any) -> str:
    """What the report's accuracy intervals resample."""
    if args.seeds == 1:
        return "Accuracy differences: [95% paired bootstrap interval over the held-out lists]."
    return (
        f"Accuracy differences: [95% bootstrap interval, resampling the held-out lists (paired) and each side's "
        f"{args.seeds} runs]."
    )


def seed_folder(work: Path, args: Any, seed: int) -> Path:
    """``WORK/seedN``: links to everything ``prepare`` wrote in ``work`` and an ``args.yaml``
    with ``--seed N``, where one run of each side trains and writes its results."""
    import copy

    from rlhfkit.config import save_yaml

    sub = work / f"seed{seed}"
    sub.mkdir(exist_ok=True)
    for f in work.iterdir():
        if f.name != "args.yaml" and not f.name.startswith("seed") and not (sub / f.name).exists():
            (sub / f.name).symlink_to(f.resolve())
    one = copy.copy(args)
    one.seed, one.seeds, one.work_dir = seed, 1, str(sub)
    save_yaml(one, sub / "args.yaml")
    return sub


def truncate_text(tokenizer, text: str, budget: int) -> str:
    """The longest prefix of ``text``, cut at a token boundary, of at most ``budget`` tokens."""

    def n_tokens(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= budget:
        return text
    keep = budget
    while keep > 0:
        prefix = text[: enc["offset_mapping"][keep - 1][1]]
        if n_tokens(prefix) <= budget:  # a prefix may tokenise differently (byte-level BPE): check
            return prefix
        keep -= 1
    raise ValueError(f"cannot fit {text[:40]!r} into {budget} tokens")


INSTALL = """\
TRL is not importable from {python}. It is not an rlhfkit dependency; the benchmark runs in
its own virtualenv (benchmarks/README.md). From the repository root:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0     # first and pinned: a plain torch pulls CUDA wheels
    .venv-bench/bin/pip install -e .
    .venv-bench/bin/pip install --no-deps -r benchmarks/requirements-peer.txt

then run: .venv-bench/bin/python benchmarks/{script}.py
"""


def thread_env(threads: int) -> dict[str, str]:
    """A child's OpenMP and MKL thread count (rlhfkit honours OMP_NUM_THREADS too); 0: PyTorch's default."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


def begin(args: Any, name: str, install: str) -> tuple[Path, bool, dict] | None:
    """The parent's start: None (after printing how to install it) when TRL is not importable;
    else the work folder (``args.work_dir`` set to it, ``args.yaml`` written), whether to
    keep it, and :func:`machine`."""
    from rlhfkit.config import save_yaml

    if importlib.util.find_spec("trl") is None:
        print(install.format(python=sys.executable, script=name), file=sys.stderr)
        return None
    work, keep = work_folder(args.work_dir, f"{name}-")
    args.work_dir = str(work)
    save_yaml(args, work / "args.yaml")
    return work, keep, machine()


def compare(
    script: str,
    argv: list[str] | None,
    args_cls: type,
    *,
    run_side: Callable,
    prepare: Callable,
    report: Callable,
    labels: dict[str, str],
    install: str,
) -> int:
    """The whole run of a benchmark of rlhfkit (``ours``) against a TRL trainer on the same lists.

    In a child (``--side``): ``run_side(args)``. In the parent: ``prepare(args, work)`` once,
    each side in its own subprocess in ``--order`` (:func:`run_child`), a paired bootstrap
    of the held-out accuracies, ``report(args, data, ours, trl, env, ci)`` printed, and
    everything written to ``--output`` as JSON. ``args_cls`` needs the fields ``side``,
    ``work_dir``, ``order``, ``threads``, ``seed`` and ``output``.
    """
    from rlhfkit.config import parse_args

    name = Path(script).stem
    args = parse_args(args_cls, argv, prog=f"{name}.py")
    if args.side:
        return run_side(args)
    started = begin(args, name, install)
    if started is None:
        return 2
    work, keep, env = started

    t0 = time.perf_counter()
    print(f"preparing data in {work} ...", flush=True)
    data = prepare(args, work)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    order = args.order.split(",")
    total = len(order) * args.seeds
    for s in range(args.seeds):  # seed by seed, both sides each time: a drift of the machine hits both
        seed = args.seed + s
        sub = work if args.seeds == 1 else seed_folder(work, args, seed)
        for side in order:
            i = len(runs["ours"]) + len(runs["trl"]) + 1
            print(
                f"[{i}/{total}] {labels[side]}, seed {seed}: training on {data['train_lists']} lists, then evaluating "
                f"(log: {sub / side}.log) ...",
                flush=True,
            )
            r = run_child(script, sub, side, ["--side", side], env=thread_env(args.threads))
            runs[side].append(r)
            print(
                f"      {r['lists_per_s']:.2f} lists/s, loop {r['loop_s']:.1f} s, pairwise accuracy {r['eval']['pairwise_accuracy']:.4f}",
                flush=True,
            )

    results = {side: mean_over_runs(runs[side]) for side in runs}
    ci = paired_bootstrap([r["eval"] for r in runs["ours"]], [r["eval"] for r in runs["trl"]], args.seed)
    table = report(args, data, results["ours"], results["trl"], env, ci)
    print()
    print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    repo = Path(script).resolve().parent.parent
    record = {
        "command": " ".join(
            [
                os.path.relpath(sys.executable, repo),
                f"benchmarks/{name}.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "args": {k: v for k, v in vars(args).items() if k not in ("side", "work_dir")},
        "data": data,
        "env": env,
        "ours": results["ours"],
        "trl": results["trl"],
        "throughput_ratio": results["ours"]["lists_per_s"] / results["trl"]["lists_per_s"],
        "accuracy_difference_ci95": ci,
        "total_s": time.perf_counter() - t0,
        "table_markdown": table,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0
