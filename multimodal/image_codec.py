"""Image codec: a ResNet conv encoder/decoder between images and a grid of D-dimensional tokens.

    encode: image [B, C, H, W] in [-1, 1] -> z [B, N, D],  N = (H / f) * (W / f), row-major
    decode: z [B, N, D] -> image [B, C, H, W]

The token sequence feeds the shared VectorQuantizer (code dimension D = ``code_dim``), so images and
audio live in one codebook. Initialisation is described in ``multimodal.layers``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from multimodal.layers import (
    ConvDecoder,
    ConvEncoder,
    check_groups,
    downsample_factor_levels,
    level_channels,
    resolve_preset,
)

IMAGE_PRESETS: dict[str, dict] = {
    # unit tests
    "tiny": dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, code_dim=16, norm_groups=4),
    # CPU training: 32x32 -> 8x8 tokens at f = 4 in ~26 GFLOP per forward+backward of 32 images
    "small": dict(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, code_dim=32, norm_groups=8),
    # GPU training
    "base": dict(channels=128, channel_mult=(1, 2, 4), num_res_blocks=2, code_dim=64, norm_groups=32),
}
DOWNSAMPLE_FACTORS = (2, 4, 8)

IMAGE_SIZES: dict[int, dict[str, int]] = {
    # image side -> down-sampling f and the DiT patch size p; tokens = (side / f / p)^2
    32: dict(downsample=4, patch_size=2),   # 8 x 8 grid -> 16 DiT tokens: the CPU recipes
    64: dict(downsample=4, patch_size=2),   # 16 x 16 grid -> 64 DiT tokens: still a CPU size
    128: dict(downsample=8, patch_size=2),  # 16 x 16 grid -> 64 DiT tokens (f = 8: LDM's f8 setting)
    256: dict(downsample=8, patch_size=2),  # 32 x 32 grid -> 256 DiT tokens: DiT-*/2 at 256 px, a GPU size
}
"""The sizes the recipes are written for (``configs/image_size/<side>.yaml`` sets them); any side
divisible by f works."""


class ImageCodec(nn.Module):
    """ResNet image encoder/decoder speaking token sequences.

    Args:
        preset: "tiny" | "small" | "base" (see ``IMAGE_PRESETS``); the explicit arguments below that
            are None are taken from it.
        in_channels: 3 (RGB) or 1 (grey).
        image_size: H = W, or (H, W); both divisible by ``downsample``. Fixes the token grid.
        downsample: f = 2, 4 or 8, the side of the square of pixels one token covers (f = 2 keeps the
            outline of objects a few pixels wide, e.g. the demo shapes at 32 px; pair it with DiT patch 4).
        channels, channel_mult, num_res_blocks, norm_groups: encoder/decoder width and depth, see
            ``multimodal.layers.ConvEncoder``; ``norm_groups`` must divide every level's width.
        code_dim: D, the token dimension shared with the quantizer and the audio codec.

    ``decode`` returns unbounded values (no tanh): the reconstruction loss pulls them into [-1, 1];
    clamp to [-1, 1] before displaying or saving.
    """

    def __init__(
        self,
        preset: str = "small",
        in_channels: int = 3,
        image_size: int | Sequence[int] = 32,
        downsample: int = 4,
        channels: int | None = None,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int | None = None,
        code_dim: int | None = None,
        norm_groups: int | None = None,
    ):
        super().__init__()
        cfg = resolve_preset(
            IMAGE_PRESETS, preset, "ImageCodec",
            channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            code_dim=code_dim, norm_groups=norm_groups,
        )  # fmt: skip
        if in_channels not in (1, 3):
            raise ValueError(f"ImageCodec: in_channels must be 1 or 3, got {in_channels!r}")
        num_down = downsample_factor_levels(downsample, DOWNSAMPLE_FACTORS, "ImageCodec: downsample")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(s < downsample or s % downsample for s in size):
            raise ValueError(
                f"ImageCodec: image_size must be an int or (H, W) divisible by downsample={downsample}, "
                f"got {image_size!r}"
            )
        if cfg["code_dim"] < 1:
            raise ValueError(f"ImageCodec: code_dim must be positive, got {cfg['code_dim']!r}")
        widths = level_channels(cfg["channels"], cfg["channel_mult"], num_down)
        check_groups(cfg["norm_groups"], widths, "ImageCodec: norm_groups")

        self.preset, self.in_channels, self.downsample = preset, in_channels, downsample
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.code_dim: int = cfg["code_dim"]
        self.config = cfg
        common = dict(
            dims=2, channels=cfg["channels"], channel_mult=tuple(cfg["channel_mult"]),
            num_res_blocks=cfg["num_res_blocks"], num_groups=cfg["norm_groups"],
        )  # fmt: skip
        self.encoder = ConvEncoder(
            in_channels=in_channels, out_channels=self.code_dim, num_down=num_down, **common
        )
        self.decoder = ConvDecoder(
            in_channels=self.code_dim, out_channels=in_channels, num_up=num_down, **common
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) = (H / f, W / f), the token grid."""
        return self.image_size[0] // self.downsample, self.image_size[1] // self.downsample

    @property
    def num_tokens(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def last_layer_weight(self) -> Tensor:
        """The decoder's final conv weight [C, width, 3, 3] (for the adaptive GAN loss weight)."""
        return self.decoder.conv_out.weight

    def encode(self, image: Tensor) -> Tensor:
        """image [B, C, H, W] in [-1, 1] -> z [B, h * w, D]; token i * w + j covers grid cell (i, j)."""
        if image.dim() != 4 or tuple(image.shape[1:]) != (self.in_channels, *self.image_size):
            raise ValueError(
                f"ImageCodec.encode expects [B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}], "
                f"got {tuple(image.shape)}"
            )
        z = self.encoder(image)  # [B, D, h, w]
        return z.flatten(2).transpose(1, 2)  # [B, h * w, D]

    def decode(self, z: Tensor) -> Tensor:
        """z [B, h * w, D] (row-major) -> image [B, C, H, W], unbounded."""
        h, w = self.grid_size
        if z.dim() != 3 or tuple(z.shape[1:]) != (h * w, self.code_dim):
            raise ValueError(f"ImageCodec.decode expects [B, {h * w}, {self.code_dim}], got {tuple(z.shape)}")
        grid = z.transpose(1, 2).reshape(z.shape[0], self.code_dim, h, w)  # [B, D, h, w]
        return self.decoder(grid)

    def forward(self, image: Tensor) -> Tensor:
        """Autoencode without quantisation: image [B, C, H, W] -> [B, C, H, W]."""
        return self.decode(self.encode(image))
