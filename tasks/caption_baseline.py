"""The best constant caption: the one sentence that, written for every image, scores highest.

The reference point a captioning report is read against (a model that ignores its input can reach
it): for each metric separately, the caption of the training set that maximises that metric when it
is the candidate for every sample of the training set, scored against all of each sample's
references. An exhaustive search is quadratic in the data set (every caption against every sample),
so the search is over a pool of candidates and scored on a seeded sample of the training set:

* the ``frequent`` most frequent captions (a closed-vocabulary set such as the demo shapes repeats
  whole captions), and
* ``consensus`` captions, chosen per word length: captions whose unigrams and bigrams occur in the
  most reference sets (mean document frequency over the scored sample), the few best of every
  length between the 10th and 90th percentile of reference lengths, so short generic captions
  (``a man``) and long ones compete under the metrics' own length handling (BLEU's brevity
  penalty, CIDEr-D's length penalty).

Nothing here is learned; the result depends only on the training references and ``seed``.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from tasks.cider import tokenize

Scorer = Callable[[list[str], list[list[str]]], float]
"""``scorer(candidates, references) -> corpus score`` (a torchmetrics metric called once, say)."""


def _ngrams(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i: i + n]) for n in (1, 2) for i in range(len(words) - n + 1)}


def candidate_pool(references: Sequence[Sequence[str]], scored: Sequence[Sequence[str]], frequent: int = 8,
                   consensus: int = 40) -> list[str]:
    """Distinct candidate captions: the most frequent of ``references`` (all of them), then the
    consensus captions of ``scored`` (the scored sample) by length; see the module doc."""
    pool = [c for c, _ in Counter(c for refs in references for c in refs).most_common(frequent)]
    counts = Counter(c for refs in scored for c in refs)
    df: Counter[tuple[str, ...]] = Counter()
    for refs in scored:
        df.update(set().union(*(_ngrams(tokenize(r)) for r in refs)))
    lengths = [len(tokenize(r)) for refs in scored for r in refs]
    low, high = (int(v) for v in np.percentile(lengths, [10, 90]))
    by_length: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for caption in counts:
        words = tokenize(caption)
        if low <= len(words) <= high and words:
            grams = _ngrams(words)
            by_length[len(words)].append((sum(df[g] for g in grams) / len(grams), caption))
    per_length = max(1, consensus // max(1, len(by_length)))
    for length in sorted(by_length):
        ranked = sorted(by_length[length], key=lambda sc: (-sc[0], sc[1]))
        pool.extend(c for _, c in ranked[:per_length])
    return list(dict.fromkeys(pool))


def best_constant_captions(
    references: Sequence[Sequence[str]],
    scorers: dict[str, Scorer],
    max_samples: int = 400,
    frequent: int = 8,
    consensus: int = 40,
    seed: int = 0,
) -> dict[str, tuple[str, float]]:
    """``{metric: (caption, its score on the scored sample)}``; empty when there is no reference.

    ``references``: every sample's captions (e.g. ``WebDataModule.split_references('train')``);
    ``scorers``: one corpus scorer per metric; ``max_samples``: reference sets scored (a seeded
    sample); ties go to the earlier candidate (frequent before consensus), so the result is
    deterministic.
    """
    every = [list(r) for r in references if r]
    if not every:
        return {}
    refs = random.Random(seed).sample(every, max_samples) if len(every) > max_samples else every
    pool = candidate_pool(every, refs, frequent, consensus)
    best: dict[str, tuple[str, float]] = {}
    for name, scorer in scorers.items():
        scores = [float(scorer([c] * len(refs), refs)) for c in pool]
        i = int(np.argmax(scores))
        best[name] = (pool[i], scores[i])
    return best
