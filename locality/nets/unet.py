"""The paper's DDPM-style eps-prediction UNet (docs/algorithms.md §11).

Architecture (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", appendix B;
the layout of their released ``diffusion_tf/models/unet.py``):

- sinusoidal timestep embedding of width ``ch`` (Vaswani et al. 2017, sec. 3.5, as in DDPM's
  ``get_timestep_embedding``) -> Dense(4 ch) -> swish -> Dense(4 ch);
- head conv3x3 to ``ch``;
- down path: per level ``l`` (width ``ch * ch_mult[l]``) ``num_res_blocks`` ResBlocks, each
  optionally followed by self-attention when the current resolution is in ``attn_resolutions``;
  a stride-2 conv3x3 downsample after every level except the last;
- middle: ResBlock, self-attention (optional), ResBlock;
- up path: per level (reversed) ``num_res_blocks + 1`` ResBlocks on ``concat(h, skip)``, then
  nearest-neighbour x2 + conv3x3 upsample except at the top level;
- tail GroupNorm - swish - conv3x3 to the image channels.

ResBlock: GroupNorm - swish - conv3x3, plus Dense(swish(temb)) broadcast over space,
GroupNorm - swish - Dropout - conv3x3, and a 1x1 shortcut when in/out widths differ.

Initialisation: Xavier-uniform (Glorot & Bengio 2010) weights, zero biases; the "output" layers
(second conv of each ResBlock, attention output projection, the tail conv) are initialised with
gain 1e-5, i.e. Xavier-uniform weights multiplied by 1e-5, so every residual branch starts near
identity and the network's initial output is near zero.

Class conditioning (optional, ``num_classes > 0``): a learned embedding of the label, with one
extra row for "no label" (index ``num_classes``), is added to the timestep embedding, as in the
class-conditional CIFAR/ImageNet networks of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs",
sec. 4) and classifier-free guidance (Ho & Salimans 2022). The table is initialised to zero, so a
conditional net whose other weights come from an unconditional one starts as exactly that net.

Options beyond the paper: ``padding="circular"`` (every 3x3 conv wraps around, which makes the
whole net equivariant to circular shifts by multiples of ``2 ** (len(ch_mult) - 1)``) and
``use_norm=False`` (no GroupNorm anywhere), the two variants of Kamb & Ganguli's networks.

Call: ``model.apply(params, x [B, H, W, C], t [B], train=bool, rngs={"dropout": key}, y=None)``
returns ``eps_hat [B, H, W, C]``; ``t`` is a float timestep in [0, 1000) (continuous allowed);
``y`` [B] int labels in ``[0, num_classes]`` (``num_classes`` = no label; ``None`` = no label for
all) and only for a conditional net.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PADDINGS = ("zeros", "circular")


def xavier_uniform(gain: float = 1.0):
    """Xavier/Glorot uniform with a torch-style ``gain`` on the standard deviation.

    ``U(-a, a)`` with ``a = gain * sqrt(6 / (fan_in + fan_out))``, fans including the receptive
    field (Glorot & Bengio 2010, eq. 16). Equivalent to variance scaling with scale ``gain**2``.
    """
    return nn.initializers.variance_scaling(gain * gain, "fan_avg", "uniform")


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps, DDPM's ``get_timestep_embedding``.

    ``freq_i = exp(-log(max_period) * i / (half - 1))``, ``i = 0..half-1``, output
    ``concat(sin(t freq), cos(t freq))`` (zero-padded if ``dim`` is odd).

    Args:
      t: [B] float timesteps.
      dim: embedding width.
    Returns:
      [B, dim] float32.
    """
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    if half < 2:
        raise ValueError(f"timestep embedding width must be >= 4, got {dim}")
    scale = math.log(max_period) / (half - 1)
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def label_embedding(num_classes: int, dim: int, y, batch: int):
    """Embedding [B, dim] of labels ``y`` for a net with ``num_classes`` classes (zero-initialised
    table of ``num_classes + 1`` rows, the last one meaning "no label"); ``y=None`` means no label
    for every image. For ``num_classes == 0`` (unconditional) it returns 0 and ``y`` must be
    ``None``."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes == 0:
        if y is not None:
            raise ValueError(
                "labels y were given to an unconditional network (num_classes=0); "
                "build it with num_classes > 0 or call it without y"
            )
        return 0.0
    if y is None:
        y = jnp.full((batch,), num_classes, jnp.int32)
    y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (batch,))
    return nn.Embed(num_classes + 1, dim, embedding_init=nn.initializers.zeros, name="label_embed")(
        y
    )


class Conv3x3(nn.Module):
    """3x3 convolution with explicit padding of one pixel on every side.

    ``padding="zeros"`` pads with zeros (PyTorch ``Conv2d(k=3, padding=1)`` semantics, also for
    stride 2: output size ``floor((H - 1) / 2) + 1``); ``"circular"`` wraps the image around.
    """

    features: int
    stride: int = 1
    padding: str = "zeros"
    gain: float = 1.0

    @nn.compact
    def __call__(self, x):
        mode = {"zeros": "constant", "circular": "wrap"}[self.padding]
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)
        return nn.Conv(
            self.features,
            (3, 3),
            strides=(self.stride, self.stride),
            padding="VALID",
            kernel_init=xavier_uniform(self.gain),
            bias_init=nn.initializers.zeros,
        )(x)


class Norm(nn.Module):
    """GroupNorm with ``num_groups`` groups (eps 1e-6, as DDPM), or identity if disabled."""

    num_groups: int = 32
    use_norm: bool = True

    @nn.compact
    def __call__(self, x):
        if not self.use_norm:
            return x
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(
                f"GroupNorm: {c} channels are not divisible by num_groups="
                f"{self.num_groups}; choose ch/num_groups so every width divides"
            )
        return nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-6)(x)


class ResBlock(nn.Module):
    """DDPM residual block (docs/algorithms.md §11)."""

    out_ch: int
    dropout: float = 0.0
    num_groups: int = 32
    use_norm: bool = True
    padding: str = "zeros"

    @nn.compact
    def __call__(self, x, temb, train: bool):
        in_ch = x.shape[-1]
        h = nn.swish(Norm(self.num_groups, self.use_norm)(x))
        h = Conv3x3(self.out_ch, padding=self.padding)(h)
        h = (
            h
            + nn.Dense(self.out_ch, kernel_init=xavier_uniform(), name="temb_proj")(nn.swish(temb))[
                :, None, None, :
            ]
        )
        h = nn.swish(Norm(self.num_groups, self.use_norm)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv3x3(self.out_ch, padding=self.padding, gain=1e-5)(h)
        if in_ch != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1), kernel_init=xavier_uniform(), name="shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (DDPM ``attn_block``).

    ``softmax(q k^T / sqrt(C)) v`` over all ``H*W`` positions; q, k, v and the output projection
    are 1x1 (dense) maps, the output projection initialised with gain 1e-5.
    """

    num_groups: int = 32
    use_norm: bool = True

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = Norm(self.num_groups, self.use_norm)(x)
        q = nn.Dense(c, kernel_init=xavier_uniform(), name="q")(h).reshape(b, hh * ww, c)
        k = nn.Dense(c, kernel_init=xavier_uniform(), name="k")(h).reshape(b, hh * ww, c)
        v = nn.Dense(c, kernel_init=xavier_uniform(), name="v")(h).reshape(b, hh * ww, c)
        w = jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5)
        w = jax.nn.softmax(w, axis=-1)
        h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
        h = nn.Dense(c, kernel_init=xavier_uniform(1e-5), name="proj_out")(h)
        return x + h


