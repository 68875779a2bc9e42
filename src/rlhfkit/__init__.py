"""rlhfkit: reinforcement learning from human feedback, readable and fast.

This module stays thin: importing ``rlhfkit`` must not import torch or transformers.
"""

__version__ = "0.1.0"
