"""WebDataset DataModules, decoding/collation and the embedded demo data sets.

Knows only the batch format of DESIGN.md; imports neither ``multimodal`` nor ``tasks``.
"""

from .multitask import MultiTaskDataModule
from .webdata import COUNTS_KEY, ShardLoader, ShardStream, WebDataModule

__all__ = ["WebDataModule", "MultiTaskDataModule", "ShardStream", "ShardLoader", "COUNTS_KEY"]
