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

Distributed: the strings are gathered from every rank at ``compute``
(:class:`tasks.text_metrics.StringMetric`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tasks.text_metrics import StringMetric

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


class CIDErD(StringMetric):
    """CIDEr-D over everything passed to ``update`` (see the module docstring).

    ``update(preds: list[str], target: list[list[str]])``: one candidate and one or more references
    per image (a plain string reference is taken as a list of one). ``compute() -> tensor []``.
    """

    def __init__(self, sigma: float = SIGMA, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sigma = sigma

    def compute(self) -> Tensor:
        score, _ = cider_d(self.preds, self.target, self.sigma)
        return torch.tensor(score, dtype=torch.float32, device=self.device)
