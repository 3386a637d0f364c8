"""``PredictionWriter``: what ``lightning predict`` writes, next to each sample's key.

Predictions are ``{task: [record, ...]}`` (``MultiTaskModule.predict_step``); a record is a dict with
``__key__``. Each task gets ``predictions/<task>.jsonl`` (one JSON object per record). Tensor fields
are written as files beside it and replaced by their path: an image ``[C, H, W]`` in [-1, 1] as
``predictions/<task>/<key>.png``, audio ``[T]`` as ``.wav`` (at the record's ``sample_rate`` or
16 kHz); other tensors become lists. Written as each batch ends (memory does not grow).
"""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image


def png_bytes(image: torch.Tensor) -> bytes:
    """An image [C, H, W] in [-1, 1] -> PNG bytes (8-bit RGB or grey)."""
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(audio: torch.Tensor, sample_rate: int, peak: float | None = None) -> bytes:
    """A waveform [T] -> 16-bit mono WAV bytes; ``peak``: scale the loudest sample to it first."""
    audio = audio.float()
    if peak is not None:
        audio = audio / audio.abs().max().clamp(min=1e-6) * peak
    pcm = (audio.clamp(-1, 1).cpu().numpy() * 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


class PredictionWriter(BasePredictionWriter):
    """Args: out_dir: where to write (default: ``<run log dir>/predictions``)."""

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = out_dir
        self._opened: set[str] = set()

    def _root(self, trainer: L.Trainer) -> Path:
        root = Path(self.out_dir) if self.out_dir else Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        if trainer.world_size > 1:
            root = root / f"rank{trainer.global_rank}"
        return root

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        if not isinstance(prediction, dict):
            return
        root = self._root(trainer)
        for task, records in prediction.items():
            folder = root / task
            path = root / f"{task}.jsonl"
            root.mkdir(parents=True, exist_ok=True)
            mode = "a" if task in self._opened else "w"
            self._opened.add(task)
            with path.open(mode, encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(self._plain(record, folder), sort_keys=True) + "\n")

    def _plain(self, record: dict[str, Any], folder: Path) -> dict[str, Any]:
        key = str(record.get("__key__", "sample")).replace("/", "_")
        out: dict[str, Any] = {}
        for name, value in record.items():
            if isinstance(value, torch.Tensor) and name == "image" and value.dim() == 3:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{key}.png").write_bytes(png_bytes(value))
                out[name] = str(folder / f"{key}.png")
            elif isinstance(value, torch.Tensor) and name == "audio" and value.dim() == 1:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{key}.wav").write_bytes(wav_bytes(value, int(record.get("sample_rate", 16000))))
                out[name] = str(folder / f"{key}.wav")
            elif isinstance(value, torch.Tensor):
                out[name] = value.tolist()
            else:
                out[name] = value
        return out

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._opened = set()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            print(f"predictions written to {self._root(trainer)}")
