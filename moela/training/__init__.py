"""The training loop's parts: optimiser, jitted step, checkpoints, metrics (``train.py`` wires them)."""
