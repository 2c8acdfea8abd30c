"""Conditional noise predictors ``f(x_t, t, cond)`` that a HyperNetwork generates weights for.

Both backbones take the same call signature so the sampler and the losses do not care which one runs:
``x_t [B, C, *spatial]``, ``t [B]`` (integer timesteps), ``cond [B, C_cond, *spatial]`` -> ``[B, C, *spatial]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import nn

__all__ = ["ConditionalUNet", "ConditionalMLP", "noise_level", "timestep_embedding"]

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]) / math.sqrt(20.0)  # unit noise gain
_MAD_TO_STD = 1.4826  # median absolute deviation of a Gaussian, in standard deviations


def noise_level(images: torch.Tensor) -> torch.Tensor:
    """Robust noise standard deviation of each image and channel, ``[B, C, H, W]`` -> ``[B, C]`` (image units).

    The median absolute value of a Laplacian residual, scaled to a Gaussian std: anatomy edges occupy few pixels,
    so the median follows the noise and the streaks of the measurement, not the structure.
    """
    b, c = images.shape[:2]
    kernel = _LAPLACIAN.to(images.device)[None, None]
    residual = F.conv2d(images.float().reshape(b * c, 1, *images.shape[2:]), kernel)
    return _MAD_TO_STD * residual.abs().flatten(1).median(dim=1).values.view(b, c)


class ConditionalUNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` (2D) conditioned by concatenating ``cond`` to ``x_t`` along channels.

    Args:
        channels: feature maps per level, e.g. ``(32, 64, 64)``.
        attention_levels: self-attention per level (same length as ``channels``).
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        num_head_channels: channels per attention head.
        use_flash_attention: attention through ``torch.nn.functional.scaled_dot_product_attention``, which does
            not hold the ``tokens x tokens`` matrix (needed at native resolution: 128 x 128 tokens at 512 x 512).
        image_channels: channels of ``x_t`` (and of the prediction).
        cond_channels: channels of ``cond``.
        noise_level_input: also give the network, as one constant plane per ``cond`` channel, the log of that
            channel's :func:`noise_level`: the measurement noise (photon count, k-space noise) as an explicit input,
            so the spread of the draws (AU) can follow it.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        num_head_channels: int = 32,
        use_flash_attention: bool = False,
        image_channels: int = 1,
        cond_channels: int = 1,
        noise_level_input: bool = False,
    ) -> None:
        super().__init__()
        self.noise_level_input = noise_level_input
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=image_channels + cond_channels * (2 if noise_level_input else 1),
            out_channels=image_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            use_flash_attention=use_flash_attention,
        )
        self.factor = 2 ** (len(channels) - 1)  # the U-Net halves the image once per level after the first

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if any(size % self.factor for size in x_t.shape[2:]):
            size = x_t.shape[-1]
            fits = sorted({max(self.factor, size // self.factor * self.factor), -(-size // self.factor) * self.factor})
            raise ValueError(f"image size {tuple(x_t.shape[2:])} does not divide by {self.factor}: a U-Net with "
                             f"{len(self.unet.block_out_channels)} levels (model#channels) halves it "
                             f"{self.factor.bit_length() - 1} times; set data#img_size to a multiple of "
                             f"{self.factor}, e.g. {' or '.join(map(str, fits))}")
        inputs = [x_t, cond]
        if self.noise_level_input:
            level = torch.log(noise_level(cond).clamp_min(1e-6)).to(cond.dtype)  # [B, C_cond]
            inputs.append(level[..., None, None].expand_as(cond))
        return self.unet(torch.cat(inputs, dim=1), t)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t [B]`` -> ``[B, dim]`` (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ConditionalMLP(nn.Module):
    """Small MLP denoiser for vector data (the 1-D toy): ``x_t [B, D]``, ``t [B]``, ``cond [B, D_cond]``.

    Args:
        data_dim: size of ``x_t`` (and of the prediction).
        cond_dim: size of ``cond``.
        hidden: width of each hidden layer.
        depth: number of hidden layers.
        time_dim: size of the sinusoidal timestep embedding.
    """

    def __init__(self, data_dim: int = 1, cond_dim: int = 1, hidden: int = 128, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.time_dim = time_dim
        layers: list[nn.Module] = []
        width = data_dim + cond_dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, data_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, cond, timestep_embedding(t, self.time_dim)], dim=1))
