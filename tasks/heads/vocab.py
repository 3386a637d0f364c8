"""The output vocabulary of the text-producing heads (captioning, speech).

``sentencepiece``: the data set's own sentencepiece model (trained by the DataModule's
``prepare_data``), bound at setup from the DataModule and saved INSIDE the checkpoint (as module
extra state, a uint8 tensor) so ``lightning test`` / ``predict`` decode text without the data
folder. ``chars``: a fixed lower-case character set, for CTC when word pieces are too coarse.
Ids 0-3 are pad (= the CTC blank), unk, bos, eos in both.

The heads that READ text (text-conditional generation, text classification) keep the data's
sentencepiece model the same way (``kind='sentencepiece'``, bound at setup), with the data's
``max_length``, so a checkpoint alone turns a sentence into the ids it was trained on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import sentencepiece as spm
import torch
from torch import Tensor, nn

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL = 4
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789'.,-?!"
KINDS = ("sentencepiece", "chars")


def tolerate_missing_extra_state(load: Callable[..., None]) -> Callable[..., None]:
    """``nn.Module._load_from_state_dict`` that accepts a checkpoint without the module's extra state
    (saved before the module stored one): the module keeps its unbound default instead of a
    strict-loading error."""

    @functools.wraps(load)
    def _load_from_state_dict(self: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list[str], *args: Any) -> None:
        load(self, state_dict, prefix, local_metadata, strict, missing_keys, *args)
        key = prefix + "_extra_state"
        if key in missing_keys:
            missing_keys.remove(key)

    return _load_from_state_dict


class TextVocabulary(nn.Module):
    """Args:
    kind: ``sentencepiece`` or ``chars``.
    size: the output layer's number of classes; for sentencepiece it must be >= the data's
        vocabulary (checked when the data is bound); for chars it is fixed (``4 + len(CHARS)``).
    max_length: ids per text including BOS and EOS; longer texts are truncated and counted.
    """

    def __init__(self, kind: str = "sentencepiece", size: int = 512, max_length: int = 64) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"text vocabulary must be one of {KINDS}, got {kind!r}")
        if max_length < 3:
            raise ValueError(f"text max_length must be >= 3 (BOS, one token, EOS), got {max_length}")
        self.kind, self.max_length = kind, max_length
        self.size = SPECIAL + len(CHARS) if kind == "chars" else int(size)
        if self.size <= SPECIAL:
            raise ValueError(f"text vocabulary size must be > {SPECIAL}, got {size}")
        self._proto: bytes | None = None
        self._sp: spm.SentencePieceProcessor | None = None

    # ------------------------------------------------------------------ binding and checkpointing
    @property
    def ready(self) -> bool:
        return self.kind == "chars" or self._sp is not None

    def bind(self, tokenizer: Any, task: str, follow_max_length: bool = False, required: bool = True) -> None:
        """Take the data's sentencepiece model (a ``datamodules.TextTokenizer``), checking its size;
        ``follow_max_length``: take the tokenizer's ``max_length`` too (a head that reads text);
        ``required=False``: data without a tokenizer leaves it as it is (the check of the data's keys
        against the head's names what is missing)."""
        if self.kind == "chars":
            return
        if tokenizer is None:
            if self.ready or not required:
                return  # restored from the checkpoint; the data brings no text (e.g. predict on images)
            raise ValueError(f"head {task!r} uses sentencepiece text but its data has no tokenizer: "
                             "add 'text' to the data's keys")
        with open(tokenizer.model_path, "rb") as f:
            self._load(f.read())
        if follow_max_length and getattr(tokenizer, "max_length", None):
            self.max_length = int(tokenizer.max_length)
        if self._sp.get_piece_size() > self.size:
            raise ValueError(f"head {task!r}: the data's sentencepiece vocabulary has {self._sp.get_piece_size()} "
                             f"pieces but the head's vocab_size is {self.size}; raise the head's vocab_size")

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)

    def get_extra_state(self) -> dict[str, Any]:
        proto = torch.frombuffer(bytearray(self._proto), dtype=torch.uint8) if self._proto else torch.zeros(0, dtype=torch.uint8)
        return {"kind": self.kind, "model": proto, "max_length": self.max_length}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint's text vocabulary is {state.get('kind')!r}, the head's is {self.kind!r}")
        model = state.get("model")
        if model is not None and model.numel():
            self._load(bytes(model.cpu().numpy().tobytes()))
        if state.get("max_length"):
            self.max_length = int(state["max_length"])

    _load_from_state_dict = tolerate_missing_extra_state(nn.Module._load_from_state_dict)

    # ------------------------------------------------------------------ text <-> ids
    def _check_ready(self) -> None:
        if not self.ready:
            raise RuntimeError("the text vocabulary is not bound: no data tokenizer and none in the checkpoint")

    def ids(self, text: str) -> list[int]:
        """Text -> ids without BOS/EOS."""
        self._check_ready()
        if self.kind == "chars":
            return [SPECIAL + CHARS.index(ch) if ch in CHARS else UNK_ID for ch in text.lower()]
        return list(self._sp.encode(text))

    def encode(self, texts: list[str], device: torch.device | None = None) -> tuple[Tensor, Tensor, int]:
        """Texts -> (ids [B, L] with BOS ... EOS, padded with 0; lengths [B]; how many were truncated)."""
        rows, truncated = [], 0
        for text in texts:
            ids = self.ids(text)
            if len(ids) > self.max_length - 2:
                truncated += 1
                ids = ids[: self.max_length - 2]
            rows.append([BOS_ID, *ids, EOS_ID])
        width = max(len(r) for r in rows)
        out = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        return out.to(device), lengths.to(device), truncated

    def decode(self, ids: Tensor | list[int]) -> str:
        """Ids -> text: stops at EOS, drops pad (blank) and BOS."""
        self._check_ready()
        out = []
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if i == EOS_ID:
                break
            if (i >= SPECIAL or i == UNK_ID) and (self.kind == "chars" or i < self._sp.get_piece_size()):
                out.append(int(i))
        if self.kind == "chars":
            return "".join(CHARS[i - SPECIAL] if i >= SPECIAL else "?" for i in out)
        return self._sp.decode(out)
