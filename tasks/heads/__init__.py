"""Task heads: small modules following the protocol in ``tasks.heads.base``."""

from .base import Head
from .captioning import CaptioningHead
from .classification import ClassificationHead
from .generation import GenerationHead
from .reconstruction import ReconstructionHead
from .speech import SpeechHead
from .vocoder import VocoderHead

__all__ = ["Head", "GenerationHead", "ReconstructionHead", "ClassificationHead", "SpeechHead", "CaptioningHead", "VocoderHead"]
