"""Backends of the MemFT loss: each module computes the per-row statistics and the gradient.

``reference`` is the PyTorch form of docs/SPEC.md; the others are tested against it.
"""
