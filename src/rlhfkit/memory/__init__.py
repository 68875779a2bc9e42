"""How much memory a run needs: model shapes (known names, sizes, a folder counted on the meta
device) and the per-phase memory math. ``rlhfkit plan`` prints it; ``rl --micro-batch-size auto``
chooses its micro-batch with it. A floor: it imports no feature."""
