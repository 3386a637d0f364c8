"""What a person hands the assistant, turned into what the heads were trained on.

    image_tensor(x, size, channels)  -> [C, H, W] in [-1, 1]   (the training transform)
    audio_wave(x, rate, sample_rate) -> float32 [T] mono at the codec's rate
    audio_chunks(wave, rate, seconds) -> [(start, stop)] windows, cut at the quietest frame

Every input that cannot be used raises :class:`InputError` with a message naming what is wrong;
nothing here crashes on a user's file. Images go through the data pipeline's own transform
(``datamodules.decode.image_to_tensor``: short side resized, centre crop) after the cases a shard
never holds are normalised: an alpha channel is composited over white (the web's convention for a
transparent picture), 16-bit and float images are rescaled to 8 bits (PIL's ``convert('L')``
clips them), palette and CMYK images are converted. Audio is decoded with soundfile
(``datamodules.shards.read_audio``: WAV, FLAC, OGG, ...), averaged to mono and resampled with soxr.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from datamodules.decode import image_to_tensor
from datamodules.shards import AudioDecodeError, read_audio, resample, to_mono

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")
MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb is refused, not decoded


class InputError(ValueError):
    """An input the assistant cannot use; the message says what is wrong with it."""


def _name(x: Any) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__


def _read_bytes(x: str | os.PathLike | bytes, what: str) -> bytes:
    if isinstance(x, (bytes, bytearray, memoryview)):
        data = bytes(x)
    else:
        path = Path(x)
        if not path.is_file():
            raise InputError(f"{what} file not found: {path}")
        data = path.read_bytes()
    if not data:
        raise InputError(f"{what} {_name(x)} is empty (0 bytes)")
    return data


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float single-channel images -> 8-bit 'L' by their range (PIL's
    ``convert('L')`` clips everything above 255 to white)."""
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        lo, hi = float(array.min()), float(array.max())
        array = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
    elif array.max(initial=0.0) > 255:
        array = array / 65535.0 * 255.0  # a 16-bit range
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), mode="L")


def _flatten(image: Image.Image) -> Image.Image:
    """Any PIL image -> 'RGB' or 'L' in 8 bits; transparency composited over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "RGBA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1
    return image


def _array_image(x: np.ndarray | torch.Tensor) -> Image.Image:
    """An array [H, W], [H, W, C] (uint8 0-255 or float 0-1), or a tensor [C, H, W] / [H, W] (float in
    [-1, 1] as in a batch, or uint8) -> PIL."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        if t.is_floating_point():
            t = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        array = t.numpy()
    else:
        array = np.asarray(x)
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise InputError("image array holds NaN or infinite values")
            scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
            array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
        elif array.dtype == np.uint16:
            array = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
        elif array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or min(array.shape[:2]) < 1:
        raise InputError(f"image array must be [H, W], [H, W, 3|4] or a [C, H, W] tensor, got shape {tuple(array.shape)}")
    return Image.fromarray(array)


def open_image(x: Any) -> Image.Image:
    """A path, bytes, PIL image, numpy array or tensor -> a loaded 8-bit 'RGB' or 'L' PIL image."""
    if isinstance(x, Image.Image):
        return _flatten(x)
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _flatten(_array_image(x))
    if not isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise InputError(f"an image must be a path, bytes, a PIL image, an array or a tensor, not {type(x).__name__}")
    data = _read_bytes(x, "image")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a truncated file fails here, not later
            return _flatten(image)
    except UnidentifiedImageError as err:
        raise InputError(f"{_name(x)} is not an image PIL can read (PNG, JPEG, WebP, BMP, GIF, TIFF)") from err
    except Image.DecompressionBombError as err:
        raise InputError(f"{_name(x)} is too large an image ({err})") from err
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise InputError(f"{_name(x)} is a damaged image: {err}") from err


