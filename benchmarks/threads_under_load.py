"""How fast is one training step when other processes share the CPU, by thread setting?

    .venv/bin/python benchmarks/threads_under_load.py                 # ~3 min on 2 cores
    .venv/bin/python benchmarks/threads_under_load.py --loads 0 1 2 --steps 6

The workload is one forward and backward pass of SmolLM2-135M on 8 sequences of 64
tokens (fp32, PyTorch's default matmuls), repeated ``--steps`` times in a fresh process
per setting, because OpenMP reads its environment once, when torch loads. Beside it run
``load`` busy processes, each a one-thread matmul loop (another user's training job).
Settings: threads = one per core (PyTorch's default) or ``cores - load`` (what rlhfkit's
default chooses on a busy machine), each with OpenMP's default wait policy (threads spin
at barriers) and with ``OMP_WAIT_POLICY=passive`` (they sleep). It prints seconds per
step and the slowdown against the idle machine, with the CPU model. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from rlhfkit.models.hub import resolve_model
threads, steps = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
ids = torch.randint(10, 40000, (8, 64))
times = []
for _ in range(steps + 1):
    t = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": sorted(times[1:])[len(times[1:]) // 2]}))
"""

LOAD = r"""
import torch
torch.set_num_threads(1)
a, b = torch.randn(512, 512), torch.randn(512, 512)
while True:
    a = (a @ b).tanh_()
"""


def run(threads: int, passive: bool, load: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "passive"
    busy = [
        subprocess.Popen([sys.executable, "-c", LOAD], env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(load)
    ]
    try:
        time.sleep(1.0 if load else 0.0)
        out = subprocess.run(
            [sys.executable, "-c", WORKER, str(threads), str(steps)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
    finally:
        for p in busy:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, nargs="*", default=[0, 1, 2], help="busy processes beside the step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting (the median is reported)")
    args = parser.parse_args()
    from rlhfkit.cpu import cpu_model, physical_cores

    cores = physical_cores()
    print(f"CPU: {cpu_model()}, {cores} physical core(s); torch threads vs busy processes; s/step (x idle)")
    idle = None
    rows = []
    for load in args.loads:
        for threads in sorted({cores, max(1, cores - load)}, reverse=True):
            for passive in (False, True):
                s = run(threads, passive, load, args.steps)
                idle = idle or s
                rows.append((load, threads, passive, s))
                print(
                    f"load {load}  threads {threads}  {'passive' if passive else 'spin   '}  {s:6.2f} s/step  ({s / idle:4.1f}x)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
