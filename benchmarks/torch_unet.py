"""PyTorch (CPU) port of the project's UNet, used only as a speed reference for a training step.

A layer-for-layer port of ``locality/nets/unet.py`` (the DDPM eps-prediction UNet; Ho, Jain &
Abbeel 2020, appendix B): the same widths ``ch * ch_mult[l]``, GroupNorm with the same
``num_groups`` (eps 1e-6, affine), the same ResBlocks (GroupNorm - SiLU - conv3x3, plus
Linear(SiLU(temb)) broadcast over space, GroupNorm - SiLU - Dropout - conv3x3, a 1x1 shortcut
when the widths differ), single-head self-attention (q, k, v, output projection as dense maps)
in the middle block and after ResBlocks at the ``attn_resolutions``, a stride-2 conv3x3
downsample after every level but the last, an up path of ``num_res_blocks + 1`` ResBlocks per
level on ``concat(h, skip)`` with nearest x2 + conv3x3 upsampling (cropped back to the skip's
size for odd sizes), and the tail GroupNorm - SiLU - conv3x3. The time embedding is the same
sinusoidal embedding of width ``ch`` -> Linear(4 ch) -> SiLU -> Linear(4 ch). Initialisation
follows the Flax net (Xavier-uniform, zero biases, gain 1e-5 on the output layers), so the
parameter count is identical (checked in ``tests/test_torch_unet.py``); the weights themselves
are of course not the same draws.

It exists only to time the same training step as ``benchmarks/train_step.py`` does in JAX
(``--torch``): a DDPM eps-MSE loss at ``t ~ U{0..999}`` of the linear beta schedule, backward,
global grad-norm clipping at 1.0, AdamW (constant lr 2e-4, no weight decay), and an EMA update
(decay 0.999) of a parameter copy; the learning-rate warmup and EMA decay value of the JAX step do
not change its cost. It runs eagerly (no ``torch.compile``) with torch's default intra-op thread
count unless ``num_threads`` is given (see :func:`time_step`). It is never imported by the
``locality`` package, and torch is only an optional extra (``pip install '.[torch-bench]'``).

Memory format: the Flax net is channels-last (``[B, H, W, C]``, XLA's preferred CPU layout);
PyTorch tensors are logically ``[B, C, H, W]`` and by default stored channels-first
(``torch.contiguous_format``). :func:`time_step` takes ``memory_format`` (``"channels_last"``,
the default, stores the same logical tensors as NHWC, which oneDNN's CPU convolutions prefer, or
``"channels_first"``) and records which one a timing used.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Mapping

# Keys of a UNet model config (``locality.nets.build_model``) and the values this port handles.
_UNET_KEYS = (
    "arch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "mid_attn",
    "dropout",
    "num_groups",
    "padding",
    "use_norm",
    "out_ch",
    "num_classes",
)
_PADDING_MODES = {"zeros": "zeros", "circular": "circular"}
MEMORY_FORMATS = ("channels_last", "channels_first")


def unsupported(model_config: Mapping[str, Any]) -> str | None:
    """Why this port cannot build ``model_config`` (``None`` if it can)."""
    cfg = dict(model_config)
    if cfg.get("arch") != "unet":
        return f"arch {cfg.get('arch')!r} is not 'unet' (the torch port covers the UNet only)"
    unknown = sorted(set(cfg) - set(_UNET_KEYS))
    if unknown:
        return f"unknown UNet option(s) {unknown}"
    if cfg.get("num_classes", 0):
        return (
            f"num_classes={cfg['num_classes']} (class conditioning) is not ported; "
            "only unconditional nets (num_classes=0)"
        )
    if cfg.get("padding", "zeros") not in _PADDING_MODES:
        return f"padding {cfg.get('padding')!r} is not one of {sorted(_PADDING_MODES)}"
    return None


def _defaults(model_config: Mapping[str, Any]) -> dict:
    """The config with the Flax ``UNet`` defaults filled in."""
    d = dict(
        ch=64,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(),
        mid_attn=True,
        dropout=0.15,
        num_groups=32,
        padding="zeros",
        use_norm=True,
        out_ch=None,
        num_classes=0,
    )
    d.update({k: v for k, v in model_config.items() if k != "arch"})
    d["ch_mult"] = tuple(d["ch_mult"])
    d["attn_resolutions"] = tuple(d["attn_resolutions"])
    return d


def _modules():
    """The torch module classes (defined lazily so that importing this file needs no torch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def xavier_(weight, gain=1.0):
        nn.init.xavier_uniform_(weight, gain=gain)

    def conv3x3(cin, cout, stride=1, padding="zeros", gain=1.0):
        c = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, padding_mode=_PADDING_MODES[padding])
        xavier_(c.weight, gain)
        nn.init.zeros_(c.bias)
        return c

    def linear(cin, cout, gain=1.0):
        lin = nn.Linear(cin, cout)
        xavier_(lin.weight, gain)
        nn.init.zeros_(lin.bias)
        return lin

    def norm(c, num_groups, use_norm):
        if not use_norm:
            return nn.Identity()
        if c % num_groups:
            raise ValueError(
                f"GroupNorm: {c} channels are not divisible by num_groups={num_groups}"
            )
        return nn.GroupNorm(num_groups, c, eps=1e-6)

    class ResBlock(nn.Module):
        def __init__(self, cin, cout, temb_ch, dropout, num_groups, use_norm, padding):
            super().__init__()
            self.norm0 = norm(cin, num_groups, use_norm)
            self.conv0 = conv3x3(cin, cout, padding=padding)
            self.temb_proj = linear(temb_ch, cout)
            self.norm1 = norm(cout, num_groups, use_norm)
            self.dropout = nn.Dropout(dropout)
            self.conv1 = conv3x3(cout, cout, padding=padding, gain=1e-5)
            self.shortcut = None
            if cin != cout:
                self.shortcut = nn.Conv2d(cin, cout, 1)
                xavier_(self.shortcut.weight)
                nn.init.zeros_(self.shortcut.bias)

        def forward(self, x, temb):
            h = self.conv0(F.silu(self.norm0(x)))
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
            h = self.conv1(self.dropout(F.silu(self.norm1(h))))
            if self.shortcut is not None:
                x = self.shortcut(x)
            return x + h

    class AttnBlock(nn.Module):
        def __init__(self, c, num_groups, use_norm):
            super().__init__()
            self.norm = norm(c, num_groups, use_norm)
            self.q, self.k, self.v = linear(c, c), linear(c, c), linear(c, c)
            self.proj_out = linear(c, c, gain=1e-5)

        def forward(self, x):
            b, c, hh, ww = x.shape
            h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
            # softmax(q k^T / sqrt(C)) v: the default scale of scaled_dot_product_attention
            h = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))
            h = self.proj_out(h).transpose(1, 2).reshape(b, c, hh, ww)
            return x + h

    class UNet(nn.Module):
        """x [B, C, H, W] float32, t [B] float timesteps -> eps_hat [B, C_out, H, W]."""

        def __init__(self, cfg: dict, image_shape):
            super().__init__()
            hw, _, in_ch = image_shape
            ch, mult = cfg["ch"], cfg["ch_mult"]
            self.ch = ch
            gn = dict(num_groups=cfg["num_groups"], use_norm=cfg["use_norm"])
            res = dict(temb_ch=4 * ch, dropout=cfg["dropout"], padding=cfg["padding"], **gn)

            def attn_at(size, c):
                # as in Flax: attention after a ResBlock whose output height is listed
                return AttnBlock(c, **gn) if size in cfg["attn_resolutions"] else None

            self.temb_dense0 = linear(ch, 4 * ch)
            self.temb_dense1 = linear(4 * ch, 4 * ch)
            self.head = conv3x3(in_ch, ch, padding=cfg["padding"])
            levels = len(mult)
            # Down path; ``skip_ch`` mirrors the Flax ``skips`` stack (widths only).
            self.down_blocks = nn.ModuleList()
            self.down_attn = nn.ModuleList()
            self.down_sample = nn.ModuleList()
            skip_ch, c, sizes = [ch], ch, [hw]
            for level in range(levels):
                blocks, attns = nn.ModuleList(), nn.ModuleList()
                for _ in range(cfg["num_res_blocks"]):
                    blocks.append(ResBlock(c, ch * mult[level], **res))
                    c = ch * mult[level]
                    attns.append(attn_at(hw, c) or nn.Identity())
                    skip_ch.append(c)
                self.down_blocks.append(blocks)
                self.down_attn.append(attns)
                if level != levels - 1:
                    self.down_sample.append(conv3x3(c, c, stride=2, padding=cfg["padding"]))
                    skip_ch.append(c)
                    hw = (hw - 1) // 2 + 1  # stride-2 conv with one pixel of padding
                    sizes.append(hw)
            self.mid0 = ResBlock(c, c, **res)
            self.mid_attn = AttnBlock(c, **gn) if cfg["mid_attn"] else nn.Identity()
            self.mid1 = ResBlock(c, c, **res)
            # Up path, in the order it runs (levels reversed).
            self.up_blocks = nn.ModuleList()
            self.up_attn = nn.ModuleList()
            self.up_sample = nn.ModuleList()
            for level in reversed(range(levels)):
                blocks, attns = nn.ModuleList(), nn.ModuleList()
                for _ in range(cfg["num_res_blocks"] + 1):
                    blocks.append(ResBlock(c + skip_ch.pop(), ch * mult[level], **res))
                    c = ch * mult[level]
                    attns.append(attn_at(sizes[level], c) or nn.Identity())
                self.up_blocks.append(blocks)
                self.up_attn.append(attns)
                if level != 0:
                    self.up_sample.append(conv3x3(c, c, padding=cfg["padding"]))
            assert not skip_ch
            self.tail_norm = norm(c, **gn)
            self.tail = conv3x3(c, cfg["out_ch"] or in_ch, padding=cfg["padding"], gain=1e-5)

        def forward(self, x, t):
            t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
            half = self.ch // 2
            freqs = torch.exp(
                torch.arange(half, dtype=torch.float32, device=x.device)
                * -(math.log(10000.0) / (half - 1))
            )
            args = t[:, None] * freqs[None, :]
            temb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
            if self.ch % 2:
                temb = F.pad(temb, (0, 1))
            temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))

            h = self.head(x)
            skips = [h]
            levels = len(self.down_blocks)
            for level in range(levels):
                for block, attn in zip(self.down_blocks[level], self.down_attn[level]):
                    h = attn(block(h, temb))
                    skips.append(h)
                if level != levels - 1:
                    h = self.down_sample[level](h)
                    skips.append(h)
            h = self.mid1(self.mid_attn(self.mid0(h, temb)), temb)
            for i in range(levels):
                for block, attn in zip(self.up_blocks[i], self.up_attn[i]):
                    h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
                if i != levels - 1:
                    sh, sw = skips[-1].shape[2:]
                    # nearest x2; odd sizes (25 -> 13 -> 26) are cropped back to the skip's size
                    h = F.interpolate(h, scale_factor=2, mode="nearest")[:, :, :sh, :sw]
                    h = self.up_sample[i](h)
            assert not skips
            return self.tail(F.silu(self.tail_norm(h)))

    return UNet


