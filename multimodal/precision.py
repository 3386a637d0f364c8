"""Which floating-point precision the hardware trains at best, decided at run time.

``trainer.precision`` left unset (the CLI's default) becomes ``bf16-mixed`` where matrix products
have native bfloat16 units and ``32-true`` elsewhere; the choice and its reason are logged once at
start. Native bf16 means: a CUDA GPU that supports it (``torch.cuda.is_bf16_supported``, Ampere and
newer), or a CPU whose instruction set has bf16 dot products (x86 ``avx512_bf16`` or ``amx_bf16``,
Arm ``bf16``/``sve-bf16``) and a oneDNN build that uses them. A CPU with AVX-512 but without those
instructions can run bf16 only emulated, slower than fp32, so it is not chosen there, and asking for
it (``--trainer.precision bf16-mixed``) is refused with a message naming the setting.

Measured on this project's 2-core CPU (one thread, avx512_bf16): square matmuls 90 GFLOP/s in fp32
and 190-210 in bf16 (``python scripts/benchmark.py matmul``).

What stays float32 under bf16 autocast, each with a comment where it is done: codebook distances and
the quantizer's EMA statistics (``multimodal.quantizer``, ``multimodal.fsq``), the mel front end and
Griffin-Lim (``multimodal.mel``), the diffusion schedule and sampler arithmetic and the diffusion
loss reduction (``multimodal.diffusion``), every cross-entropy / CTC loss (``tasks.heads``) and
every torchmetrics state.
"""

from __future__ import annotations

import logging
import platform
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "svebf16")
"""/proc/cpuinfo flags (x86 ``flags``, Arm ``Features``) of native bf16 dot-product instructions."""

BF16_NAMES = ("bf16", "bf16-mixed", "bf16-true")


@cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native bf16 instruction flags this CPU reports (empty where none, or not on Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        flags.add("bf16")  # Apple M2 and newer; oneDNN decides below whether it is used
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """(whether ``device``'s matmuls have native bf16 units, the reason in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bf16"
        return False, f"{name} has no bf16 support"
    if device.type != "cpu":
        return False, f"bf16 is not chosen automatically on {device.type}"
    flags = cpu_bf16_flags()
    if not flags:
        return False, "this CPU has no native bf16 instructions (avx512_bf16 / amx_bf16 / Arm bf16)"
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False, f"the CPU has {', '.join(flags)} but this torch build's oneDNN does not use bf16"
    return True, f"the CPU has {', '.join(flags)}"


def accelerator_device(accelerator: str | None) -> str:
    """The device kind a Trainer's ``accelerator`` setting runs on (``auto``: CUDA when available)."""
    accelerator = str(accelerator or "auto").lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator in ("cpu", "auto"):
        return "cpu"
    return accelerator


def resolve_precision(precision: str | int | None, accelerator: str | None = "auto") -> tuple[str, str]:
    """``trainer.precision`` as configured -> (the precision to run, why; logged once at start).

    None means "what the hardware runs best": ``bf16-mixed`` with native bf16, else ``32-true``.
    An explicit bf16 setting on hardware without native bf16 is a ValueError naming the setting;
    anything else is passed through unchanged.
    """
    device = accelerator_device(accelerator)
    if precision is None:
        ok, why = native_bf16(device)
        chosen = "bf16-mixed" if ok else "32-true"
        return chosen, f"trainer.precision={chosen} (chosen for {device}: {why}; set trainer.precision to override)"
    if str(precision) in BF16_NAMES and device in ("cpu", "cuda"):
        ok, why = native_bf16(device)
        if not ok:
            raise ValueError(
                f"trainer.precision={precision} asks for bf16, but {why}: it would run emulated, slower than "
                "float32. Use --trainer.precision 32 (or leave it unset to let the hardware choose)."
            )
    return str(precision), f"trainer.precision={precision} (as configured)"


def autocast_dtype(device: str | torch.device = "cpu") -> torch.dtype | None:
    """bf16 where ``device`` has native bf16 (for sampling and inference outside a Trainer), else None."""
    return torch.bfloat16 if native_bf16(device)[0] else None
