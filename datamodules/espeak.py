"""A small ctypes binding of the espeak-ng speech synthesiser, for the embedded demo data.

The shared library and its data come from the ``espeakng-loader`` wheel (the ``demo`` extra), so
nothing is installed system-wide and nothing is downloaded. Only the few calls the demo needs
are bound: initialise in synchronous mode, choose a voice, set rate and pitch, synthesise text
into int16 samples collected by a callback.

espeak-ng keeps global state, so there is one library instance per process: it is created
lazily on first use and shared by every :class:`Espeak` object, and calls are serialised with a
lock.

Reproducibility. Seeding espeak-ng's noise generator and libc's ``rand`` is not enough: the
waveform generator carries state from one utterance to the next (pitch-flutter phase, glottal
phase, echo buffer, frame pools), so the same text came out slightly different on every call.
To make a clip depend only on its arguments, the library's static variables that synthesis
changes are found once at start-up (from the ELF symbol table of the shared library, comparing
them before and after calibration utterances with a fixed voice) and written back to their
post-warm-up values before every clip; the voice is then re-selected, which resets the voice's
own state. A self-check confirms it; where it cannot work (no symbol table, not ELF) the binding
still runs and :attr:`Espeak.reproducible` is ``False`` (clips then depend on the calls before
them in the process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import struct
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Espeak", "list_variants"]

# Constants of speak_lib.h.
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000
ESPEAK_CHARS_UTF8 = 1
POS_CHARACTER = 1
ESPEAK_RATE = 1
ESPEAK_PITCH = 3
EE_OK = 0

DEFAULT_SAMPLE_RATE = 22050
BUFFER_MS = 100
DEFAULT_RATE = 170
DEFAULT_PITCH = 50
# espeak-ng copies the data path into a fixed 160-byte buffer and silently truncates longer ones.
MAX_DATA_PATH = 120
WARMUP_TEXT = "warm up."
CALIBRATION_TEXTS = (
    "yes no up down left right on off stop go.",
    "zero one two three four five six seven eight nine, stop; go!",
    "go three one",
    "off zero eight",
)
CALIBRATION_VOICES = ("en-us+f5", "en-gb-x-rp+m3", "en")
INSTALL_HINT = 'pip install -e ".[demo]"'

# int (t_espeak_callback)(short *wav, int numsamples, espeak_EVENT *events)
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _loader() -> Any:
    try:
        import espeakng_loader
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the spoken demo data needs espeak-ng from the 'espeakng-loader' package: {INSTALL_HINT}"
        ) from err
    return espeakng_loader


def _short_data_path(data_path: str) -> str:
    """``data_path`` itself when short, else a symlink to it under a short per-user temp folder."""
    if len(data_path) < MAX_DATA_PATH:
        return data_path
    base = Path(tempfile.gettempdir()) / f"espk-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        if base.is_symlink() or base.stat().st_uid != os.getuid():
            raise PermissionError(f"{base} is not owned by this user")
    except OSError:
        base = Path(tempfile.mkdtemp(prefix="espk-"))
    link = base / hashlib.sha1(data_path.encode()).hexdigest()[:10]
    if not (link.is_symlink() and os.readlink(link) == data_path):
        tmp = base / f"{link.name}.{os.getpid()}.{threading.get_ident()}"
        tmp.unlink(missing_ok=True)
        os.symlink(data_path, tmp)
        os.replace(tmp, link)  # atomic: concurrent processes agree on the same link
    if len(str(link)) >= MAX_DATA_PATH:
        raise RuntimeError(f"cannot make a short enough path to the espeak-ng data ({link})")
    return str(link)


def _elf_symbols(path: str) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """``(functions, writable_objects)`` of a little-endian ELF64 file's ``.symtab``.

    ``functions``: name -> address; ``writable_objects``: name -> (address, size) of the data
    objects in writable sections (``.data``, ``.bss``). Empty dicts when not ELF64 or stripped.
    """
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:  # ELF, 64-bit, little-endian
        return {}, {}
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", blob, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    sht_symtab, shf_write, stt_object, stt_func = 2, 0x1, 1, 2
    functions: dict[str, int] = {}
    objects: dict[str, tuple[int, int]] = {}
    for sec in sections:
        if sec[1] != sht_symtab:
            continue
        strtab_offset = sections[sec[6]][4]
        for off in range(sec[4], sec[4] + sec[5], 24):
            name_off, info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", blob, off)
            start = strtab_offset + name_off
            name = blob[start : blob.index(b"\0", start)].decode("utf-8", "replace")
            kind = info & 0xF
            if kind == stt_func and value:
                functions[name] = value
            elif kind == stt_object and size and 0 < shndx < shnum and sections[shndx][2] & shf_write:
                objects[name] = (value, size)
    return functions, objects


def list_variants() -> list[str]:
    """Names of the voice variants (``m1``, ``f5``, ...) in the installed espeak-ng data."""
    folder = Path(_loader().get_data_path()) / "voices" / "!v"
    return sorted(p.name for p in folder.iterdir() if p.is_file())


class _Library:
    """The process-wide espeak-ng instance (use :meth:`get`)."""

    _instance: _Library | None = None
    _create_lock = threading.Lock()

    def __init__(self) -> None:
        loader = _loader()
        self.data_path = loader.get_data_path()
        self.library_path = loader.get_library_path()
        self.variants = frozenset(list_variants())
        lib = ctypes.CDLL(self.library_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,  # text
            ctypes.c_size_t,  # size in bytes, terminator included
            ctypes.c_uint,  # position
            ctypes.c_int,  # position_type
            ctypes.c_uint,  # end_position
            ctypes.c_uint,  # flags
            ctypes.POINTER(ctypes.c_uint),  # unique_identifier
            ctypes.c_void_p,  # user_data
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = ctypes.c_int
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.srand.argtypes = [ctypes.c_uint]
        libc.srand.restype = None
        self.lib, self.libc = lib, libc
        self.lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._state: list[tuple[int, bytes]] = []  # (address, bytes) written back before each clip

        rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, _short_data_path(self.data_path).encode(), ESPEAK_INITIALIZE_DONT_EXIT
        )
        self.sample_rate = int(rate) if rate > 0 else DEFAULT_SAMPLE_RATE
        self._callback = _SYNTH_CALLBACK(self._on_samples)  # keep referenced: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        # With DONT_EXIT a failed initialisation returns normally; the first voice tells.
        if rate <= 0 or lib.espeak_SetVoiceByName(b"en") != EE_OK:
            raise RuntimeError(f"espeak-ng failed to initialise with its data at {self.data_path}")
        self.reproducible = self._calibrate()

    @classmethod
    def get(cls) -> _Library:
        if cls._instance is None:
            with cls._create_lock:
                if cls._instance is None:
                    cls._instance = cls()
        return cls._instance

    def _on_samples(self, wav: Any, numsamples: int, events: Any) -> int:
        if numsamples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, numsamples * ctypes.sizeof(ctypes.c_short)))
        return 0  # 0: continue synthesis

    # ------------------------------------------------------------------ reproducibility
    def _calibrate(self) -> bool:
        """Find the synthesis state to reset before each clip (see the module docstring)."""
        if not sys.platform.startswith("linux"):
            return False
        try:
            functions, objects = _elf_symbols(self.library_path)
        except (OSError, struct.error, ValueError):
            return False
        if "espeak_Synth" not in functions or not objects:
            return False
        base = ctypes.cast(self.lib.espeak_Synth, ctypes.c_void_p).value - functions["espeak_Synth"]
        regions = [(base + addr, size) for addr, size in objects.values()]

        def snapshot() -> list[bytes]:
            return [ctypes.string_at(addr, size) for addr, size in regions]

        # The first utterance initialises things lazily (text decoder, buffers: heap pointers
        # that must never be written back) and is not compared. After it, keep the symbols that
        # synthesis changes (not those only selecting a voice changes, such as the translator:
        # the voice is re-selected after the reset). Ring buffers stay consistent as their
        # head and tail are both written back while the queue is empty.
        synth_changed: set[int] = set()
        self._setup("en", DEFAULT_RATE, DEFAULT_PITCH, 0)
        self._synth(WARMUP_TEXT)
        reference = snapshot()
        for i, text in enumerate(CALIBRATION_TEXTS):
            try:
                self._setup(CALIBRATION_VOICES[i % len(CALIBRATION_VOICES)], 150 + 20 * i, 40 + 10 * i, i)
            except ValueError:  # a variant missing from this espeak-ng build
                self._setup("en", 150 + 20 * i, 40 + 10 * i, i)
            selected = snapshot()
            self._synth(text)
            after = snapshot()
            synth_changed.update(j for j in range(len(regions)) if selected[j] != after[j])
        self._state = [(regions[j][0], reference[j]) for j in sorted(synth_changed)]
        # Self-check: a clip must not depend on what was synthesised before it.
        probe = ("go three one", "en-us+f2", 150, 40, 7)
        first = self.synthesize(*probe)
        self.synthesize("stop; left nine", "en-gb-x-rp+m3", 200, 70, 3)
        if not np.array_equal(first, self.synthesize(*probe)):
            self._state = []
            return False
        return True

    def _reset_state(self) -> None:
        for addr, data in self._state:
            ctypes.memmove(addr, data, len(data))

    # ------------------------------------------------------------------ synthesis
    def _select_voice(self, voice: str) -> None:
        base, _, variant = voice.partition("+")
        if variant and variant not in self.variants:
            raise ValueError(
                f"unknown espeak-ng voice {voice!r}: no variant {variant!r} "
                f"(known variants: {', '.join(sorted(self.variants))})"
            )
        if not base or self.lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise ValueError(f"unknown espeak-ng voice {voice!r} (e.g. 'en', 'en-us+f3', 'en-gb-x-rp+m2')")

    def _setup(self, voice: str, rate: int, pitch: int, seed: int) -> None:
        self._select_voice(voice)  # re-selected every clip: resets the voice's own state (echo, ...)
        for param, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch)):
            if self.lib.espeak_SetParameter(param, int(value), 0) != EE_OK:
                raise ValueError(f"espeak-ng rejected parameter {param} = {value}")
        self.lib.espeak_ng_SetRandSeed(int(seed))
        self.libc.srand(int(seed) & 0xFFFFFFFF)

    def _synth(self, text: str) -> bytes:
        data = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(data, len(data))
        self._chunks = []
        try:
            err = self.lib.espeak_Synth(buf, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
            if err != EE_OK:
                raise RuntimeError(f"espeak_Synth failed with code {err} for text {text!r}")
            self.lib.espeak_Synchronize()
            return b"".join(self._chunks)
        finally:
            self._chunks = []

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
        with self.lock:
            self._reset_state()
            self._setup(voice, rate, pitch, seed)
            pcm = self._synth(text)
        return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0


class Espeak:
    """Text to speech with espeak-ng.

    >>> tts = Espeak()
    >>> wave = tts.synthesize("go three one", voice="en-us+f3", rate=170, pitch=50, seed=0)

    ``voice`` is an espeak-ng voice name (``en``, ``en-us``, ``en-gb-x-rp``, ...) with an optional
    ``+variant`` (see :func:`list_variants`). Raises ImportError (with the install hint) when
    ``espeakng-loader`` is missing.
    """

    sample_rate: int = DEFAULT_SAMPLE_RATE
    """Output rate in Hz (what the library reports; 22050 for espeak-ng)."""
    reproducible: bool = True
    """Whether a clip depends only on the arguments of :meth:`synthesize` (see the module docs)."""

    def __init__(self) -> None:
        self._lib = _Library.get()
        self.sample_rate = self._lib.sample_rate
        self.reproducible = self._lib.reproducible

    def synthesize(
        self, text: str, voice: str = "en", rate: int = DEFAULT_RATE, pitch: int = DEFAULT_PITCH, seed: int = 0
    ) -> np.ndarray:
        """Float32 mono waveform in [-1, 1] at :attr:`sample_rate`.

        ``rate`` in words per minute (80-450), ``pitch`` 0-100 (50: the voice's normal pitch),
        ``seed`` for espeak-ng's noise sources. A bad voice name raises ValueError.
        """
        if not text.strip():
            raise ValueError("nothing to synthesize: empty text")
        return self._lib.synthesize(text, voice, rate, pitch, seed)
