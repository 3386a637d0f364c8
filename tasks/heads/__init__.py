"""Task heads: small modules following the protocol in ``tasks.heads.base``."""

from .base import Head
from .generation import GenerationHead
from .reconstruction import ReconstructionHead

__all__ = ["Head", "GenerationHead", "ReconstructionHead"]
