"""memft_kernels: fused kernels for the MemFT loss (arXiv 2605.30260) and the tools around it.

``memft_loss`` is a drop-in replacement for ``F.cross_entropy`` that spends the gradient only on
tokens whose target probability is still below the recall threshold (docs/SPEC.md).
"""
from .accumulate import MemFTAccumulator
from .dispatch import available_backends
from .linear_loss import memft_linear_loss
from .loss import MemFTLoss, memft_loss
from .spec import MemFTStats

__version__ = "0.1.0"

__all__ = ["memft_loss", "MemFTLoss", "memft_linear_loss", "MemFTStats", "available_backends", "MemFTAccumulator", "__version__"]
