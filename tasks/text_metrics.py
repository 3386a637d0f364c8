"""Corpus-level caption metrics the captioning head reports beside torchmetrics' ``BLEUScore``.

* :class:`StringMetric`: the base of metrics that must see the whole corpus as strings (CIDEr-D's
  document frequencies, chrF's corpus statistics). torchmetrics can only all-gather tensors, so the
  strings are list states that are never synced per step (``dist_sync_on_step=False``);
  ``_sync_dist`` (which torchmetrics calls from ``compute`` when a process group is initialised,
  and undoes after it) gathers them from every rank with ``torch.distributed.all_gather_object``.
* :class:`ChrF`: chrF++ (character 6-grams and word bigrams, beta 2) computed by sacrebleu, the
  reference implementation (WMT), on a 0-1 scale. torchmetrics' ``CHRFScore`` gives the same value
  but builds a tensor per n-gram: 200 demo captions with four references each take 3.98 s against
  sacrebleu's 0.10 s on one core, the same 0.3746 (``python scripts/benchmark.py text_metrics``), which
  made a four-reference validation of 500 images cost ~20 s for the model and its baseline.
* :class:`RougeLF`: ROUGE-L F-measure (torchmetrics' ``rouge_score``) with scalar states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.text.rouge import rouge_score


class StringMetric(Metric):
    """Keeps every candidate (``preds``) and its references (``target``: list[list[str]]) as strings;
    subclasses implement ``compute`` over the whole corpus (see the module docstring)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __hash__(self) -> int:
        # torchmetrics hashes list states by their items; the references are lists (unhashable)
        return hash((self.__class__.__name__, id(self)))

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_on_step", False)
        if kwargs["dist_sync_on_step"]:
            raise ValueError(f"{type(self).__name__} keeps strings, which cannot be synced per step: "
                             "dist_sync_on_step must be False")
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx=None)
        self.add_state("target", default=[], dist_reduce_fx=None)

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str] | str]) -> None:
        if len(preds) != len(target):
            raise ValueError(f"{type(self).__name__}.update: {len(preds)} candidates but {len(target)} reference lists")
        self.preds.extend(str(p) for p in preds)
        self.target.extend([t] if isinstance(t, str) else [str(r) for r in t] for t in target)

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        """Gather the strings of every rank (torchmetrics' tensor gathering cannot carry them)."""
        group = process_group or self.process_group
        world = torch.distributed.get_world_size(group)
        for attr in ("preds", "target"):
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, list(getattr(self, attr)), group=group)
            setattr(self, attr, [item for part in gathered for item in part])


class ChrF(StringMetric):
    """Corpus chrF++ on a 0-1 scale (sacrebleu ``CHRF(word_order=2)``; see the module docstring).

    Candidates with fewer references than the most-referenced one are padded with ``None``, which
    sacrebleu skips (variable reference counts)."""

    def __init__(self, char_order: int = 6, word_order: int = 2, beta: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.char_order, self.word_order, self.beta = char_order, word_order, beta

    def compute(self) -> Tensor:
        from sacrebleu.metrics import CHRF

        if not self.preds:
            return torch.tensor(0.0, device=self.device)
        width = max(len(t) for t in self.target)
        streams = [[t[i] if i < len(t) else None for t in self.target] for i in range(width)]
        chrf = CHRF(char_order=self.char_order, word_order=self.word_order, beta=self.beta)
        score = chrf.corpus_score(list(self.preds), streams).score / 100.0
        return torch.tensor(score, dtype=torch.float32, device=self.device)


class RougeLF(Metric):
    """ROUGE-L F-measure averaged over captions (torchmetrics' ``rouge_score`` per batch; the best
    reference of each caption counts).

    Sum and count are scalar states (summed over DDP ranks); torchmetrics' ``ROUGEScore`` keeps one
    list entry per caption, and list states with different lengths per rank made its sync issue
    different collectives on different ranks (a gloo size mismatch in the DDP test).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], target: list[list[str]] | list[str]) -> None:
        if not preds:
            return
        score = rouge_score(preds, target, rouge_keys="rougeL", accumulate="best")["rougeL_fmeasure"]
        self.total += score.double() * len(preds)
        self.count += len(preds)

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()
