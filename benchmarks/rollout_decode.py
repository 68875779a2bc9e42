"""The rollout's decode loop on the CPU: ``generate`` against rlhfkit's loop, where ended rows leave.

Issue 21 asks that rows finishing at EOS not hold the batch, from what transformers offers
before a loop of rlhfkit's own. Candidates, each sampling the same rows with the same seed:

- ``generate``: what ``rlhfkit.sampling.sample`` ran before: ``model.generate`` with the growing
  KV cache and the shared-prompt prefill, greedy over the exponential-race draw (a logits
  processor calling :func:`rlhfkit.decoding.categorical_draw` with one ``torch.rand`` per row
  and token, as before), log-probs recorded. Every row stays in the batch until the last ends.
- ``decode``: :func:`rlhfkit.decoding.decode` as ``sample`` runs it now (ended rows leave the
  batch once they are a quarter of it).
- ``decode-keep``: the same loop with ``compact_fraction=1`` (rows never leave): what the loop
  itself costs or saves against ``generate``, apart from the rows that leave.
- ``continuous`` (``--continuous``): transformers' continuous batching (``generate_batch``,
  paged attention), greedy only (its sampler is not the race), against greedy ``decode``.

Sampled tokens must be equal between the candidates (the same random stream); the table says
so. Rounds are interleaved (a drift of the machine hits every candidate) and each round uses
a new seed for all. Run it alone::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rollout_decode.py --threads 2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/rollout_decode.py --threads 2 --policy outputs/pipeline-demo/sft

Results: the printed table and ``benchmarks/results/rollout_decode.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import machine  # noqa: E402

SAMPLED = ("generate", "decode", "decode-keep")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rollout_decode.py", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shapes",
        default="8x4x64,16x4x32",
        help="PROMPTSxSAMPLESxNEW_TOKENS, comma-separated (default: 8x4x64,16x4x32)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per shape (default: 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--policy", default="smollm2-135m", help="model: alias or folder (default: smollm2-135m)")
    ap.add_argument("--continuous", action="store_true", help="also time transformers' continuous batching (greedy)")
    ap.add_argument("--output", default=str(HERE / "results" / "rollout_decode.json"), help="JSON result file")
    args = ap.parse_args(argv)

    import torch

    from rlhfkit.data.prompts import read_prompts
    from rlhfkit.models.policy import load_policy
    from rlhfkit.models.tokenizers import eos_token_ids
    from rlhfkit.sampling import encode_queries, render_prompt, response_mask_from_eos

    torch.set_num_threads(args.threads)
    model, tokenizer = load_policy(args.policy)
    model.eval()
    eos_ids = eos_token_ids(model, tokenizer)
    prompts = read_prompts(str(REPO / "examples" / "review_prompts.txt"))
    env = machine()
    rows_out = []
    for shape in args.shapes.split(","):
        n_prompts, k, n_new = (int(x) for x in shape.lower().split("x"))
        texts = [render_prompt(tokenizer, p, True) for p in prompts[:n_prompts] for _ in range(k)]
        ids, mask = encode_queries(tokenizer, texts, 256, True)
        times: dict[str, list[float]] = {c: [] for c in SAMPLED}
        equal, lengths, steps, row_steps = True, [], [], []
        for r in range(args.repeats + 1):  # round 0 warms up
            outs = {}
            for c in SAMPLED:
                torch.manual_seed(1000 + r)
                seconds, outs[c] = run_sampled(c, model, tokenizer, ids, mask, n_new, eos_ids)
                if r:
                    times[c].append(seconds)
            ref = outs["generate"][0]
            equal &= all(torch.equal(outs[c][0], ref) for c in SAMPLED)
            rmask, _ = response_mask_from_eos(ref, eos_ids)
            if r:
                lengths.append(float(rmask.sum(1).float().mean()))
                steps.append(int(ref.shape[1]))
                row_steps.append(outs["decode"][1])
        row = {
            "prompts": n_prompts,
            "samples": k,
            "rows": len(texts),
            "new_tokens": n_new,
            "prompt_tokens": int(ids.shape[1]),
            "same_tokens": equal,
            "mean_response_tokens": statistics.mean(lengths),
            "mean_steps": statistics.mean(steps),
            "decode_row_steps_share": statistics.mean(rs / (len(texts) * s) for rs, s in zip(row_steps, steps)),
        }
        for c in SAMPLED:
            med = statistics.median(times[c])
            row[c] = {"median_s": med, "all_s": times[c]}
        for c in ("decode", "decode-keep"):
            row[f"generate_over_{c}"] = row["generate"]["median_s"] / row[c]["median_s"]
        if args.continuous:
            row["greedy"] = greedy_round(model, tokenizer, ids, mask, n_new, eos_ids, args.repeats)
        rows_out.append(row)
        print(
            f"{shape}: generate {row['generate']['median_s']:.2f} s, decode {row['decode']['median_s']:.2f} s "
            f"({row['generate_over_decode']:.2f}x), decode-keep {row['decode-keep']['median_s']:.2f} s "
            f"({row['generate_over_decode-keep']:.2f}x); tokens {'equal' if equal else 'DIFFER'}; mean response "
            f"{row['mean_response_tokens']:.1f} of {row['mean_steps']:.1f} steps"
            + (
                f"; greedy: decode {row['greedy']['decode_s']:.2f} s, continuous {row['greedy']['continuous_s']:.2f} s "
                f"(tokens {'equal' if row['greedy']['same_tokens'] else 'DIFFER'})"
                if args.continuous
                else ""
            ),
            flush=True,
        )

    lines = [
        "| prompts x samples x new tokens | mean response / steps | rows run (decode / generate) | generate s | decode s | speed-up | decode-keep s | speed-up | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['prompts']} x {r['samples']} x {r['new_tokens']} | {r['mean_response_tokens']:.1f} / "
            f"{r['mean_steps']:.1f} | {r['decode_row_steps_share']:.2f} | {r['generate']['median_s']:.2f} | "
            f"{r['decode']['median_s']:.2f} | {r['generate_over_decode']:.2f}x | {r['decode-keep']['median_s']:.2f} | "
            f"{r['generate_over_decode-keep']:.2f}x | {'yes' if r['same_tokens'] else 'no'} |"
        )
    if args.continuous:
        lines += [
            "",
            "| prompts x samples x new tokens (greedy) | decode s | continuous batching s | ratio | same tokens |",
        ]
        lines.append("|---|---|---|---|---|")
        for r in rows_out:
            g = r["greedy"]
            lines.append(
                f"| {r['prompts']} x {r['samples']} x {r['new_tokens']} | {g['decode_s']:.2f} | {g['continuous_s']:.2f} | "
                f"{g['continuous_s'] / g['decode_s']:.2f}x slower | {'yes' if g['same_tokens'] else 'no'} |"
            )
    caption = (
        f"{args.policy}, fp32, temperature 1, log-probs recorded, {args.threads} thread(s), median of {args.repeats} "
        f"interleaved rounds; machine: {env['cpu']}, {env['cpus']} CPUs, load {env['loadavg']} at the start."
    )
    table = "\n".join(lines) + "\n\n" + caption
    print("\n" + table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["benchmarks/rollout_decode.py", *(argv or sys.argv[1:])]), "machine": env}
    out.write_text(json.dumps({**record, "args": vars(args), "rows": rows_out, "table_markdown": table}, indent=2))
    print(f"\nwrote {out}")
    return 0


def run_sampled(candidate, model, tokenizer, ids, mask, n_new, eos_ids):
    """``(seconds, (response_ids (M, N), row steps))`` of one candidate at temperature 1."""
    import torch

    from rlhfkit.decoding import SamplingSettings, decode
    from rlhfkit.sampling import response_mask_from_eos, shared_prompt_cache

    settings = SamplingSettings(max_new_tokens=n_new, temperature=1.0)
    t0 = time.perf_counter()
    if candidate == "generate":
        response_ids = generate_race(model, tokenizer, ids, mask, settings, eos_ids)
        rmask, _ = response_mask_from_eos(response_ids, eos_ids)
        response_ids = torch.where(rmask.bool(), response_ids, tokenizer.pad_token_id)
        rows = response_ids.numel()
    else:
        d = decode(
            model,
            ids,
            mask,
            settings,
            eos_ids,
            tokenizer.pad_token_id,
            with_logprobs=True,
            prompt_cache=shared_prompt_cache(model, ids, mask),
            compact_fraction=1.0 if candidate == "decode-keep" else 0.25,
        )
        response_ids, rows = d.response_ids, d.row_steps
    return time.perf_counter() - t0, (response_ids, rows)


def generate_race(model, tokenizer, ids, mask, settings, eos_ids):
    """The previous ``sample``: ``generate`` greedy over the race draw, log-probs recorded per step."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from rlhfkit.decoding import categorical_draw
    from rlhfkit.sampling import shared_prompt_cache

    class Race(LogitsProcessor):
        def __init__(self):
            self.logprobs = []  # one (M, V) log-softmax per step, as the old recorder kept

        def __call__(self, input_ids, scores):
            logits = scores.float()
            lp = torch.log_softmax(logits, dim=-1)
            self.logprobs.append(lp.gather(1, input_ids[:, -1:]))  # the previous token's (kept for the cost)
            u = torch.rand(logits.shape, device=logits.device, dtype=torch.float32)
            token = categorical_draw(logits, settings, u, lp)
            return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)

    cache = shared_prompt_cache(model, ids, mask)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=0,
            eos_token_id=list(eos_ids),
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
            logits_processor=LogitsProcessorList([Race()]),
            **({"cache": cache} if cache is not None else {}),
        )
    return out[:, ids.shape[1] :]


