"""How fast are oneDNN and PyTorch's default (MKL) fp32 matmuls on this CPU, and how long does
``--cpu-matmul auto`` take to find out?

    .venv/bin/python benchmarks/cpu_linear_speed.py                 # a few seconds
    .venv/bin/python benchmarks/cpu_linear_speed.py --threads 1 2 --repeats 5

The layers are SmolLM2-135M's (30 blocks of q, k, v, o and the three MLP projections, and
the LM head), measured as ``--cpu-matmul auto`` measures them (``measure_kernels`` with the
real timer: forward and both backward matmuls, every shape once per kernel on a bounded
number of rows). It prints, per thread count, the GFLOP/s of each kernel, the faster one and
the seconds the whole measurement took (the median of ``--repeats``), with the CPU model.
Nothing is cached. Run it on a quiet machine: other processes slow both kernels and the
measurement alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlhfkit.cpu import cpu_model, physical_cores
from rlhfkit.models.cpu_linear import measure_kernels, onednn_available

# SmolLM2-135M: hidden 576, 9 query and 3 key/value heads of 64, MLP 1536, 30 blocks, vocabulary 49152.
SHAPES = {(576, 576): 2 * 30, (576, 192): 2 * 30, (576, 1536): 2 * 30, (1536, 576): 30, (576, 49152): 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, nargs="*", default=None, help="torch thread counts (default: 1 and the physical cores)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="measurements per thread count (the median is reported)")
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("this PyTorch build has no oneDNN: there is nothing to compare")
    cores = physical_cores()
    print(f"CPU: {cpu_model()}, {cores} physical core(s); torch {torch.__version__}; SmolLM2-135M's linear layers")
    for threads in args.threads or sorted({1, cores}):
        torch.set_num_threads(threads)
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            onednn, plain = measure_kernels(SHAPES)
            runs.append((time.perf_counter() - t0, onednn, plain))
        seconds, onednn, plain = (statistics.median(x) for x in zip(*runs))
        faster = "oneDNN" if onednn > plain else "PyTorch"
        print(
            f"threads {threads}  oneDNN {onednn:6.1f} GFLOP/s  PyTorch {plain:6.1f} GFLOP/s  ({faster} {max(onednn, plain) / min(onednn, plain):.2f}x)"
            f"  measurement {seconds:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
