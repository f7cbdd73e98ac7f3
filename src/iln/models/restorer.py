"""The frame HAT and SwinIR share: input encoding and padding, shallow convolution, patch
embedding, the residual groups (given by the network), final norm, long skip and the
reconstruction head (pixel shuffle for SR, a residual image at scale 1)."""

from __future__ import annotations

from torch import Tensor, nn

from iln.models import common
from iln.models.common import ForwardContext
from iln.models.norms import NormFactory


class PatchEmbed(nn.Module):
    """Image to tokens (patch size 1) followed by the patch-embed norm."""

    def __init__(self, dim: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.norm = norm_layer(dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, N, C)
        y, _ = self.norm(common.tokens(x))  # no residual here: the branch scale is unused
        return y


class WindowedRestorer(nn.Module):
    """conv_first -> patch embed -> groups -> final norm -> conv_after_body + long skip ->
    head, on an image padded (reflect) to a multiple of the window and cropped back.

    Heads: for ``scale`` 2, 3, 4 conv -> LeakyReLU -> pixel shuffle -> ``conv_last``; for
    ``scale`` 1 (restoration, SwinIR's denoising/JPEG design) ``conv_last`` maps the
    features to an ``in_chans``-channel residual added to the encoded input. The encoding
    (``InputNorm``) is affine, so the output is the input plus a residual in image space.
    ``in_chans`` is 3 (RGB) or 1 (greyscale: the official grey models, mean 0).
    Subclasses pass their groups as ``layers`` (each with its blocks under
    ``residual_group.blocks``: ``residual_groups`` / ``group_blocks`` expose them), run
    them in ``forward_layers`` and set
    ``drop_sites``, the number of stochastic-depth decisions per sample (two per block).
    """

    drop_sites: int

    def __init__(
        self,
        *,
        scale: int,
        embed_dim: int,
        window_size: int,
        stdnorm: bool,
        img_range: float,
        outer_norm_layer: NormFactory,
        layers: nn.ModuleList,
        fast: bool,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.in_chans = in_chans
        self.window_size = window_size
        self.embed_dim = embed_dim
        self.fast = fast
        self.input_norm = common.InputNorm(stdnorm, img_range, in_chans)
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, outer_norm_layer)
        self.layers = layers
        self.norm = outer_norm_layer(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        if scale == 1:  # restoration head: features -> residual image
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)
        else:  # super-resolution head: features -> pixel shuffle -> image
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, common.NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            self.upsample = common.upsample_layers(scale)
            self.conv_last = nn.Conv2d(common.NUM_FEAT, in_chans, 3, 1, 1)

    def residual_groups(self) -> nn.ModuleList:
        """The residual groups in forward order (``layers``): each maps tokens (B, N, C) to
        tokens, the points the probes, the precision monitor and the KL regulariser read."""
        return self.layers

    def group_blocks(self, group: int) -> nn.ModuleList:
        """The transformer blocks of residual group ``group`` (negative: from the end), in
        forward order; every block has ``attn.relative_position_bias_table``."""
        return self.layers[group].residual_group.blocks

    def forward_layers(self, t: Tensor, ctx: ForwardContext) -> Tensor:
        """Tokens (B, N, C) through every group."""
        raise NotImplementedError

    def forward_features(
        self, x: Tensor, drop_noise: Tensor | None = None, checkpoint: bool = False
    ) -> Tensor:
        """(B, C, H, W) with H, W multiples of the window -> (B, C, H, W)."""
        size = (x.shape[2], x.shape[3])
        ctx = common.window_context(
            size,
            self.window_size,
            device=x.device,
            dtype=x.dtype,
            drop_noise=drop_noise,
            checkpoint=checkpoint,
            fast=self.fast,
        )
        t = self.forward_layers(self.patch_embed(x), ctx)  # (B, N, C)
        t, _ = self.norm(t)
        return common.image(t, size, self.fast)

    def forward(
        self, x: Tensor, *, drop_noise: Tensor | None = None, checkpoint: bool = False
    ) -> Tensor:
        """x (B, in_chans, H, W) in [0, 1] -> (B, in_chans, s*H, s*W) (s = 1: input +
        residual), not clamped.

        ``drop_noise`` (B, ``self.drop_sites``) uniform in [0, 1) decides stochastic depth in
        training, a column per drop site (None: the global RNG); ``checkpoint`` recomputes
        each block's activations in the backward pass (less memory, same gradients)."""
        h, w = x.shape[2], x.shape[3]
        if drop_noise is not None and drop_noise.shape != (x.shape[0], self.drop_sites):
            raise ValueError(
                f"drop_noise: expected shape {(x.shape[0], self.drop_sites)}, "
                f"got {tuple(drop_noise.shape)}"
            )
        x = self.input_norm.encode(common.pad_to_multiple(x, self.window_size))
        f = self.conv_first(x)
        f = self.conv_after_body(self.forward_features(f, drop_noise, checkpoint)) + f
        if self.scale == 1:  # global residual in the encoded space: decode(x + r) = x + r'
            x = x + self.conv_last(f)
        else:
            x = self.conv_last(self.upsample(self.conv_before_upsample(f)))
        x = self.input_norm.decode(x)
        return x[:, :, : h * self.scale, : w * self.scale]
