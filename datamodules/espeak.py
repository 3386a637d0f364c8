"""A small ctypes binding of the espeak-ng speech synthesiser, for the embedded demo data.

The shared library and its data come from the ``espeakng-loader`` wheel (the ``demo`` extra), so
nothing is installed system-wide and nothing is downloaded. Only the few calls the demo needs
are bound: initialise in synchronous mode, choose a voice, set rate and pitch, synthesise text
into int16 samples collected by a callback.

espeak-ng keeps global state, so there is one library instance per process: it is created
lazily on first use and shared by every :class:`Espeak` object, and calls are serialised with a
lock.

Determinism contract. Before every clip espeak-ng's noise generator (``espeak_ng_SetRandSeed``:
breath noise of the breathy variants) and libc's ``rand`` are seeded from ``seed``, but that does
not make a clip a function of its arguments alone: the library carries internal state from one
utterance to the next (pitch flutter, glottal phase, echo buffer, ...), which it offers no way
to reset. What holds is weaker: the samples are a deterministic function of the whole sequence
of calls made since the library was loaded in this process. Repeating a call later in the same
process may therefore give slightly different samples. Reproducible data comes from running a
fixed sequence of calls in a fresh process: :class:`EspeakProcess` does that, running the
library in a child process of its own (which imports this file, numpy and espeakng_loader;
not the ``datamodules`` package, whose import costs seconds of torch) and forwarding
each :meth:`~EspeakProcess.synthesize` to it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["Espeak", "EspeakProcess", "list_variants"]

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
INSTALL_HINT = 'pip install -e ".[demo]"'
CHILD_STOP_TIMEOUT = 10.0  # seconds a child process gets to exit after its input closes

# int (t_espeak_callback)(short *wav, int numsamples, espeak_EVENT *events)
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _loader() -> Any:
    try:
        import espeakng_loader
    except ImportError as err:
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
        self.variants = frozenset(list_variants())
        lib = ctypes.CDLL(loader.get_library_path())
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
        self._set_rand_seed = getattr(lib, "espeak_ng_SetRandSeed", None)  # absent from old espeak-ng builds
        if self._set_rand_seed is not None:
            self._set_rand_seed.argtypes = [ctypes.c_long]
            self._set_rand_seed.restype = ctypes.c_int
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.srand.argtypes = [ctypes.c_uint]
        libc.srand.restype = None
        self.lib, self.libc = lib, libc
        self.lock = threading.Lock()
        self._chunks: list[bytes] = []

        rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS,
            BUFFER_MS,
            _short_data_path(self.data_path).encode(),
            ESPEAK_INITIALIZE_DONT_EXIT,
        )
        self.sample_rate = int(rate) if rate > 0 else DEFAULT_SAMPLE_RATE
        self._callback = _SYNTH_CALLBACK(self._on_samples)  # keep referenced: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        # With DONT_EXIT a failed initialisation returns normally; the first voice tells.
        if rate <= 0 or lib.espeak_SetVoiceByName(b"en") != EE_OK:
            raise RuntimeError(f"espeak-ng failed to initialise with its data at {self.data_path}")

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

    def _select_voice(self, voice: str) -> None:
        base, _, variant = voice.partition("+")
        if variant and variant not in self.variants:
            raise ValueError(
                f"unknown espeak-ng voice {voice!r}: no variant {variant!r} "
                f"(known variants: {', '.join(sorted(self.variants))})"
            )
        if not base or self.lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise ValueError(f"unknown espeak-ng voice {voice!r} (e.g. 'en', 'en-us+f3', 'en-gb-x-rp+m2')")

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> bytes:
        """Little-endian int16 samples (native order) of ``text``."""
        data = text.encode("utf-8") + b"\0"
        with self.lock:
            self._select_voice(voice)
            for param, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch)):
                if self.lib.espeak_SetParameter(param, int(value), 0) != EE_OK:
                    raise ValueError(f"espeak-ng rejected parameter {param} = {value}")
            if self._set_rand_seed is not None:
                self._set_rand_seed(int(seed))
            self.libc.srand(int(seed) & 0xFFFFFFFF)
            buf = ctypes.create_string_buffer(data, len(data))
            self._chunks = []
            try:
                err = self.lib.espeak_Synth(
                    buf, len(data), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None
                )
                if err != EE_OK:
                    raise RuntimeError(f"espeak_Synth failed with code {err} for text {text!r}")
                self.lib.espeak_Synchronize()
                return b"".join(self._chunks)
            finally:
                self._chunks = []


def _check_text(text: str) -> None:
    if not text.strip():
        raise ValueError("nothing to synthesize: empty text")


def _to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0


class Espeak:
    """Text to speech with espeak-ng, in this process.

    >>> tts = Espeak()
    >>> wave = tts.synthesize("go three one", voice="en-us+f3", rate=170, pitch=50, seed=0)

    ``voice`` is an espeak-ng voice name (``en``, ``en-us``, ``en-gb-x-rp``, ...) with an optional
    ``+variant`` (see :func:`list_variants`). Raises ImportError (with the install hint) when
    ``espeakng-loader`` is missing. Every ``Espeak`` of a process shares one library instance,
    so a clip also depends on all the calls made before it in this process (see the module
    docs); use :class:`EspeakProcess` for reproducible sequences.
    """

    sample_rate: int = DEFAULT_SAMPLE_RATE
    """Output rate in Hz (what the library reports; 22050 for espeak-ng)."""

    def __init__(self) -> None:
        self._lib = _Library.get()
        self.sample_rate = self._lib.sample_rate

    def synthesize(
        self,
        text: str,
        voice: str = "en",
        rate: int = DEFAULT_RATE,
        pitch: int = DEFAULT_PITCH,
        seed: int = 0,
    ) -> np.ndarray:
        """Float32 mono waveform in [-1, 1] at :attr:`sample_rate`.

        ``rate`` in words per minute (80-450), ``pitch`` 0-100 (50: the voice's normal pitch),
        ``seed`` for espeak-ng's random sources (breath noise). A bad voice name raises
        ValueError.
        """
        _check_text(text)
        return _to_float(self._lib.synthesize(text, voice, int(rate), int(pitch), int(seed)))


# ---------------------------------------------------------------------------------- child process
# The child runs this file by path, not ``datamodules.espeak``: importing the package would
# import torch and lightning (seconds) for nothing. ``sys.path[0]`` (the working folder under
# ``-c``) is dropped so that no file there can shadow numpy or espeakng_loader.
_CHILD_CODE = """\
import sys
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]
import importlib.util
spec = importlib.util.spec_from_file_location("_espeak_child", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
module._serve()
"""
_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "ImportError": ImportError}


def _send(stream: IO[bytes], message: Any) -> None:
    pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def _serve() -> None:
    """The child's loop: one reply per request read from stdin, until stdin closes.

    Replies go to a private copy of stdout; fd 1 itself is pointed at stderr so anything the
    library prints cannot corrupt them. Replies: ``("ready", sample_rate)`` once, then
    ``("ok", pcm_bytes)`` or ``("error", exception_name, message)`` per request.
    """
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    try:
        lib = _Library.get()
    except Exception as err:  # reported to the parent, which raises it
        _send(replies, ("error", type(err).__name__, str(err)))
        return
    _send(replies, ("ready", lib.sample_rate))
    while True:
        try:
            text, voice, rate, pitch, seed = pickle.load(requests)
        except EOFError:
            return
        try:
            _send(replies, ("ok", lib.synthesize(text, voice, rate, pitch, seed)))
        except (ValueError, RuntimeError) as err:
            _send(replies, ("error", type(err).__name__, str(err)))


def _stop_child(proc: subprocess.Popen, log: IO[bytes]) -> None:
    """Close the child's input (it then exits), wait for it, kill it if it does not."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=CHILD_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    log.close()


class EspeakProcess:
    """Text to speech with espeak-ng in a fresh child process: reproducible call sequences.

    >>> with EspeakProcess() as tts:
    ...     wave = tts.synthesize("go three one", voice="en-us+f3", rate=170, pitch=50, seed=0)

    Same arguments and errors as :class:`Espeak`. Each instance starts its own child, which
    loads the library afresh, so two instances given the same sequence of
    :meth:`synthesize` calls return the same samples, whatever else ran in this process.
    Close it (or use it as a context manager) to end the child.
    """

    sample_rate: int = DEFAULT_SAMPLE_RATE

    def __init__(self) -> None:
        _loader()  # a missing package raises the install hint here, before any child starts
        if not sys.executable:
            raise RuntimeError("cannot start the espeak-ng child process: sys.executable is unknown")
        self._lock = threading.Lock()
        self._log = tempfile.TemporaryFile()  # the child's stderr, quoted when it fails
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._finalizer = weakref.finalize(self, _stop_child, self._proc, self._log)
        try:
            self.sample_rate = int(self._receive())
        except BaseException:
            self.close()
            raise

    def _receive(self) -> Any:
        try:
            reply = pickle.load(self._proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError) as err:
            self._proc.poll()
            self._log.seek(0)
            log = self._log.read()[-2000:].decode("utf-8", "replace").strip()
            raise RuntimeError(
                f"the espeak-ng child process failed (exit code {self._proc.returncode})"
                + (f":\n{log}" if log else "")
            ) from err
        if reply[0] == "error":
            raise _ERRORS.get(reply[1], RuntimeError)(reply[2])
        return reply[1]

    def synthesize(
        self,
        text: str,
        voice: str = "en",
        rate: int = DEFAULT_RATE,
        pitch: int = DEFAULT_PITCH,
        seed: int = 0,
    ) -> np.ndarray:
        """Float32 mono waveform in [-1, 1] at :attr:`sample_rate` (see :meth:`Espeak.synthesize`)."""
        _check_text(text)
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("this EspeakProcess is closed")
            try:
                _send(self._proc.stdin, (str(text), str(voice), int(rate), int(pitch), int(seed)))
            except OSError as err:  # the child died: _receive says why
                raise RuntimeError(f"the espeak-ng child process is gone ({err})") from err
            return _to_float(self._receive())

    def close(self) -> None:
        """End the child process (idempotent)."""
        self._finalizer()

    def __enter__(self) -> EspeakProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