def greedy_round(model, tokenizer, ids, mask, n_new, eos_ids, repeats):
    """Greedy ``decode`` against transformers' continuous batching, median seconds of ``repeats`` after a warm-up."""
    from transformers import GenerationConfig

    from rlhfkit.decoding import SamplingSettings
    from rlhfkit.sampling import sample

    inputs = [[t for t, m in zip(row, k) if m] for row, k in zip(ids.tolist(), mask.tolist())]
    config = GenerationConfig(
        max_new_tokens=n_new, do_sample=False, eos_token_id=list(eos_ids), pad_token_id=tokenizer.pad_token_id
    )
    settings = SamplingSettings(max_new_tokens=n_new, temperature=0)
    times = {"decode": [], "continuous": []}
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        response_ids = sample(model, tokenizer, ids, mask, settings, eos_ids)  # greedy decode, as rlhfkit samples
        t1 = time.perf_counter()
        cb = model.generate_batch(inputs, generation_config=config, max_new_tokens=n_new)
        t2 = time.perf_counter()
        if r:
            times["decode"].append(t1 - t0)
            times["continuous"].append(t2 - t1)
    ours = [[t for t in row if t != tokenizer.pad_token_id] for row in response_ids.tolist()]
    theirs = [list(cb[key].generated_tokens) for key in sorted(cb, key=lambda s: int(s.rsplit("_", 1)[-1]))]
    return {
        "decode_s": statistics.median(times["decode"]),
        "continuous_s": statistics.median(times["continuous"]),
        "same_tokens": ours == theirs,
    }


if __name__ == "__main__":
    sys.exit(main())
