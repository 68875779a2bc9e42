"""The rollout's KV cache on the CPU: today's growing cache against a preallocated (static) one.

Issue 21 asks for a preallocated cache on the CPU "where it measures faster than today's
growing one". The rollout used ``model.generate`` with transformers' default cache
(``DynamicCache``: each decode step appends the new keys and values to every layer's tensors;
``rlhfkit.decoding.decode`` keeps that cache), plus the shared-prompt prefill (:func:`rlhfkit.sampling.shared_prompt_cache`) when a
prompt repeats. The candidate is ``generate(..., cache_implementation="static")``: a cache
allocated once at ``prompt + max_new_tokens`` positions, each step writing in place and attending
over the whole (masked) buffer. Both run eagerly here (no ``torch.compile``: that is the GPU
path's business).

For each shape (rows x new tokens, prompts from ``examples/review_prompts.txt`` through the chat
template, as a rollout renders them) and each cache, in one process, interleaved round by round
so that a drift of the machine hits both: greedy decoding to exactly ``max_new_tokens`` (no EOS
stop, so both do the same number of steps), ``--repeats`` timed rounds after one warm-up, the
median seconds per round and decoded tokens per second. Greedy outputs are compared (equal
tokens, or the first row and position where they differ: a cache that changes the answer is no
candidate). Run it alone::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cpu_kv_cache.py --threads 2

Results: the printed table and ``benchmarks/results/cpu_kv_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import machine  # noqa: E402

CACHES = ("dynamic", "static")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpu_kv_cache.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8x32,8x64,16x128", help="ROWSxNEW_TOKENS, comma-separated")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per shape and cache (default: 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--policy", default="smollm2-135m", help="model: alias or folder (default: smollm2-135m)")
    ap.add_argument("--output", default=str(HERE / "results" / "cpu_kv_cache.json"), help="JSON result file")
    args = ap.parse_args(argv)

    import torch

    from rlhfkit.data.prompts import read_prompts
    from rlhfkit.models.policy import load_policy
    from rlhfkit.sampling import encode_queries

    torch.set_num_threads(args.threads)
    model, tokenizer = load_policy(args.policy)
    model.eval()
    prompts = read_prompts(str(REPO / "examples" / "review_prompts.txt"))
    env = machine()
    rows_out = []
    for shape in args.shapes.split(","):
        n_rows, n_new = (int(x) for x in shape.lower().split("x"))
        ids, mask = encode_queries(tokenizer, [tokenizer_text(tokenizer, p) for p in prompts[:n_rows]], 256, True)

        run = partial(generate, model, tokenizer, ids, mask, n_new)
        outputs = {c: run(c)[1] for c in CACHES}  # warm-up, and the greedy answers
        times: dict[str, list[float]] = {c: [] for c in CACHES}
        for _ in range(args.repeats):
            for c in CACHES:
                times[c].append(run(c)[0])
        same = torch.equal(outputs["dynamic"], outputs["static"])
        first_diff = None
        if not same:
            where = (outputs["dynamic"] != outputs["static"]).nonzero()
            first_diff = [int(x) for x in where[0]] if len(where) else "shapes differ"
        row = {
            "rows": n_rows,
            "new_tokens": n_new,
            "prompt_tokens": int(ids.shape[1]),
            "same_greedy_tokens": same,
            "first_difference": first_diff,
        }
        for c in CACHES:
            med = statistics.median(times[c])
            row[c] = {"median_s": med, "all_s": times[c], "tokens_per_s": n_rows * n_new / med}
        row["static_over_dynamic_time"] = row["static"]["median_s"] / row["dynamic"]["median_s"]
        rows_out.append(row)
        print(
            f"{n_rows} x {n_new} tokens (prompt {ids.shape[1]}): dynamic {row['dynamic']['median_s']:.2f} s, "
            f"static {row['static']['median_s']:.2f} s (static/dynamic {row['static_over_dynamic_time']:.2f}); "
            f"greedy tokens {'equal' if same else f'differ at {first_diff}'}",
            flush=True,
        )

    lines = [
        "| rows x new tokens | prompt tokens | dynamic s (tokens/s) | static s (tokens/s) | static / dynamic time | greedy equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['rows']} x {r['new_tokens']} | {r['prompt_tokens']} | {r['dynamic']['median_s']:.2f} "
            f"({r['dynamic']['tokens_per_s']:.0f}) | {r['static']['median_s']:.2f} ({r['static']['tokens_per_s']:.0f}) | "
            f"{r['static_over_dynamic_time']:.2f} | {'yes' if r['same_greedy_tokens'] else 'no'} |"
        )
    caption = (
        f"{args.policy}, fp32, {args.threads} thread(s), median of {args.repeats} interleaved rounds; machine: "
        f"{env['cpu']}, {env['cpus']} CPUs, load {env['loadavg']} at the start."
    )
    table = "\n".join(lines) + "\n\n" + caption
    print("\n" + table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["benchmarks/cpu_kv_cache.py", *(argv or sys.argv[1:])]), "machine": env}
    out.write_text(json.dumps({**record, "args": vars(args), "rows": rows_out, "table_markdown": table}, indent=2))
    print(f"\nwrote {out}")
    return 0


def generate(model, tokenizer, ids, mask, n_new: int, cache: str):
    """Greedy ``n_new`` tokens for every row with ``cache`` ("dynamic": transformers' default, or
    "static"); returns (seconds, the new tokens ``(rows, n_new)``)."""
    import torch

    kwargs = dict(cache_implementation="static") if cache == "static" else {}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,  # no early stop: both caches decode the same number of steps
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            **kwargs,
        )
    return time.perf_counter() - t0, out[:, ids.shape[1] :]


def tokenizer_text(tokenizer, prompt) -> str:
    from rlhfkit.sampling import render_prompt

    return render_prompt(tokenizer, prompt, True)


if __name__ == "__main__":
    sys.exit(main())
