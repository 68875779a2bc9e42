"""Config pieces every trainer shares, written and validated once: run control, optimiser, LoRA.

A trainer's config derives from the pieces it needs and adds its own fields::

    @dataclass(kw_only=True)
    class RMTrainConfig(RunOptions, OptimOptions, LoraOptions):
        train: str = opt(help="training data file")

A trainer may give a shared field another default by declaring it again (PPO's ``lr``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from rlhfkit.config import Options, opt
from rlhfkit.defaults import LORA_DROPOUT
from rlhfkit.files import check_output_dir
from rlhfkit.tracking import TRACKERS, check_installed, parse_report_to

logger = logging.getLogger(__name__)

CPU_MATMUL_HELP = (
    "CPU only: how fp32 Linear layers multiply: oneDNN, PyTorch's default BLAS (torch), or auto: "
    "time both on this model's shapes once per machine and take the faster"
)


@dataclass(kw_only=True)
class RunOptions(Options):
    """Where a run writes, how it starts and stops, and on what hardware."""

    output: str = opt(help="run folder: models, checkpoint/, metrics.jsonl, plots")
    seed: int = opt(42, "random seed (data order, initialisation, sampling)")
    resume: bool = opt(False, "continue from OUTPUT/checkpoint exactly where it stopped")
    stop_after_steps: int | None = opt(
        None, "stop after this step with a checkpoint, to continue later with --resume", ge=1
    )
    save_every: int = opt(
        100, "write a resumable checkpoint every N steps (and after the last, unless --no-final-checkpoint)", ge=1
    )
    final_checkpoint: bool = opt(
        True,
        "after the last step, also write a resumable checkpoint (weights, optimizer state: about 1.6 GB and 2 s "
        "for a 135M model), needed only to extend the finished run with --resume and a larger step count; "
        "--no-final-checkpoint keeps final/ and the periodic checkpoints only",
    )
    log_every: int = opt(10, "log training metrics every N steps", ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt("auto", "auto: bf16 on CUDA, fp32 on the CPU")
    cpu: bool = opt(False, "run on the CPU even if a GPU is present")
    cpu_matmul: Literal["auto", "onednn", "torch"] = opt("auto", CPU_MATMUL_HELP)
    threads: int | None = opt(
        None,
        "CPU threads for PyTorch (default: OMP_NUM_THREADS if set, else one per physical core, fewer when the machine is busy)",
        ge=1,
    )
    report_to: list[str] = opt(
        factory=lambda: ["tensorboard"],
        help=f"where metrics go besides metrics.jsonl: "
        f"{', '.join(TRACKERS)} or none; several comma-separated (wandb,mlflow); each "
        "configured by its own environment variables (docs/tracking.md)",
    )
    tensorboard: bool | None = opt(None, "deprecated: use --report-to (--no-tensorboard takes tensorboard out of it)")
    progress: bool = opt(True, "show a progress bar")

    def validate(self) -> None:
        super().validate()
        check_output_dir(self.output)
        self.report_to = parse_report_to(self.report_to)
        if (
            self.tensorboard is not None
        ):  # the old switch, folded into --report-to once (then unset: rebuilding is silent)
            others = [n for n in self.report_to if n not in ("tensorboard", "none")]
            if self.tensorboard:
                self.report_to = self.report_to if "tensorboard" in self.report_to else [*others, "tensorboard"]
            else:
                self.report_to = others or ["none"]
            logger.warning(
                "--%stensorboard is deprecated; use --report-to (this run: --report-to %s)",
                "" if self.tensorboard else "no-",
                ",".join(self.report_to),
            )
            self.tensorboard = None
        check_installed(self.report_to)  # a missing tracker fails here, before anything is written


@dataclass(kw_only=True)
class OptimOptions(Options):
    """AdamW, its learning-rate schedule, accumulation and clipping."""

    lr: float = opt(2e-5, "peak learning rate", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = opt("linear", "learning-rate schedule after warm-up")
    warmup_ratio: float = opt(0.05, "share of the optimizer steps spent warming the learning rate up", ge=0, lt=1)
    max_grad_norm: float = opt(1.0, "gradient-norm clipping (0 = off)", ge=0)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)


LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_target": None}


@dataclass(kw_only=True)
class LoraOptions(Options):
    """Low-rank adapters (peft) instead of training every weight."""

    lora: bool = opt(False, "train LoRA adapters (merged into the saved model) instead of all weights")
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA alpha", ge=1)
    lora_dropout: float = opt(LORA_DROPOUT, "LoRA dropout", ge=0, lt=1)
    lora_target: list[str] | None = opt(None, "module names for LoRA (default: peft's choice for the architecture)")

    def validate(self) -> None:
        super().validate()
        changed = [k for k, v in LORA_DEFAULTS.items() if getattr(self, k) != v]
        if not self.lora and changed:
            logger.warning("%s: ignored without --lora", ", ".join(f"--{k.replace('_', '-')}" for k in changed))


def check_resume_matches(
    saved: dict,
    current: dict,
    ignore: tuple[str, ...] = (
        "output",  # a run folder copied or moved elsewhere is the same run
        "resume",
        "stop_after_steps",
        "progress",
        "tensorboard",
        "report_to",
        "threads",
        "final_checkpoint",  # where the run ends, not what it trains
    ),
) -> list[str]:
    """The options that differ between a run's saved config and the resuming one (by name)."""
    return sorted(k for k in current if k not in ignore and k in saved and saved[k] != current[k])
