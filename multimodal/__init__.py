"""The models: the shared quantizer, modality codecs, the backbone and the CLI entry point.

Never imports ``tasks`` or ``datamodules``.
"""

from .audio_codec import AudioCodec
from .backbone import Backbone, Tokens
from .checkpoint import load_backbone
from .diffusion import GaussianDiffusion
from .dit import DiffusionTransformer
from .fsq import FSQ
from .image_codec import ImageCodec
from .quantizer import VectorQuantizer
from .vocoder import Vocoder

__all__ = [
    "AudioCodec", "Backbone", "DiffusionTransformer", "FSQ", "GaussianDiffusion", "ImageCodec", "Tokens",
    "VectorQuantizer", "Vocoder", "load_backbone",
]
