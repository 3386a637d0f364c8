"""Writing WebDataset shards and their ``info.json``.

One home for the shard format of DESIGN.md, shared by ``scripts/make_shards.py`` and the embedded
demo data sets. webdataset's ``TarWriter`` does the tar encoding; what it does not offer is
written here: a fixed integer mtime (its default float mtime adds a PAX header to every member,
which doubles small shards and slows reading), byte-identical output for identical input, and
shards written under a temporary name and renamed when complete, so a crash never leaves a
half-written shard that looks whole.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import webdataset as wds
from PIL import Image

INFO_FILE = "info.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac")
SPLITS = ("train", "val", "test")


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or an ``[H, W]`` / ``[H, W, C]`` uint8 array (deterministic)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_wav(wave: np.ndarray, sample_rate: int, fmt: str = "wav") -> bytes:
    """16-bit PCM WAV (or FLAC) bytes of a mono float waveform in [-1, 1] (clipped)."""
    wave = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ShardSink:
    """Writes samples of one split to ``{out}/{split}-%06d.tar``.

    A new shard starts when the current one holds ``max_count`` samples or ``max_size`` bytes.
    Each shard is written as ``.tar.tmp`` and renamed on completion. Samples are dicts with a
    ``__key__`` and ``ext -> bytes | str`` members; members are written in sorted order with
    ``mtime`` (an int), so the same samples give the same bytes.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split: str,
        max_count: int = 10_000,
        max_size: float = 1e9,
        mtime: int = 0,
    ) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if max_size <= 0:
            raise ValueError(f"max_size must be > 0, got {max_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.max_count = max_count
        self.max_size = max_size
        self.mtime = int(mtime)
        self.count = 0
        self.shards: list[str] = []
        self._writer: wds.TarWriter | None = None
        self._stream = None
        self._shard_count = 0
        self._shard_size = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / (name + ".tmp")
        self._final = self.out_dir / name
        self._stream = open(self._tmp, "wb")
        self._writer = wds.TarWriter(self._stream, encoder=False, mtime=self.mtime, user="", group="")
        self._shard_count = 0
        self._shard_size = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # closes the stream too
        os.replace(self._tmp, self._final)
        self.shards.append(self._final.name)
        self._writer = None

    def write(self, sample: dict[str, Any]) -> None:
        if "__key__" not in sample:
            raise ValueError("a sample needs a '__key__'")
        if self._writer is not None and (
            self._shard_count >= self.max_count or self._shard_size >= self.max_size
        ):
            self._finish()
        if self._writer is None:
            self._open()
        encoded = {k: (v.encode("utf-8") if isinstance(v, str) else v) for k, v in sample.items() if k != "__key__"}
        encoded["__key__"] = sample["__key__"]
        payload = self._writer.write(encoded)
        members = len(encoded) - 1
        # tar: a 512-byte header per member, contents padded to 512-byte blocks
        self._shard_size += payload + members * 512 + sum(-len(v) % 512 for k, v in encoded.items() if k != "__key__")
        self._shard_count += 1
        self.count += 1

    def close(self) -> list[str]:
        """Finish the last shard; returns the shard file names written, in order."""
        self._finish()
        return list(self.shards)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # leave no half shard behind
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = None


def write_info(out_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Atomically write ``info.json``. Expected keys (see :func:`make_info`)."""
    path = Path(out_dir) / INFO_FILE
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return path


def make_info(
    splits: dict[str, dict[str, Any]],
    modalities: list[str],
    classes: list[str] | None = None,
    sample_rate: int | None = None,
    source: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """The ``info.json`` schema.

    ``splits``: ``{split: {"count": int, "shards": [file names]}}``; ``modalities``: a subset of
    ``image, audio, text, label``; ``classes``: class names indexed by label; ``sample_rate``:
    audio rate in Hz when audio is present; ``source``: free text saying where the data came from.
    """
    info: dict[str, Any] = {
        "splits": splits,
        "modalities": sorted(set(modalities)),
        "classes": list(classes) if classes else [],
        "sample_rate": sample_rate,
        "source": source,
    }
    info.update(extra)
    return info


def read_info(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {INFO_FILE} in shard folder {root!s}")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- audio
AUDIO_READ_EXTS = ("wav", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff", "aifc", "au", "w64", "caf")
"""File extensions :func:`read_audio` accepts as input (whatever libsndfile decodes)."""


class AudioDecodeError(ValueError):
    """An audio clip that cannot be used; ``reason`` is a short tag (``truncated_audio``, ``empty_audio``, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


def wav_truncation(data: bytes) -> str | None:
    """Why a RIFF/WAVE byte string is incomplete, or ``None`` when it is whole (or not a WAV).

    libsndfile silently shortens a WAV whose ``data`` chunk holds fewer bytes than its header
    declares; this walks the chunks and reports that case. It also reports the opposite lie, a
    ``data`` chunk declaring fewer bytes than its RIFF chunk goes on with, when what follows is
    not a chunk (sample bytes, which libsndfile would silently drop); bytes after the RIFF
    chunk (an appended tag) are not looked at. Streamed WAVs (size ``0xFFFFFFFF``) and RF64
    files are not checked.
    """
    if len(data) < 12 or data[8:12] != b"WAVE" or data[:4] not in (b"RIFF", b"RIFX"):
        return None
    fmt = "<I" if data[:4] == b"RIFF" else ">I"
    (riff_size,) = struct.unpack(fmt, data[4:8])
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack(fmt, data[pos + 4 : pos + 8])
        if chunk_id == b"data":
            available = len(data) - pos - 8
            if size != 0xFFFFFFFF and available < size:
                return f"data chunk holds {available} of {size} bytes"
            after = pos + 8 + size + (size & 1)
            riff_end = min(len(data), 8 + riff_size) if riff_size != 0xFFFFFFFF else after
            if size != 0xFFFFFFFF and after + 8 <= riff_end and not all(32 <= b < 127 for b in data[after : after + 4]):
                return f"data chunk declares {size} bytes but {riff_end - pos - 8} follow in the RIFF chunk"
            return None
        pos += 8 + size + (size & 1)
    return "no data chunk"


def to_mono(wave: np.ndarray) -> np.ndarray:
    """Average the channels of a ``[T, C]`` array (a ``[T]`` array is returned as is), float32."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:
        return wave[:, 0] if wave.shape[1] == 1 else wave.mean(axis=1, dtype=np.float32)
    return wave


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample a mono float waveform with soxr (high quality); a no-op when the rates match."""
    wave = np.asarray(wave, dtype=np.float32)
    if int(orig_rate) == int(target_rate) or wave.size == 0:
        return wave
    out = soxr.resample(wave, int(orig_rate), int(target_rate), quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


def read_audio(source: str | os.PathLike | bytes, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file or its bytes to a mono float32 waveform, resampled to ``sample_rate``.

    Returns ``(wave, rate)``. Raises :class:`AudioDecodeError` with reason ``undecodable_audio``,
    ``truncated_audio`` (a WAV shorter than its header says, or fewer frames than declared, or a
    header that ends the samples early: :func:`wav_truncation`),
    ``empty_audio`` (no frames) or ``non_finite_audio`` (NaN/inf samples).
    """
    data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    why = wav_truncation(data)
    if why is not None:
        raise AudioDecodeError("truncated_audio", why)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            declared, rate = f.frames, f.samplerate
            wave = f.read(dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises several types on garbage
        raise AudioDecodeError("undecodable_audio", str(exc).strip() or type(exc).__name__) from exc
    if len(wave) == 0:
        raise AudioDecodeError("empty_audio", "no audio frames")
    if 0 < declared < 2**62 and len(wave) < declared:
        raise AudioDecodeError("truncated_audio", f"read {len(wave)} of {declared} frames")
    wave = to_mono(wave)
    if not np.isfinite(wave).all():
        raise AudioDecodeError("non_finite_audio", "NaN or infinite samples")
    if sample_rate is not None:
        wave, rate = resample(wave, rate, sample_rate), int(sample_rate)
        if len(wave) == 0:
            raise AudioDecodeError("empty_audio", "no audio frames left after resampling")
    return wave, int(rate)
