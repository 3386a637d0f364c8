"""A scene map read off the trunk's hidden states while it denoises: where each object is and what it is.

Why: the caption -> image trunk learns every attribute of a described object but its shape (README,
caption -> image: colour, size, place and relation right, shape at chance), although the shape is
still in the noisy latent where it has to be decided (``scripts/ideal_observer.py``). This module
asks, at one block of the trunk, for a map over the image tokens of the ``B`` scenes being denoised:

    objectness  [B, N']         a Gaussian bump (std ``sigma`` tokens) on each object's centre, soft BCE
    attribute a [B, N', n_a]    the attributes of the object nearest each token, cross-entropy weighted
                                by that object's bump (so a token between objects counts little)

from the hidden states of that block at the image tokens (the last N' = (h/p) * (w/p) tokens of the
sequence, the caption's tokens coming first). ``probe``: the states are detached, so the map is a
linear probe of what the trunk already knows (no gradient reaches it); ``supervise``: the loss
trains the trunk too, an auxiliary objective in the spirit of REPA (Yu et al. 2024, which aligns an
early block with a pretrained encoder; here the target is the scene annotation the data already has,
so nothing is downloaded).

Reported per quarter of the time range (``<attribute>_acc_q0`` = least noisy): the accuracy of each
attribute at the token under each object's centre. Written here: no library offers a scene-map
probe over a DiT's tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from tasks.metrics import update_fp32

MODES = ("off", "probe", "supervise")


def object_bumps(objects: Tensor, grid: tuple[int, int], sigma: float) -> Tensor:
    """objects [B, K, 2 + A] (centres x, y in [0, 1], padding rows -1) -> bumps [B, N, K] in [0, 1]:
    exp(-d^2 / 2 sigma^2) for d the distance in tokens from token n's centre (row-major grid
    ``(h, w)``) to object k's centre; 0 for padding rows."""
    h, w = grid
    device = objects.device
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5).repeat_interleave(w)  # [N], token units
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5).repeat(h)
    ox, oy = objects[..., 0].float() * w, objects[..., 1].float() * h  # [B, K]
    d2 = (xs[None, :, None] - ox[:, None, :]).square() + (ys[None, :, None] - oy[:, None, :]).square()
    real = (objects[..., 2] >= 0)[:, None, :]
    return torch.exp(-d2 / (2 * sigma**2)) * real


def centre_tokens(objects: Tensor, grid: tuple[int, int]) -> Tensor:
    """objects [B, K, 2 + A] -> the row-major index [B, K] of the token under each object's centre."""
    h, w = grid
    col = (objects[..., 0].float() * w).long().clamp(0, w - 1)
    row = (objects[..., 1].float() * h).long().clamp(0, h - 1)
    return row * w + col


def scene_map_metrics(attributes: dict[str, int]) -> dict[str, MeanMetric]:
    """Evaluation metrics: the map's loss, each attribute's accuracy at the objects' centres over all
    times and per quarter of the time range (a batch may have no object in a quarter: weighted means)."""
    metrics = {f"scene_map/{name}_acc{q}": MeanMetric() for name in attributes for q in ("", "_q0", "_q1", "_q2", "_q3")}
    return {**metrics, "scene_map/loss": MeanMetric()}


