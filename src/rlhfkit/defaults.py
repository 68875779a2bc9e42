"""Defaults and names that more than one command reads, written once.

Each trainer's config field takes its default from here, and ``rlhfkit plan`` plans a run
with the same values, so a changed default cannot leave the planner behind (a test holds
every trainer's config to this table). Nothing here imports anything.
"""

from __future__ import annotations

RL_ALGORITHMS = ("ppo", "rloo", "grpo", "reinforce++")  # rlhfkit rl --algo; plan --algo; pipeline algorithm:

EXPORT = "final"  # every trainer's model at the end of its run: OUTPUT/final/ (rm train also keeps OUTPUT/best/)
SNAPSHOTS = "snapshots"  # rl --save-policy-every: OUTPUT/snapshots/update-N/

# per trainer: sft, rm (rm train), dpo, rl (every --algo)
BATCH_SIZE = {"sft": 8, "rm": 2, "dpo": 4, "rl": 16}  # sft rows, rm/dpo lists, rl prompts per rollout; per process
MAX_LENGTH = {"sft": 512, "rm": 256, "dpo": 512}  # tokens per training sequence
EVAL_BATCH_SIZE = {"sft": 16, "rm": 64, "dpo": 16}  # sequences per evaluation forward pass
LORA_DROPOUT = 0.05  # sft, rm, dpo
RL_LORA_DROPOUT = 0.0  # 0 keeps the rollout's and the update's log-probs equal

# online RL and sampling
MINI_BATCH_SIZE = 8  # rollout rows per optimizer step
MAX_NEW_TOKENS = 64
MAX_PROMPT_LENGTH = 256


def samples_per_prompt(algo: str) -> int:
    """Responses per prompt when ``--samples-per-prompt`` is not given: PPO samples each prompt
    once; the group methods compare 4 samples of a prompt with each other."""
    return 1 if algo == "ppo" else 4
