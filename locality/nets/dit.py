"""Diffusion Transformer (DiT) for eps-prediction on small images.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv 2212.09748):

- patchify: non-overlapping ``p x p`` patches -> linear embedding of width ``hidden`` plus fixed
  2-D sine-cosine position embeddings (sec. 3.2, "Patchify");
- conditioning ``c`` = MLP(sinusoidal(t)) (unconditional here: no class embedding);
- ``depth`` adaLN-Zero blocks (sec. 3.2, "adaLN-Zero block"): from ``c`` a zero-initialised
  Dense regresses ``(shift, scale, gate)`` for the attention and the MLP branch,
  ``x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)``,
  ``x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)``, LN without affine parameters;
- final layer: adaLN modulation + zero-initialised linear to ``p * p * C``; unpatchify.

Sizes (``SIZES``): ``tiny`` (hidden 128, depth 4, 4 heads), ``mini`` (256, 6, 4),
``small`` (384, 12, 6; DiT-S). Same call interface as :class:`locality.nets.unet.UNet`:
``model.apply(params, x [B, H, W, C], t [B], train=bool, rngs=...) -> eps [B, H, W, C]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from locality.nets.unet import label_embedding, timestep_embedding

SIZES = {
    "tiny": dict(hidden=128, depth=4, num_heads=4),
    "mini": dict(hidden=256, depth=6, num_heads=4),
    "small": dict(hidden=384, depth=12, num_heads=6),
}

_xavier = nn.initializers.xavier_uniform()


def sincos_pos_embed_2d(dim: int, gh: int, gw: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding (MAE / DiT): half the width encodes the row,
    half the column, each as ``concat(sin(pos w), cos(pos w))`` with ``w_i = 10000^(-i/(d/4))``.

    Returns float32 [gh * gw, dim] in row-major token order.
    """
    if dim % 4:
        raise ValueError(f"DiT hidden width must be divisible by 4, got {dim}")

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(
        np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij"
    )
    emb = np.concatenate([one_d(dim // 2, rows), one_d(dim // 2, cols)], axis=1)
    return emb.astype(np.float32)


def modulate(x, shift, scale):
    """adaLN: ``x * (1 + scale) + shift`` with per-sample shift/scale broadcast over tokens."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (Peebles & Xie 2023, fig. 3)."""

    hidden: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, c, train: bool):
        mod = nn.Dense(6 * self.hidden, kernel_init=nn.initializers.zeros, name="adaLN_modulation")(
            nn.silu(c)
        )
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = jnp.split(mod, 6, axis=-1)
        ln = lambda name: nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, name=name)
        h = modulate(ln("norm1")(x), sh_msa, sc_msa)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, kernel_init=_xavier, deterministic=True, name="attn"
        )(h, h)
        x = x + g_msa[:, None, :] * h
        h = modulate(ln("norm2")(x), sh_mlp, sc_mlp)
        h = nn.Dense(int(self.hidden * self.mlp_ratio), kernel_init=_xavier, name="mlp_fc1")(h)
        h = nn.gelu(h, approximate=True)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Dense(self.hidden, kernel_init=_xavier, name="mlp_fc2")(h)
        return x + g_mlp[:, None, :] * h


class DiT(nn.Module):
    """DiT predicting eps (unconditional, or class-conditional with ``num_classes``); see the
    module docstring.

    Attributes:
      patch_size: ``p``; image height and width must be divisible by it.
      hidden, depth, num_heads: transformer size (see ``SIZES``).
      mlp_ratio: MLP width / hidden.
      dropout: dropout inside the MLP, only with ``train=True``.
      out_ch: output channels; ``None`` means the input's channel count.
      num_classes: 0 (unconditional) or the number of class labels: a zero-initialised label
        embedding (one extra row for "no label") is added to the timestep conditioning, as the
        class embedding of Peebles & Xie 2023, sec. 3.2 (see :func:`unet.label_embedding`).
    """

    patch_size: int = 2
    hidden: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    out_ch: int | None = None
    num_classes: int = 0

    @nn.compact
    def __call__(self, x, t, train: bool = False, y=None):
        """x: [B, H, W, C] float32; t: [B] float timesteps in [0, 1000); y: [B] int labels or
        ``None`` (conditional nets only) -> eps_hat [B, H, W, C]."""
        if x.ndim != 4:
            raise ValueError(f"DiT expects x of shape [B, H, W, C], got {x.shape}")
        b, height, width, c_in = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size={p}")
        gh, gw = height // p, width // p
        out_ch = self.out_ch or c_in
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))

        # Patchify: [B, H, W, C] -> [B, gh*gw, p*p*C] (row-major patches) -> linear embedding.
        tokens = x.reshape(b, gh, p, gw, p, c_in).transpose(0, 1, 3, 2, 4, 5)
        tokens = tokens.reshape(b, gh * gw, p * p * c_in)
        h = nn.Dense(self.hidden, kernel_init=_xavier, name="patch_embed")(tokens)
        h = h + jnp.asarray(sincos_pos_embed_2d(self.hidden, gh, gw))[None]

        c = timestep_embedding(t, 256)
        c = nn.Dense(self.hidden, kernel_init=nn.initializers.normal(0.02), name="t_mlp0")(c)
        c = nn.Dense(self.hidden, kernel_init=nn.initializers.normal(0.02), name="t_mlp1")(
            nn.silu(c)
        )
        c = c + label_embedding(self.num_classes, self.hidden, y, b)

        for i in range(self.depth):
            h = DiTBlock(
                self.hidden, self.num_heads, self.mlp_ratio, self.dropout, name=f"block_{i}"
            )(h, c, train)

        shift, scale = jnp.split(
            nn.Dense(2 * self.hidden, kernel_init=nn.initializers.zeros, name="final_adaLN")(
                nn.silu(c)
            ),
            2,
            axis=-1,
        )
        h = modulate(
            nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, name="final_norm")(h),
            shift,
            scale,
        )
        h = nn.Dense(p * p * out_ch, kernel_init=nn.initializers.zeros, name="final_linear")(h)

        # Unpatchify: [B, gh*gw, p*p*C] -> [B, H, W, C].
        h = h.reshape(b, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, out_ch)
