"""``CIDErD``: the CIDEr-D caption metric (Vedantam, Zitnick and Parikh, CVPR 2015) as a torchmetric.

For each image i with candidate c_i and references R_i, and each n in 1..4:

* g_n(s): the TF-IDF vector of the n-grams of a sentence s: term count times
  ``log(N) - log(max(1, df(w)))``, where N is the number of images evaluated and df(w) the number of
  images whose references contain the n-gram w (document frequencies come from the REFERENCES of the
  evaluated set, as in the coco-caption evaluation);
* sim_n(c, r) = sum_w min(g_n(c)_w, g_n(r)_w) * g_n(r)_w / (|g_n(c)| |g_n(r)|)   (the "-D" clipping of
  candidate counts to the reference counts; 0 when either norm is 0), times the Gaussian length
  penalty exp(-(len(c) - len(r))^2 / (2 * 6^2)) over word counts.

CIDEr-D(i) = 10 * mean over n of mean over r in R_i of sim_n(c_i, r); the metric is the mean over
images. Sentences are lower-cased, punctuation is replaced by spaces, and words are split on
whitespace. With a single image every weight is log(1) - log(1) = 0 and the score is 0: CIDEr-D
is a corpus-level measure.

Distributed: torchmetrics can only all-gather tensors, so the strings are list states that are
never synced per step (``dist_sync_on_step=False``); ``_sync_dist`` (which torchmetrics calls
from ``compute`` when a process group is initialised, and undoes after it) gathers them from every
rank with ``torch.distributed.all_gather_object``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

MAX_N = 4
SIGMA = 6.0
_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> list[str]:
    """Lower-case, punctuation -> space, split on whitespace."""
    return _PUNCT.sub(" ", text.lower()).split()


def ngram_counts(words: list[str], max_n: int = MAX_N) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams, n = 1 .. max_n."""
    return Counter(tuple(words[i: i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def cider_d(preds: Sequence[str], target: Sequence[Sequence[str]], sigma: float = SIGMA) -> tuple[float, list[float]]:
    """CIDEr-D of candidates ``preds`` against references ``target`` -> (corpus score, per-image scores)."""
    if len(preds) != len(target):
        raise ValueError(f"CIDEr-D: {len(preds)} candidates but {len(target)} reference lists")
    if not preds:
        return 0.0, []
    refs = [[ngram_counts(tokenize(r)) for r in refs] for refs in target]
    cands = [ngram_counts(tokenize(c)) for c in preds]
    df: Counter[tuple[str, ...]] = Counter()
    for image_refs in refs:
        df.update(set().union(*image_refs) if image_refs else set())
    log_n = math.log(float(len(refs)))

    def vectorise(counts: Counter[tuple[str, ...]]) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_N)]
        norm = [0.0] * MAX_N
        for gram, tf in counts.items():
            n = len(gram) - 1
            w = tf * (log_n - math.log(max(1.0, float(df[gram]))))
            vec[n][gram] = w
            norm[n] += w * w
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, image_refs in zip(cands, refs):
        if not image_refs:
            scores.append(0.0)
            continue
        vc, nc, lc = vectorise(cand)
        total = 0.0
        for ref in image_refs:
            vr, nr, lr = vectorise(ref)
            penalty = math.exp(-((lc - lr) ** 2) / (2.0 * sigma**2))
            for n in range(MAX_N):
                if nc[n] == 0.0 or nr[n] == 0.0:
                    continue
                dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
                total += dot / (nc[n] * nr[n]) * penalty
        scores.append(10.0 * total / (MAX_N * len(image_refs)))
    return sum(scores) / len(scores), scores


class CIDErD(Metric):
    """CIDEr-D over everything passed to ``update`` (see the module docstring).

    ``update(preds: list[str], target: list[list[str]])``: one candidate and one or more references
    per image (a plain string reference is taken as a list of one). ``compute() -> tensor []``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __hash__(self) -> int:
        # torchmetrics hashes list states by their items; the references are lists (unhashable)
        return hash((self.__class__.__name__, id(self)))

    def __init__(self, sigma: float = SIGMA, **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_on_step", False)
        if kwargs["dist_sync_on_step"]:
            raise ValueError("CIDErD keeps strings, which cannot be synced per step: dist_sync_on_step must be False")
        super().__init__(**kwargs)
        self.sigma = sigma
        self.add_state("preds", default=[], dist_reduce_fx=None)
        self.add_state("target", default=[], dist_reduce_fx=None)

    def update(self, preds: Sequence[str], target: Sequence[Sequence[str] | str]) -> None:
        if len(preds) != len(target):
            raise ValueError(f"CIDErD.update: {len(preds)} candidates but {len(target)} reference lists")
        self.preds.extend(str(p) for p in preds)
        self.target.extend([t] if isinstance(t, str) else [str(r) for r in t] for t in target)

    def compute(self) -> Tensor:
        score, _ = cider_d(self.preds, self.target, self.sigma)
        return torch.tensor(score, dtype=torch.float32, device=self.device)

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        """Gather the strings of every rank (torchmetrics' tensor gathering cannot carry them)."""
        group = process_group or self.process_group
        world = torch.distributed.get_world_size(group)
        for attr in ("preds", "target"):
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, list(getattr(self, attr)), group=group)
            setattr(self, attr, [item for part in gathered for item in part])
