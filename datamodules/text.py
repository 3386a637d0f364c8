"""Text tokenisation with sentencepiece: training a model on a data set's text, and encoding.

Ids are fixed so every model agrees: pad = 0, unk = 1, bos = 2, eos = 3.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_sentencepiece(
    texts: Iterable[str],
    out_path: str | os.PathLike,
    vocab_size: int = 512,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
) -> Path:
    """Train a sentencepiece model on ``texts`` and write it atomically to ``out_path``.

    ``vocab_size`` is a soft limit (``hard_vocab_limit=False``): a small corpus yields a smaller
    vocabulary instead of an error.
    """
    sentences = [t.strip() for t in texts if t and t.strip()]
    if not sentences:
        raise ValueError("cannot train a sentencepiece model: no non-empty text in the training split")
    out_path = Path(out_path)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        minloglevel=2,
        num_threads=1,
        input_sentence_size=1_000_000,
        shuffle_input_sentence=False,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)
    log.info("trained sentencepiece model on %d texts -> %s", len(sentences), out_path)
    return out_path


class TextTokenizer:
    """A sentencepiece model with BOS/EOS handling and truncation to ``max_length`` ids.

    Picklable (loaded lazily from its path), so it can travel into DataLoader workers.
    """

    def __init__(self, model_path: str | os.PathLike, max_length: int = 64) -> None:
        if max_length < 3:
            raise ValueError(f"text max_length must be >= 3 (BOS, one token, EOS), got {max_length}")
        self.model_path = str(model_path)
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.model_path}")
        self.max_length = max_length
        self._sp: spm.SentencePieceProcessor | None = None

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        if self._sp is None:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        return self._sp

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "max_length": self.max_length, "_sp": None}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> tuple[torch.Tensor, bool]:
        """``[BOS, ids..., EOS]`` as a long tensor, and whether it had to be truncated."""
        ids = self.sp.encode(text)
        truncated = len(ids) > self.max_length - 2
        ids = [BOS_ID, *ids[: self.max_length - 2], EOS_ID]
        return torch.tensor(ids, dtype=torch.long), truncated

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; stops at EOS, drops BOS and pad."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(i)
        return self.sp.decode(out)
