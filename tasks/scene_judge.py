"""The scene judge: reads every object of an image back (where it is, and each attribute), and scores
a generated image against the objects its caption described, GenEval-style.

GenEval (Ghosh et al. 2023) checks a text-to-image sample with an object detector: the right number
of objects, each named object present with its colour, the stated position relation. No detector is
available offline, so this is the project's own: :class:`SceneJudge`, a small CenterNet-style network
(Zhou et al. 2019, "Objects as Points") trained inside the generation head on the REAL images and
their scene annotations (batch key ``objects``, ``datamodules/decode.py``), its loss never reaching
the trunk. Per cell of a stride-4 grid it predicts whether an object's centre lies in the cell, the
centre's offset inside the cell, and a class per attribute (shape, colour, size for the demo shapes).

:func:`score_scenes` matches the detections of each image to the described objects (Hungarian
assignment, scipy, on agreeing attributes, then distance) and counts, per caption:

``count``      as many objects detected as described;
``<attr>``     per described object: its matched detection has that attribute value (an object left
               unmatched is wrong in every attribute);
``relation``   per described object after the first: the first object lies on the same side of it as
               in the described scene (left/right/above/below along the axis the offset is longest on;
               the demo captions state exactly these relations), judged from the matched detections;
``all``        all of the above right at once (GenEval's per-prompt score).

:class:`SceneScores` accumulates them per group: captions of 1, 2, 3 and 4+ objects, and those with an
attribute combination the training split never holds (``unseen``) or not (``seen``); optionally also the
one-object captions by the value of one attribute (``breakdown``: e.g. small vs large objects).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchmetrics import Metric

STRIDE = 4
GROUPS = ("1_object", "2_objects", "3_objects", "4+_objects", "seen", "unseen")


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]


class SceneJudge(nn.Module):
    """x [B, C, H, W] (H, W multiples of 4) -> per-cell maps on the [H/4, W/4] grid.

    Geometry body: conv stages of width w (stride 1), 2w (stride 2), 4w (stride 2), then three 4w convs
    at stride 4 (receptive field 45 px: a 32 px scene whole); 1x1 heads: objectness logit, centre
    offset (2, through a sigmoid: position inside the cell), logits for each attribute but colour.
    Colour pathway (attribute ``colour``, when there is one): two convs on the image itself (stride
    4, then 3x3 at the cell grid) and a 1x1 head.

    Why two pathways: the judge learns from the training split, which holds out attribute
    combinations on purpose. One network learns the shortcut "purple, so not a circle" and then
    misreads the very combinations the test is about (its shape accuracy on held-out combinations
    was 0.73 against 0.94 on seen ones, one network, 600 steps: ``scripts/scene_probe.py``). So the
    geometry body is trained on images whose colour channels are randomly permuted and inverted (shapes, sizes and positions
    stay; colours no longer predict them), and colour is read by its own small pathway. Without a
    colour attribute (``colour_index`` None) there is one network and no recolouring
    (``scripts/scene_probe.py`` compares the two).
    Default PyTorch init but the objectness bias, set to -4.6 (sigmoid 0.01: cells are mostly empty).
    """

    def __init__(self, in_channels: int, attribute_sizes: list[int], width: int = 32,
                 colour_index: int | None = None) -> None:
        super().__init__()
        if not attribute_sizes or min(attribute_sizes) < 1:
            raise ValueError(f"scene judge needs at least one attribute with values, got {attribute_sizes}")
        w = width
        self.body = nn.Sequential(*_block(in_channels, w, 1), *_block(w, 2 * w, 2), *_block(2 * w, 4 * w, 2),
                                  *_block(4 * w, 4 * w, 1), *_block(4 * w, 4 * w, 1), *_block(4 * w, 4 * w, 1))
        self.attribute_sizes, self.colour_index = list(attribute_sizes), colour_index
        geometry = [k for j, k in enumerate(attribute_sizes) if j != colour_index]
        self.head = nn.Conv2d(4 * w, 3 + sum(geometry), 1)
        nn.init.constant_(self.head.bias[0], -4.6)
        if colour_index is not None:
            self.colour = nn.Sequential(*_block(in_channels, w, 4), *_block(w, w, 1),
                                        nn.Conv2d(w, attribute_sizes[colour_index], 1))

    def forward(self, x: Tensor, geometry_input: Tensor | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """-> objectness logits [B, h, w], offsets [B, 2, h, w] in [0, 1], attribute logits [B, K_a, h, w]
        each (in attribute order). ``geometry_input`` (training: the recoloured x) feeds the geometry body."""
        out = self.head(self.body(x if geometry_input is None else geometry_input))
        sizes = [k for j, k in enumerate(self.attribute_sizes) if j != self.colour_index]
        attrs = list(out[:, 3:].split(sizes, dim=1))
        if self.colour_index is not None:
            attrs.insert(self.colour_index, self.colour(x))
        return out[:, 0], out[:, 1:3].sigmoid(), attrs

    @staticmethod
    def recolour(x: Tensor) -> Tensor:
        """Per image, a random permutation of the colour channels and, with p = 0.5, inverted values."""
        perm = torch.stack([torch.randperm(x.shape[1], device=x.device) for _ in range(len(x))])
        out = x.gather(1, perm[:, :, None, None].expand_as(x))
        flip = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
        return torch.where(flip, -out, out)

    def loss(self, x: Tensor, objects: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """BCE on objectness (every cell), L1 on the centre offset and cross-entropy per attribute at
        the cells holding a centre. ``objects`` [B, K, 2 + A] as from the decoder (padding rows -1)."""
        recolour = self.colour_index is not None and x.shape[1] > 1  # colour read apart: the body need not
        logit, offset, attrs = self(x, self.recolour(x) if recolour else x)
        b, h, w = logit.shape
        real = objects[..., 2] >= 0
        bi, ki = real.nonzero(as_tuple=True)
        xy = objects[bi, ki, :2].clamp(0.0, 1.0 - 1e-6) * torch.tensor([w, h], device=x.device)
        cx, cy = xy[:, 0].long(), xy[:, 1].long()
        target = torch.zeros_like(logit, dtype=torch.float32)
        target[bi, cy, cx] = 1.0
        obj_loss = F.binary_cross_entropy_with_logits(logit.float(), target, pos_weight=target.new_tensor(10.0))
        off_loss = (offset[bi, :, cy, cx].float() - (xy - xy.floor())).abs().mean()
        attr_losses = [F.cross_entropy(a[bi, :, cy, cx].float(), objects[bi, ki, 2 + j].long())
                       for j, a in enumerate(attrs)]
        loss = obj_loss + off_loss + sum(attr_losses)
        with torch.no_grad():
            hit = torch.stack([(a[bi, :, cy, cx].argmax(1) == objects[bi, ki, 2 + j].long()).float().mean()
                               for j, a in enumerate(attrs)]).min()
        return loss, {"objectness": obj_loss.detach(), "attributes": sum(attr_losses).detach(), "attr_acc_min": hit}

    @torch.no_grad()
    def detect(self, x: Tensor, threshold: float = 0.5) -> list[Tensor]:
        """Objects found in each image: a list of B tensors [n_i, 2 + A] in the decoder's row format.

        A detection is a cell whose objectness probability exceeds ``threshold`` and is the largest of
        its 3x3 neighbourhood (CenterNet's max-pool peak picking)."""
        logit, offset, attrs = self(x.float())
        prob = logit.float().sigmoid()
        peak = (prob == F.max_pool2d(prob[:, None], 3, 1, 1)[:, 0]) & (prob > threshold)
        h, w = prob.shape[1:]
        found = []
        for i in range(len(x)):
            cy, cx = peak[i].nonzero(as_tuple=True)
            rows = [(cx + offset[i, 0, cy, cx].float()) / w, (cy + offset[i, 1, cy, cx].float()) / h]
            rows += [a[i, :, cy, cx].argmax(0).float() for a in attrs]
            found.append(torch.stack(rows, dim=1))
        return found


def _side(d: np.ndarray) -> tuple[int, float]:
    """The axis (0 = x, 1 = y) an offset is longest on, and its sign."""
    axis = int(abs(d[1]) > abs(d[0]))
    return axis, float(np.sign(d[axis]))


def score_scene(found: np.ndarray, described: np.ndarray) -> dict[str, float]:
    """One image: detections [m, 2 + A] against the described objects [n, 2 + A] ->
    ``{"count", "attr<j>", "relation", "all"}`` as fractions (attributes: over the n objects;
    relation: over the n - 1 relations, absent for one object); see the module docstring."""
    n, m, a = len(described), len(found), described.shape[1] - 2
    match = np.full(n, -1)
    if m:
        agree = (described[:, None, 2:] == found[None, :, 2:]).sum(-1)  # [n, m]
        dist = np.linalg.norm(described[:, None, :2] - found[None, :, :2], axis=-1)
        rows, cols = linear_sum_assignment(-(agree - 0.01 * dist))
        match[rows] = cols
    scores: dict[str, float] = {"count": float(m == n)}
    right = np.zeros((n, a), dtype=bool)
    for i in range(n):
        if match[i] >= 0:
            right[i] = described[i, 2:] == found[match[i], 2:]
    for j in range(a):
        scores[f"attr{j}"] = float(right[:, j].mean())
    relations_ok = []
    for i in range(1, n):
        if match[0] < 0 or match[i] < 0:
            relations_ok.append(False)
            continue
        axis, sign = _side(described[0, :2] - described[i, :2])
        d = found[match[0], :2] - found[match[i], :2]
        relations_ok.append(bool(np.sign(d[axis]) == sign and abs(d[axis]) > abs(d[1 - axis])))
    if relations_ok:
        scores["relation"] = float(np.mean(relations_ok))
    scores["all"] = float(m == n and right.all() and all(relations_ok))
    return scores


class SceneScores(Metric):
    """Mean of each :func:`score_scene` score per group of captions (:data:`GROUPS`) and over all.

    ``update(found: list of [m_i, 2 + A], described [B, K, 2 + A] (padding rows -1), unseen [B] bool)``;
    ``compute()`` -> ``{"{prefix}/{group}/{score}": value}`` for groups that had captions, scores named
    ``count``, each attribute's name, ``relation``, ``all``. ``breakdown = (attribute, value names)`` adds
    the groups ``1_object_{attribute}={value}``: the one-object captions whose object has that value.
    """

    full_state_update = False

    def __init__(self, attribute_names: list[str], prefix: str = "scene",
                 breakdown: tuple[str, list[str]] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attribute_names, self.prefix = list(attribute_names), prefix
        self.scores = ["count", *self.attribute_names, "relation", "all"]
        self.breakdown_column, self.groups = None, list(GROUPS)
        if breakdown is not None:
            name, values = breakdown
            if name not in self.attribute_names:
                raise ValueError(f"SceneScores: breakdown attribute {name!r} is not one of {self.attribute_names}")
            self.breakdown_column = self.attribute_names.index(name)
            self.groups += [f"1_object_{name}={value}" for value in values]
        self.groups.append("all_captions")
        shape = (len(self.groups), len(self.scores))
        self.add_state("sums", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, found: list[Tensor], described: Tensor, unseen: Tensor) -> None:
        described = described.detach().cpu().double().numpy()
        for i, det in enumerate(found):
            objects = described[i][described[i, :, 2] >= 0]
            raw = score_scene(det.detach().cpu().double().numpy(), objects)
            n = len(objects)
            groups = [min(n, 4) - 1, 4 + int(bool(unseen[i])), len(self.groups) - 1]
            if n == 1 and self.breakdown_column is not None:
                groups.append(len(GROUPS) + int(objects[0, 2 + self.breakdown_column]))
            for k, name in enumerate(self.scores):
                key = f"attr{k - 1}" if 1 <= k <= len(self.attribute_names) else name
                if key in raw:
                    for g in groups:
                        self.sums[g, k] += raw[key]
                        self.seen[g, k] += 1

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for g, group in enumerate(self.groups):
            for k, name in enumerate(self.scores):
                if self.seen[g, k] > 0:
                    out[f"{self.prefix}/{group}/{name}"] = (self.sums[g, k] / self.seen[g, k]).float()
        return out


def unseen_mask(described: Tensor, combinations: list[dict[int, int]]) -> Tensor:
    """[B] bool: the caption holds an object with a held-out combination. ``combinations``: each a
    ``{attribute column (0-based, after x and y): value index}``."""
    out = torch.zeros(described.shape[0], dtype=torch.bool, device=described.device)
    for combo in combinations:
        hit = torch.ones(described.shape[:2], dtype=torch.bool, device=described.device)
        for column, value in combo.items():
            hit &= described[..., 2 + column] == value
        out |= hit.any(1)
    return out


def heldout_indices(attributes: dict[str, list[str]], heldout: list[dict[str, str]]) -> list[dict[int, int]]:
    """info.json's held-out combinations ``[{attribute: value name}]`` -> ``[{attribute column: value index}]``
    for :func:`unseen_mask`, against the data's ``attributes`` ``{name: [value names]}`` (in column order)."""
    names = list(attributes)
    return [{names.index(k): attributes[k].index(v) for k, v in combo.items()} for combo in heldout]
