"""LightningModules and task heads; imports ``multimodal`` only."""

from .discriminator import PatchDiscriminator
from .heads import Head, ReconstructionHead
from .module import MultiTaskModule

__all__ = ["MultiTaskModule", "Head", "ReconstructionHead", "PatchDiscriminator"]