def image_tensor(x: Any, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Any image input -> [C, H, W] in [-1, 1], the training transform (``image_to_tensor``)."""
    image = open_image(x)
    if size[0] != size[1]:
        raise InputError(f"the image codec takes {size[0]}x{size[1]} images; only square sizes are supported here")
    return image_to_tensor(image, size[0], channels)


def audio_wave(x: Any, sample_rate: int, rate: int | None = None) -> tuple[np.ndarray, int]:
    """A path, bytes, or an array (with ``rate``) -> (float32 mono wave at ``sample_rate``, the input's rate).

    Arrays: [T] or [T, C] / [C, T] with C <= 8 channels (averaged); float in [-1, 1] or int16."""
    if isinstance(x, (np.ndarray, torch.Tensor)):
        if rate is None:
            raise InputError("an audio array needs its sample rate: pass sample_rate=...")
        array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if array.dtype == np.int16:
            array = array.astype(np.float32) / 32768.0
        array = array.astype(np.float32, copy=False)
        if array.ndim == 2 and array.shape[0] <= 8 < array.shape[1]:
            array = array.T  # [C, T] -> [T, C]
        if array.ndim not in (1, 2) or array.size == 0:
            raise InputError(f"an audio array must be [T] or [T, C] and not empty, got shape {tuple(array.shape)}")
        if not np.isfinite(array).all():
            raise InputError("audio array holds NaN or infinite samples")
        wave = to_mono(array if array.ndim == 2 else array[:, None])
        return resample(wave, int(rate), sample_rate).astype(np.float32), int(rate)
    if not isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise InputError(f"audio must be a path, bytes or an array with its rate, not {type(x).__name__}")
    data = _read_bytes(x, "audio")
    try:
        wave, source_rate = read_audio(data)
        wave = resample(wave, source_rate, sample_rate) if source_rate != sample_rate else wave
    except AudioDecodeError as err:
        what = {"truncated_audio": "a truncated audio file", "empty_audio": "an audio file with no samples",
                "non_finite_audio": "audio with NaN or infinite samples"}.get(err.reason, "not audio soundfile can read "
                                                                                  "(WAV, FLAC, OGG, MP3)")
        raise InputError(f"{_name(x)} is {what}: {err.detail}") from err
    if len(wave) == 0:
        raise InputError(f"{_name(x)} has no samples left after resampling to {sample_rate} Hz")
    return np.ascontiguousarray(wave, dtype=np.float32), source_rate


def audio_chunks(wave: np.ndarray, sample_rate: int, seconds: float) -> list[tuple[int, int]]:
    """Windows ``[(start, stop)]`` of at most ``seconds`` covering ``wave``; each cut is placed at the
    quietest 20 ms frame of the window's last quarter, so words are rarely split."""
    limit = max(1, int(seconds * sample_rate))
    if len(wave) <= limit:
        return [(0, len(wave))]
    frame = max(1, sample_rate // 50)
    out, start = [], 0
    while len(wave) - start > limit:
        lo, hi = start + (3 * limit) // 4, start + limit
        region = wave[lo:hi]
        n = len(region) // frame
        if n >= 1:
            energy = (region[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
            cut = lo + int(np.argmin(energy)) * frame + frame // 2
        else:
            cut = hi
        out.append((start, cut))
        start = cut
    out.append((start, len(wave)))
    return out


def _magic(head: bytes) -> str | None:
    if head.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")) or head[8:12] == b"WEBP":
        return "image"
    if head.startswith((b"RIFF", b"fLaC", b"OggS", b"ID3", b"FORM", b"\xff\xfb", b"\xff\xf3")):
        return "audio"
    return None


def sniff(data: bytes, filename: str = "") -> str:
    """``image`` or ``audio`` for uploaded bytes, by their first bytes (an upload's name proves nothing)."""
    kind = _magic(data[:16])
    if kind is None:
        raise InputError(f"{filename or 'the upload'} is neither an image nor an audio file "
                         "(images: PNG, JPEG, WebP, BMP, GIF, TIFF; audio: WAV, FLAC, OGG, MP3)")
    return kind


def kind_of(x: Any) -> str:
    """``image``, ``audio`` or ``text`` for a command-line argument: files by extension (then by
    content), anything else is text."""
    if isinstance(x, Image.Image):
        return "image"
    if not isinstance(x, (str, os.PathLike)):
        raise InputError(f"cannot tell what {type(x).__name__} is: pass image=, audio= or text=")
    path = Path(x)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if path.is_file():
        kind = _magic(path.read_bytes()[:16])
        if kind is None:
            raise InputError(f"{path} is neither an image nor an audio file (by its name and its first bytes)")
        return kind
    return "text"
