"""The transcriber: a small CTC speech recogniser the generation head trains on REAL clips, to measure
text -> speech by the word error rate of what it hears in generated clips.

Independent of what it measures: it reads log-mel spectrograms (the judge's input, not the trunk's
tokens), has its own weights, and its loss never reaches the trunk. Like the judge, it is the
project's own network because no pretrained recogniser can be downloaded here.

    log-mel [B, 1, n_mels, F] -> two conv stages (stride 2 in frequency, the second also in time)
    -> per frame features -> 2-layer bidirectional GRU -> logits over the text vocabulary [B, F/2, V]

CTC with blank = the pad id, on sentencepiece ids of the transcript (``tasks.heads.speech``: word
pieces run at ~3 per second against 50 positions per second here). Greedy decoding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tasks.heads.speech import ctc_greedy_decode, ctc_text_loss
from tasks.heads.vocab import TextVocabulary


class Transcriber(nn.Module):
    """log-mel [B, 1, n_mels, F] -> CTC log-probabilities [B, ceil(F / 2), vocab_size] (float32).

    Init: PyTorch defaults."""

    def __init__(self, n_mels: int, vocab_size: int, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        if vocab_size < 2 or n_mels < 4:
            raise ValueError(f"transcriber needs vocab_size >= 2 and n_mels >= 4, got {vocab_size}, {n_mels}")
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, (2, 1), 1), nn.GroupNorm(8, width), nn.SiLU(),
            nn.Conv2d(width, width, 3, (2, 2), 1), nn.GroupNorm(8, width), nn.SiLU(),
        )
        freq = math.ceil(math.ceil(n_mels / 2) / 2)  # two stride-2 convs (kernel 3, padding 1)
        self.rnn = nn.GRU(width * freq, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, vocab_size)
        self.vocab_size = vocab_size

    def forward(self, mel: Tensor) -> Tensor:
        h = self.conv(mel)  # [B, C, n_mels / 4, F / 2]
        h = h.flatten(1, 2).transpose(1, 2)  # [B, F / 2, C * n_mels / 4]
        h, _ = self.rnn(h.float())
        return self.out(h).float().log_softmax(-1)

    def loss(self, mel: Tensor, texts: list[str], vocab: TextVocabulary) -> tuple[Tensor, dict[str, Tensor]]:
        """CTC against the transcripts (every position valid: the clips are padded with silence)."""
        log_probs = self(mel)
        lengths = torch.full((len(mel),), log_probs.shape[1], dtype=torch.long, device=mel.device)
        return ctc_text_loss(log_probs, lengths, texts, vocab)

    @torch.no_grad()
    def transcribe(self, mel: Tensor, vocab: TextVocabulary) -> list[str]:
        """log-mel [B, 1, n_mels, F] -> one transcript per clip (greedy CTC)."""
        return [vocab.decode(ids) for ids in ctc_greedy_decode(self(mel))]