class UNet(nn.Module):
    """DDPM eps-prediction UNet (docs/algorithms.md §11); see the module docstring.

    Attributes:
      ch: base width. Paper: 64 at 28 px, 128 at 32/64 px.
      ch_mult: width multipliers per level. Paper: (1, 2, 2) at 28 px, (1, 2, 3, 4) at 32/64 px.
      num_res_blocks: ResBlocks per level on the down path (up path has one more).
      attn_resolutions: spatial sizes (height) after which ResBlocks get self-attention.
      mid_attn: self-attention between the two middle ResBlocks.
      dropout: dropout rate inside ResBlocks (paper 0.15), active only with ``train=True``.
      num_groups: GroupNorm groups (paper 32).
      padding: "zeros" or "circular".
      use_norm: GroupNorm on (paper) or off (Kamb & Ganguli).
      out_ch: output channels; ``None`` means the input's channel count.
      num_classes: 0 (unconditional, the paper) or the number of class labels (module docstring).
    """

    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    mid_attn: bool = True
    dropout: float = 0.15
    num_groups: int = 32
    padding: str = "zeros"
    use_norm: bool = True
    out_ch: int | None = None
    num_classes: int = 0

    @property
    def downsample_factor(self) -> int:
        """Total spatial downsampling ``2 ** (levels - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    @nn.compact
    def __call__(self, x, t, train: bool = False, y=None):
        """x: [B, H, W, C] float32; t: [B] (or scalar) float timesteps; y: [B] int labels or
        ``None`` (conditional nets only) -> eps_hat [B, H, W, C]."""
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape [B, H, W, C], got {x.shape}")
        b, height, width, c_in = x.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        out_ch = self.out_ch or c_in
        norm = dict(num_groups=self.num_groups, use_norm=self.use_norm)
        res = dict(dropout=self.dropout, padding=self.padding, **norm)

        temb = timestep_embedding(t, self.ch)
        temb = nn.Dense(4 * self.ch, kernel_init=xavier_uniform(), name="temb_dense0")(temb)
        temb = nn.Dense(4 * self.ch, kernel_init=xavier_uniform(), name="temb_dense1")(
            nn.swish(temb)
        )
        temb = temb + label_embedding(self.num_classes, 4 * self.ch, y, b)

        h = Conv3x3(self.ch, padding=self.padding, name="head")(x)
        skips = [h]
        levels = len(self.ch_mult)
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, **res)(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(**norm)(h)
                skips.append(h)
            if level != levels - 1:
                h = Conv3x3(h.shape[-1], stride=2, padding=self.padding, name=f"down_{level}")(h)
                skips.append(h)

        h = ResBlock(h.shape[-1], **res)(h, temb, train)
        if self.mid_attn:
            h = AttnBlock(**norm)(h)
        h = ResBlock(h.shape[-1], **res)(h, temb, train)

        for level in reversed(range(levels)):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.ch * self.ch_mult[level], **res)(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(**norm)(h)
            if level != 0:
                skip_hw = skips[-1].shape[1:3]
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
                # odd sizes (25 -> 13 -> 26): crop back to the skip's size
                h = h[:, : skip_hw[0], : skip_hw[1]]
                h = Conv3x3(h.shape[-1], padding=self.padding, name=f"up_{level}")(h)
        assert not skips

        h = nn.swish(Norm(**norm, name="tail_norm")(h))
        return Conv3x3(out_ch, padding=self.padding, gain=1e-5, name="tail")(h)
