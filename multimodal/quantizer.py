"""Vector quantization with one codebook shared by every modality.

``VectorQuantizer`` maps encoder outputs ``z [B, N, D]`` to the nearest of ``K`` codes and returns
``(quantized [B, N, D], codes [B, N], loss, stats)``. ``mask [B, N]`` (True = valid token) keeps padded
tokens out of the loss, the codebook updates and the statistics; they are still quantized in the output.

The math, in code space (``d = code_dim`` or ``D``; ``x = W_in z`` when ``code_dim`` is set, then
l2-normalised when ``use_cosine``)::

    code      k* = argmin_k ||x - c_k||^2 = argmax_k (x . c_k - ||c_k||^2 / 2)
    loss      beta * ||x - sg(c_k*)||^2               commitment: trains the encoder
              + ||sg(x) - c_k*||^2                    codebook loss: only when use_ema=False
    EMA       n_k <- decay n_k + (1 - decay) #{x -> k}
              s_k <- decay s_k + (1 - decay) sum_{x -> k} x
              c_k  = s_k / ((n_k + eps) / (n + K eps) * n),  n = sum_k n_k   (Laplace smoothing)
    output    x + sg(c_k* - x)   (straight-through)   or   the rotation trick (Fifty et al. 2024)

Codebook health: k-means++ then Lloyd on the first ``kmeans_init_batches`` training batches; a code
unused for ``dead_code_steps`` training steps is restarted at a recent encoder output.

Under DDP (decided on every training step, never at construction, because Lightning creates the process
group after the model is built) the per-code counts and sums, the k-means statistics and the restart
vectors are summed over ranks or taken from rank 0, so every rank keeps a bit-identical codebook. In eval
mode the quantizer is a pure lookup.

Initialisation: codes ~ N(0, 1) (overwritten by k-means when ``kmeans_init``); EMA cluster sizes 1 and
sums equal to the codes; the projections keep PyTorch's default Linear initialisation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

_NEVER = -(2**40)  # "last used" step of a code that has never been used


def ddp_world_size(enabled: bool = True) -> int:
    """Ranks of the running process group when it has more than one, else 1. Checked at call time."""
    if enabled and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code by L2. x [M, d], codebook [K, d] -> [M] long.

    ||x||^2 is the same for every code, so argmin ||x - c||^2 = argmax (x . c - ||c||^2 / 2): one addmm.
    """
    half_sq = codebook.pow(2).sum(1).mul(-0.5)
    return torch.addmm(half_sq, x, codebook.t()).argmax(1)


