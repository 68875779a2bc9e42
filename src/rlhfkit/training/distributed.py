"""Which distributed mode a run is in, and FSDP2 on the CPU.

``accelerate launch --config_file examples/accelerate/fsdp2.yaml`` asks for FSDP2. On a GPU
accelerate shards as asked. On the CPU, accelerate 1.15 silently runs the same config as
plain multi-process data parallelism (``MULTI_CPU``: every process keeps the whole model),
although ``torch.distributed.fsdp.fully_shard`` works on the CPU with the gloo backend.
:func:`enable_fsdp_on_cpu` switches accelerate's state to FSDP2 in that case, so the very
same accelerate code path (``prepare``, ``no_sync``, gradient clipping, sharded
``save_state``/``load_state``, ``get_state_dict``) runs on the CPU as on a GPU, and tests can
check sharding on a laptop. The run log names the mode (:func:`describe`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

from rlhfkit.errors import UserError

logger = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Accelerator) -> bool:
    """Run an FSDP config as FSDP2 on the CPU (module docstring); True if it switched."""
    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings accelerate launch exported
    if plugin.fsdp_version != 2:
        raise UserError(
            "on the CPU rlhfkit shards with FSDP2 only; set fsdp_version: 2 in the accelerate config "
            "(examples/accelerate/fsdp2.yaml)"
        )
    # accelerate re-reads PartialState's fields whenever it builds an AcceleratorState: set both.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return True


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether models prepared by ``accelerator`` hold only a shard of their parameters (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def describe(accelerator: Accelerator) -> str:
    """The mode for the run log: single process, DDP (every process a full copy) or FSDP2 (sharded)."""
    if accelerator.num_processes == 1 and not is_sharded(accelerator):
        return "single process"
    if is_sharded(accelerator):
        plugin = accelerator.state.fsdp_plugin
        offload = (
            ", parameters offloaded to the CPU"
            if getattr(plugin, "cpu_offload", None) and getattr(plugin.cpu_offload, "offload_params", False)
            else ""
        )
        return f"FSDP{plugin.fsdp_version} (parameters, gradients and optimizer state sharded over {accelerator.num_processes} processes{offload})"
    return f"DDP ({accelerator.num_processes} processes, each with a full copy; {accelerator.distributed_type.value})"


def settle_roots(model: nn.Module) -> None:
    """Fix now which module is FSDP2's root: the outermost sharded module(s) in ``model``.

    FSDP2 decides it lazily: the first sharded module to run a forward pass becomes the root.
    ``generate`` on a LoRA (peft) policy, or on the actor inside an actor-critic, enters the
    model below the module that ``accelerate.prepare`` sharded, and a layer would claim the
    root, after which the real root's first forward fails ("requires running forward through
    the root module first"). Call once after ``prepare``; it is what the root's first forward
    would do (``_lazy_init``, FSDP2's only entry point for it in torch 2.13)."""
    roots: list[nn.Module] = []
    for module in model.modules():  # pre-order: a root comes before everything below it
        if isinstance(module, FSDPModule) and not any(module is m for r in roots for m in r.modules()):
            roots.append(module)
    for root in roots:
        root._get_fsdp_state()._lazy_init()


def shard_frozen(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Shard a frozen model (the reference policy, a reward model) for inference, one FSDP2
    unit per transformer block (its ``_no_split_modules``) plus the root, with the run's
    offload setting: each process then holds 1/N of it, and a forward pass gathers one block
    at a time. Collective: every process must run the same number of forward passes, as the
    rollout does (the same number of rows on each process). Returns ``model``, sharded in place."""
    plugin = accelerator.state.fsdp_plugin
    kwargs = {"reshard_after_forward": True}
    if isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy):
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    settle_roots(model)
    return model


@contextlib.contextmanager
def gathered(model: nn.Module, skip: nn.Module | None = None) -> Iterator[None]:
    """Inside, a sharded (FSDP2) ``model`` holds its full weights on every process, gathered
    once: generation's many small forward passes then run locally, with no all-gather per
    token and no collective that processes sampling different lengths could disagree on.
    The shards are restored on exit; ``skip``'s (e.g. a critic that generation does not use)
    stay sharded. A model that is not sharded is left as it is."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule) and id(m) not in skipped]
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
