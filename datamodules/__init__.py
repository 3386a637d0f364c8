"""WebDataset DataModules, decoding/collation and the embedded demo data sets.

Knows only the batch format of DESIGN.md; imports neither ``multimodal`` nor ``tasks``.
"""

from .loader import ShardLoader
from .multitask import MultiTaskDataModule
from .stream import COUNTS_KEY, ShardStream
from .webdata import WebDataModule

__all__ = ["WebDataModule", "MultiTaskDataModule", "ShardStream", "ShardLoader", "COUNTS_KEY"]