def rotation_trick(e: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    """Rotation-trick estimator (Fifty et al. 2024). e, q [M, d] -> [M, d] equal to q in value.

    Forward: q (exactly). Backward: dL/de = (|q| / |e|) R^T dL/dq, where R = I - 2 r r^T + 2 q^ e^T
    (r = (e^ + q^) / |e^ + q^|) is the rotation taking e's direction onto q's; R and the scale are
    constants (stop-gradient), as in the paper.
    """
    e_norm = e.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    e_hat = (e / e_norm).detach()
    q_hat = (q / q_norm).detach()
    r = F.normalize(e_hat + q_hat, dim=-1, eps=eps)
    rotated = e - 2 * r * (r * e).sum(-1, keepdim=True) + 2 * q_hat * (e_hat * e).sum(-1, keepdim=True)
    scaled = rotated * (q_norm / e_norm).detach()
    return (scaled - scaled.detach()) + q.detach()


def kmeans_plusplus(x: Tensor, k: int) -> Tensor:
    """k-means++ seeding: k rows of x [M, d] drawn with probability ~ squared distance to the nearest
    seed so far. -> [k, d]."""
    centers = x.new_empty(k, x.shape[1])
    first = torch.randint(x.shape[0], (1,), device=x.device)
    centers[0] = x.index_select(0, first)[0]
    d2 = (x - centers[0]).pow(2).sum(1)
    for i in range(1, k):
        pick = torch.multinomial(d2 + 1e-20, 1)  # + tiny: uniform once every row is a seed
        centers[i] = x.index_select(0, pick)[0]
        d2 = torch.minimum(d2, (x - centers[i]).pow(2).sum(1))
    return centers


def kmeans(x: Tensor, k: int, iters: int, spherical: bool = False, sync: bool = True) -> tuple[Tensor, Tensor]:
    """k-means++ seeds, then ``iters`` Lloyd steps. x [M, d] -> (centers [k, d], counts [k]).

    With ``sync`` under DDP the seeds are rank 0's and every Lloyd step sums the per-cluster sums and
    counts over ranks, so all ranks fit the union of their data and end with the same centers. An empty
    cluster keeps its previous center. ``spherical``: centers are l2-normalised after every step. Only
    the seeding rank needs rows: x may be empty on the others.
    """
    world = ddp_world_size(sync)
    if world == 1 or dist.get_rank() == 0:
        seed_rows = x[torch.randperm(x.shape[0], device=x.device)[: 16 * k]]  # caps the sequential seeding
        centers = kmeans_plusplus(seed_rows, k)
        if spherical:
            centers = F.normalize(centers, dim=-1)
    else:
        centers = x.new_empty(k, x.shape[1])
    if world > 1:
        dist.broadcast(centers, src=0)
    ones = x.new_ones(x.shape[0])
    for step in range(iters + 1):
        assign = nearest_code(x, centers)
        stats = torch.cat([x.new_zeros(k, 1).index_add_(0, assign, ones[:, None]),
                           x.new_zeros(k, x.shape[1]).index_add_(0, assign, x)], dim=1)
        if world > 1:
            dist.all_reduce(stats)
        counts, sums = stats[:, 0], stats[:, 1:]
        if step == iters:  # last pass only counts the final assignment
            break
        means = sums / counts.clamp_min(1)[:, None]
        centers = torch.where(counts[:, None] > 0, means, centers)
        if spherical:
            centers = F.normalize(centers, dim=-1)
    return centers, counts


class CodeUsage(nn.Module):
    """Which codes a quantizer uses: per-step counts -> perplexity, usage, windowed usage, dead codes.

    Buffers (persistent, so they survive checkpoints): ``step`` (training steps counted), ``last_used``
    [K] and ``last_reset`` [K] (step a code was last used / (re)initialised). ``usage_counts`` [K] is a
    non-persistent running histogram of the tokens this process has quantized since ``reset()``.
    """

    def __init__(self, num_codes: int, window: int, dead_code_steps: int):
        super().__init__()
        self.window = window
        self.dead_code_steps = dead_code_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((num_codes,), _NEVER, dtype=torch.long))
        self.register_buffer("last_reset", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("usage_counts", torch.zeros(num_codes), persistent=False)

    @torch.no_grad()
    def count(self, counts: Tensor) -> None:
        """Add counts [K] (tokens per code) to the histogram."""
        self.usage_counts.add_(counts)

    @torch.no_grad()
    def advance(self, counts: Tensor) -> None:
        """One training step that used the codes with counts [K] > 0."""
        self.step.add_(1)
        self.last_used.copy_(torch.where(counts > 0, self.step, self.last_used))

    def dead(self) -> Tensor:
        """[K] bool: codes neither used nor reset for the last ``dead_code_steps`` steps."""
        return self.step - torch.maximum(self.last_used, self.last_reset) >= self.dead_code_steps

    @torch.no_grad()
    def mark_reset(self, which: Tensor) -> None:
        """Start the dead-code clock again for the codes where which [K] is True."""
        self.last_reset.copy_(torch.where(which, self.step, self.last_reset))

    def stats(self, counts: Tensor, dead: Tensor) -> dict[str, Tensor]:
        """Detached float scalars from this batch's counts [K] and the dead mask [K]."""
        p = counts / counts.sum().clamp_min(1)
        return {
            "perplexity": torch.special.entr(p).sum().exp(),
            "usage": (counts > 0).float().mean(),
            "usage_window": (self.step - self.last_used < self.window).float().mean(),
            "dead_codes": dead.sum().float(),
        }

    def reset(self) -> None:
        """Zero the histogram."""
        self.usage_counts.zero_()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with one codebook [K, d] (see the module docstring).

    Args:
        num_codes: K, the codebook size.
        dim: D, the size of the vectors given to ``forward`` and returned by it and by ``lookup``.
        code_dim: quantize in a smaller space (factorized codes): Linear D -> code_dim before, code_dim
            -> D after. ``None`` (default) quantizes in D directly.
        beta: commitment weight: ``beta * ||x - sg(q)||^2`` trains the encoder.
        use_ema: update the codebook by exponential moving averages (codebook held as buffers); if
            False, the codebook is a Parameter trained by the codebook loss ``||sg(x) - q||^2``.
        decay: EMA decay in (0, 1).
        eps: Laplace-smoothing constant for the EMA cluster sizes (> 0).
        use_cosine: compare l2-normalised inputs and codes (cosine similarity) instead of raw L2.
        kmeans_init: initialise the codebook by k-means++ / Lloyd on the first training batches.
        kmeans_iters: Lloyd iterations of that initialisation.
        kmeans_init_batches: how many training batches' (valid) tokens the initialisation pools.
        dead_code_steps: a code unused for this many training steps is dead (reported in ``dead_codes``
            and, with ``restart_dead_codes``, restarted).
        restart_dead_codes: replace dead codes by recent encoder outputs.
        restart_buffer_size: how many recent encoder outputs are kept to restart codes from.
        balance_calls: every call of ``forward`` (one task's batch: one modality) weighs the same in the
            k-means initialisation (each of the ``kmeans_init_batches`` pooled batches is subsampled to
            the smallest one's valid tokens) and in the restart buffer (every call writes
            ``restart_buffer_size / 4`` rows, drawn with replacement), whatever its token count; by
            default both follow the token counts, and a modality with few tokens per batch (a second
            of speech is 25 tokens, a 32 px image 64) ends up with a small share of the codes. Set
            ``kmeans_init_batches`` to the number of tasks calling the quantizer per step with it.
        usage_window: the ``usage_window`` statistic counts codes used in this many recent steps.
        grad: ``"ste"`` (straight-through) or ``"rotation"`` (rotation trick) gradient to the encoder.
        sync_ddp: synchronise codebook statistics over a running process group (turn off only to test
            that the synchronisation matters).
    """

    def __init__(
        self,
        num_codes: int = 512,
        dim: int = 64,
        code_dim: int | None = None,
        beta: float = 0.25,
        use_ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        use_cosine: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        kmeans_init_batches: int = 1,
        dead_code_steps: int = 100,
        restart_dead_codes: bool = True,
        restart_buffer_size: int = 4096,
        balance_calls: bool = False,
        usage_window: int = 100,
        grad: Literal["ste", "rotation"] = "ste",
        sync_ddp: bool = True,
    ):
        super().__init__()
        _check(num_codes >= 2, "num_codes", num_codes, "an int >= 2")
        _check(dim >= 1, "dim", dim, "an int >= 1")
        _check(code_dim is None or code_dim >= 1, "code_dim", code_dim, "None or an int >= 1")
        _check(beta >= 0, "beta", beta, ">= 0")
        _check(0 < decay < 1, "decay", decay, "in (0, 1)")
        _check(eps > 0, "eps", eps, "> 0")
        _check(kmeans_iters >= 0, "kmeans_iters", kmeans_iters, "an int >= 0")
        _check(kmeans_init_batches >= 1, "kmeans_init_batches", kmeans_init_batches, "an int >= 1")
        _check(dead_code_steps >= 1, "dead_code_steps", dead_code_steps, "an int >= 1")
        _check(restart_buffer_size >= 1, "restart_buffer_size", restart_buffer_size, "an int >= 1")
        _check(usage_window >= 1, "usage_window", usage_window, "an int >= 1")
        _check(grad in ("ste", "rotation"), "grad", grad, "'ste' or 'rotation'")
        self.num_codes = num_codes
        self.dim = dim
        self.code_dim = code_dim or dim
        self.beta = beta
        self.use_ema = use_ema
        self.decay = decay
        self.eps = eps
        self.use_cosine = use_cosine
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.kmeans_init_batches = kmeans_init_batches
        self.restart_dead_codes = restart_dead_codes
        self.restart_buffer_size = restart_buffer_size
        self.balance_calls = balance_calls
        self.grad = grad
        self.sync_ddp = sync_ddp

        factorized = code_dim is not None and code_dim != dim
        self.project_in = nn.Linear(dim, self.code_dim) if factorized else nn.Identity()
        self.project_out = nn.Linear(self.code_dim, dim) if factorized else nn.Identity()

        codebook = torch.randn(num_codes, self.code_dim)
        if use_cosine:
            codebook = F.normalize(codebook, dim=-1)
        if use_ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_cluster_size", torch.ones(num_codes))
            self.register_buffer("ema_embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.usage = CodeUsage(num_codes, usage_window, dead_code_steps)
        # Recent encoder outputs to restart dead codes from: a ring buffer made on first use, and the
        # quantizer's own random generator for the restart draws. Both travel in the state dict as
        # extra state (checkpointed, so a resumed run restarts the same codes as an uninterrupted
        # one) and are not buffers (DDP does not re-broadcast them every step).
        self._recent: Tensor | None = None
        self._recent_filled = 0
        self._recent_ptr = 0
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._init_done = not kmeans_init  # host-side copy of `initialized`: no device sync per step
        self._init_data: list[Tensor] = []
        self.register_load_state_dict_post_hook(_refresh_init_flag)

    # ------------------------------------------------------------------ lookups

    def codes_in_use(self) -> Tensor:
        """The effective codebook [K, code_dim] (l2-normalised when ``use_cosine``)."""
        return F.normalize(self.codebook, dim=-1) if self.use_cosine else self.codebook

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [...] long -> vectors [..., D] (after the output projection)."""
        return self.project_out(F.embedding(codes, self.codes_in_use()))

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Nearest codes only, never updating anything. z [..., D] -> codes [...] long."""
        x = self._to_code_space(z)
        return nearest_code(x.reshape(-1, self.code_dim), self.codes_in_use()).view(x.shape[:-1])

    def code_usage_counts(self) -> Tensor:
        """[K] tokens per code quantized by this process since the last ``reset_usage()`` (a copy)."""
        return self.usage.usage_counts.clone()

    def reset_usage(self) -> None:
        """Zero the per-code usage histogram."""
        self.usage.reset()

    # ------------------------------------------------------------------ forward

    def forward(self, z: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """z [B, N, D], mask [B, N] bool (True = valid) or None ->
        (quantized [B, N, D], codes [B, N] long, loss [], stats {name: detached []})."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer(dim={self.dim}) got z of shape {tuple(z.shape)}")
        if mask is not None and mask.shape != z.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match z shape {tuple(z.shape[:-1])}")
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA sums in float32
            return self._quantize(z, mask)

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        x = self._to_code_space(z)
        flat = x.reshape(-1, self.code_dim)
        valid = None if mask is None else mask.reshape(-1).to(flat.dtype)
        sync = ddp_world_size(self.sync_ddp) > 1

        if self.training and not self._init_done:
            self._collect_for_init(flat.detach(), mask, sync)

        codebook = self.codes_in_use()
        with torch.no_grad():
            codes = nearest_code(flat.detach(), codebook)
        q = F.embedding(codes, codebook)

        # losses: mean over valid tokens and channels
        weight = 1.0 if valid is None else valid[:, None]
        denom = flat.shape[1] * (flat.shape[0] if valid is None else valid.sum().clamp_min(1))
        commit = ((flat - q.detach()).pow(2) * weight).sum() / denom
        loss = self.beta * commit
        if not self.use_ema:
            loss = loss + ((flat.detach() - q).pow(2) * weight).sum() / denom

        if self.grad == "rotation":
            out = rotation_trick(flat, q)
        else:
            out = (flat - flat.detach()) + q.detach()  # exactly q in value, identity gradient to x

        counts = flat.new_zeros(self.num_codes).index_add_(
            0, codes, valid if valid is not None else flat.new_ones(flat.shape[0]))
        self.usage.count(counts)
        if self.training and self._init_done:
            counts, dead = self._update(flat.detach(), codes, counts, valid, sync)
        else:
            dead = self.usage.dead()

        stats = self.usage.stats(counts, dead)
        stats["commit_loss"] = commit.detach()
        quantized = self.project_out(out.view(x.shape)).to(z.dtype)
        return quantized, codes.view(x.shape[:-1]), loss, stats

    def _to_code_space(self, z: Tensor) -> Tensor:
        x = self.project_in(z.float())
        return F.normalize(x, dim=-1) if self.use_cosine else x

    # ------------------------------------------------------------------ training-time updates

    @torch.no_grad()
    def _collect_for_init(self, flat: Tensor, mask: Tensor | None, sync: bool) -> None:
        """Pool valid tokens of the first ``kmeans_init_batches`` batches, then fit k-means to them."""
        self._init_data.append(flat if mask is None else flat[mask.reshape(-1)])
        if len(self._init_data) < self.kmeans_init_batches:
            return
        chunks = self._init_data
        if self.balance_calls:  # every pooled batch contributes as many tokens as the smallest
            smallest = min(c.shape[0] for c in chunks)
            rng = self._rng(chunks[0].device)
            chunks = [c[torch.randperm(c.shape[0], device=c.device, generator=rng)[:smallest]] for c in chunks]
        data = torch.cat(chunks)
        rows = torch.tensor([data.shape[0]], device=data.device)
        if sync:
            dist.broadcast(rows, src=0)  # the seeds come from rank 0: it must have data
        if int(rows) == 0:
            return  # all padding so far: keep pooling
        self._init_data = []
        centers, counts = kmeans(data, self.num_codes, self.kmeans_iters, self.use_cosine, sync)
        if sync:
            dist.broadcast(centers, src=0)
        self.codebook.data.copy_(centers)
        if self.use_ema:
            # cluster sizes on the scale of one batch, at least 1, so that no code jumps to zero
            world = ddp_world_size(sync)
            size = (counts / (self.kmeans_init_batches * world)).clamp_min(1)
            self.ema_cluster_size.copy_(size)
            self.ema_embed_sum.copy_(centers * size[:, None])
        self.usage.mark_reset(torch.ones_like(self.usage.last_reset, dtype=torch.bool))
        self.initialized.fill_(True)
        self._init_done = True

    @torch.no_grad()
    def _update(self, flat: Tensor, codes: Tensor, counts: Tensor, valid: Tensor | None,
                sync: bool) -> tuple[Tensor, Tensor]:
        """EMA step, usage clock and dead-code restart. Returns (global counts [K], dead [K] before restart).

        Under DDP one all_reduce carries [counts | sums | restart candidates]: candidates are rank 0's
        (zeros elsewhere), so the sum is a broadcast and every rank restarts with the same vectors.
        """
        parts = [counts[:, None]]
        if self.use_ema:
            sums = flat.new_zeros(self.num_codes, self.code_dim).index_add_(
                0, codes, flat if valid is None else flat * valid[:, None])
            parts.append(sums)
        if self.restart_dead_codes:
            self._remember(flat, valid)
            pick = torch.randint(self._recent_filled, (self.num_codes,), device=flat.device,
                                 generator=self._rng(flat.device))
            candidates = self._recent[pick]
            if sync and dist.get_rank() != 0:
                candidates = torch.zeros_like(candidates)
            parts.append(candidates)
        payload = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if sync:
            dist.all_reduce(payload)
        counts = payload[:, 0]

        if self.use_ema:
            sums = payload[:, 1 : 1 + self.code_dim]
            self.ema_cluster_size.lerp_(counts, 1 - self.decay)
            self.ema_embed_sum.lerp_(sums, 1 - self.decay)
            n = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
            new = self.ema_embed_sum / smoothed[:, None]
            self.codebook.copy_(F.normalize(new, dim=-1) if self.use_cosine else new)

        self.usage.advance(counts)
        dead = self.usage.dead()
        if self.restart_dead_codes:
            candidates = payload[:, -self.code_dim :]
            gate = dead[:, None]
            self.codebook.data.copy_(torch.where(gate, candidates, self.codebook.data))
            if self.use_ema:
                self.ema_cluster_size.copy_(torch.where(dead, 1.0, self.ema_cluster_size))
                self.ema_embed_sum.copy_(torch.where(gate, candidates, self.ema_embed_sum))
            self.usage.mark_reset(dead)
        return counts, dead

    def _rng(self, device: torch.device) -> torch.Generator:
        """The restart draws' generator on ``device``: seeded from torch's initial seed (so
        ``seed_everything`` fixes it), or restored from a checkpoint."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
            else:
                self._generator.manual_seed(torch.initial_seed() % 2**63)
        return self._generator

    def get_extra_state(self) -> dict[str, Any]:
        filled = self._recent_filled if self._recent is not None else 0
        return {
            "recent": self._recent[:filled].detach().cpu().clone() if filled else torch.zeros(0, self.code_dim),
            "ptr": self._recent_ptr,
            "rng": self._generator.get_state() if self._generator is not None else self._generator_state,
        }

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # checkpoints written before the restart state was saved: start it afresh instead of failing
        # (load_state_dict hands every module its own copy of the dict)
        state_dict.setdefault(prefix + "_extra_state", {"recent": None, "ptr": 0, "rng": None})
        super()._load_from_state_dict(state_dict, prefix, *args)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        recent = state.get("recent")
        self._recent, self._recent_filled, self._recent_ptr = None, 0, int(state.get("ptr", 0))
        if recent is not None and recent.numel():
            self._recent = recent.new_zeros(self.restart_buffer_size, self.code_dim)
            self._recent[: recent.shape[0]] = recent
            self._recent_filled = recent.shape[0]
        self._generator, self._generator_state = None, state.get("rng")

    @torch.no_grad()
    def _remember(self, flat: Tensor, valid: Tensor | None) -> None:
        """Write a random sample of this batch's valid tokens into the ring buffer of recent outputs."""
        if self._recent is None:
            self._recent = flat.new_zeros(self.restart_buffer_size, self.code_dim)
            self._recent_filled = self._recent_ptr = 0
        elif self._recent.device != flat.device or self._recent.dtype != flat.dtype:
            self._recent = self._recent.to(flat.device, flat.dtype)  # e.g. restored on CPU, trained on GPU
        m = max(1, self.restart_buffer_size // 4)
        if not self.balance_calls:  # a batch's share of the buffer follows its token count
            m = min(flat.shape[0], m)
        rng = self._rng(flat.device)
        if valid is None:
            rows = torch.randint(flat.shape[0], (m,), device=flat.device, generator=rng)
        else:  # sample valid rows; uniform over all rows if none is valid (no host sync either way)
            rows = torch.multinomial(valid + (valid.sum() == 0).to(valid.dtype), m, replacement=True, generator=rng)
        slots = (torch.arange(m, device=flat.device) + self._recent_ptr) % self.restart_buffer_size
        self._recent.index_copy_(0, slots, flat[rows])
        self._recent_ptr = (self._recent_ptr + m) % self.restart_buffer_size
        self._recent_filled = min(self._recent_filled + m, self.restart_buffer_size)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, code_dim={self.code_dim}, beta={self.beta}, "
                f"use_ema={self.use_ema}, decay={self.decay}, use_cosine={self.use_cosine}, grad={self.grad!r}")


def _refresh_init_flag(module: VectorQuantizer, incompatible_keys) -> None:
    """After load_state_dict, trust the loaded ``initialized`` buffer."""
    module._init_done = bool(module.initialized)
    module._init_data = []


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
