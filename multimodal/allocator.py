"""Keep glibc's malloc from handing every tensor of a megabyte or more back to the kernel.

glibc serves allocations above its mmap threshold (128 KiB at start, raised by itself only up to the
size of blocks freed so far) with fresh ``mmap`` pages, which the kernel zero-fills at their first
touch, and trims freed memory back to the kernel. PyTorch's CPU allocator asks glibc for every
tensor, so a training step that makes and frees the same large temporaries each step pays those
page faults again every time. Measured on this project's CPU (one thread): a quickstart stage-2 step
drops by 5.6 % (``python scripts/benchmark.py stage2``, the ``+ allocator`` row); one op on a 1.5 MB
tensor repeated in a loop runs the same either way (``python scripts/benchmark.py kernels``: glibc
raises its threshold to a size once it has seen one freed), so the gain comes from a step's mix of
tensor sizes.
Intel's PyTorch CPU tuning guide recommends jemalloc or tcmalloc for the same reason; neither is on
every machine, while ``mallopt`` is part of glibc, so it is set here at start (nothing in torch or
Lightning does this).

Settings: ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's maximum on 64-bit; tensors below it come from the
reusable heap) and ``M_TRIM_THRESHOLD`` = 256 MiB (freed heap memory is kept for the next step).
Set ``MULTIMODAL_MALLOC=default`` to leave glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Apply the settings above once per process (Linux with glibc only). Returns whether they are set."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("MULTIMODAL_MALLOC", "").lower() == "default" or platform.system() != "Linux":
        return _tuned
    if platform.libc_ver()[0] != "glibc":
        return _tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError) as err:  # not glibc after all: leave the allocator alone
        log.debug("mallopt unavailable: %s", err)
    return _tuned
