"""Peak memory and time of the RL update's log-prob part: full logits vs ``--logprob-chunk-size``.

Each variant runs in its own subprocess (peak RSS, ``ru_maxrss``, is per process) on SmolLM2-135M
(the embedded ``smollm2-135m``): the actor's forward pass over ``--rows x (--prompt + --tokens)``
tokens, the response log-probs and entropy (today's path: the ``(rows, tokens, V)`` logits;
chunked: :func:`rlhfkit.models.chunked_logprobs.logprobs_from_hidden`), a PPO-style loss, and its
backward pass. ``--part head`` times only the log-prob part on random hidden states of the model's
shape. Prints one markdown row per variant (the median of ``--repeats`` timed steps after one warm-up)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/logprob_chunks.py --chunks 0 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run_one(args: argparse.Namespace, chunk: int) -> dict:
    import torch

    from rlhfkit.models.chunked_logprobs import logprobs_from_hidden
    from rlhfkit.models.logprobs import lm_head_weights, response_hidden, response_logits
    from rlhfkit.models.policy import load_policy
    from rlhfkit.ops import entropy_from_logits, logprobs_from_logits, masked_mean

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_policy("smollm2-135m")
    model.train()
    R, P, N = args.rows, args.prompt, args.tokens
    vocab, hidden_size = model.config.vocab_size, model.config.hidden_size
    ids = torch.randint(0, vocab, (R, P + N))
    mask = torch.ones(R, P + N, dtype=torch.long)
    labels = ids[:, P:]
    response_mask = torch.ones(R, N)

    def step() -> None:
        if args.part == "head":
            hidden = torch.randn(R, N, hidden_size, requires_grad=True)
        if chunk:
            if args.part == "model":
                hidden = response_hidden(model, ids, mask, N)
            weight, bias = lm_head_weights(model)
            logprobs, entropy = logprobs_from_hidden(
                hidden, weight, labels, bias=bias, temperature=0.7, chunk_size=chunk, with_entropy=True
            )
            entropy = entropy.detach()
        else:
            if args.part == "model":
                logits, _ = response_logits(model, ids, mask, N)
            else:
                logits = hidden @ model.get_output_embeddings().weight.t()
            logits = logits / 0.7
            logprobs = logprobs_from_logits(logits, labels)
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach())
        loss = -masked_mean(torch.exp(logprobs - logprobs.detach()), response_mask) + 0 * entropy.mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB)
    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"chunk": chunk, "seconds": statistics.median(times), "peak_gib": peak, "before_gib": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 256, 1024, 4096])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--part", choices=["model", "head"], default="model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args, args.one)))
        return
    print(f"{args.part}: {args.rows} rows x ({args.prompt} + {args.tokens}) tokens, {args.threads} threads")
    print("| --logprob-chunk-size | step s (median) | peak RSS GiB | RSS before the first step GiB |")
    print("| --- | --- | --- | --- |")
    passthrough = [a for a in sys.argv[1:]]
    for chunk in args.chunks:
        out = subprocess.run(
            [sys.executable, __file__, *passthrough, "--one", str(chunk)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {chunk} | {r['seconds']:.3f} | {r['peak_gib']:.2f} | {r['before_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
