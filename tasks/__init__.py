"""LightningModules and task heads; imports ``multimodal`` only."""

from .discriminator import PatchDiscriminator
from .heads import (
           CaptioningHead,
           ClassificationHead,
           GenerationHead,
           Head,
           ReconstructionHead,
           SpeechHead,
           VocoderHead,
)
from .judge import JudgeNet
from .module import MultiTaskModule

__all__ = ["MultiTaskModule", "Head", "GenerationHead", "JudgeNet", "ReconstructionHead", "PatchDiscriminator",
           "ClassificationHead", "SpeechHead", "CaptioningHead", "VocoderHead"]
