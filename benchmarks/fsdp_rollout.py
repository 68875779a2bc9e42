"""Generation with sharded (FSDP2) weights: gather the actor once per rollout, as rlhfkit
does (``training.distributed.gathered``), against generating on the shards, where every
forward pass of every new token all-gathers each block (``generate(synced_gpus=True)``,
which keeps the processes in step until the last one has finished).

Run under two processes; each prints its own line, rank 0 the comparison:
``accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2
benchmarks/fsdp_rollout.py --cpu [--policy smollm2-135m --batch-size 8 --max-new-tokens 32]``.
Both ways sample the same tokens (greedy decoding, checked), so the difference is the
communication and the per-token gathering alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, peak_rss_mib  # noqa: E402

from rlhfkit.data.prompts import read_prompts  # noqa: E402
from rlhfkit.models.policy import load_policy  # noqa: E402
from rlhfkit.models.tokenizers import eos_token_ids, use_chat_template  # noqa: E402
from rlhfkit.sampling import SamplingSettings, encode_queries, sample  # noqa: E402
from rlhfkit.training.distributed import describe, enable_fsdp_on_cpu, gathered, settle_roots  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", default="smollm2-135m")
    parser.add_argument(
        "--prompts", default=str(Path(__file__).resolve().parent.parent / "examples" / "review_prompts.txt")
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per process")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=args.cpu)
    enable_fsdp_on_cpu(accelerator)
    rank = accelerator.process_index
    policy, tokenizer = load_policy(args.policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    settle_roots(policy)
    policy.eval()
    prompts = read_prompts(args.prompts)[rank * args.batch_size : (rank + 1) * args.batch_size]
    chat = use_chat_template(tokenizer, None, args.policy)
    ids, mask = encode_queries(tokenizer, [p.text for p in prompts], 256, chat=chat)
    ids, mask = ids.to(accelerator.device), mask.to(accelerator.device)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=0.0)
    eos = eos_token_ids(policy, tokenizer)
    times: dict[str, list[float]] = {"gathered once": [], "per-token gathers": []}
    outputs = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            accelerator.wait_for_everyone()
            t = time.perf_counter()
            with gathered(policy):
                outputs["gathered once"] = sample(policy, tokenizer, ids, mask, settings, eos)
            accelerator.wait_for_everyone()
            times["gathered once"].append(time.perf_counter() - t)
            t = time.perf_counter()
            out = policy.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                synced_gpus=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            accelerator.wait_for_everyone()
            times["per-token gathers"].append(time.perf_counter() - t)
            outputs["per-token gathers"] = out[:, ids.shape[1] :]
    a, b = outputs["gathered once"], outputs["per-token gathers"]
    n = min(a.shape[1], b.shape[1])
    same = bool(torch.equal(a[:, :n], b[:, :n]))
    best = {k: min(v) for k, v in times.items()}
    row = {
        "rank": rank,
        "mode": describe(accelerator),
        "policy": args.policy,
        "batch_per_process": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "seconds_best_of": args.repeats,
        **{f"{k} s": round(v, 3) for k, v in best.items()},
        "same_tokens": same,
        "peak_rss_mib": round(peak_rss_mib()),
    }
    print(json.dumps(row), flush=True)
    if rank == 0:
        print(
            json.dumps(
                {
                    "machine": machine(),
                    "speedup of gathering once": round(best["per-token gathers"] / best["gathered once"], 2),
                }
            )
        )


if __name__ == "__main__":
    main()