def build(model_config: Mapping[str, Any], image_shape=(28, 28, 1)):
    """The torch UNet for a ``locality.nets.build_model`` UNet config and images of shape
    ``image_shape`` = (H, W, C) (the size fixes where ``attn_resolutions`` attention sits, as the
    Flax net decides it at trace time; the net takes ``[B, C, H, W]``).

    Raises ``ValueError`` naming what this port does not support (another arch, unknown keys,
    ``num_classes > 0``, an unknown padding).
    """
    why = unsupported(model_config)
    if why:
        raise ValueError(f"torch_unet cannot build this config: {why}")
    return _modules()(_defaults(model_config), tuple(image_shape))


def count_params(module) -> int:
    """Number of scalars in ``module``'s parameters."""
    return int(sum(p.numel() for p in module.parameters()))


def time_step(
    model_config: Mapping[str, Any],
    batch_size: int,
    repeats: int,
    repeat_s: float,
    image_shape=(28, 28, 1),
    memory_format: str = "channels_last",
    num_threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Time one eager PyTorch training step of the UNet on the CPU (see the module docstring).

    Same protocol as ``bench()`` in ``benchmarks/train_step.py``: one warm step, whose time sizes
    the number of steps per repeat (about ``repeat_s`` seconds each), then the median over
    ``repeats``. Returns the keys of ``bench()`` (less the compile time, there is none) plus
    ``torch_version``, ``torch_num_threads`` and ``memory_format``.

    ``num_threads``: torch's intra-op threads for this timing (restored afterwards); ``None``
    keeps torch's default (one per physical core). On a machine where other processes hold some
    of the cores, torch's OpenMP threads wait on each other at every parallel region and a step
    can take several times longer than with fewer threads; the count used is recorded.
    """
    import torch

    if num_threads is None:
        return _time_step(
            model_config, batch_size, repeats, repeat_s, image_shape, memory_format, seed
        )
    saved = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _time_step(
            model_config, batch_size, repeats, repeat_s, image_shape, memory_format, seed
        )
    finally:
        torch.set_num_threads(saved)


def _time_step(model_config, batch_size, repeats, repeat_s, image_shape, memory_format, seed):
    import torch

    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    torch.manual_seed(seed)
    h, w, c = image_shape
    net = build(model_config, image_shape).to(memory_format=fmt)
    net.train()
    params = [p for p in net.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).to(torch.float32)
    x0 = (torch.rand(batch_size, c, h, w) * 2 - 1).contiguous(memory_format=fmt)
    ema_decay = 0.999

    def step():
        t = torch.randint(0, 1000, (batch_size,))
        eps = torch.randn_like(x0)
        ab = alphas_cumprod[t][:, None, None, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        loss = torch.mean((net(xt, t.to(torch.float32)) - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay)
        return loss

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()  # one warm step, also sizes the repeats
    n = max(1, int(round(repeat_s / (time.perf_counter() - t0))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            loss = step()
        loss.item()
        times.append((time.perf_counter() - t0) / n)
    med = statistics.median(times)
    return {
        "model": dict(model_config),
        "num_params": count_params(net),
        "batch_size": batch_size,
        "steps_per_repeat": n,
        "first_step_s": first,
        "step_s_median": med,
        "step_s_all": times,
        "steps_per_s": 1.0 / med,
        "images_per_s": batch_size / med,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "memory_format": memory_format,
    }


def run(
    configs: Mapping[str, Mapping[str, Any]],
    names,
    batch_sizes,
    repeats: int,
    repeat_s: float,
    num_threads: int | None = None,
) -> dict:
    """Time every (name, batch size) with :func:`time_step`, or say why torch is unavailable.

    Names whose config this port cannot build (not a UNet, conditional, ...) get a
    ``{"name": n, "skipped": why}`` entry instead.
    """
    try:
        import torch
    except ImportError as e:
        return {"available": False, "why": f"{e}; install with pip install '.[torch-bench]'"}
    results = []
    for name in names:
        why = unsupported(configs[name])
        if why:
            results.append({"name": name, "skipped": why})
            print(f"torch    {name:8s} skipped: {why}", flush=True)
            continue
        for b in batch_sizes:
            r = {
                "name": name,
                **time_step(configs[name], b, repeats, repeat_s, num_threads=num_threads),
            }
            results.append(r)
            print(
                f"torch    {name:8s} b{b:<4d} params {r['num_params']:>10,d}  step "
                f"{r['step_s_median'] * 1e3:.0f} ms  {r['images_per_s']:.1f} img/s "
                f"({r['torch_num_threads']} threads, {r['memory_format']})",
                flush=True,
            )
    return {"available": True, "torch": torch.__version__, "results": results}
