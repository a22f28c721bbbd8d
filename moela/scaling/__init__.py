"""Scaling-law tooling; ``scaling.flops`` is the one FLOPs accounting (shared with train.py's MFU)."""
