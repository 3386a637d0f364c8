"""``TextDecoder``: an autoregressive transformer that writes token ids while reading a memory.

Generic over what the memory is (image or audio trunk features, anything ``[B, S, memory_dim]``):
a token embedding plus positions, ``depth`` pre-LayerNorm blocks of

    x = x + SelfAttention(LN(x))        causal
    x = x + CrossAttention(LN(x), mem)  the memory, projected to ``width`` once (LN + Linear)
    x = x + MLP(LN(x))

then a final LayerNorm and the output projection (optionally tied to the embedding). Attention is
:func:`multimodal.attention.attention` (``F.scaled_dot_product_attention``; explicit on CPUs in bf16).

Id conventions (those of ``tasks.heads.vocab``): sequences are ``BOS t1 ... tn EOS`` right-padded
with ``pad_id``. Because padding is on the right and self-attention is causal, real tokens never
attend to padding, so no self-attention padding mask is needed. Decoding never emits ``pad_id``
or ``bos_id``.

Decoding feeds one id per step and caches the self-attention keys/values of the earlier ids and
the cross-attention keys/values of the memory (``DecoderBlock.step``); it computes exactly what
:meth:`TextDecoder.forward` computes at the last position.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from multimodal.attention import attention

POSITIONS = ("sincos", "learned")


def sincos_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed sinusoidal positions ``[length, dim]`` (sin on the first half of the channels, cos on the second)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(1, half))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None, :]
    out = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        out = F.pad(out, (0, 1))
    return out


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query and key/value inputs.

    forward(x [B, L, W], context [B, S, W], mask: bool, broadcastable to [B, heads, L, S], True = may
    attend; or None; causal: bool) -> [B, L, W].
    """

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"TextDecoder: width={width} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def _split(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # [B, heads, N, head_dim]

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """context [B, S, W] -> keys, values [B, heads, S, head_dim] (cached while decoding)."""
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """Queries from x [B, L, W] over given keys/values -> [B, L, W]."""
        q = self._split(self.q(x))
        out = attention(q, k, v, mask, is_causal=causal and mask is None,
                        dropout_p=self.dropout if self.training else 0.0)
        B, _, L, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, L, -1))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        return self.attend(x, *self.keys_values(context), mask=mask, causal=causal)


