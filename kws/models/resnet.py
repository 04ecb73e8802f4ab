"""2D residual CNN over the log-mel front end: waveform in, logits out.

A stem convolution, then 4 stages of [residual block of Conv + BatchNorm + ReLU, pooling], global
average pooling, dropout and a linear layer, as in Tang & Lin's res8/res15 and timm's ResNets.
"""

from __future__ import annotations

import torch
from torch import nn

from kws.config import FeatureConfig
from kws.features import FrontEnd


class ResidualBlock(nn.Module):
    """Two Conv + BatchNorm layers (kernel 3) with a skip connection (1x1 projection when channels change).

    `dims` is 2 for (batch, channels, frequency, time) maps and 1 for (batch, channels, time).
    """

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2) -> None:
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(conv(in_channels, out_channels, 1, bias=False), norm(out_channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.skip(x))


def residual_stages(in_channels: int, widths: tuple[int, ...], pools: tuple, dims: int = 2) -> nn.Sequential:
    """One stage per width: a `ResidualBlock` then max pooling by that stage's `pools` entry (none at 1)."""
    pool_layer = nn.MaxPool2d if dims == 2 else nn.MaxPool1d
    stages = []
    for stage_in, stage_out, pool in zip((in_channels, *widths[:-1]), widths, pools):
        pooled = any(size > 1 for size in (pool if isinstance(pool, tuple) else (pool,)))
        pooling = pool_layer(pool, ceil_mode=True) if pooled else nn.Identity()
        stages.append(nn.Sequential(ResidualBlock(stage_in, stage_out, dims), pooling))
    return nn.Sequential(*stages)


class KeywordResNet(nn.Module):
    """(batch, samples) waveform -> (batch, num_classes) logits, through the model's own front end.

    `widths` are the channels of the 4 stages; `pools` the (frequency, time) pooling after each.
    The input BatchNorm learns the level and spread of the dB features, so raw log-mel works.
    """

    def __init__(
        self,
        num_classes: int,
        features: FeatureConfig,
        widths: tuple[int, ...] = (16, 24, 32, 48),
        stem_pool: tuple[int, int] = (1, 1),
        pools: tuple[tuple[int, int], ...] = ((2, 2), (2, 2), (2, 2), (1, 1)),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.front_end = FrontEnd(features)
        self.input_norm = nn.BatchNorm2d(1)
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.AvgPool2d(stem_pool) if tuple(stem_pool) != (1, 1) else nn.Identity(),
        )
        self.stages = residual_stages(widths[0], widths, tuple(tuple(pool) for pool in pools))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.classify(self.front_end(waveform))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, n_features, frames) -> (batch, num_classes) logits."""
        x = self.input_norm(features.unsqueeze(1))
        x = self.stages(self.stem(x))
        return self.head(self.dropout(x.mean(dim=(2, 3))))
