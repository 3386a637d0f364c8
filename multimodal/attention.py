"""Scaled dot-product attention through the fastest path of the hardware it runs on.

    out = softmax(q k^T / sqrt(d) + mask) v        q [B, h, L, d], k, v [B, h, S, d] -> [B, h, L, d]

Everywhere but one case this is ``F.scaled_dot_product_attention`` (FlashAttention or the
memory-efficient kernel on GPUs, torch's flash kernel on CPUs in float32). The exception is a CPU
in bfloat16 (or float16): there torch's CPU flash kernel is the slow path, its backward above all.
Measured on this project's 2-core CPU (one thread, avx512_bf16; ``python scripts/benchmark.py
kernels``), forward + backward of q, k, v [64, 4, 16, 64] (the quickstart's image batches): bf16
flash 25.4 ms, fp32 flash 6.1 ms, and the explicit ``softmax(q k^T) v`` below in bf16 4.0 ms, its two
matmuls on the bf16 units; at [32, 4, 80, 64] with a padding mask (speech) 45.7 / 19.7 / 15.6 ms. The
explicit form rounds the scores to bf16 before the softmax (the softmax itself accumulates in
float32), as timm's non-fused attention under autocast does. It materialises the [L, S] score matrix,
which is fine at the sequence lengths CPUs train on.

``mask``: bool, broadcastable to [B, h, L, S], True = may attend (every row needs one True key).
``MULTIMODAL_ATTENTION=sdpa`` in the environment turns the explicit path off (benchmarks compare both).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

EXPLICIT_DTYPES = (torch.bfloat16, torch.float16)


EXPLICIT_ON_CPU = os.environ.get("MULTIMODAL_ATTENTION", "").lower() != "sdpa"


def uses_explicit(q: Tensor) -> bool:
    """Whether :func:`attention` takes the explicit path for ``q`` (CPU in a 16-bit float type)."""
    return EXPLICIT_ON_CPU and q.device.type == "cpu" and q.dtype in EXPLICIT_DTYPES


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
              dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=..., dropout_p=...)``,
    explicit on CPUs in 16-bit floats (see the module docstring). -> [B, h, L, d]."""
    if not uses_explicit(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # [B, h, L, S]
    if is_causal:
        L, S = scores.shape[-2:]
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()  # top-left, as SDPA's
        mask = causal if mask is None else mask & causal
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v
