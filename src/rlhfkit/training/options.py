"""Config pieces every trainer shares, written once: run control, optimiser, LoRA."""

from __future__ import annotations

# The run-control option every trainer has (rlhfkit.models.cpu_linear does the work).
CPU_MATMUL_HELP = ("CPU only: fp32 Linear matmuls through oneDNN (auto: on the CPU; ~2x faster where MKL takes a slow "
                   "path, e.g. AMD) or PyTorch's default BLAS (torch)")