class SceneMap(nn.Module):
    """A linear read-out of a trunk block's image tokens: [B, N', hidden] -> objectness [B, N'] and one
    logit vector per attribute [B, N', n_a].

    Args:
        hidden_size: the trunk's width.
        attributes: ``{name: number of values}``, in the data's column order of ``objects``.
        layer: the block (1-based) whose output is read.
        mode: ``probe`` (detached: measures) or ``supervise`` (trains the trunk).
        sigma: the bumps' std in tokens (of the patchified grid).
    """

    def __init__(self, hidden_size: int, attributes: dict[str, int], layer: int = 2,
                 mode: str = "probe", sigma: float = 1.0) -> None:
        super().__init__()
        if mode not in MODES[1:]:
            raise ValueError(f"scene map: mode must be one of {MODES[1:]}, got {mode!r}")
        if not attributes:
            raise ValueError("scene map: needs the scene attributes (scene_attributes)")
        if layer < 1 or sigma <= 0:
            raise ValueError(f"scene map: layer must be >= 1 and sigma > 0, got layer={layer}, sigma={sigma}")
        self.attributes = dict(attributes)
        self.layer, self.mode, self.sigma = layer, mode, sigma
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)  # the trunk's states grow in scale
        self.out = nn.Linear(hidden_size, 1 + sum(self.attributes.values()))
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)
        self._captured: list[Tensor] = []
        self.last_hits: dict[str, Tensor] = {}  # the last loss's per-object results, for evaluation metrics

    @contextmanager
    def capture(self, trunk: nn.Module) -> Iterator[None]:
        """Within: the last output of block ``layer`` of ``trunk`` is kept: the pass the loss is on (a
        self-conditioned trunk runs a no-grad pass first; an activation-checkpoint recompute happens in
        backward, after the context)."""
        blocks = trunk.blocks
        if self.layer > len(blocks):
            raise ValueError(f"scene map: layer={self.layer} but the trunk has {len(blocks)} blocks")
        self._captured = []

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._captured[:] = [output]

        handle = blocks[self.layer - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def update_metrics(self, metrics: MetricCollection) -> None:
        """Add the last :meth:`loss`'s results to :func:`scene_map_metrics`'s metrics."""
        hits = self.last_hits
        update_fp32(metrics["scene_map/loss"], hits["loss"])
        for name in self.attributes:
            update_fp32(metrics[f"scene_map/{name}_acc"], hits[name].float(), hits["real"].float())
            for q in range(4):
                sel = hits["real"] & (hits["quarter"] == q)
                update_fp32(metrics[f"scene_map/{name}_acc_q{q}"], hits[name].float(), sel.float())

    def forward(self, h: Tensor) -> tuple[Tensor, list[Tensor]]:
        """h [B, N', hidden] -> (objectness logits [B, N'], [logits [B, N', n_a] per attribute])."""
        out = self.out(self.norm(h.float()))
        return out[..., 0], list(out[..., 1:].split(list(self.attributes.values()), dim=-1))

    def loss(self, objects: Tensor, grid: tuple[int, int], t_frac: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The map's loss on the captured states. objects [B, K, 2 + A]; grid the PATCHIFIED image grid
        (h/p, w/p); t_frac [B] the time fraction of each sample (0 = clean). Returns (loss, logs); logs
        hold ``<attribute>_acc_q<q>`` only in training (a batch may have no object in a quarter: under
        DDP every rank must log the same keys at evaluation, so evaluation reads ``last_hits``:
        ``quarter`` [B, K], per attribute ``right`` [B, K] bool (padding rows never right), ``real``
        [B, K] and ``loss``)."""
        if not self._captured:
            raise RuntimeError(f"scene map: block {self.layer} did not run inside capture()")
        n = grid[0] * grid[1]
        h = self._captured[0][:, -n:]  # the image tokens come last, after the condition's
        self._captured = []
        if self.mode == "probe":
            h = h.detach()
        objectness, logits = self(h)
        bumps = object_bumps(objects, grid, self.sigma)  # [B, N, K]
        weight, nearest = bumps.max(dim=-1)  # [B, N]
        obj_loss = F.binary_cross_entropy_with_logits(objectness, weight)
        logs: dict[str, Tensor] = {"objectness_loss": obj_loss.detach()}
        loss = obj_loss
        centre = centre_tokens(objects, grid)  # [B, K]
        real = objects[..., 2] >= 0  # [B, K]
        quarter = (t_frac.float() * 4).long().clamp(0, 3)[:, None].expand_as(real)
        self.last_hits = {"real": real, "quarter": quarter}
        for j, (name, logit) in enumerate(zip(self.attributes, logits)):
            values = objects[..., 2 + j].long()  # [B, K]
            target = values.gather(1, nearest).clamp(min=0)  # [B, N]: the nearest object's value
            ce = F.cross_entropy(logit.transpose(1, 2), target, reduction="none")  # [B, N]
            loss = loss + (ce * weight).sum() / weight.sum().clamp(min=1e-6)
            with torch.no_grad():
                at_centre = logit.gather(1, centre[..., None].expand(-1, -1, logit.shape[-1])).argmax(-1)
                right = (at_centre == values) & real  # [B, K]
                logs[f"{name}_acc"] = right.sum() / real.sum().clamp(min=1)
                self.last_hits[name] = right
                for q in range(4 if self.training else 0):
                    sel = real & (quarter == q)
                    if sel.any():  # no object in this quarter in this batch: no value (not a 0)
                        logs[f"{name}_acc_q{q}"] = (right & sel).sum() / sel.sum()
        logs["loss"] = self.last_hits["loss"] = loss.detach()
        return loss, logs