class DecoderBlock(nn.Module):
    """Pre-LN block: causal self-attention, cross-attention to the memory, MLP. [B, L, W] -> [B, L, W]."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = MultiHeadAttention(width, num_heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.cross_attn = MultiHeadAttention(width, num_heads, dropout)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=nn.GELU, drop=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_mask: Tensor | None) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, causal=True))
        x = x + self.drop(self.cross_attn(self.norm2(x), memory, memory_mask))
        return x + self.drop(self.mlp(self.norm3(x)))

    def step(self, x: Tensor, cache: dict[str, Tensor], memory_mask: Tensor | None) -> Tensor:
        """One new position x [N, 1, W] given ``cache`` (``mem_k``/``mem_v``: the memory's keys and
        values; ``k``/``v``: the self-attention keys and values of the earlier positions, appended to
        here) -> [N, 1, W]. The same computation as :meth:`forward` at the last position."""
        h = self.norm1(x)
        k, v = self.self_attn.keys_values(h)
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        x = x + self.self_attn.attend(h, k, v)  # the newest position may read every earlier one
        x = x + self.cross_attn.attend(self.norm2(x), cache["mem_k"], cache["mem_v"], memory_mask)
        return x + self.mlp(self.norm3(x))


class TextDecoder(nn.Module):
    """Args:
    vocab_size: output classes V (ids 0 .. V-1).
    memory_dim: channels of the memory it reads (e.g. the trunk's hidden size).
    width / depth / num_heads / mlp_ratio: the transformer's size.
    dropout: on attention weights, residual branches and the embeddings (training only).
    max_length: the longest id sequence (BOS and EOS included) of the ``learned`` position table;
        also the default decoding length.
    positions: ``learned`` (a table of ``max_length`` rows) or ``sincos`` (fixed, any length; the token
        embeddings are then scaled by sqrt(width) to match their unit scale).
    tie_embeddings: the output projection reuses the token embedding matrix.
    pad_id / bos_id / eos_id: special ids (defaults: those of ``tasks.heads.vocab``).
    """

    def __init__(
        self,
        vocab_size: int,
        memory_dim: int,
        width: int = 256,
        depth: int = 3,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        max_length: int = 64,
        positions: str = "learned",
        tie_embeddings: bool = True,
        pad_id: int = 0,
        bos_id: int = 2,
        eos_id: int = 3,
    ) -> None:
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"TextDecoder: positions must be one of {POSITIONS}, got {positions!r}")
        for name, value in (("vocab_size", vocab_size), ("memory_dim", memory_dim), ("width", width),
                            ("depth", depth), ("num_heads", num_heads), ("max_length", max_length)):
            if value < 1:
                raise ValueError(f"TextDecoder: {name} must be positive, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"TextDecoder: dropout must be in [0, 1), got {dropout}")
        if max(pad_id, bos_id, eos_id) >= vocab_size:
            raise ValueError(f"TextDecoder: vocab_size={vocab_size} must exceed the special ids {pad_id, bos_id, eos_id}")
        self.vocab_size, self.width, self.max_length = vocab_size, width, max_length
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(max_length, width)) if positions == "learned" else None
        self.embed_scale = math.sqrt(width) if positions == "sincos" else 1.0  # unit-scale positions: scale tokens too
        self.embed_drop = nn.Dropout(dropout)
        self.memory_norm = nn.LayerNorm(memory_dim)
        self.memory_proj = nn.Linear(memory_dim, width)
        self.blocks = nn.ModuleList(DecoderBlock(width, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=True)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Truncated normal (std 0.02) for linear and embedding weights, zero biases, unit LayerNorms;
        residual output projections scaled by 1 / sqrt(2 * depth) (GPT-2 style)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        scale = 1.0 / math.sqrt(2 * len(self.blocks))
        for block in self.blocks:
            for proj in (block.self_attn.proj, block.cross_attn.proj, block.mlp.fc2):
                proj.weight.data.mul_(scale)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # ------------------------------------------------------------------ teacher forcing
    def _positions(self, length: int, device: torch.device) -> Tensor:
        if self.pos_embed is None:
            return sincos_positions(length, self.width, device)
        if length > self.max_length:
            raise ValueError(f"TextDecoder: {length} ids exceed max_length={self.max_length} of the learned positions")
        return self.pos_embed[:length]

    @staticmethod
    def _cross_mask(memory_mask: Tensor | None) -> Tensor | None:
        """[B, S] bool -> [B, 1, 1, S]; a row with no real token attends everywhere (no NaN)."""
        if memory_mask is None:
            return None
        mask = memory_mask.bool()
        mask = mask | ~mask.any(dim=1, keepdim=True)
        return mask[:, None, None, :]

    def forward(self, ids: Tensor, memory: Tensor, memory_mask: Tensor | None = None) -> Tensor:
        """ids [B, L] long (BOS first, right-padded); memory [B, S, memory_dim]; memory_mask [B, S]
        bool (True = a real memory token) or None -> logits [B, L, V] (position i predicts id i + 1)."""
        if ids.dim() != 2 or memory.dim() != 3 or ids.shape[0] != memory.shape[0]:
            raise ValueError(f"TextDecoder: ids [B, L] and memory [B, S, D] expected, got {tuple(ids.shape)} "
                             f"and {tuple(memory.shape)}")
        mem = self.memory_proj(self.memory_norm(memory))
        cross = self._cross_mask(memory_mask)
        x = self.embed(ids) * self.embed_scale + self._positions(ids.shape[1], ids.device).to(memory.dtype)
        x = self.embed_drop(x)
        for block in self.blocks:
            x = block(x, mem, cross)
        return self.head(self.norm(x))

    # ------------------------------------------------------------------ decoding
    def _start(self, memory: Tensor, memory_mask: Tensor | None) -> dict[str, Any]:
        """The decoding state: per block, the memory's cross-attention keys/values (computed once) and
        the self-attention keys/values of the ids fed so far (key/value cache)."""
        mem = self.memory_proj(self.memory_norm(memory))
        caches = []
        for block in self.blocks:
            k, v = block.cross_attn.keys_values(mem)
            caches.append({"mem_k": k, "mem_v": v})
        return {"caches": caches, "cross": self._cross_mask(memory_mask)}

    @staticmethod
    def _reorder(state: dict[str, Any], index: Tensor, memory: bool = False) -> None:
        """Keep the rows ``index`` [N] of the cached self-attention keys/values (beam search's
        surviving beams), and of the memory's too when ``memory`` (beams never change row, so
        their memory rows stay valid otherwise)."""
        keys = ("k", "v", "mem_k", "mem_v") if memory else ("k", "v")
        for cache in state["caches"]:
            for key in keys:
                if key in cache:
                    cache[key] = cache[key].index_select(0, index)
        if memory and state["cross"] is not None:
            state["cross"] = state["cross"].index_select(0, index)

    def _next_logprobs(self, ids: Tensor, state: dict[str, Any]) -> Tensor:
        """Log-probabilities [N, V] of the id after ``ids`` [N, t], feeding only the last id (the
        earlier ones are in ``state``'s cache, which is extended). Pad and BOS are never emitted."""
        t = ids.shape[1] - 1
        x = self.embed(ids[:, -1:]) * self.embed_scale + self._positions(t + 1, ids.device)[t:].to(self.embed.weight.dtype)
        for block, cache in zip(self.blocks, state["caches"]):
            x = block.step(x, cache, state["cross"])
        logits = self.head(self.norm(x))[:, -1].float()
        logits[:, self.pad_id] = float("-inf")
        logits[:, self.bos_id] = float("-inf")
        return logits.log_softmax(dim=-1)

    def _check_length(self, max_length: int | None) -> int:
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise ValueError(f"TextDecoder: max_length must be >= 2 (BOS and one id), got {max_length}")
        if self.pos_embed is not None and max_length > self.max_length:
            raise ValueError(f"TextDecoder: max_length={max_length} exceeds the learned positions ({self.max_length})")
        return max_length

    @torch.no_grad()
    def greedy(self, memory: Tensor, memory_mask: Tensor | None = None, max_length: int | None = None) -> Tensor:
        """Argmax decoding -> ids [B, T], T <= max_length: BOS, the ids, EOS (when emitted within
        ``max_length``), then ``pad_id``. Stops when every row has emitted EOS. Decode in eval mode
        (dropout off)."""
        max_length = self._check_length(max_length)
        B = memory.shape[0]
        ids = torch.full((B, 1), self.bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(B, dtype=torch.bool, device=memory.device)
        state = self._start(memory, memory_mask)
        for _ in range(max_length - 1):
            nxt = self._next_logprobs(ids, state).argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done = done | (nxt == self.eos_id)
            if bool(done.all()):
                break
        return ids

    @staticmethod
    def gnmt_penalty(length: int | Tensor, alpha: float) -> float | Tensor:
        """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016); length counts the
        generated ids, EOS included."""
        return ((5.0 + length) / 6.0) ** alpha

    @torch.no_grad()
    def beam_search(self, memory: Tensor, memory_mask: Tensor | None = None, beam_size: int = 4,
                    max_length: int | None = None, length_penalty: float = 0.6) -> Tensor:
        """Beam search over all rows at once -> ids [B, T] in the layout of :meth:`greedy`.

        Each row keeps ``beam_size`` live hypotheses; at each step the ``2 * beam_size`` best
        extensions (by summed log-probability) are ranked: an extension ending in EOS that ranks
        within the first ``beam_size`` becomes a finished hypothesis, the first ``beam_size``
        others are the new live beams. A row stops once it holds ``beam_size`` finished
        hypotheses; at ``max_length`` the live beams are finished as they are (no EOS). The answer
        is the finished hypothesis with the best ``logprob / gnmt_penalty(len, length_penalty)``.
        ``beam_size=1`` gives exactly :meth:`greedy`'s result.
        """
        max_length = self._check_length(max_length)
        if beam_size < 1:
            raise ValueError(f"TextDecoder: beam_size must be >= 1, got {beam_size}")
        B, K, device = memory.shape[0], beam_size, memory.device
        state = self._start(memory, memory_mask)
        self._reorder(state, torch.arange(B, device=device).repeat_interleave(K), memory=True)  # rows b*K .. b*K+K-1: row b
        seqs = torch.full((B * K, 1), self.bos_id, dtype=torch.long, device=device)  # row b*K + k: beam k of b
        scores = [0.0 if k == 0 else -math.inf for _ in range(B) for k in range(K)]  # one live beam at first
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        row_done = [False] * B
        V = self.vocab_size
        for step in range(1, max_length):
            logp = self._next_logprobs(seqs, state)
            cand = (torch.tensor(scores, device=device)[:, None] + logp).view(B, K * V)
            top_scores, top_idx = (t.tolist() for t in cand.topk(min(2 * K, K * V), dim=1))
            source = list(range(B * K))  # the beam each new beam extends
            tokens = [self.pad_id] * (B * K)
            new_scores = [-math.inf] * (B * K)
            for b in range(B):
                if row_done[b]:
                    continue
                alive = 0
                for rank, (score, index) in enumerate(zip(top_scores[b], top_idx[b])):
                    if score == -math.inf:
                        break
                    k, token = divmod(index, V)
                    if token == self.eos_id:
                        if rank < K:
                            hyp = seqs[b * K + k].tolist() + [token]
                            finished[b].append((score / self.gnmt_penalty(step, length_penalty), hyp))
                        continue
                    row = b * K + alive
                    source[row], tokens[row], new_scores[row] = b * K + k, token, score
                    alive += 1
                    if alive == K:
                        break
                if len(finished[b]) >= K or alive == 0:
                    row_done[b] = True
            index = torch.tensor(source, device=device)
            seqs = torch.cat([seqs[index], torch.tensor(tokens, device=device)[:, None]], dim=1)
            scores = new_scores
            self._reorder(state, index)
            if all(row_done):
                break
        else:
            length = seqs.shape[1] - 1  # max_length reached: the live beams finish without EOS
            for b in range(B):
                for k in range(K):
                    score = scores[b * K + k]
                    if not row_done[b] and score != -math.inf:
                        finished[b].append((score / self.gnmt_penalty(length, length_penalty), seqs[b * K + k].tolist()))
        best = [max(hyps, key=lambda h: h[0])[1] if hyps else [self.bos_id] for hyps in finished]
        width = max(len(h) for h in best)
        out = torch.full((B, width), self.pad_id, dtype=torch.long, device=device)
        for b, hyp in enumerate(best):
            out[b, : len(hyp)] = torch.tensor(hyp, device=device)
        return out

    @torch.no_grad()
    def sequence_logprob(self, ids: Tensor, memory: Tensor, memory_mask: Tensor | None = None) -> Tensor:
        """Summed log-probability [B] of decoded ids [B, T] (BOS first; up to and including EOS, pad
        ignored) under the decoding distribution (pad and BOS excluded), as beam search scores them."""
        logits = self.forward(ids[:, :-1], memory, memory_mask).float()
        logits[..., self.pad_id] = float("-inf")
        logits[..., self.bos_id] = float("-inf")
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return torch.where(ids[:, 1:] == self.pad_id, torch.zeros_like(logp), logp).sum(-1)
