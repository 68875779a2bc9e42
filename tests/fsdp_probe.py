"""Run an rlhfkit command in each process of ``accelerate launch`` and record, per process,
how the models it trained were held: their parameters' types and the size of this
process's shard. ``python fsdp_probe.py REPORT_PREFIX rlhfkit-args...``; writes
``REPORT_PREFIX.rank{i}.json``.

Also ``python fsdp_probe.py --update REPORT_PREFIX ...``: one RL update on a fixed rollout
(see :func:`fixed_update`), for comparing a sharded update with a single-process one.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.distributed.tensor import DTensor

import rlhfkit.training.step as step_module
from rlhfkit.cli import main

RECORD: dict = {}


def _record_one(model: torch.nn.Module) -> dict:
    params = list(model.parameters())
    return {
        "dtensor": all(isinstance(p, DTensor) for p in params),
        "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "global": sum(p.numel() for p in params),
    }


def _record(models) -> None:
    models = [models] if isinstance(models, torch.nn.Module) else list(models)
    for i, model in enumerate(models):
        RECORD.setdefault(f"model{i}_{len(RECORD)}", _record_one(model))


def probe_train_step(*args, **kwargs):
    out = REAL(*args, **kwargs)
    if (
        len(RECORD) < 4
    ):  # after the step: FSDP2 reshards after the backward pass (a forward alone may leave the root gathered)
        _record(args[1])
    return out


REAL = step_module.train_step


def fixed_update(prefix: str, policy: str, reward_model: str, algo: str) -> None:
    """One update of ``algo`` on a seeded rollout of 8 rows, this process's share of them."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from rlhfkit.config import from_dict
    from rlhfkit.models.logprobs import policy_logprobs
    from rlhfkit.models.policy import load_policy
    from rlhfkit.rl.critic import ActorCritic, load_critic
    from rlhfkit.rl.rollout import Rollout
    from rlhfkit.rl.trainer import RLConfig, UpdateBatch, build_networks, compute_advantages, optimise
    from rlhfkit.training.distributed import enable_fsdp_on_cpu
    from rlhfkit.training.run import Run

    accelerator = Accelerator(cpu=True)
    enable_fsdp_on_cpu(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg = from_dict(
        RLConfig,
        dict(
            policy=policy,
            reward=reward_model,
            prompts="unused.txt",
            output=f"{prefix}-run",
            algo=algo,
            critic="reward-model",
            batch_size=8 // world // (2 if algo != "ppo" else 1),
            samples_per_prompt=1 if algo == "ppo" else 2,
            mini_batch_size=8 // world,
            ppo_epochs=2,
            lr=1e-3,
            max_grad_norm=0.0,
            packing=False,
            kl_coef=0.05,
        ),
    )
    torch.manual_seed(0)
    actor, tok = load_policy(policy)
    critic = load_critic("reward-model", tok, reward=reward_model, policy=policy) if algo == "ppo" else None
    model = ActorCritic(actor, critic, value_head=False)
    M, P, N = 8, 5, 6
    g = torch.Generator().manual_seed(1)
    query_ids, response_ids = torch.randint(3, 200, (M, P), generator=g), torch.randint(3, 200, (M, N), generator=g)
    if algo != "ppo":  # the two samples of a prompt share it
        query_ids[1::2] = query_ids[0::2]
    mask = torch.ones(
        M, N, dtype=torch.long
    )  # equal lengths: the mean of the processes' token means is the global mean
    ids, am = torch.cat([query_ids, response_ids], 1), torch.cat([torch.ones(M, P, dtype=torch.long), mask], 1)
    with torch.no_grad():
        old = policy_logprobs(actor, ids, am, response_ids, 1.0)
        values = critic(ids, am, N) if critic is not None else torch.zeros(M, N)
    scores = torch.randn(M, generator=g)
    rows = slice(rank * M // world, (rank + 1) * M // world)
    r = Rollout(
        prompts=["p"] * M,
        responses=["r"] * M,
        query_ids=query_ids,
        query_mask=torch.ones(M, P, dtype=torch.long),
        response_ids=response_ids,
        response_mask=mask,
        ended=torch.ones(M, dtype=torch.bool),
        old_logprobs=old,
        ref_logprobs=old + 0.1 * torch.randn(M, N, generator=g),
        old_values=values,
        scores=scores,
    )
    r = Rollout(
        **{k: (v[rows] if isinstance(v, torch.Tensor) else v[rows]) for k, v in vars(r).items() if k != "packed"}
    )
    run = Run(cfg, "probe", accelerator, None)
    steps, _, model = build_networks(cfg, run, model)
    advantages, returns, _, _ = compute_advantages(cfg, r, r.scores, cfg.kl_coef, accelerator)
    optimise(cfg, run, steps, UpdateBatch(r, advantages, returns, cfg.kl_coef), step=0)
    _record([s.net for s in steps])
    state = run.full_state_dict(steps[0].net) if run.sharded else steps[0].net.state_dict()
    if accelerator.is_main_process:
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, f"{prefix}.actor.safetensors")
    accelerator.wait_for_everyone()
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(RECORD, f)


def _leave(code: int) -> None:
    """Exit as rlhfkit's CLI does: the gloo group destroyed, output flushed, then ``os._exit``
    without the interpreter's teardown, where a rank aborted about once in ten runs ("terminate
    called without an active exception"), after its results were written."""
    import atexit
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()  # what the interpreter would run at exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "--update":
        fixed_update(*sys.argv[2:6])
        _leave(0)
    prefix, argv = sys.argv[1], sys.argv[2:]
    step_module.train_step = probe_train_step
    import rlhfkit.dpo.train as dpo_train
    import rlhfkit.rl.trainer as rl_trainer
    import rlhfkit.rm.train as rm_train
    import rlhfkit.sft.train as sft_train

    for module in (rm_train, sft_train, rl_trainer, dpo_train):
        module.train_step = probe_train_step
    real_shard_frozen = rl_trainer.shard_frozen

    def probe_shard_frozen(model, accelerator):  # the frozen reference and reward models, once sharded
        out = real_shard_frozen(model, accelerator)
        RECORD[f"frozen_{len(RECORD)}"] = _record_one(model)
        return out

    rl_trainer.shard_frozen = probe_shard_frozen
    code = main(argv)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(RECORD, f)
    _leave(code)
